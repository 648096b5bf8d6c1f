"""What a datamodule offers the layers above it, as Protocols a type checker sees.

A task's link with its data (:mod:`visiontl.tasks.link`), feature caching, the run report and the
after-fit analyses ask a datamodule for these and for nothing else. They test which it offers with
``isinstance`` (the Protocols are runtime-checkable; a check reads the members, so it is made once a
datamodule is set up), never attribute by attribute.

The Protocols, and who offers them:

- ``Preprocessed``: every visiontl datamodule (:class:`~visiontl.data.base.ImageDataModule`);
- ``LabelledSplits``: the classification datamodules (folder, CSV, adaptation);
- ``LabelledData``: the classification datamodules and the streamed one;
- ``ServesFeatures``: the classification datamodules: cached features in place of images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from visiontl.data.preprocessing import Preprocessing

__all__ = ["LabelledData", "LabelledSplits", "Preprocessed", "ServesFeatures", "TaggedData"]


@runtime_checkable
class Preprocessed(Protocol):
    """Refines a backbone's input convention from its data and settings; is told the device its
    loaders feed; names its augmentation preset, its batch size (``None``: chosen at set-up) and
    the files it left out."""

    feeds: str
    augment: str
    batch_size: int | None
    skipped: list[tuple[Path, str]]

    def resolve_preprocessing(self, backbone: Preprocessing | None = None) -> Preprocessing: ...


@runtime_checkable
class LabelledSplits(Protocol):
    """Labelled images by split (``{split: [(path, class name), ...]}``), their files and frames,
    and the sets a run may name beside them (``retain``, ``unlabelled``)."""

    splits: dict[str, list[tuple[Path, str]]]
    retain: str | None
    unlabelled: str | None

    def paths(self, split: str) -> list[Path]: ...

    def frame_indices(self, split: str) -> list[int | None]: ...


@runtime_checkable
class LabelledData(Protocol):
    """Training images in all and per class, in label order (balanced class weights, the run's
    settings), and the data check's report (``None`` when none ran)."""

    train_size: int
    class_counts: list[int]
    data_report: Any


@runtime_checkable
class TaggedData(Protocol):
    """Says whether its images carry several tags each (multi-label) or one class
    (:mod:`visiontl.data.multilabel`); a datamodule without it has one class per image."""

    multilabel: bool


@runtime_checkable
class ServesFeatures(Protocol):
    """Serves a frozen backbone's cached features in place of images (:mod:`visiontl.models.features`)."""

    datasets: dict[str, Any]

    def feature_source(self, split: str, augmented: bool = False) -> Any: ...

    def full_feature_source(self, split: str) -> Any: ...

    def set_features(self, split: str, features: Any, labels: Any) -> None: ...
