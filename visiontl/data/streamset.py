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
    _states_before: dict[int, dict[str, Any]] | None = None

    def __iter__(self) -> Any:
        if self.restore and self._resumed_iteration_started:
            self.restore = False  # the resumed epoch was served: this is a new one
        self._resumed_iteration_started = bool(self.restore)
        return self._remembering(super().__iter__())

    def _remembering(self, batches: Any) -> Any:
        """Yield ``batches``, keeping the loader's state after each of the last few was served: the
        loader counts a batch as served once Lightning has fetched it, before it trains on it, and a
        checkpoint written between two batches must resume with the first one not trained
        (:meth:`state_before`)."""
        self._states_before = {}
        for served, batch in enumerate(batches, start=1):
            self._states_before[served] = self.state_dict()  # LitData counted this batch before yielding it
            self._states_before.pop(served - 4, None)
            yield batch

    def state_before(self, batches: int) -> dict[str, Any] | None:
        """The state as it was when ``batches`` (>= 1) batches of this epoch had been served; None
        when not remembered (an epoch's start: :class:`visiontl.train.resume.LastCheckpoint` then writes at
        the previous batch's end, where Lightning's own state is right)."""
        return (self._states_before or {}).get(batches) if batches > 0 else None

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        state = obj.get("dataset")
        here = getattr(self.dataset, "input_dir", None)
        if isinstance(state, dict) and here is not None and state.get("input_dir_url") == here.url:
            obj = {**obj, "dataset": {**state, "input_dir_path": here.path,
                                      "cache_dir_path": self.dataset.cache_dir.path}}
        self._resumed_iteration_started = False
        super().load_state_dict(obj)
