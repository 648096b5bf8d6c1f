"""Lightning datamodules for labelled images: a class-per-folder tree or a CSV of (path, label).

Sizes are chosen from the data: the batch size follows the number of training images, the last
batch is never a lone image and a loader never has zero batches (:func:`visiontl.data.base.drop_last_batch`).
Preprocessing starts from the backbone's convention, handed over once at set-up
(:class:`visiontl.tasks.link.DataLink`), and is refined here from the data and the settings given
(:class:`visiontl.data.Preprocessing`).
:func:`labelled_datamodule` picks the datamodule of a folder or a CSV.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import replace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from visiontl.data.base import ImageDataModule, auto_batch_size, auto_workers, drop_last_batch
from visiontl.data.formats import Frame
from visiontl.data.images import (
    DataError,
    expand_frames,
    read_image,
    to_channels,
)
from visiontl.data.layout import Sample, folder_splits, index_folder, list_images, read_csv_rows, source_kind
from visiontl.data.multilabel import (
    TAG_SEP,
    UNCERTAIN_POLICIES,
    check_tag,
    decode_tags,
    iterative_split,
    row_tags,
    split_gaps,
    tag_counts,
    tag_targets,
    tag_vocabulary,
)
from visiontl.data.preprocessing import Preprocessing
from visiontl.data.presize import presize
from visiontl.data.sampling import (
    DistributedEpochBatchSampler,
    DistributedEpochSampler,
    EpochBatchSampler,
    EpochSampler,
    sample_seed,
)
from visiontl.data.shots import nested_shots
from visiontl.data.transforms import build_transforms

__all__ = [
    "ClassificationDataModule",
    "CsvDataModule",
    "FeatureDataset",
    "FolderDataModule",
    "ImageDataset",
    "auto_batch_size",
    "auto_workers",
    "index_folder",
    "labelled_datamodule",
    "multilabel_split",
    "stratified_split",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "predict")


class ImageDataset(Dataset):
    """``(path, label)`` pairs read with :func:`read_image` and an albumentations transform.

    Items are dicts: ``image`` (CHW float tensor), ``label`` (the class index, -1 when unknown; for
    multi-label data a ``float32`` vector of 1 / 0 / -1 per tag, :func:`~visiontl.data.multilabel.tag_targets`),
    ``index``.
    ``frames`` gives each item's frame of a multi-frame DICOM (an index or ``"middle"``; see
    :func:`visiontl.data.images.expand_frames`); without it a multi-frame file is an error.
    """

    def __init__(self, items: Sequence[tuple[Path, Any]], transform: Any, in_chans: int,
                 presized: np.ndarray | None = None, max_pixels: int | None = None, seed: int | None = None,
                 frames: Sequence[Frame] | None = None) -> None:
        self.items = list(items)
        self.frames: list[Frame] = list(frames) if frames is not None else ["error"] * len(self.items)
        if len(self.frames) != len(self.items):
            raise ValueError(f"{len(self.frames)} frames given for {len(self.items)} items")
        self.max_pixels = max_pixels
        self.seed = seed  # set for random (training) transforms: augmentation seeded per (seed, epoch, image)
        self.transform = transform
        self.in_chans = in_chans
        self.presized = presized  # uint8 N x S x S x C from visiontl.data.presize, or None

    @property
    def source_tag(self) -> str:
        """What the pixels come from (part of the feature-cache key)."""
        return "files" if self.presized is None else f"presized-{self.presized.shape[1]}"

    @property
    def frame_key(self) -> str:
        """Which frames the items read (part of the feature-cache key): empty for whole files."""
        if all(f == "error" for f in self.frames):
            return ""
        import hashlib

        return hashlib.sha256(repr(self.frames).encode()).hexdigest()

    def frame_indices(self) -> list[int | None]:
        """Each item's frame index in its file (None: the file's only or middle frame)."""
        return [f if isinstance(f, int) else None for f in self.frames]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = divmod(int(index), len(self.items))  # EpochSampler(encode_epoch=True) sends both
        if self.seed is not None:
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
        path, label = self.items[index]
        if self.presized is not None:
            image = np.asarray(self.presized[index], dtype=np.float32) / 255.0
        else:
            image = to_channels(read_image(path, self.max_pixels, self.frames[index]), self.in_chans, path)
        return {"image": self.transform(image=image)["image"], "label": label, "index": index}


class FeatureDataset(Dataset):
    """Cached backbone features standing in for images: items have ``features``, ``label``, ``index``.

    With ``views`` augmented views per image, row ``r`` belongs to image ``r % n_images``.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_images: int) -> None:
        self.features = features
        self.labels = labels
        self.n_images = n_images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, Any]:
        """One row, or a whole batch at once for a list of rows (see :meth:`loader`)."""
        if not isinstance(index, (int, np.integer)):
            rows = np.asarray(index, dtype=np.int64)
            return {
                "features": torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32)),
                "label": torch.from_numpy(np.asarray(self.labels[rows], dtype=self._label_dtype)),
                "index": torch.from_numpy(rows % self.n_images),
            }
        label = self.labels[index]
        return {
            "features": torch.from_numpy(np.array(self.features[index], dtype=np.float32)),
            "label": int(label) if self.labels.ndim == 1 else torch.from_numpy(np.array(label, dtype=np.float32)),
            "index": index % self.n_images,
        }

    @property
    def _label_dtype(self) -> type:
        """Class indices (one column) or per-tag targets (a row of floats each)."""
        return np.int64 if self.labels.ndim == 1 else np.float32

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False, rank: int = 0,
               world_size: int = 1) -> DataLoader:
        """Batches gathered by one fancy-indexing read each, in the main process: per-row reads,
        collation and worker processes cost more than the head's whole step on features. Under
        DDP (``world_size`` > 1) rank ``rank`` reads its share of each one-process batch."""
        # the same (seed, epoch) order as the image loader it replaces: the same batches
        if world_size == 1:
            sampler = EpochBatchSampler(EpochSampler(len(self), seed, shuffle), batch_size, drop_last)
        else:
            shard = DistributedEpochSampler(len(self), seed, shuffle, rank=rank, world_size=world_size)
            sampler = DistributedEpochBatchSampler(shard, batch_size, drop_last)
        return DataLoader(self, batch_size=None, sampler=sampler, num_workers=0)


