"""What every visiontl datamodule shares: image settings, the image check, preprocessing, loader
sizing and the training loader (:class:`ImageDataModule`); the labelled, unlabelled and streamed
datamodules build on it.

Three rules live here and nowhere else: the last training batch is never a lone image
(:func:`drop_last_batch`), the training order is a function of (seed, epoch)
(:meth:`ImageDataModule.train_loader`), and a fit resumed mid-epoch skips the batches it already
trained on (:meth:`ImageDataModule.skip_resumed`).

Preprocessing is resolved here and nowhere else (:meth:`ImageDataModule.resolve_preprocessing`):
from the backbone's convention it is given, refined by the data (see
:mod:`visiontl.data.preprocessing` for the direction of flow). A datamodule never looks at the
model or the trainer's module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from visiontl.core.machine import cpu_count
from visiontl.data.images import DataError, bad_image_line, check_frames, scan_frame, scan_images
from visiontl.data.preprocessing import INTERPOLATIONS, Preprocessing
from visiontl.data.sampling import DistributedEpochSampler, EpochSampler
from visiontl.data.stats import channel_stats, needs_dataset_stats, stored_bit_depth

__all__ = ["ImageDataModule", "auto_batch_size", "auto_workers", "drop_last_batch", "loader_defaults"]

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = Preprocessing(crop_pct=0.875)
"""The convention assumed when no backbone is given (a datamodule used on its own): timm's
ImageNet defaults, 224 px RGB."""


def auto_batch_size(n_train: int, cap: int = 32) -> int:
    """Batch size from the training set size: 8 on tiny sets, ~8 steps per epoch, ``cap`` on large ones."""
    if n_train <= 0:
        return 1
    size = 2 ** max(3, math.floor(math.log2(max(n_train / 8, 1))))
    return int(max(1, min(cap, size, n_train)))


def drop_last_batch(n: int, batch_size: int, shares: int = 1) -> bool:
    """Whether a training loader of ``n`` items drops its last batch: only when it would be one lone
    image (BatchNorm cannot train on a batch of one) and not the only batch (a loader never has
    zero batches). Under DDP each of ``shares`` ranks batches its equal, padded share ``ceil(n / shares)``.

    Every datamodule's training loader follows it; shorter last batches of two or more are kept."""
    share = -(-int(n) // max(1, int(shares)))
    return share > batch_size and share % batch_size == 1


EVAL_BATCH = 32
"""The smallest evaluation batch (32 was the fastest feature-extraction batch for Lite0 on 2 cores)."""


def loader_defaults(kind: str, cpus: int | None = None) -> dict[str, Any]:
    """``pin_memory`` and ``num_workers`` for loaders feeding a device kind (``cuda``, ``mps``, ``cpu``)."""
    cpus = cpu_count() if cpus is None else int(cpus)
    most = 8 if kind in ("cuda", "mps") else 4  # one persistent worker beat two on a 2-core machine
    return {"pin_memory": kind == "cuda", "num_workers": max(1, min(most, cpus - 1))}


def auto_workers(kind: str = "cpu") -> int:
    """DataLoader workers for this machine feeding a device ``kind`` (:func:`loader_defaults`):
    one fewer than the cores, at least 1."""
    return int(loader_defaults(kind)["num_workers"])


class ImageDataModule(pl.LightningDataModule):
    """Base of the visiontl datamodules.

    Subclasses give :meth:`train_paths` (the images statistics are measured on),
    :meth:`check_paths` (every image the image check decodes), :meth:`drop_bad` (what to do with
    the files it rejects under ``on_bad_image='skip'``) and :meth:`build_datasets` (called with
    each newly resolved preprocessing).

    Args:
        batch_size: images per batch; ``None`` picks one from the training set size.
        num_workers: loader processes; ``None`` picks one for this machine (0 = main process).
        image_size: input size; ``None`` uses the backbone's.
        augment: augmentation preset: natural, satellite, xray, histology, dermoscopy, none.
        on_bad_image: ``error`` stops on the first unreadable image with its path; ``skip``
            leaves such files out and lists them (also in the run directory).
        mean: normalisation mean override (``[0, 1]`` scale).
        std: normalisation std override.
        crop_pct: evaluation centre-crop fraction override; ``None``: the backbone's for the
            ``natural`` preset, 1 (no crop: tiles, scans and slides keep their borders) for the others.
            Images smaller than the input are never cropped (:mod:`visiontl.data.geometry`).
        interpolation: resize interpolation override; ``None``: the backbone's.
        normalize: where mean / std come from when not given: ``backbone`` (its pretraining
            statistics), ``dataset`` (measured on the training images, :mod:`visiontl.data.stats`)
            or ``auto``: the dataset's for more than 3 channels or images deeper than 8 bits
            (16-bit PNG / TIFF, DICOM), the backbone's otherwise.
        in_chans: channels fed to the model; ``None`` follows the backbone.
        check_images: decode every image once before training so corrupt files fail early.
        max_pixels: images with more pixels (height x width, read from the header) are bad images
            (decompression bombs); ``None``: ``VISIONTL_MAX_PIXELS`` or Pillow's limit (~179 Mpx).
        frames: multi-frame DICOMs (cine loops, enhanced CT / MR): ``error`` names them as bad
            images, ``middle`` reads each one's middle frame, ``all`` makes every frame a sample.
    """

    seed: int = 0
    """Seed of the training order and augmentation (subclasses take it as an argument)."""

    def __init__(
        self,
        batch_size: int | None = None,
        num_workers: int | None = None,
        image_size: int | None = None,
        augment: str = "natural",
        on_bad_image: Literal["error", "skip"] = "error",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        normalize: Literal["auto", "backbone", "dataset"] = "auto",
        in_chans: int | None = None,
        check_images: bool = True,
        max_pixels: int | None = None,
        frames: Literal["error", "middle", "all"] = "error",
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("image_size", image_size), ("max_pixels", max_pixels),
                            ("in_chans", in_chans)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                raise DataError(f"{name} must be a whole number >= 1 (or None for automatic), got {value!r}.")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers must be >= 0 (or None for automatic), got {num_workers!r}.")
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1] (1: no crop), got {crop_pct!r}.")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}.")
        if normalize not in ("auto", "backbone", "dataset"):
            raise DataError(f"normalize must be 'auto', 'backbone' or 'dataset', got {normalize!r}.")
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.augment, self.on_bad_image, self.normalize = augment, on_bad_image, normalize
        self.mean, self.std, self.in_chans = mean, std, in_chans
        self.crop_pct, self.interpolation = crop_pct, interpolation
        self.check_images, self.max_pixels = check_images, max_pixels
        self.frames = check_frames(frames)
        self.skipped: list[tuple[Path, str]] = []
        self._preprocessing: Preprocessing | None = None
        self._scanned: set[int] = set()  # channel counts the image check has passed for
        self._stats: dict[int, tuple[list[float], list[float]]] = {}
        self._needs_stats: dict[int, bool] = {}

    # -- subclasses ---------------------------------------------------------------------------
    def train_paths(self) -> list[Path]:
        """The training images (normalisation statistics and bit depth are measured on them)."""
        raise NotImplementedError

    def check_paths(self) -> list[Path]:
        """Every image the image check decodes."""
        return self.train_paths()

    def drop_bad(self, bad: set[Path]) -> None:
        """Leave out the images the check rejected (``on_bad_image='skip'``)."""
        raise NotImplementedError

    def build_datasets(self, pre: Preprocessing) -> None:
        """(Re)build the datasets for a newly resolved preprocessing."""

    def check_channels(self, chans: int) -> None:
        """Raise :class:`DataError` if the model's input channels cannot fit this dataset (a hook)."""

    # -- preprocessing ------------------------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        """The resolved preprocessing (resolved now with :data:`DEFAULT_BACKBONE` if nothing was)."""
        if self._preprocessing is None:
            self.resolve_preprocessing()
        assert self._preprocessing is not None
        return self._preprocessing

    def resolve_preprocessing(self, backbone: Preprocessing | None = None) -> Preprocessing:
        """Refine the backbone's convention from this data and these settings, check every image
        for it once, and (re)build the datasets when the result changed.

        ``image_size``, ``in_chans``, ``mean`` / ``std`` and ``normalize`` override the backbone;
        ``normalize='auto'`` measures per-channel statistics on the training images when they
        have more than 3 channels or more than 8 bits; centre crops are for natural photos only
        (tiles, scans and slides keep their borders).
        """
        given = backbone is not None
        backbone = backbone or DEFAULT_BACKBONE
        if given and self.in_chans and self.in_chans != backbone.in_chans:
            raise DataError(
                f"The data is set to {self.in_chans} channel(s) (in_chans) but the model takes {backbone.in_chans}: "
                f"set the model's in_chans to {self.in_chans} (--model.init_args.in_chans {self.in_chans}), or "
                f"leave the data's in_chans unset to convert images to the model's {backbone.in_chans}."
            )
        chans = self.in_chans or backbone.in_chans
        self.check_channels(chans)
        base = backbone.with_channels(chans)
        frame = scan_frame(self.frames)
        if self.mean is not None or self.std is not None:
            mean, std = list(self.mean or base.mean), list(self.std or base.std)
            if len(mean) != chans:
                mean, std = [float(np.mean(mean))] * chans, [float(np.mean(std))] * chans
            normalization = "given"
        elif self._use_dataset_stats(chans, frame):
            mean, std = self.dataset_stats(chans)
            normalization = "dataset"
        else:
            mean, std, normalization = list(base.mean), list(base.std), "backbone"
        resolved = base.replace(
            size=self.image_size or base.size, mean=tuple(mean), std=tuple(std), normalization=normalization,
            crop_pct=self.crop_pct if self.crop_pct is not None else (base.crop_pct if self.augment == "natural" else 1.0),
            interpolation=self.interpolation or base.interpolation,
            bit_depth=self.bit_depth(frame),
        )
        self._scan(chans)
        if resolved != self._preprocessing:
            self._preprocessing = resolved
            self.build_datasets(resolved)
        return resolved

    def _use_dataset_stats(self, chans: int, frame: Any) -> bool:
        if self.normalize != "auto":
            return self.normalize == "dataset"
        if chans not in self._needs_stats:
            self._needs_stats[chans] = needs_dataset_stats(chans, self.bit_depth(frame))
        return self._needs_stats[chans]

    def bit_depth(self, frame: Any = "error") -> int:
        """Bits per stored sample of the training images (8, 16, or 32 for floats; a hook: measured
        on the first files here)."""
        return stored_bit_depth(self.train_paths(), frame=frame)

    def dataset_stats(self, chans: int) -> tuple[list[float], list[float]]:
        """Per-channel mean / std of the training images (measured once, cached on disk)."""
        if chans not in self._stats:
            self._stats[chans] = channel_stats(self.train_paths(), chans, frame=scan_frame(self.frames))
        return self._stats[chans]

    # -- the image check ----------------------------------------------------------------------
    def _scan(self, chans: int) -> None:
        """Decode every image once (per channel count): unreadable ones, or ones whose bands
        cannot become ``chans`` channels, stop with their paths or are left out and listed."""
        if not self.check_images or chans in self._scanned:
            return
        bad = scan_images(self.check_paths(), channels=chans, max_pixels=self.max_pixels, frames=self.frames)
        if bad and self.on_bad_image == "error":
            listing = "\n".join(f"  {bad_image_line(p, r)}" for p, r in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(
                f"{len(bad)} image(s) cannot be used:\n{listing}{more}\nReplace or delete them, or set "
                f"on_bad_image='skip' (--data.init_args.on_bad_image skip) to train without them."
            )
        if bad:
            self.skipped = [*self.skipped, *bad]
            self.drop_bad({p for p, _ in bad})
        self._scanned.add(chans)

    # -- loaders ------------------------------------------------------------------------------
    def loader_batch_size(self, n_train: int, n_items: int, cap: int = 32) -> int:
        """The batch size: ``batch_size`` or one chosen from the training set size, at most ``n_items``."""
        return max(1, min(self.batch_size or auto_batch_size(n_train, cap), n_items))

    def eval_batch_size(self, n_train: int, n_items: int) -> int:
        """The batch size of evaluation loaders: the training one, but at least :data:`EVAL_BATCH`.

        Small training batches help tiny sets generalise; evaluation gains nothing from them and
        pays per batch (a 3-image batch made validating a 1-shot run cost twice its training).
        Evaluation keeps no activations for backward, so a batch larger than training's fits."""
        return max(1, min(max(self.loader_batch_size(n_train, n_items), EVAL_BATCH), n_items))

    feeds: str = "cpu"
    """The device kind the loaders feed (``cuda``, ``mps`` or ``cpu``), told at set-up by the task's
    link with the Trainer (:class:`visiontl.tasks.link.DataLink`); the data layer never asks."""

    def device_kind(self) -> str:
        """The device the loaders feed: ``cuda``, ``mps`` or ``cpu`` (:attr:`feeds`)."""
        return self.feeds

    def loader_workers(self) -> int:
        """Loader processes: ``num_workers`` or one chosen for this machine and device."""
        return auto_workers(self.device_kind()) if self.num_workers is None else self.num_workers

    def pin_memory(self) -> bool:
        """Page-locked batches where they are copied to a CUDA device (faster, asynchronous copies)."""
        return self.device_kind() == "cuda"

    # -- the training loader and exact resume -------------------------------------------------
    def _world_size(self) -> int:
        return 1 if self.trainer is None else int(self.trainer.world_size)

    def _rank(self) -> int:
        return 0 if self._world_size() == 1 else int(self.trainer.global_rank)

    def _current_epoch(self) -> int | None:
        trainer = self.trainer
        return None if trainer is None else int(trainer.current_epoch)

    def train_loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        """A training loader over ``dataset`` (which decodes ``epoch * len + index``, see
        :class:`~visiontl.data.sampling.EpochSampler`): shuffled by (``seed``, epoch), so a resumed
        run repeats the order; under DDP each rank takes its share of the one-process order (Lightning
        keeps a ``DistributedSampler`` as it is: its own would reshuffle); never a lone last image
        (:func:`drop_last_batch`)."""
        world = self._world_size()
        epochs = (EpochSampler if world == 1 else DistributedEpochSampler)(
            len(dataset), self.seed, shuffle=True, encode_epoch=True, epoch_fn=self._current_epoch,
            rank=self._rank(), world_size=world)
        workers = self.loader_workers()
        return DataLoader(dataset, batch_size=batch_size, sampler=epochs,
                          drop_last=drop_last_batch(len(dataset), batch_size, world), num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=self.pin_memory())

    def skip_resumed(self, *loaders: DataLoader) -> None:
        """Leave out of each training loader what a fit resumed mid-epoch already trained on.

        One loader skips the epoch's first ``done`` batches. Loaders paired by Lightning's
        ``CombinedLoader`` (``max_size_cycle``: the epoch runs over the longest, the shorter cycle
        through the same order again) each skip what they served (``done`` modulo their length), and
        serve no more than the epoch has left: ``max_size_cycle`` ends the epoch only once every
        loader ran out."""
        longest = max(len(loader) for loader in loaders)
        done = self._batches_done_in_resumed_epoch(longest)
        if not done:
            return
        for loader in loaders:
            sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
            epochs = getattr(sampler, "sampler", None)
            if isinstance(epochs, EpochSampler):
                size = sampler.batch_size * self._world_size()  # every rank's share of the order
                epochs.skip_next(done % len(loader) * size, (longest - done) * size)

    def _batches_done_in_resumed_epoch(self, per_epoch: int) -> int:
        """Batches of the current epoch a resumed fit already trained on (0 for a fresh fit or a
        checkpoint written at an epoch's end): Lightning restores its loop counters
        (``fit_loop.epoch_loop.batch_progress.current.processed``) before it asks for the training loader."""
        trainer = self.trainer
        if trainer is None or not getattr(trainer, "ckpt_path", None):
            return 0
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return done if 0 < done < per_epoch else 0
