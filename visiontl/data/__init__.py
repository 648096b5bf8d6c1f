"""Data: image reading, augmentation presets, datamodules and built-in datasets."""

from visiontl.data.datamodules import (
    ClassificationDataModule,
    CsvDataModule,
    FolderDataModule,
    ImageDataset,
    auto_batch_size,
    index_folder,
    stratified_split,
)
from visiontl.data.bluemarble import BlueMarbleDataModule, build_tiles
from visiontl.data.images import DataError, ImageReadError, read_image, scan_images, to_channels
from visiontl.data.transforms import PRESETS, build_transforms

__all__ = [
    "PRESETS",
    "BlueMarbleDataModule",
    "build_tiles",
    "ClassificationDataModule",
    "CsvDataModule",
    "DataError",
    "FolderDataModule",
    "ImageDataset",
    "ImageReadError",
    "auto_batch_size",
    "build_transforms",
    "index_folder",
    "read_image",
    "scan_images",
    "stratified_split",
    "to_channels",
]
