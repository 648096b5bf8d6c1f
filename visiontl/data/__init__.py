"""Data: image reading, augmentation presets, datamodules and built-in datasets.

Imported lazily: ``visiontl.data.images`` (numpy + PIL) is usable without torch.
"""

from __future__ import annotations

from visiontl.core.lazy import lazy_exports

_EXPORTS = {
    "ClassificationDataModule": "visiontl.data.datamodules",
    "CsvDataModule": "visiontl.data.datamodules",
    "FeatureDataset": "visiontl.data.datamodules",
    "FolderDataModule": "visiontl.data.datamodules",
    "ImageDataset": "visiontl.data.datamodules",
    "auto_batch_size": "visiontl.data.datamodules",
    "index_folder": "visiontl.data.layout",
    "stratified_split": "visiontl.data.datamodules",
    "auto_workers": "visiontl.data.datamodules",
    "AdaptationData": "visiontl.data.adaptation",
    "AdaptationDataModule": "visiontl.data.adaptation",
    "CsvAdaptationDataModule": "visiontl.data.adaptation",
    "BlueMarbleAdaptationDataModule": "visiontl.data.adaptation",
    "UnlabelledDataModule": "visiontl.data.unlabelled",
    "BlueMarbleUnlabelledDataModule": "visiontl.data.unlabelled",
    "EuroSATDataModule": "visiontl.data.public",
    "MedMNISTDataModule": "visiontl.data.public",
    "StreamingDataModule": "visiontl.data.streaming",
    "prepare_data": "visiontl.data.streaming",
    "channel_stats": "visiontl.data.stats",
    "read_raw": "visiontl.data.images",
    "BlueMarbleDataModule": "visiontl.data.bluemarble",
    "build_tiles": "visiontl.data.bluemarble",
    "DataError": "visiontl.data.images",
    "ImageReadError": "visiontl.data.images",
    "read_image": "visiontl.data.images",
    "scan_images": "visiontl.data.images",
    "to_channels": "visiontl.data.images",
    "PRESETS": "visiontl.data.transforms",
    "build_transforms": "visiontl.data.transforms",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("visiontl.data", globals(), _EXPORTS)
