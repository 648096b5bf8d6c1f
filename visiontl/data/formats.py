"""Readers for the formats PIL does not cover well: multiband / 16-bit TIFF and DICOM.

Both return HWC arrays. ``*_raw`` readers keep the stored dtype (what ``check-data`` inspects);
:func:`dicom_to_float` turns a DICOM into what a model sees:

1. stored values -> modality values with ``RescaleSlope`` / ``RescaleIntercept`` (e.g. CT in HU);
2. the file's window (``WindowCenter`` / ``WindowWidth``, DICOM's linear formula) to ``[0, 1]``,
   or, with no window in the file, the image's own min..max;
3. ``MONOCHROME1`` (white = low values) inverted so that bone / dense tissue is bright everywhere.

Errors name the file and say what to do (missing pixel data, compressed pixel data without a
decoder, multi-frame files).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["DICOM_EXTENSIONS", "TIFF_EXTENSIONS", "FormatError", "dicom_to_float", "is_dicom",
           "read_dicom", "read_dicom_raw", "read_tiff_raw"]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})

_DECODERS_HINT = (
    "install a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(JPEG, JPEG-LS, JPEG 2000) or pip install python-gdcm, or store the images uncompressed"
)


class FormatError(ValueError):
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
    import tifffile

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


def _dataset(path: str | os.PathLike[str]):  # noqa: ANN202 - pydicom.Dataset
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise FormatError(f"{path} is not a DICOM file ({err}).") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = getattr(ds, "Modality", "") or "non-image"
        raise FormatError(
            f"DICOM {path} has no pixel data (a {kind} object such as a report or a presentation state); "
            "move it out of the image folder."
        )
    return ds


def _pixels(ds, path: str | os.PathLike[str]) -> np.ndarray:  # noqa: ANN001 - pydicom.Dataset
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as err:
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax is not None and syntax.is_compressed:
            raise FormatError(
                f"DICOM {path} stores compressed pixel data ({syntax.name}) and no decoder for it is installed: "
                f"{_DECODERS_HINT}."
            ) from err
        raise FormatError(f"DICOM {path}: cannot decode the pixel data ({err}).") from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise FormatError(
            f"DICOM {path} is a multi-frame object ({frames} frames); visiontl classifies 2-D images: "
            "export the frames you want as single-frame files."
        )
    return arr


def _sized(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None):  # noqa: ANN202
    ds = _dataset(path)
    if on_shape is not None and "Rows" in ds and "Columns" in ds:
        on_shape(int(ds.Rows), int(ds.Columns))
    return ds


def read_dicom_raw(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Stored pixel values of a single-frame DICOM, HWC (``uint16``, ``int16``, ``uint8``...)."""
    arr = _pixels(_sized(path, on_shape), path)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _first(value: object) -> float:
    """A DICOM value that may be multi-valued (several windows): its first value."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
        value = list(value)[0]  # type: ignore[arg-type]
    return float(value)  # type: ignore[arg-type]


def dicom_to_float(ds, arr: np.ndarray) -> np.ndarray:  # noqa: ANN001 - pydicom.Dataset
    """Modality rescale, window to ``[0, 1]`` and MONOCHROME1 inversion (see the module docstring)."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):  # colour: stored 8 / 16-bit RGB
        bits = int(getattr(ds, "BitsStored", 8) or 8)
        return np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
    values = arr.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        out = (values - (centre - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5  # DICOM PS3.3 C.11.2.1.2
    else:
        low, high = float(values.min()), float(values.max())
        out = (values - low) / (high - low) if high > low else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def read_dicom(path: str | os.PathLike[str], on_shape: Callable[[int, int], None] | None = None) -> np.ndarray:
    """A single-frame DICOM as ``float32`` HWC in ``[0, 1]`` (see :func:`dicom_to_float`)."""
    ds = _sized(path, on_shape)
    out = dicom_to_float(ds, _pixels(ds, path))
    return out[:, :, None] if out.ndim == 2 else out
