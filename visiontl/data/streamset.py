"""LitData's ``StreamingDataset`` reading the samples of ``visiontl prepare-data`` as training items
(imported only where streaming is used: it needs the ``stream`` extra)."""

from __future__ import annotations

from typing import Any

from litdata import StreamingDataset

from visiontl.data.images import to_channels
from visiontl.data.sampling import sample_seed
from visiontl.data.streamcodec import decode_image

__all__ = ["StreamingImages"]


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
