"""LitData's ``StreamingDataset`` reading the samples of ``visiontl prepare-data`` as training items
(imported only where streaming is used: it needs the ``stream`` extra)."""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataLoader, StreamingDataset

from visiontl.data.images import to_channels
from visiontl.data.sampling import sample_seed
from visiontl.data.streamcodec import decode_image

__all__ = ["StreamingImages", "StreamingLoader"]


class StreamingImages(StreamingDataset):
    """Items ``{"image", "label", "index"}`` as :class:`~visiontl.data.datamodules.ImageDataset`
    gives them: the stored image decoded, converted to ``in_chans`` and transformed; with
    ``aug_seed``, the augmentation is seeded per (seed, epoch, image) as in a folder run."""

    def __init__(self, input_dir: str, *, transform: Any, in_chans: int, aug_seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(input_dir, **kwargs)
        self.image_transform, self.in_chans, self.aug_seed = transform, int(in_chans), aug_seed

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if isinstance(item, list):  # a slice
            return [self._item(i) for i in item]
        return self._item(item)

    def _item(self, item: dict[str, Any]) -> dict[str, Any]:
        index = int(item["index"])
        image = to_channels(decode_image(item["image"], item["codec"]), self.in_chans, f"sample {index}")
        if self.aug_seed is not None:
            self.image_transform.set_random_seed(sample_seed(self.aug_seed, int(self.current_epoch), index))
        return {"image": self.image_transform(image=image)["image"], "label": int(item["label"]), "index": index}


class StreamingLoader(StreamingDataLoader):
    """LitData's loader, resumable through Lightning's checkpoints (its state rides in the fit loop's).

    Two fixes on top of it:

    - a resumed epoch's rest is served once. LitData keeps ``restore`` set until an iteration runs
      to its end, but Lightning leaves an epoch as soon as it has its batches, so the next epoch
      would replay the resumed one's rest (a batch trained twice, every later batch one step late);
    - the shard cache may live elsewhere on resume (another machine, another ``cache_dir``): the
      state's cache path is the current one when the data (its URL) is the same, where LitData
      refuses it.
    """

    _resumed_iteration_started = False

    def __iter__(self) -> Any:
        if self.restore and self._resumed_iteration_started:
            self.restore = False  # the resumed epoch was served: this is a new one
        self._resumed_iteration_started = bool(self.restore)
        return super().__iter__()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        state = obj.get("dataset")
        here = getattr(self.dataset, "input_dir", None)
        if isinstance(state, dict) and here is not None and state.get("input_dir_url") == here.url:
            obj = {**obj, "dataset": {**state, "input_dir_path": here.path,
                                      "cache_dir_path": self.dataset.cache_dir.path}}
        self._resumed_iteration_started = False
        super().load_state_dict(obj)
