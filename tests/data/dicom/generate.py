"""A tiny folder of single-frame 16-bit DICOM radiographs sorted by class, plus unusable DICOMs.

Mimics no single public dataset but the way DICOM classification sets are usually organised
after export from a PACS or from collections such as the RSNA Pneumonia Detection Challenge or
VinDr-CXR (single-frame DX / CR radiographs, 12-bit pixel data in 16-bit words; real-world
licences vary: RSNA's is competition-only, VinDr-CXR's PhysioNet credentialed). Layout::

    root/dicom/<class>/<PatientID>_<n>.dcm       # classes "normal" and "abnormal", 6 files each

Every file: Digital X-Ray Image Storage - For Presentation (1.2.840.10008.5.1.4.1.1.1.1), Modality
DX, Explicit VR Little Endian, uncompressed, 64x64, SamplesPerPixel 1, BitsAllocated 16,
BitsStored 12, HighBit 11, PixelRepresentation 0 (stored values 0..4095), anonymous PatientID
``ANON0001``... and deterministic UIDs. The six files of a class cycle through real-world variants
(same anatomy, different encoding), so a reader must apply them to see the same picture:

    0: MONOCHROME2, no rescale, no window (display by min..max)
    1: MONOCHROME1 (stored = 4095 - v: white is low), no window
    2: MONOCHROME2, RescaleSlope 1 / RescaleIntercept -1024 (stored = v, modality value = v - 1024),
       WindowCenter / WindowWidth in modality units
    3: MONOCHROME2, two windows (multi-valued WindowCenter / WindowWidth + explanation)
    4: MONOCHROME1 with a window (in stored units)
    5: RescaleSlope 1 / RescaleIntercept -1024, no window

The pictures are chest-like (dark lungs, bright ribs, spine and heart); "abnormal" ones have a
bright nodule / opacity in one lung. ``make_bad`` writes three unusable files into ``root/bad/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

CLASSES = ("normal", "abnormal")
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def _uid(*parts: object) -> str:
    """A deterministic UID (pydicom's prefix + a hash of ``parts``)."""
    return generate_uid(entropy_srcs=["visiontl-test-fixture", *map(str, parts)])


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    low = rng.random((cells, cells))
    idx = np.linspace(0, cells - 1, size)
    i0 = np.floor(idx).astype(int)
    i1 = np.minimum(i0 + 1, cells - 1)
    f = idx - i0
    rows = low[i0] * (1 - f)[:, None] + low[i1] * f[:, None]
    return rows[:, i0] * (1 - f) + rows[:, i1] * f


def radiograph(abnormal: bool, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Chest-like picture as 12-bit values (0..4095, bright = dense), uint16."""
    s = size / 64
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cx = size / 2 + rng.uniform(-2, 2) * s
    k = rng.uniform(0.9, 1.1)
    body = ((xx - cx) / (29 * s * k)) ** 2 + ((yy - 38 * s) / (34 * s * k)) ** 2 < 1
    img = np.where(body, 0.55, 0.05)
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lungs |= ((xx - cx - side * 12 * s * k) / (8.5 * s * k)) ** 2 + ((yy - 32 * s) / (19 * s * k)) ** 2 < 1
    img[lungs] = 0.2
    ribs = np.sin(2 * np.pi * (yy + 0.02 * (xx - cx) ** 2 / s) / (7 * s * k) + rng.uniform(0, 6)) > 0.1
    img += 0.12 * (lungs & ribs)
    img[np.abs(xx - cx) < 3 * s] += 0.2
    heart = ((xx - cx - 4 * s) / (9 * s)) ** 2 + ((yy - 42 * s) / (8 * s)) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.62)
    if abnormal:  # nodule / focal opacity in one lung
        side = rng.choice((-1, 1))
        ny, nx = rng.uniform(22, 42) * s, cx + side * rng.uniform(9, 15) * s
        rad = rng.uniform(3, 6) * s
        img += lungs * 0.35 * np.exp(-((xx - nx) ** 2 + (yy - ny) ** 2) / (2 * rad**2))
    img += 0.05 * _smooth(rng, size, 5) + rng.normal(0, 0.015, img.shape)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.03)
    lo, hi = rng.uniform(150, 400), rng.uniform(3500, 3950)  # detector range used
    return np.clip(lo + img * (hi - lo), 0, 4095).round().astype(np.uint16)


def _file_dataset(sop_class: str, sop_uid: str, syntax: str, patient: str, rng: np.random.Generator) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = f"2019{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(60)):02d}00"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientName = f"Anonymous^{patient[4:]}"
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = str(rng.choice(("M", "F")))
    ds.StudyInstanceUID = _uid(sop_uid, "study")
    ds.SeriesInstanceUID = _uid(sop_uid, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _set_pixels(ds: Dataset, frames: np.ndarray, photometric: str) -> None:
    """Uncompressed 12-in-16-bit monochrome pixel data (``frames``: (H, W) or (F, H, W) uint16)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()
    ds["PixelData"].VR = "OW"


def _radiograph_dataset(cls: str, i: int, patient: str, rng: np.random.Generator, size: int) -> FileDataset:
    v = radiograph(cls == "abnormal", rng, size)
    ds = _file_dataset(DX_FOR_PRESENTATION, _uid(patient, cls, i), ExplicitVRLittleEndian, patient, rng)
    ds.Modality = "DX"
    ds.ConversionType = "WSD"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = str(rng.choice(("PA", "AP")))
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.139 * 2048 / size] * 2
    lo, hi = np.percentile(v, [1, 99])
    centre, width = float((lo + hi) / 2), float(hi - lo)
    variant = i % 6
    stored, photometric = v, "MONOCHROME2"
    if variant in (1, 4):  # white = low stored value
        stored, photometric = (4095 - v).astype(np.uint16), "MONOCHROME1"
        centre = 4095 - centre
    if variant in (2, 5):  # modality value = stored - 1024
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "US"
        centre -= 1024
    if variant in (2, 4):
        ds.WindowCenter, ds.WindowWidth = round(centre, 1), round(width, 1)
        ds.VOILUTFunction = "LINEAR"
    if variant == 3:
        ds.WindowCenter = [round(centre, 1), round(centre + 0.1 * width, 1)]
        ds.WindowWidth = [round(width, 1), round(0.6 * width, 1)]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER"]
    _set_pixels(ds, stored, photometric)
    return ds


def make(root: Path, seed: int = 0, per_class: int = 6, size: int = 64) -> Path:
    """Write ``root/dicom/{normal,abnormal}/ANONnnnn_<k>.dcm`` (``per_class`` each) and return
    ``root/dicom``."""
    top = Path(root) / "dicom"
    rng = np.random.default_rng(seed)
    n = 0
    for cls in CLASSES:
        (top / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n += 1
            patient = f"ANON{n:04d}"
            ds = _radiograph_dataset(cls, i, patient, rng, size)
            ds.save_as(top / cls / f"{patient}_1.dcm", enforce_file_format=True)
    return top


def _jpeg_ls_frame() -> tuple[bytes, dict]:
    """One JPEG-LS lossless frame (and its image pixel attributes) from pydicom's bundled test file
    MR_small_jpeg_ls_lossless.dcm (64x64, 16-bit signed), or, if that file is not installed, a
    header-only JPEG-LS codestream (SOI, SOF55, SOS, EOI) that no decoder can expand."""
    path = Path(pydicom.data.__file__).parent / "test_files" / "MR_small_jpeg_ls_lossless.dcm"
    if path.is_file():
        src = pydicom.dcmread(path)
        frame = next(generate_frames(src.PixelData, number_of_frames=1))
        attrs = {k: src[k].value for k in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                                           "PixelRepresentation")}
        return frame, attrs
    sof = b"\xff\xf7\x00\x0b\x10\x00\x40\x00\x40\x01\x01\x11\x00"  # 16-bit, 64x64, 1 component
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00"  # component 1, NEAR=0, ILV=0, point transform 0
    return b"\xff\xd8" + sof + sos + bytes(64) + b"\xff\xd9", {
        "Rows": 64, "Columns": 64, "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1}


def make_bad(root: Path) -> dict[str, Path]:
    """Write unusable DICOMs into ``root/bad/`` and return ``{kind: path}``:

    - ``"no_pixels"``: a valid Basic Text SR (a report, Modality SR) with no PixelData;
    - ``"compressed"``: a DX whose pixels are encapsulated JPEG-LS Lossless (1.2.840.10008.1.2.4.80):
      ``pixel_array`` raises without a JPEG-LS decoder (pylibjpeg-libjpeg, pyjpegls or gdcm);
    - ``"multiframe"``: a valid 3-frame 16-bit uncompressed Multi-frame Grayscale Word Secondary
      Capture (NumberOfFrames 3), ``pixel_array`` of shape (3, 64, 64).
    """
    bad = Path(root) / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    out = {}

    sr = _file_dataset(BASIC_TEXT_SR, _uid("bad", "sr"), ExplicitVRLittleEndian, "ANON9001", rng)
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    sr.ConceptNameCodeSequence = Sequence([title])
    finding_name = Dataset()
    finding_name.CodeValue, finding_name.CodingSchemeDesignator, finding_name.CodeMeaning = "121071", "DCM", "Finding"
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([finding_name])
    item.TextValue = "No acute cardiopulmonary abnormality."
    sr.ContentSequence = Sequence([item])
    out["no_pixels"] = bad / "no_pixels.dcm"
    sr.save_as(out["no_pixels"], enforce_file_format=True)

    frame, attrs = _jpeg_ls_frame()
    jls = _file_dataset(DX_FOR_PRESENTATION, _uid("bad", "jpegls"), JPEGLSLossless, "ANON9002", rng)
    jls.Modality = "DX"
    jls.PresentationIntentType = "FOR PRESENTATION"
    jls.SamplesPerPixel, jls.PhotometricInterpretation = 1, "MONOCHROME2"
    for key, value in attrs.items():
        setattr(jls, key, value)
    jls.PixelData = encapsulate([frame])
    jls["PixelData"].VR = "OB"
    jls["PixelData"].is_undefined_length = True
    out["compressed"] = bad / "compressed.dcm"
    jls.save_as(out["compressed"], enforce_file_format=True)

    mf = _file_dataset(MF_GRAYSCALE_WORD_SC, _uid("bad", "multiframe"), ExplicitVRLittleEndian, "ANON9003", rng)
    mf.Modality = "OT"
    mf.ConversionType = "WSD"
    mf.NumberOfFrames = 3
    mf.FrameIncrementPointer = 0x00181063  # Frame Time
    mf.FrameTime = 100.0
    _set_pixels(mf, np.stack([radiograph(False, rng) for _ in range(3)]), "MONOCHROME2")
    out["multiframe"] = bad / "multiframe.dcm"
    mf.save_as(out["multiframe"], enforce_file_format=True)
    return out
