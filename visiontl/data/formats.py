"""Readers for the formats PIL does not cover well: multiband / 16-bit TIFF and DICOM.

Both return HWC arrays. ``*_raw`` readers keep the stored dtype (what ``check-data`` inspects);
:func:`dicom_to_float` turns a DICOM into what a model sees:

1. stored values -> modality values with ``RescaleSlope`` / ``RescaleIntercept`` (e.g. CT in HU);
2. the file's window (``WindowCenter`` / ``WindowWidth``, DICOM's linear formula) to ``[0, 1]``,
   or, with no window in the file, the image's own min..max;
3. ``MONOCHROME1`` (white = low values) inverted so that bone / dense tissue is bright everywhere;
   ``PALETTE COLOR`` goes through its colour table, YBR to RGB.

Compressed transfer syntaxes (JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, RLE)
decode with the plugins of the ``dicom`` extra. Multi-frame objects give one frame per read
(``frame``: an index or ``"middle"``; see :data:`FRAMES` for the datamodules' option); enhanced
multi-frame objects take rescale and window from the frame's functional groups. Files without a
preamble or file meta are read as bare datasets where pydicom can. Every failure is a
:class:`FormatError` naming the file and the cure (no pixel data, an incomplete pixel
description, no decoder installed, a corrupt codestream, a multi-frame file under
``frame="error"``); nothing else escapes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visiontl.data.pixels import to_unit
from visiontl.core.extras import MissingExtraError, require
from visiontl.core.errors import UserError

__all__ = ["DICOM_EXTENSIONS", "FRAMES", "TIFF_EXTENSIONS", "Frame", "FormatError", "dicom_frames", "dicom_to_float",
           "is_dicom", "read_dicom", "read_dicom_raw", "read_tiff_raw"]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})


class FormatError(UserError):
    """A file in a supported format whose content cannot be used; the message says why."""


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """A ``.dcm`` / ``.dicom`` file, or an extension-less file with the DICOM preamble (``DICM``)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    if path.suffix or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_tiff_raw(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Read a (Geo)TIFF with every band, as HWC in its stored dtype.

    Band-sequential files (``bands x H x W``, the GeoTIFF default for multispectral data) are
    transposed to HWC; an RGB(A) file's alpha band is kept (the caller drops it). ``on_shape``
    is called with (height, width) from the header before any pixel is decoded (a size check).
    """
    tifffile = require("tifffile", "tiff", f"Reading the TIFF {path}")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        axes = str(getattr(page, "axes", ""))  # e.g. "YXS" (interleaved) or "SYX" (band-sequential)
        if on_shape is not None and "Y" in axes and "X" in axes:
            on_shape(int(page.shape[axes.index("Y")]), int(page.shape[axes.index("X")]))
        arr = page.asarray()
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise FormatError(f"TIFF {path} holds an array of shape {arr.shape}; expected one 2-D image with bands.")
    if axes.startswith("S"):
        arr = np.moveaxis(arr, 0, 2)
    return np.ascontiguousarray(arr)


FRAMES = ("middle", "all", "error")
"""What to do with a multi-frame DICOM (cine loop, enhanced CT / MR, tomosynthesis): read its
``middle`` frame, make ``all`` of its frames samples (one each), or stop with an ``error``."""

Frame = int | str
"""Which frame a reader returns: an index (from 0), ``"middle"``, or ``"error"`` (a multi-frame
file is refused, naming the ``frames`` option)."""

_DECODERS_HINT = (
    "install the decoders with pip install 'visiontl[dicom]' (pylibjpeg with its libjpeg, openjpeg and "
    "rle plugins: JPEG, JPEG-LS, JPEG 2000, RLE) or pip install python-gdcm, or store the images uncompressed"
)
_PIXEL_MODULE = ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation",
                 "PixelRepresentation")
_NATIVE_SYNTAX = {  # how pydicom found a bare dataset encoded (implicit VR, little endian) -> its syntax
    (True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1", (False, False): "1.2.840.10008.1.2.2",
}
_DEFER = "256 KB"  # pixel data stays on disk until a frame is decoded


@dataclass
class _Dicom:
    """A parsed DICOM header (pixel data deferred) and how its pixels can be reached."""

    path: str | os.PathLike[str]
    ds: Any  # pydicom.Dataset
    by_path: bool  # the file itself can be re-read frame by frame (it has a valid file meta)
    frames: int


_PASS_THROUGH = (FormatError, MissingExtraError, OSError, KeyboardInterrupt, SystemExit, GeneratorExit)


@contextmanager
def _untrusted(path: str | os.PathLike[str]) -> Iterator[None]:
    """Whatever pydicom or a decoder plugin raises on a damaged file becomes a FormatError naming it:
    lazily parsed header values fail wherever they are first touched, and the Rust / C plugins
    raise their own types (pylibjpeg-rle panics with a BaseException)."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except BaseException as err:  # noqa: BLE001 - see the docstring
        reason = " ".join(str(err).split())[:300]
        raise FormatError(f"DICOM {path} is damaged ({type(err).__name__}: {reason}); replace it.") from err


def _open(path: str | os.PathLike[str]) -> _Dicom:
    """Parse a DICOM's header; files without a preamble or file meta are read with ``force``.

    Raises FormatError for anything pydicom cannot parse, for objects without pixel data and for
    images whose pixel description (Rows, Bits Allocated...) is incomplete.
    """
    require("pydicom", "dicom", f"Reading the DICOM {path}")
    import pydicom
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except InvalidDicomError:  # no 'DICM' preamble / file meta: a bare dataset, as old archives hold
            ds, forced = pydicom.dcmread(path, defer_size=_DEFER, force=True), True
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure on untrusted bytes is a bad file
        raise FormatError(f"DICOM {path} cannot be parsed ({type(err).__name__}: {err}); it is truncated or "
                          "corrupt.") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if forced and not any(element.keyword for element in ds):
            raise FormatError(f"{path} is not a DICOM file: it has no 'DICM' preamble or file meta, and read as "
                              "a bare dataset it holds no standard element.")
        kind = str(ds.get("Modality", "") or "") or "non-image"
        raise FormatError(
            f"DICOM {path} has no pixel data (a {kind} object such as a report or a presentation state); "
            "move it out of the image folder."
        )
    missing = [k for k in _PIXEL_MODULE if ds.get(k) in (None, "")]
    if missing:
        raise FormatError(
            f"DICOM {path} has pixel data but lacks {', '.join(missing)} (the Image Pixel module), so its pixels "
            "cannot be decoded: the file is incomplete; re-export it from the PACS or viewer."
        )
    by_path = _settle_syntax(ds, path) and not forced
    raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(raw or 1)
    except (TypeError, ValueError) as err:
        raise FormatError(f"DICOM {path}: Number of Frames is {raw!r}, not a whole number; fix the header.") from err
    return _Dicom(path, ds, by_path, max(frames, 1))


def _settle_syntax(ds: Any, path: str | os.PathLike[str]) -> bool:
    """Make sure the dataset has a Transfer Syntax UID; True if the file already had one.

    A file meta without one (old or hand-made files) is given the encoding pydicom found the
    dataset in, which is certain for native (uncompressed) pixel data; compressed data then has
    no named codec and is refused.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return True
    element = ds.get_item("PixelData") if "PixelData" in ds else None
    encapsulated = element is not None and (
        getattr(element, "is_undefined_length", False) or getattr(element, "length", 0) == 0xFFFFFFFF)
    if encapsulated:
        raise FormatError(
            f"DICOM {path} has no Transfer Syntax UID and its pixel data is compressed (encapsulated), so the "
            "codec is unknown; re-export the file with its file meta (dcmconv, gdcmconv)."
        )
    encoding = tuple(getattr(ds, "original_encoding", (None, None)))
    syntax = _NATIVE_SYNTAX.get(encoding, "1.2.840.10008.1.2.1")  # type: ignore[arg-type]
    if meta is None:
        meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(syntax)
    ds.file_meta = meta
    return False


def _frame_index(dicom: _Dicom, frame: Frame) -> int | None:
    """The frame to decode (None: the file's only frame)."""
    n = dicom.frames
    if isinstance(frame, str) and frame not in ("middle", "error"):
        raise ValueError(f"frame must be a frame index, 'middle' or 'error', got {frame!r}")
    if n == 1:
        if isinstance(frame, int) and frame != 0:
            raise FormatError(f"DICOM {dicom.path} has one frame; frame {frame} does not exist.")
        return None
    if frame == "error":
        raise FormatError(
            f"DICOM {dicom.path} is a multi-frame object ({n} frames); set frames: middle to read its middle "
            "frame or frames: all for one sample per frame (--data.init_args.frames middle), or export the "
            "frames you want as single-frame files."
        )
    index = n // 2 if frame == "middle" else int(frame)
    if not 0 <= index < n:
        raise FormatError(f"DICOM {dicom.path} has {n} frames; frame {index} does not exist.")
    return index


def _decode(dicom: _Dicom, index: int | None) -> np.ndarray:
    """Decoded pixels of one frame (or the only one), colour converted to RGB; pydicom's and its
    plugins' failures become a FormatError naming the file and the cure."""
    from pydicom.pixels import pixel_array

    try:
        if dicom.by_path and index is not None:  # reads this frame's bytes only, not the whole cine loop
            return pixel_array(dicom.path, index=index)
        return pixel_array(dicom.ds, index=index)
    except _PASS_THROUGH:
        raise
    except BaseException as err:  # noqa: BLE001 - every decoder failure on untrusted bytes is a bad file
        raise _decode_error(dicom, err) from err


def _decode_error(dicom: _Dicom, err: BaseException) -> FormatError:
    from pydicom.pixels import get_decoder

    syntax = dicom.ds.file_meta.TransferSyntaxUID
    reason = " ".join(str(err).split())[:300]
    if not syntax.is_compressed:
        return FormatError(f"DICOM {dicom.path}: cannot decode the pixel data ({reason}).")
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        return FormatError(f"DICOM {dicom.path} stores pixel data as {syntax.name}, which pydicom cannot decode; "
                           "store the images uncompressed.")
    if not available:
        return FormatError(f"DICOM {dicom.path} stores compressed pixel data ({syntax.name}) and no decoder for it "
                           f"is installed: {_DECODERS_HINT}.")
    return FormatError(
        f"DICOM {dicom.path}: the installed decoders failed on its {syntax.name} pixel data ({reason}); the file "
        "may be corrupt, or need another decoder (pip install python-gdcm)."
    )


def _frame_value(ds: Any, keyword: str, index: int | None) -> Any:
    """An attribute of the dataset, or, in enhanced multi-frame objects, of the frame's functional
    groups (per-frame first, then shared): rescale and window live there."""
    if keyword in ds:
        return ds[keyword].value
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        for element in group:
            if element.VR == "SQ" and element.value and keyword in element.value[0]:
                return element.value[0][keyword].value
    return None


def dicom_frames(path: str | os.PathLike[str]) -> int:
    """Number of frames of a DICOM image (1 for a single-frame one), from its header."""
    with _untrusted(path):
        return _open(path).frames


def _read(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None,
          frame: Frame) -> tuple[Any, np.ndarray, int | None]:
    with _untrusted(path):
        dicom = _open(path)
        if on_shape is not None:
            on_shape(int(dicom.ds.Rows), int(dicom.ds.Columns))
        index = _frame_index(dicom, frame)
        return dicom.ds, _decode(dicom, index), index


def read_dicom_raw(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None = None,
                   frame: Frame = "error") -> np.ndarray:
    """Stored pixel values of one frame of a DICOM, HWC (``uint16``, ``int16``, ``uint8``...)."""
    _, arr, _ = _read(path, on_shape, frame)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _first(value: object) -> float:
    """A DICOM value that may be multi-valued (several windows): its first value."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        value = list(value)[0]  # type: ignore[arg-type]
    return float(value)  # type: ignore[arg-type]


def dicom_to_float(ds: Any, arr: np.ndarray, index: int | None = None) -> np.ndarray:
    """Modality rescale, window to ``[0, 1]`` and MONOCHROME1 inversion (see the module docstring);
    palette-colour images through their colour table. ``index``: the frame, for enhanced
    multi-frame objects whose rescale and window are per frame."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        return to_unit(rgb)  # the colour table's 8 or 16-bit values, by their type
    if not photometric.startswith("MONOCHROME"):  # colour: stored 8 / 16-bit RGB (YBR converted)
        bits = int(ds.get("BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    slope = float(_frame_value(ds, "RescaleSlope", index) or 1)
    intercept = float(_frame_value(ds, "RescaleIntercept", index) or 0)
    centre, width = _frame_value(ds, "WindowCenter", index), _frame_value(ds, "WindowWidth", index)
    window = None if centre in (None, "") or width in (None, "") else (_first(centre), max(_first(width), 1.0))
    values = arr.astype(np.float64) * slope + intercept
    if not np.isfinite([slope, intercept, *(window or ())]).all() or not np.isfinite(values).all():
        raise FormatError(f"DICOM {getattr(ds, 'filename', '')} has non-finite rescale, window or pixel values "
                          f"(slope {slope}, intercept {intercept}, window {window}); fix the header.")
    if window is not None:
        centre, width = window
        out = (values - (centre - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5  # DICOM PS3.3 C.11.2.1.2
    else:
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def read_dicom(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None = None,
               frame: Frame = "error") -> np.ndarray:
    """One frame of a DICOM as ``float32`` HWC in ``[0, 1]`` (see :func:`dicom_to_float`)."""
    ds, arr, index = _read(path, on_shape, frame)
    with _untrusted(path):
        out = dicom_to_float(ds, arr, index)
    return out[:, :, None] if out.ndim == 2 else out