def stratified_split(
    samples: Sequence[Sample], fraction: float, seed: int, groups: Mapping[Path, str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Split per class: ``fraction`` of each class (at least one image when it has two) to validation.

    With ``groups`` (image path -> group id, e.g. a lesion or a patient), whole groups move
    together, so no group has images on both sides (the leak that inflates dermoscopy and X-ray
    scores); a group counts towards the class of its first image.
    """
    if not 0 < fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {fraction}.")
    units: dict[str, list[Sample]] = {}  # group id (or the image itself) -> its images
    for s in sorted(samples):
        unit = groups.get(s[0], f"\0{s[0]}") if groups else f"\0{s[0]}"
        units.setdefault(unit, []).append(s)
    by_class: dict[str, list[list[Sample]]] = {}
    for unit in sorted(units):
        by_class.setdefault(units[unit][0][1], []).append(units[unit])
    rng = random.Random(seed)
    train, val = [], []
    for name in sorted(by_class):
        items = by_class[name]
        rng.shuffle(items)
        n_images = sum(len(u) for u in items)
        want = min(n_images - 1, max(1, round(n_images * fraction))) if len(items) > 1 else 0
        taken = 0
        for unit in items:
            if taken < want and len(unit) <= n_images - taken - 1:
                val.extend(unit)
                taken += len(unit)
            else:
                train.extend(unit)
    return train, val


def multilabel_split(
    samples: Sequence[Sample], fraction: float, seed: int, groups: Mapping[Path, str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Split multi-label samples (canonical tag strings) so that about ``fraction`` of the images and of
    each tag's positives go to validation: iterative stratification
    (:func:`visiontl.data.multilabel.iterative_split`); with ``groups`` whole groups move together,
    a group carrying the union of its images' tags."""
    units: dict[str, list[Sample]] = {}
    for s in sorted(samples):
        units.setdefault(groups.get(s[0], f"\0{s[0]}") if groups else f"\0{s[0]}", []).append(s)
    described = [(uid, frozenset().union(*(decode_tags(s[1])[0] for s in items)), len(items))
                 for uid, items in sorted(units.items())]
    train_ids, val_ids = iterative_split(described, fraction, seed)
    return ([s for uid in sorted(train_ids) for s in units[uid]], [s for uid in sorted(val_ids) for s in units[uid]])


class ClassificationDataModule(ImageDataModule):
    """Labelled images: splits, class names, the cheap data check, datasets and loaders.

    Subclasses implement :meth:`load_splits` returning ``{split: [(path, class name), ...]}``.
    Preprocessing is resolved by :meth:`~visiontl.data.base.ImageDataModule.resolve_preprocessing`
    (from the backbone's convention, given at set-up by the task's
    :class:`~visiontl.tasks.link.DataLink`; used on its own, the datamodule assumes timm's ImageNet
    defaults). The datasets are built for it, on first use.

    Args:
        val_fraction: share of each class held out for validation when no validation split exists.
        seed: seed of that split, of the data order and of the augmentation.
        presize: decode and resize every image once to uint8 at about the training size and
            read that cache afterwards (:mod:`visiontl.data.presize`; for large 8-bit files).
        shots: train on this many images per class (a label budget; ``None``: all): a seeded,
            stratified subset of the training split, nested across budgets (:mod:`visiontl.data.shots`);
            the validation split stays whole. A class with fewer images is an error naming it.
        shots_seed: seed of that subset (default: ``seed``).
        split_seed: seed of the validation split drawn from the training data (and of a built-in
            data set's draw of images); default: ``seed``. Fix it to vary only the training
            randomness (data order, augmentation, a new head's initialisation) across seeds while
            every run validates on the same images, as ``visiontl bench`` does.
        retain: a labelled folder or CSV of an earlier task or domain whose knowledge the
            fine-tuned model should keep: a run then reports ``retain_acc_before``,
            ``retain_acc_after`` and ``forgetting`` (:mod:`visiontl.analyse.forgetting`).
        unlabelled: a folder of unlabelled images of the task (searched recursively; class folders,
            if any, are ignored), augmented like the training images. Training batches then pair
            the two: ``{"source": labelled batch, "target": unlabelled batch}`` (Lightning's
            ``CombinedLoader``, ``max_size_cycle``: the smaller side is cycled). For tasks that learn
            from unlabelled images (:class:`~visiontl.tasks.DistillationTask`); files also in a
            labelled split are left out.
        **kwargs: the image settings of :class:`~visiontl.data.base.ImageDataModule`
            (``batch_size``, ``num_workers``, ``image_size``, ``augment``, ``on_bad_image``,
            ``mean``, ``std``, ``normalize``, ``in_chans``, ``check_images``, ``max_pixels``,
            ``frames``: with ``all``, a file's frames stay on one side of a validation split).
    """

    def __init__(self, val_fraction: float = 0.2, seed: int = 0, presize: bool = False, shots: int | None = None,
                 shots_seed: int | None = None, retain: str | None = None, split_seed: int | None = None,
                 unlabelled: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retain = retain
        self.unlabelled = unlabelled
        if shots is not None and int(shots) < 1:
            raise DataError(f"shots must be >= 1 image per class (or None for all), got {shots}.")
        self.shots = int(shots) if shots is not None else None
        self.shots_seed = shots_seed
        self._full_train: list[Sample] | None = None
        self.presize = presize
        self.val_fraction = val_fraction
        self.seed = seed
        self.split_seed = split_seed
        self.data_report: Any = None  # the cheap data check's DataReport, after setup
        self._expanded: dict[str, list[tuple[Path, str, Frame]]] = {}
        self._splits: dict[str, list[Sample]] | None = None
        self._layout_checked = False
        self._datasets: dict[str, Dataset] | None = None
        self._image_datasets: dict[str, ImageDataset] = {}
        self._multilabel = False  # set by a datamodule that reads tag sets (CsvDataModule)
        self._tags: list[str] | None = None  # a fixed tag order (tag_columns), else sorted from the data

    @property
    def data_seed(self) -> int:
        """The seed of the validation split and of a built-in data set's draw: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    # -- subclasses ---------------------------------------------------------------------------
    def load_splits(self) -> dict[str, list[Sample]]:
        """Return ``{"train": [...], "val": [...], optional "test", "predict"}``."""
        raise NotImplementedError

    def groups(self) -> dict[Path, str] | None:
        """Image path -> group id (patient, lesion) kept on one side of a validation split, or None."""
        return None

    # -- splits and classes -------------------------------------------------------------------
    @property
    def splits(self) -> dict[str, list[Sample]]:
        """Samples per split (computed once; a validation split is made if there is none)."""
        if self._splits is None:
            splits = self.load_splits()
            if not splits.get("train"):
                raise DataError(f"{type(self).__name__}: the training split is empty.")
            if not splits.get("val"):
                draw = multilabel_split if self._multilabel else stratified_split
                splits["train"], splits["val"] = draw(splits["train"], self.val_fraction, self.data_seed,
                                                      groups=self.groups())
            (self._check_tags if self._multilabel else self._check_classes)(splits)
            if self.shots is not None and self._multilabel:
                raise DataError(f"{type(self).__name__}: shots counts training images per class, which multi-label "
                                f"images do not have; list fewer images in the CSV instead (shots: null).")
            if self.shots is not None:
                self._full_train = splits["train"]
                seed = self.seed if self.shots_seed is None else self.shots_seed
                splits["train"] = nested_shots(splits["train"], self.shots, seed,
                                               what=f"the training split of {type(self).__name__}")
            self._splits = splits
        if self.unlabelled and "unlabelled" not in self._splits:  # also when set after the splits were read
            labelled = {p.resolve() for items in self._splits.values() for p, _ in items}
            found = list_images(self.unlabelled, "The unlabelled folder",
                                "point unlabelled at a folder of images of the task (any layout)")
            unlabelled = [(p, "") for p in found if p.resolve() not in labelled]
            if not unlabelled:
                raise DataError(f"Every image in the unlabelled folder {self.unlabelled} is also a labelled "
                                f"training / validation / test image; give images the model has no labels for.")
            self._splits["unlabelled"] = unlabelled
        return self._splits

    def _check_classes(self, splits: dict[str, list[Sample]]) -> None:
        """Single-label: two classes at least, and none outside training in the other splits."""
        known = set(s[1] for s in splits["train"])
        if len(known) < 2:
            raise DataError(
                f"{type(self).__name__}: the training split has only one class ({', '.join(sorted(known))}); a "
                f"classifier needs at least two. Check the folder layout (one sub-folder per class) or the CSV's "
                f"label column."
            )
        for split in ("val", "test"):
            unknown = sorted({s[1] for s in splits.get(split, [])} - known)
            if unknown:
                raise DataError(
                    f"The {split} split has classes the training split lacks: {', '.join(unknown)}. "
                    f"Every class needs training images."
                )

    def _check_tags(self, splits: dict[str, list[Sample]]) -> None:
        """Multi-label: every tag has training images, and validation lacking a tag is said once."""
        tags = list(self._tags) if self._tags is not None else tag_vocabulary(
            s[1] for items in splits.values() for s in items)
        gaps = split_gaps([s[1] for s in splits["train"]], [s[1] for s in splits["val"]], tags)
        if gaps["train"]:
            raise DataError(f"{type(self).__name__}: no training image has the tag(s) {', '.join(gaps['train'])}; every "
                            f"tag needs positive training images (drop the tag, or move images to training).")
        if gaps["val"]:
            log.warning("[visiontl] data check: no validation image has the tag(s) %s (too few images to divide: see "
                        "check-data's per-tag counts); their validation scores are not measured and their decision "
                        "thresholds stay at 0.5.", ", ".join(gaps["val"]))

    @property
    def multilabel(self) -> bool:
        """Whether the images carry several tags each (see :attr:`task`)."""
        self.splits  # noqa: B018 - a CSV's task is known once it is read
        return self._multilabel

    @property
    def task(self) -> str:
        """``multiclass`` (one class per image) or ``multilabel`` (a set of tags per image:
        :mod:`visiontl.data.multilabel`); the task is chosen by the data and handed to the model."""
        return "multilabel" if self.multilabel else "multiclass"

    def encode_label(self, label: str) -> Any:
        """The training target of a label string: the class index (-1 for none), or for multi-label
        data the per-tag ``float32`` vector (:func:`~visiontl.data.multilabel.tag_targets`)."""
        if self.multilabel:
            return tag_targets(label, self.class_names)
        return self._class_index.get(label, -1)

    @property
    def _class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    @property
    def class_names(self) -> list[str]:
        """Sorted class names of the training split (label index = position); for multi-label data
        the tags in their given order (``tag_columns``), else sorted."""
        if self.multilabel:
            return list(self._tags) if self._tags is not None else tag_vocabulary(s[1] for s in self.splits["train"])
        return sorted({s[1] for s in self.splits["train"]})

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def train_size(self) -> int:
        """Training samples (frames under ``frames='all'``)."""
        return len(self.samples("train"))

    @property
    def class_counts(self) -> list[int]:
        """Training samples per class, in label order (frames under ``frames='all'``); for
        multi-label data the training images with each tag present."""
        if self.multilabel:
            return tag_counts((s[1] for s in self.samples("train")), self.class_names)
        counts = Counter(s[1] for s in self.samples("train"))
        return [counts[c] for c in self.class_names]

    def samples(self, split: str) -> list[tuple[Path, str, Frame]]:
        """``(path, class name, frame)`` of every sample of ``split`` in loader order: one per file,
        or one per frame of each multi-frame DICOM under ``frames='all'``."""
        if split not in self._expanded:
            self._expanded[split] = expand_frames(self.splits[split], self.frames)
        return self._expanded[split]

    def paths(self, split: str) -> list[Path]:
        """File path of each sample of ``split`` in loader order (after skipping unreadable files;
        a multi-frame file once per frame under ``frames='all'``, see :meth:`frame_indices`)."""
        return [p for p, _, _ in self.samples(split)]

    def frame_indices(self, split: str) -> list[int | None]:
        """Frame index of each sample of ``split`` in its file (None: a whole or middle frame)."""
        return [f if isinstance(f, int) else None for _, _, f in self.samples(split)]

    # -- the image base's hooks ---------------------------------------------------------------
    def train_paths(self) -> list[Path]:
        return [p for p, _ in self.splits["train"]]

    def check_paths(self) -> list[Path]:
        return sorted({p for items in self.splits.values() for p, _ in items})

    def drop_bad(self, bad: set[Path]) -> None:
        self._splits = {k: [s for s in v if s[0] not in bad] for k, v in self.splits.items()}
        if self._full_train is not None:
            self._full_train = [s for s in self._full_train if s[0] not in bad]
        self._expanded = {}
        if not self._splits["train"]:
            raise DataError("Every training image was unreadable; nothing left to train on.")

    # -- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """The cheap part of ``visiontl check-data`` (headers, counts, imbalance, paths shared
        between splits or labels): warnings are logged, errors stop the run before any training.
        Images are decoded (checked) when preprocessing is resolved: in a run, by the task's
        :class:`~visiontl.tasks.link.DataLink` right after this; called on its own (no Trainer),
        here, with timm's ImageNet defaults."""
        self._check_layout()
        if self.trainer is None:
            self.resolve_preprocessing()

    def _check_layout(self) -> None:
        if self._layout_checked or not self.check_images:
            return
        from visiontl.data.check import check_data

        report = check_data(self.splits, deep=False, progress=True, frames=self.frames, task=self.task)
        self.data_report = report
        for finding in report.warnings:
            if finding.code == "few_images" and getattr(self, "shots", None) == 1:
                continue  # one image per class was asked for (shots=1, a bench's 1-shot cell): kept in the report only
            log.warning("[visiontl] data check: %s", finding.message)
        if report.errors:
            raise DataError(
                f"{report.summary(max_items=5)}\nRun `visiontl check-data` on the dataset for the full report "
                f"(exact and near duplicates too), or set check_images: false to skip every check."
            )
        self._layout_checked = True

    def build_datasets(self, pre: Preprocessing) -> None:
        datasets: dict[str, Dataset] = {}
        for split in self.splits:
            train = split in ("train", self.paired_split)  # unlabelled images are augmented like the labelled ones
            refs = self.samples(split)
            labelled = [(p, self.encode_label(c)) for p, c, _ in refs]
            frames = [f for _, _, f in refs]
            arrays = presize([p for p, _, _ in refs], pre.size, pre.in_chans, frames) if self.presize else None
            # augmentation is seeded per (seed, epoch, index): another seed for the unlabelled images, so
            # image i of each side does not get the same crop
            seed = (self.seed + (split == self.paired_split)) if train else None
            datasets[split] = ImageDataset(labelled, self._transform(pre, train), pre.in_chans, arrays,
                                           self.max_pixels, seed=seed, frames=frames)
        self._datasets = datasets
        self._image_datasets = dict(datasets)

    def _transform(self, pre: Preprocessing, train: bool) -> Any:
        return build_transforms(self.augment, train, pre.size, list(pre.mean), list(pre.std), pre.crop_pct,
                                pre.interpolation)

    @property
    def datasets(self) -> dict[str, Dataset]:
        """Dataset per split (images, or cached features after :meth:`set_features`)."""
        if self._datasets is None:
            pre = self.preprocessing  # resolving it for the first time builds them
            if self._datasets is None:
                self.build_datasets(pre)
        assert self._datasets is not None
        return self._datasets

    def feature_source(self, split: str, augmented: bool = False) -> ImageDataset:
        """The images of ``split`` with the evaluation transform (or, for the augmented training and
        paired splits, the training one)."""
        source = self.datasets[split]
        if not isinstance(source, ImageDataset):
            source = self._image_datasets[split]
        if augmented or split not in ("train", self.paired_split):
            return source
        return ImageDataset(source.items, self._transform(self.preprocessing, False), source.in_chans,
                            source.presized, source.max_pixels, seed=None, frames=source.frames)

    def full_feature_source(self, split: str) -> tuple[ImageDataset, list[int]] | None:
        """For a ``shots`` subset of the training split: the whole split's images (evaluation
        transform) and the rows of the subset in it, so features cached for the whole split serve
        every label budget; ``None`` otherwise."""
        if split != "train" or self._full_train is None or self.frames == "all":
            return None
        source = self.feature_source(split)
        items = [(p, self.encode_label(c)) for p, c in self._full_train]
        row = {p: i for i, (p, _) in enumerate(items)}
        full = ImageDataset(items, source.transform, source.in_chans, None, source.max_pixels, seed=None,
                            frames=[self.frames] * len(items))
        return full, [row[p] for p, _ in self.splits["train"]]

    def set_features(self, split: str, features: np.ndarray, labels: np.ndarray) -> None:
        """Serve cached features instead of images for ``split`` (see :mod:`visiontl.models.features`)."""
        n_images = len(self._image_datasets[split])
        self.datasets[split] = FeatureDataset(features, labels, n_images)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"{type(self).__name__} has no {split!r} split; give one to use it.")
        dataset = self.datasets[split]
        batch_size = self.loader_batch_size(len(self.samples("train")), len(dataset))
        if isinstance(dataset, FeatureDataset):  # evaluation needs no small batches on features
            world = self._world_size()
            drop_last = train and drop_last_batch(len(dataset), batch_size, world)
            return dataset.loader(batch_size if train else max(batch_size, 1024), train, self.seed, drop_last,
                                  rank=self._rank(), world_size=world)
        if train:
            return self.train_loader(dataset, batch_size)
        workers = self.loader_workers()
        batch_size = self.eval_batch_size(len(self.samples("train")), len(dataset))
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=self.pin_memory())

    @property
    def paired_split(self) -> str | None:
        """The split of unlabelled images training batches pair with the labelled ones (see
        ``unlabelled``), or None: ``unlabelled`` when given (domain adaptation pairs its target)."""
        return "unlabelled" if "unlabelled" in self.splits else None

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        loader = self._loader("train", train=True)
        paired = self.paired_split
        if paired is None:
            self.skip_resumed(loader)
            return loader
        # paired with the unlabelled images: the epoch runs over the longer one, the shorter cycles
        # (the same order again: orders depend on the epoch only)
        target = self._loader(paired, train=True)
        self.skip_resumed(loader, target)
        return CombinedLoader({"source": loader, "target": target}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.splits else "test")


class FolderDataModule(ClassificationDataModule):
    """Images in one sub-folder per class.

    ``root`` is either ``root/<class>/*`` (a validation split is drawn per class) or holds
    ``train/``, ``val/`` (or ``valid``/``validation``) and ``test/`` folders of that form.

    Args:
        root: the dataset folder.
        val_root: a separate validation folder (overrides ``root/val``).
        test_root: a separate test folder.
        predict_root: a folder of unlabelled images for ``predict`` (searched recursively).
        **kwargs: see :class:`ClassificationDataModule`.
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.val_root, self.test_root, self.predict_root = val_root, test_root, predict_root

    def load_splits(self) -> dict[str, list[Sample]]:
        splits = folder_splits(self.root)
        for split, given in (("val", self.val_root), ("test", self.test_root)):
            if given:
                splits[split] = index_folder(given)
        if self.predict_root:
            splits["predict"] = [(p, "") for p in list_images(self.predict_root, "predict_root")]
        return splits


class CsvDataModule(ClassificationDataModule):
    """Images listed in CSV files with a path column and a label column.

    Args:
        train_csv: CSV of training images.
        val_csv: CSV of validation images (else a stratified split of ``train_csv``).
        test_csv: CSV of test images.
        root: folder relative paths are resolved against (default: each CSV's folder).
        path_column: column with image paths (or image ids, with ``suffix`` / ``image_dirs``).
        label_column: column with class names.
        suffix: appended to every path value (``.jpg`` when the column holds ids, as HAM10000's
            ``image_id`` does).
        image_dirs: folders (relative to ``root``) searched in order for each image, for data
            shipped in several parts (``HAM10000_images_part_1``, ``..._part_2``).
        group_column: column whose value ties images together (lesion, patient): a validation
            split drawn from ``train_csv`` keeps each group on one side.
        split_column: a column of ``train_csv`` naming each row's split (``train``, ``val`` /
            ``valid`` / ``validation``, ``test``; empty: ``train``), for data listed in one CSV
            (a run directory's ``splits.csv`` is such a file); ``val_csv`` / ``test_csv`` then
            must not be given.
        task: ``auto`` (default): multi-label when ``tag_columns`` is given or a label cell holds
            ``tag_sep``, else one class per image; ``multiclass`` or ``multilabel`` to say so
            (an image with a single tag or none is multi-label data too). See
            :mod:`visiontl.data.multilabel`.
        tag_columns: multi-label data with one column per tag (the ChestX-ray14 / CheXpert shape):
            ``1`` present, ``0`` or empty absent, ``-1`` uncertain; the tags are these column
            names, in this order. ``label_column`` is then not read.
        tag_sep: multi-label data in one column: the separator of an image's tags (``|``; an
            empty cell is an image with no tag).
        uncertain: what a ``-1`` in a tag column means: ``ignore`` (default: that image and tag
            are left out of the loss and the metrics, CheXpert's U-Ignore), ``positive`` (U-Ones)
            or ``negative`` (U-Zeros).
        no_tag: multi-label data in one column: the cell value of an image with no tag, besides an
            empty cell (ChestX-ray14 writes ``No Finding``).
        **kwargs: see :class:`ClassificationDataModule`. With ``on_bad_image='skip'``, rows
            whose file is missing are left out and listed (``skipped_files.txt``) instead of
            stopping with an error.
    """

    def __init__(
        self,
        train_csv: str,
        val_csv: str | None = None,
        test_csv: str | None = None,
        root: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        suffix: str = "",
        image_dirs: Sequence[str] | None = None,
        group_column: str | None = None,
        split_column: str | None = None,
        task: str = "auto",
        tag_columns: Sequence[str] | None = None,
        tag_sep: str = TAG_SEP,
        uncertain: str = "ignore",
        no_tag: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in ("auto", "multiclass", "multilabel"):
            raise DataError(f"CsvDataModule: task must be auto, multiclass or multilabel, got {task!r}.")
        if uncertain not in UNCERTAIN_POLICIES:
            raise DataError(f"CsvDataModule: uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}.")
        if tag_columns is not None:
            if isinstance(tag_columns, str) or not tag_columns:
                raise DataError("CsvDataModule: tag_columns is a list of column names (one per tag), e.g. "
                                "[Atelectasis, Effusion].")
            if task == "multiclass":
                raise DataError("CsvDataModule: tag_columns makes the data multi-label; leave task at auto or "
                                "multilabel.")
            tag_columns = [check_tag(str(c), f"{train_csv}: tag_columns") for c in tag_columns]
            if len(set(tag_columns)) != len(tag_columns):
                raise DataError(f"CsvDataModule: tag_columns names a column twice ({', '.join(tag_columns)}).")
            self._tags = list(tag_columns)
        if not tag_sep or tag_sep.isspace():
            raise DataError(f"CsvDataModule: tag_sep must be a visible separator such as '|' or ';', got {tag_sep!r}.")
        self.task_setting, self.tag_columns, self.tag_sep, self.uncertain = task, tag_columns, tag_sep, uncertain
        self.no_tag = no_tag
        self._multilabel = task == "multilabel" or tag_columns is not None
        if split_column is not None and (val_csv or test_csv):
            raise DataError(f"CsvDataModule: split_column={split_column!r} takes every split from {train_csv}; do "
                            f"not also give val_csv / test_csv.")
        self.split_column = split_column
        self.train_csv, self.val_csv, self.test_csv = train_csv, val_csv, test_csv
        self.root = root
        self.path_column, self.label_column = path_column, label_column
        self.suffix, self.image_dirs, self.group_column = suffix, list(image_dirs or []), group_column
        self._groups: dict[Path, str] = {}

    def groups(self) -> dict[Path, str] | None:
        """Image -> ``group_column`` value (filled while the CSVs are read), or None without one."""
        return self._groups if self.group_column is not None else None

    def _read(self, csv_path: str, *, listing: bool = True) -> list[Sample]:
        """The samples of ``csv_path``; ``listing=False``: a CSV outside this data set's listing (a
        domain adaptation's labelled target), read without its split and group columns."""
        return [s for _, s in self._read_rows(csv_path, listing=listing)]

    def _read_rows(self, csv_path: str, *, listing: bool = True) -> list[tuple[str, Sample]]:
        """``(split, sample)`` per row (the split from ``split_column``, else ``train``)."""
        group_column = self.group_column if listing else None
        split_column = self.split_column if listing else None
        rows = read_csv_rows(csv_path, self.path_column, self.label_column, self.root, self.suffix, self.image_dirs,
                             group_column, split_column=split_column or "split",
                             tag_columns=self.tag_columns, uncertain=self.uncertain)
        path = Path(csv_path).expanduser()
        if self.task_setting == "auto" and not self._multilabel and csv_path == self.train_csv:
            self._multilabel = any(self.tag_sep in row.label for row in rows)  # the training CSV decides
        if self._multilabel and not self.tag_columns:  # one column of joined tags: in canonical form
            rows = [replace(row, label=row_tags({"label": row.label}, f"{path}, line {row.line}", tag_sep=self.tag_sep,
                                                no_tag=self.no_tag))
                    for row in rows]
        samples, missing = [], []
        for row in rows:
            if not row.label:
                hint = (f"; for multi-label data, where an empty cell is an image with no tag, set task: multilabel "
                        f"(tags joined by {self.tag_sep!r}) or tag_columns" if not self._multilabel else "")
                raise DataError(f"{path}, line {row.line}: empty label in column {self.label_column!r}{hint}.")
            if row.path is None or not row.path.is_file():
                missing.append((row.path or path, f"listed in {path.name} line {row.line} but missing"))
                continue
            if group_column is not None:
                self._groups[row.path] = row.group or str(row.path)
            samples.append((row.split if split_column else "train", (row.path, row.label)))
        if missing and self.on_bad_image == "skip":
            self.skipped.extend(missing)
        elif missing:
            listing = "\n  ".join(f"{f} ({why})" for f, why in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            base = Path(self.root).expanduser() if self.root else path.parent
            where = f"{base}" + (f" (folders {', '.join(self.image_dirs)})" if self.image_dirs else "")
            raise DataError(
                f"{path} lists {len(missing)} file(s) that do not exist:\n  {listing}{more}\n"
                f"Fix the paths (they are resolved against {where}; set 'root' / 'image_dirs' to change "
                f"that), or set on_bad_image='skip' to train without them."
            )
        return samples

    def load_splits(self) -> dict[str, list[Sample]]:
        if self.split_column is not None:
            splits: dict[str, list[Sample]] = {}
            for split, sample in self._read_rows(self.train_csv):
                if split not in ("train", "val", "test"):
                    raise DataError(f"{self.train_csv}: column {self.split_column!r} has {split!r}; use train, val "
                                    f"(valid, validation) or test.")
                splits.setdefault(split, []).append(sample)
            splits.setdefault("train", [])
            return splits
        splits = {"train": self._read(self.train_csv)}
        if self.val_csv:
            splits["val"] = self._read(self.val_csv)
        if self.test_csv:
            splits["test"] = self._read(self.test_csv)
        return splits


def labelled_datamodule(source: str | os.PathLike[str], **kwargs: Any) -> ClassificationDataModule:
    """The datamodule of a labelled data set on disk: :class:`FolderDataModule` for a folder,
    :class:`CsvDataModule` for a CSV (:func:`visiontl.data.layout.source_kind` decides, and names
    what to give for anything else); ``kwargs`` go to it."""
    path = Path(source).expanduser()
    kind = CsvDataModule if source_kind(path) == "csv" else FolderDataModule
    return kind(str(path), **kwargs)
