"""Streaming data for sets that do not fit in memory or on local disk, in Lightning's own format.

``visiontl prepare-data SRC OUT`` (:func:`prepare_data`) decodes a labelled folder or CSV once and
writes it with LitData's ``optimize`` as chunked binary shards, one LitData data set per split
(``OUT/train``, ``OUT/val``, ``OUT/test``), then ``OUT/visiontl.json``: the classes, each split's
counts and sample names, the channels, bit depth and per-channel statistics of the training
images, and anything left out. ``OUT`` may be a local folder, a shared filesystem, or object
storage (``s3://``, ``gs://``; LitData uploads the shards). :class:`StreamingDataModule` then
trains from it with LitData's ``StreamingDataset`` / ``StreamingDataLoader``: shards are fetched
as needed into a bounded local cache, each rank and worker reads its own share, and nothing is
held in memory.

Each sample keeps the decoded image as lossless PNG (8 or 16 bits; ``.npy`` for other band counts),
its label and its position in the split's listing (``index``), which names it in
``visiontl.json``. Images read exactly as :func:`~visiontl.data.images.read_image` reads the files
(DICOM windowing, 16-bit scaling, multi-band TIFF); ``image_size`` resizes them once, shorter side
to :func:`~visiontl.data.presize.presized_side`, for sources much larger than training needs.

``visiontl.json`` is written last: a folder without it is an unfinished preparation, and
:class:`StreamingDataModule` refuses it. Needs the ``stream`` extra (``pip install 'visiontl[stream]'``).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.data.base import ImageDataModule, drop_last_batch
from visiontl.data.images import DataError, scan_frame
from visiontl.data.stats import stats_from_sums
from visiontl.data.streamcodec import encode_sample, read_log

__all__ = ["META", "StreamingDataModule", "describe", "prepare_data", "read_meta"]

META = "visiontl.json"
FORMAT = 1
SPLITS = ("train", "val", "test")
_REMOTE = ("s3://", "gs://", "r2://", "azure://", "hf://")
_LISTED = 20  # files left out that prepare-data prints (all are in visiontl.json)


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as err:
        raise ImportError("Streaming data needs LitData: pip install 'visiontl[stream]' (or pip install litdata).") \
            from err
    return litdata


# -- where the data set lives -----------------------------------------------------------------
def _is_remote(path: str) -> bool:
    return str(path).startswith(_REMOTE)


def _local(path: str) -> Path | None:
    """The local folder of ``path`` (a plain path or LitData's ``local:`` prefix), None for object storage."""
    path = str(path)
    if _is_remote(path):
        return None
    return Path(path[len("local:"):] if path.startswith("local:") else path).expanduser()


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def read_meta(input_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``visiontl.json`` of a prepared data set (downloaded first from object storage)."""
    local = _local(input_dir)
    if local is not None:
        meta_path = local / META
        if not meta_path.is_file():
            what = "does not exist" if not local.exists() else "holds no visiontl.json"
            raise DataError(f"{input_dir} {what}: it is not a data set prepared by `visiontl prepare-data` (or its "
                            f"preparation did not finish). Run `visiontl prepare-data SRC {input_dir}` first.")
        text = meta_path.read_text(encoding="utf-8")
    else:
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory(prefix="visiontl-meta-") as tmp:
            target = str(Path(tmp) / META)
            try:
                get_downloader(input_dir, tmp, [], storage_options or {}).download_file(_join(input_dir, META), target)
                text = Path(target).read_text(encoding="utf-8")
            except Exception as err:  # noqa: BLE001 - the provider's own errors vary
                raise DataError(f"Cannot read {_join(input_dir, META)} ({type(err).__name__}: {err}): is {input_dir} "
                                f"a data set prepared by `visiontl prepare-data`, and are its credentials set?") from err
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise DataError(f"{input_dir}/{META} has format {meta.get('format')!r}; this visiontl reads format {FORMAT}. "
                        f"Prepare the data again.")
    return meta


def _write_meta(out: str, meta: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    local = _local(out)
    if local is not None:
        from visiontl.core.files import write_json

        write_json(local / META, meta)  # atomic: the last thing written, so its presence means "finished"
        return
    from litdata.streaming.fs_provider import _get_fs_provider  # LitData's own uploader for its shards

    with tempfile.TemporaryDirectory(prefix="visiontl-meta-") as tmp:
        path = Path(tmp) / META
        path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _get_fs_provider(out, storage_options or {}).upload_file(str(path), _join(out, META))


def _check_out(out: str, overwrite: bool) -> None:
    local = _local(out)
    if local is None:
        return  # object storage: LitData's optimize refuses a non-empty prefix itself unless overwriting
    from visiontl.core.files import remove_stale_temps

    remove_stale_temps(local)  # the staging folder of a killed preparation
    if local.exists() and not local.is_dir():
        raise DataError(f"{out} is a file; give prepare-data a folder to write the data set to.")
    if local.is_dir() and any(local.iterdir()) and not overwrite:
        what = "a prepared data set" if (local / META).exists() else "files"
        raise DataError(f"{out} already holds {what}; nothing was changed. Give another OUT, or pass --overwrite "
                        f"to replace it.")


def _stage(out: str) -> Path | None:
    """A new folder beside a local ``out`` that the splits are written to (None for object storage):
    ``out`` changes only once every split is written, so a failed or killed preparation leaves it as
    it was (a killed one's folder is removed by the next preparation of ``out``)."""
    local = _local(out)
    if local is None:
        return None
    local = local.absolute()
    local.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{local.name}.tmp-{os.getpid()}-", dir=local.parent))
    from visiontl.core.files import current_umask

    os.chmod(stage, 0o777 & ~current_umask())
    return stage


def _publish(stage: Path, out: str, written: list[str]) -> None:
    """Move the staged splits into ``out``, replacing the data set there (``visiontl.json`` comes
    after, written last); files of ``out`` other than a data set's are kept."""
    local = _local(out)
    assert local is not None
    local.mkdir(parents=True, exist_ok=True)
    (local / META).unlink(missing_ok=True)  # unfinished from now until the new one is written
    for split in SPLITS:
        shutil.rmtree(local / split, ignore_errors=True)
    for split in written:
        os.replace(stage / split, local / split)


def _worker_error(err: BaseException) -> str:
    """The first exception's ``Type: message`` line of LitData's flattened worker traceback(s),
    or the error's own text when it holds none."""
    import re

    text = str(err)
    for line in text.splitlines():
        found = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$", line.strip())
        if found and "Traceback" not in line:
            return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2)}"
    return f"{type(err).__name__}: {' '.join(text.split())[:300]}"


# -- prepare ----------------------------------------------------------------------------------
def _name(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _why_missing(path: Path, frame: Any, max_pixels: int | None) -> str:
    """Why a worker wrote nothing for an image (LitData ends a worker that raised without saying so)."""
    from visiontl.data.images import ImageReadError, read_image

    try:
        read_image(path, max_pixels, frame)
    except ImageReadError as err:
        return str(err)
    return "not written (its worker process stopped)"


def prepare_data(src: str | os.PathLike[str], out: str, *, val_fraction: float = 0.2, seed: int = 0,
                 image_size: int | None = None, on_bad_image: str = "error", frames: str = "error",
                 max_pixels: int | None = None, chunk_bytes: str | int = "64MB", num_workers: int | None = None,
                 overwrite: bool = False, storage_options: dict[str, Any] | None = None,
                 csv_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the labelled images of ``src`` (a class-per-folder tree, or a CSV of path, label) to
    ``out`` in LitData's format and return the data set's ``visiontl.json``.

    Splits are read as :class:`~visiontl.data.FolderDataModule` / :class:`~visiontl.data.CsvDataModule`
    read them (a validation split of ``val_fraction`` per class is drawn with ``seed`` when there is
    none), after the same cheap data check (errors stop here, before anything is written).

    Args:
        image_size: store images resized once (shorter side ``ceil(1.15 * image_size)``, aspect
            kept); ``None`` keeps full resolution.
        on_bad_image: ``error`` stops at an unreadable file, naming it; ``skip`` leaves it out and
            lists it in ``visiontl.json`` (``skipped``). Entries a folder's layout does not take
            (dangling symlinks, folders or FIFOs named like images, images outside the class
            folders: :func:`visiontl.data.layout.not_taken`) are listed there in either case, and
            printed by :func:`describe`.
        chunk_bytes: size of LitData's shards (``"64MB"``: a few hundred to a few thousand images each).
        num_workers: processes decoding images (default: the machine's cores).
        overwrite: replace a data set (or other files) already in ``out``; without it they are kept
            and nothing is written. A local ``out`` is written to a folder beside it and changes only
            once every split is written: a failure leaves it as it was.
        csv_options: more :class:`~visiontl.data.CsvDataModule` arguments for a CSV source
            (``path_column``, ``label_column``, ``root``, ``split_column``...).
    """
    _litdata()  # the extra is there, before anything is read
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise DataError(f"image_size must be a whole number >= 1 (or None to keep full resolution), got {image_size!r}.")
    from visiontl.data.datamodules import labelled_datamodule

    dm = labelled_datamodule(src, val_fraction=val_fraction, seed=seed, on_bad_image=on_bad_image, frames=frames,
                             max_pixels=max_pixels, **(csv_options or {}))
    if dm.multilabel:
        raise DataError(f"{src}: prepare-data streams one class per image; multi-label data (several tags per image) "
                        f"trains from the CSV itself (CsvDataModule), without prepare-data.")
    dm._check_layout()  # headers, counts, leakage: stops before anything is written
    _check_out(out, overwrite)
    stage = _stage(out)
    try:
        meta = _prepare(dm, src, out, stage, image_size=image_size, on_bad_image=on_bad_image, max_pixels=max_pixels,
                        chunk_bytes=chunk_bytes, num_workers=num_workers, storage_options=storage_options)
        if stage is not None:
            _publish(stage, out, list(meta["splits"]))
        _write_meta(out, meta, storage_options)  # last: its presence means "finished"
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return meta


def _left_out(dm: Any, src: str | os.PathLike[str]) -> list[list[str]]:
    """``[path, why]`` of the files the source lists or holds that are not prepared before any is
    decoded: CSV rows whose file is missing (under ``skip``), and for a folder, every entry named
    like an image that its layout does not take (:func:`visiontl.data.layout.not_taken`: dangling
    symlinks, folders or FIFOs named ``*.png``, images outside the class folders)."""
    from visiontl.data.layout import not_taken

    out = [[str(p), str(why)] for p, why in dm.skipped]
    path = Path(src).expanduser()
    if path.is_dir():
        taken = [p for items in dm.splits.values() for p, _ in items]
        out += [[str(p), why] for p, why in not_taken(path, taken)]
    return out


def _stopped(src: Any, out: str, split: str, what: str) -> DataError:
    left = f"nothing was written to {out}" if _local(out) is not None else f"{out} holds no finished data set"
    return DataError(f"prepare-data stopped at the {split} split of {src}: {what.rstrip('.')}. {left[0].upper()}"
                     f"{left[1:]}.")


def _prepare(dm: Any, src: str | os.PathLike[str], out: str, stage: Path | None, *, image_size: int | None,
             on_bad_image: str, max_pixels: int | None, chunk_bytes: str | int, num_workers: int | None,
             storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Write every split to ``stage`` (``out`` itself for object storage) and return the metadata."""
    from visiontl.data.images import bad_image_line
    from visiontl.data.presize import presized_side

    litdata = _litdata()
    target = str(stage) if stage is not None else out
    short_side = presized_side(int(image_size)) if image_size is not None else None
    classes = dm.class_names
    label_of = {c: i for i, c in enumerate(classes)}
    base = Path(src).expanduser()
    base = base.parent if base.is_file() else base
    meta: dict[str, Any] = {"format": FORMAT, "source": str(src), "classes": classes, "image_size": image_size,
                            "stored_short_side": short_side, "splits": {}, "skipped": _left_out(dm, src)}
    stats: dict[int, np.ndarray] = {}
    workers = int(num_workers) if num_workers is not None else max(1, os.cpu_count() or 1)
    for split in SPLITS:
        refs = dm.samples(split) if split in dm.splits else []
        if not refs:
            continue
        inputs = [(i, str(p), label_of[c], f) for i, (p, c, f) in enumerate(refs)]
        with tempfile.TemporaryDirectory(prefix="visiontl-prepare-") as log_dir:
            fn = functools.partial(encode_sample, short_side=short_side, max_pixels=max_pixels, log_dir=log_dir,
                                   skip_bad=on_bad_image == "skip")
            method = multiprocessing.get_start_method(allow_none=True)
            crashed: Exception | None = None
            try:
                litdata.optimize(fn=fn, inputs=inputs, output_dir=_join(target, split), chunk_bytes=chunk_bytes,
                                 num_workers=min(workers, len(inputs)), reorder_files=False, mode="overwrite",
                                 storage_options=storage_options or {}, verbose=len(inputs) >= 300)
            except Exception as err:  # LitData's own failure (the workers log the images'): said after theirs
                crashed = err
            finally:  # LitData sets the process-wide start method (spawn): the caller's comes back
                multiprocessing.set_start_method(method, force=True)
            records = read_log(Path(log_dir))
        failed = [r["error"] for _, r in sorted(records.items()) if "error" in r]
        if failed:
            raise _stopped(src, out, split, failed[0]) from crashed
        bad = [(str(refs[i][0]), records[i]["bad"]) for i in sorted(records) if "bad" in records[i]]
        if bad and on_bad_image == "error":
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise _stopped(src, out, split, "; ".join(bad_image_line(p, r) for p, r in bad[:3]) + more
                           + ". Replace or delete the file(s), or pass --on-bad-image skip (on_bad_image='skip') to "
                           "leave unreadable images out, listed") from crashed
        if not records:
            said = f" ({_worker_error(crashed)})" if crashed is not None else ""
            raise DataError(f"prepare-data: LitData's worker processes wrote none of the {len(inputs)} {split} images "
                            f"to {out}{said}. They are started with spawn, which imports the calling script again: "
                            f"call prepare_data under `if __name__ == \"__main__\":` (or use `visiontl prepare-data`). "
                            f"{out} holds no finished data set.") from crashed
        if crashed is not None:
            raise _stopped(src, out, split, _worker_error(crashed)) from crashed
        kept = [i for i in range(len(inputs)) if i in records and "bad" not in records[i]]
        lost = [(str(refs[i][0]), _why_missing(refs[i][0], refs[i][2], max_pixels))
                for i in range(len(inputs)) if i not in records]
        if lost and on_bad_image == "error":
            raise _stopped(src, out, split, "; ".join(bad_image_line(p, r) for p, r in lost[:3]))
        meta["skipped"] += [[p, r] for p, r in bad + lost]
        counts = [0] * len(classes)
        for i in kept:
            counts[inputs[i][2]] += 1
            if split == "train":
                record = records[i]
                sums = stats.setdefault(int(record["channels"]), np.zeros(3 * int(record["channels"])))
                sums += np.concatenate([record["sum"], record["sumsq"],
                                        [record["pixels"]] * int(record["channels"])])
        if split == "train" and not kept:
            raise _stopped(src, out, split, "every training image was unreadable, nothing to prepare")
        meta["splits"][split] = {
            "n": len(kept), "class_counts": counts,
            "names": [_name(Path(p), base) for p, _, _ in refs],  # by the samples' ``index``
            "labels": [label_of[c] for _, c, _ in refs],
        }
    report = dm.data_report  # the data check's findings travel with the data set
    meta["data_check"] = report.to_dict() if report is not None else None
    meta["bit_depth"] = dm.bit_depth(scan_frame(dm.frames))  # of the files, as a folder run records it
    meta["stats"] = {}
    for chans, sums in sorted(stats.items()):
        mean, std = stats_from_sums(sums[:chans], sums[chans:2 * chans], sums[2 * chans:])
        meta["stats"][str(chans)] = {"mean": mean, "std": std, "pixels": int(sums[2 * chans])}
    meta["channels"] = max((int(c) for c in meta["stats"]), default=3)
    return meta


class _StoredReport:
    """A data check's report as ``prepare-data`` stored it."""

    def __init__(self, found: dict[str, Any]) -> None:
        self._found = found

    def to_dict(self) -> dict[str, Any]:
        return dict(self._found)


# -- train from it ----------------------------------------------------------------------------
class StreamingDataModule(ImageDataModule):
    """A data set written by ``visiontl prepare-data``, streamed with LitData.

    Every strategy that trains through images works from it (probe, partial, full, gradual,
    LoRA, scratch), on one process or under DDP (LitData gives each rank and loader worker its own
    share of the shards). Cached features and fitted heads need the image files and are not
    offered: an LP-FT strategy trains its head by SGD instead, and says so.

    Args:
        input_dir: where ``prepare-data`` wrote it: a local folder, ``local:/path`` (read as if it
            were remote: shards are copied to ``cache_dir``, for testing), or ``s3://`` / ``gs://``.
        cache_dir: local folder for the fetched shards (default: LitData's).
        max_cache_size: the most local disk the fetched shards take (``"50GB"``).
        storage_options: credentials and options for the object store (LitData's).
        seed: seed of the training order and of the augmentation.
        **kwargs: the image settings of :class:`~visiontl.data.base.ImageDataModule`
            (``batch_size``, ``num_workers``, ``image_size``, ``augment``, ``mean``, ``std``,
            ``normalize``, ``in_chans``). Images were checked when they were prepared.
    """

    def __init__(self, input_dir: str, cache_dir: str | None = None, max_cache_size: str = "50GB",
                 storage_options: dict[str, Any] | None = None, seed: int = 0, **kwargs: Any) -> None:
        kwargs["check_images"] = False  # prepare-data decoded every image
        super().__init__(**kwargs)
        self.input_dir, self.cache_dir, self.max_cache_size = input_dir, cache_dir, max_cache_size
        self.storage_options = storage_options
        self.seed = seed
        self._meta: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The data set's ``visiontl.json``."""
        if self._meta is None:
            self._meta = read_meta(self.input_dir, self.storage_options)
        return self._meta

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def data_report(self) -> _StoredReport | None:
        """The data check ``prepare-data`` ran (a run directory's ``data_check.json``)."""
        found = self.meta.get("data_check")
        return _StoredReport(found) if found is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        return list(self.meta["splits"]["train"]["class_counts"])

    @property
    def train_size(self) -> int:
        """Training images."""
        return int(self.meta["splits"]["train"]["n"])

    @property
    def split_names(self) -> list[str]:
        return [s for s in SPLITS if s in self.meta["splits"]]

    def names(self, split: str) -> list[str]:
        """Each sample's name (its path under the prepared source), by the samples' ``index``."""
        return list(self.meta["splits"][split]["names"])

    # -- the image base's hooks ---------------------------------------------------------------
    def train_paths(self) -> list[Path]:
        return []

    def bit_depth(self, frame: Any = "error") -> int:
        return int(self.meta.get("bit_depth", 8))

    def dataset_stats(self, chans: int) -> tuple[list[float], list[float]]:
        """Per-channel mean / std measured by ``prepare-data`` on the training images as they are read
        with ``chans`` channels (gray images count once per channel); other conversions are an error."""
        stats = self.meta.get("stats", {})
        parts = [(stats[str(chans)], False)] if str(chans) in stats else []
        if chans > 1 and "1" in stats:
            parts.append((stats["1"], True))
        if not parts or set(stats) - {str(chans), "1"}:
            raise DataError(f"{self.input_dir} holds images with {', '.join(sorted(stats))} channel(s); statistics for "
                            f"{chans} channels cannot be derived from them. Set mean and std, or normalize: backbone.")
        total = sum(np.resize(p["mean"], chans) * p["pixels"] for p, _ in parts)
        squares = sum((np.resize(p["std"], chans) ** 2 + np.resize(p["mean"], chans) ** 2) * p["pixels"]
                      for p, _ in parts)
        return stats_from_sums(total, squares, sum(p["pixels"] for p, _ in parts))

    def drop_bad(self, bad: set[Path]) -> None:  # pragma: no cover - images are checked by prepare-data
        raise DataError("Streamed images were checked when they were prepared.")

    # -- loaders ------------------------------------------------------------------------------
    def _dataset(self, split: str, train: bool, drop_last: bool) -> Any:
        from visiontl.data.streamset import StreamingImages
        from visiontl.data.transforms import build_transforms

        pre = self.preprocessing
        transform = build_transforms(self.augment, train, pre.size, list(pre.mean), list(pre.std), pre.crop_pct,
                                     pre.interpolation)
        cache_dir = None if self.cache_dir is None else str(Path(self.cache_dir).expanduser() / split)
        return StreamingImages(_join(self.input_dir, split), transform=transform, in_chans=pre.in_chans,
                               aug_seed=self.seed if train else None, shuffle=train, seed=self.seed,
                               drop_last=drop_last, cache_dir=cache_dir, max_cache_size=self.max_cache_size,
                               storage_options=self.storage_options or {})

    def _loader(self, split: str, train: bool = False) -> Any:
        from visiontl.data.streamset import StreamingLoader

        if split not in self.meta["splits"]:
            raise DataError(f"{self.input_dir} has no {split!r} split (it has {', '.join(self.split_names)}).")
        n = int(self.meta["splits"][split]["n"])
        batch = self.loader_batch_size(self.train_size, n) if train else self.eval_batch_size(self.train_size, n)
        world = self._world_size()
        if not train:  # LitData hands ranks whole batches: one per rank at least, or a rank has none
            batch = max(1, min(batch, n // world))
        # the datamodules' rule (drop_last_batch): LitData deals each worker whole batches and the rest
        # (n % batch) to one of them, so only that last batch can be a lone image. Under DDP every short
        # batch goes, as LitData cannot pad the ranks' shares to equal ones
        drop_last = train and (world > 1 or drop_last_batch(n, batch))
        return StreamingLoader(self._dataset(split, train, drop_last), batch_size=batch,
                               num_workers=self.loader_workers(), pin_memory=self.pin_memory(), drop_last=drop_last)

    def train_dataloader(self) -> Any:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        return self._loader("val")

    def test_dataloader(self) -> Any:
        return self._loader("test")

    def predict_dataloader(self) -> Any:
        return self._loader("test")


def describe(meta: dict[str, Any]) -> str:
    """A few lines about a prepared data set (what ``prepare-data`` prints)."""
    lines = [f"{len(meta['classes'])} classes: {', '.join(meta['classes'][:12])}"
             + (" ..." if len(meta["classes"]) > 12 else "")]
    for split, info in meta["splits"].items():
        lines.append(f"{split}: {info['n']} images")
    lines.append(f"channels {meta['channels']}, {meta['bit_depth']}-bit"
                 + (f", stored at shorter side {meta['stored_short_side']} px" if meta.get("stored_short_side") else ""))
    skipped = meta["skipped"]
    if skipped:
        lines.append(f"{len(skipped)} file(s) left out (listed in {META}: skipped):")
        lines += [f"  {path}: {why}" for path, why in skipped[:_LISTED]]
        if len(skipped) > _LISTED:
            lines.append(f"  ... and {len(skipped) - _LISTED} more")
    return "\n".join(lines)
