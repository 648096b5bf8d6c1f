"""Real-world DICOM: every transfer syntax with an encoder, multi-frame objects, files without
meta, incomplete headers, and pydicom's own collection of vendor files (CT, MR, US, secondary
capture, RT; 78 files in many syntaxes). Nothing but a DataError may escape a reader, and
lossless syntaxes must give back exactly the stored pixels."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from visiontl.data.check import check_data
from visiontl.data import FolderDataModule
from visiontl.data.formats import dicom_frames
from visiontl.data.images import DataError, ImageReadError, read_image, read_raw

VENDOR_FILES = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
RNG = np.random.default_rng(0)
# a smooth 12-bit picture plus noise: what a radiograph's stored values look like
_Y, _X = np.mgrid[0:48, 0:40]
GRAY12 = np.clip(1800 + 1200 * np.sin(_X / 7.0) * np.cos(_Y / 9.0) + RNG.normal(0, 40, (48, 40)), 0, 4095).astype(
    np.uint16)
RGB8 = np.stack([(_X * 6) % 256, (_Y * 5) % 256, ((_X + _Y) * 3) % 256], axis=-1).astype(np.uint8)


def _image(pixels: np.ndarray, frames: int = 1, **attrs: object) -> FileDataset:
    """A DX (grayscale) or secondary-capture (RGB) image dataset around ``pixels`` (F x H x W [x 3])."""
    rgb = pixels.shape[-1] == 3 and pixels.dtype == np.uint8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7" if rgb else "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT" if rgb else "DX"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


def _save(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_baseline(pixels: np.ndarray, path: Path) -> Path:
    """8-bit JPEG baseline frames made by Pillow (pydicom has no JPEG encoder), encapsulated."""
    ds = _image(pixels if pixels.ndim == 4 else pixels[None], frames=len(pixels) if pixels.ndim == 4 else 1)
    fragments = []
    for frame in pixels if pixels.ndim == 4 else pixels[None]:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95, subsampling=0)
        fragments.append(buf.getvalue())
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL"  # what Pillow's JFIF stores
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return _save(ds, path)


# (syntax, what to encode, lossless?, compress() keyword arguments)
SYNTAXES = [
    (ExplicitVRLittleEndian, "gray", True, None),
    (ImplicitVRLittleEndian, "gray", True, None),
    (DeflatedExplicitVRLittleEndian, "gray", True, None),
    (RLELossless, "gray", True, {}),
    (RLELossless, "rgb", True, {}),
    (JPEGLSLossless, "gray", True, {}),
    (JPEGLSLossless, "rgb", True, {}),
    (JPEGLSNearLossless, "gray", False, {"jls_error": 3}),
    (JPEG2000Lossless, "gray", True, {}),
    (JPEG2000Lossless, "rgb", True, {}),
    (JPEG2000, "gray", False, {"j2k_cr": [8]}),
    (JPEGBaseline8Bit, "rgb", False, None),
]


def _write(syntax: str, kind: str, kwargs: dict | None, path: Path, frames: int = 1) -> tuple[Path, np.ndarray]:
    base = GRAY12 if kind == "gray" else RGB8
    pixels = np.stack([np.roll(base, 5 * i, axis=1) for i in range(frames)]) if frames > 1 else base
    if syntax == JPEGBaseline8Bit:
        return _jpeg_baseline(pixels if frames > 1 else pixels, path), pixels
    ds = _image(pixels, frames)
    if kwargs is None:  # native syntaxes: written as they are
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        from pydicom.pixels import get_encoder

        if not get_encoder(syntax).is_available:  # the dicom extra (in dev) provides every one of these
            pytest.skip(f"no {syntax.name} encoder installed: pip install 'visiontl[dicom]'")
        ds.compress(syntax, **kwargs)
    return _save(ds, path), pixels


@pytest.mark.parametrize("syntax,kind,lossless,kwargs", SYNTAXES,
                         ids=[f"{s.name}-{k}" for s, k, _, _ in SYNTAXES])
def test_every_transfer_syntax_reads_back(syntax: str, kind: str, lossless: bool, kwargs: dict | None,
                                          tmp_path: Path) -> None:
    path, pixels = _write(syntax, kind, kwargs, tmp_path / "image.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    raw = read_raw(path)
    expected = pixels if pixels.ndim == 3 else pixels[:, :, None]
    assert raw.shape == expected.shape
    error = np.abs(raw.astype(np.int64) - expected.astype(np.int64))
    if lossless:
        assert error.max() == 0, f"{syntax.name} is lossless but pixels changed"
    elif syntax == JPEGLSNearLossless:
        assert error.max() <= 3  # near-lossless: bounded by the encoder's error
    else:
        top = 4095 if kind == "gray" else 255
        assert error.mean() < 0.02 * top  # lossy, but the same picture
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == expected.shape and 0 <= image.min() <= image.max() <= 1


@pytest.mark.parametrize("syntax,kind,kwargs", [(RLELossless, "gray", {}), (JPEGLSLossless, "gray", {}),
                                                (JPEG2000Lossless, "rgb", {}), (JPEGBaseline8Bit, "rgb", None),
                                                (ExplicitVRLittleEndian, "gray", None)],
                         ids=["rle", "jpegls", "j2k", "jpeg", "native"])
def test_multi_frame_frames_option(syntax: str, kind: str, kwargs: dict | None, tmp_path: Path) -> None:
    path, pixels = _write(syntax, kind, kwargs, tmp_path / "cine.dcm", frames=5)
    assert dicom_frames(path) == 5
    with pytest.raises(ImageReadError, match=r"cine\.dcm.*5 frames.*frames: middle.*frames: all"):
        read_image(path)  # the default refuses, naming the option
    for i in range(5):
        raw = read_raw(path, frame=i)
        if syntax != JPEGBaseline8Bit:
            assert np.array_equal(raw.reshape(pixels[i].shape), pixels[i]), f"frame {i}"
    assert np.array_equal(read_raw(path, frame="middle"), read_raw(path, frame=2))
    with pytest.raises(ImageReadError, match=r"cine\.dcm has 5 frames; frame 5 does not exist"):
        read_raw(path, frame=5)


def _enhanced(path: Path) -> tuple[Path, list[tuple[float, float, float, float]]]:
    """Enhanced multi-frame: rescale and window per frame in the functional groups only."""
    pixels = np.stack([GRAY12, GRAY12, GRAY12])
    ds = _image(pixels, frames=3)
    params = [(1.0, -1024.0, 800.0, 1600.0), (2.0, 0.0, 4000.0, 2000.0), (0.5, 100.0, 1000.0, 400.0)]
    per_frame = []
    for slope, intercept, centre, width in params:
        group = Dataset()
        transform, voi = Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
        voi.WindowCenter, voi.WindowWidth = centre, width
        group.PixelValueTransformationSequence = Sequence([transform])
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    return _save(ds, path), params


def test_enhanced_multi_frame_uses_each_frames_rescale_and_window(tmp_path: Path) -> None:
    path, params = _enhanced(tmp_path / "enhanced.dcm")
    for i, (slope, intercept, centre, width) in enumerate(params):
        values = GRAY12.astype(np.float64) * slope + intercept
        expected = np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
        assert np.allclose(read_image(path, frame=i)[:, :, 0], expected, atol=1e-6), f"frame {i}"


def test_files_without_meta_are_read_as_bare_datasets(tmp_path: Path) -> None:
    ds = Dataset(_image(GRAY12))  # the elements only: no preamble, no file meta
    bare = tmp_path / "bare.dcm"
    # what old archives and some modalities write
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_raw(bare)[:, :, 0], GRAY12)
    # a file meta without a Transfer Syntax UID: the syntax is what the dataset was found in
    missing = _image(GRAY12)
    del missing.file_meta.TransferSyntaxUID
    target = tmp_path / "no_syntax.dcm"
    pydicom.dcmwrite(target, missing, implicit_vr=False, little_endian=True, enforce_file_format=False)
    assert "TransferSyntaxUID" not in pydicom.dcmread(target, force=True).file_meta
    assert np.array_equal(read_raw(target)[:, :, 0], GRAY12)


def test_bad_dicoms_are_data_errors_that_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no Bits Allocated
    ds = _image(GRAY12)
    del ds.BitsAllocated
    path = tmp_path / "no_bits.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    with pytest.raises(ImageReadError, match=r"no_bits\.dcm has pixel data but lacks BitsAllocated.*re-export"):
        read_image(path)
    # compressed pixel data and no Transfer Syntax UID: the codec is unknown
    compressed, _ = _write(RLELossless, "gray", {}, tmp_path / "rle.dcm")
    ds = pydicom.dcmread(compressed)
    del ds.file_meta.TransferSyntaxUID
    unnamed = tmp_path / "rle_no_syntax.dcm"
    pydicom.dcmwrite(unnamed, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    with pytest.raises(ImageReadError, match=r"rle_no_syntax\.dcm has no Transfer Syntax UID.*compressed"):
        read_image(unnamed)
    # a corrupt codestream: the decoders fail, the message says so
    j2k, _ = _write(JPEG2000Lossless, "gray", {}, tmp_path / "j2k.dcm")
    ds = pydicom.dcmread(j2k)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    broken = _save(ds, tmp_path / "broken_j2k.dcm")
    with pytest.raises(ImageReadError, match=r"broken_j2k\.dcm: the installed decoders failed.*JPEG 2000"):
        read_image(broken)
    # not DICOM at all, with a .dcm name
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageReadError, match=r"junk\.dcm"):
        read_image(junk)
    # a truncated file
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(_save(_image(GRAY12), tmp_path / "whole.dcm").read_bytes()[:900])
    with pytest.raises(ImageReadError, match=r"truncated\.dcm"):
        read_image(truncated)
    # no decoder installed for a compressed syntax: the message says what to install
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))

    def no_plugin(*args: object, **kwargs: object) -> np.ndarray:
        raise RuntimeError("Unable to decompress: no plugins available")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_plugin)
    with pytest.raises(ImageReadError, match=r"j2k\.dcm stores compressed pixel data.*JPEG 2000.*visiontl\[dicom\]"):
        read_image(j2k)


@pytest.mark.parametrize("frames", ["error", "middle"])
def test_vendor_files_give_images_or_data_errors_only(frames: str) -> None:
    assert len(VENDOR_FILES) >= 70, "pydicom's bundled test files moved"
    read, refused = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each vendor quirk it works around
        for path in VENDOR_FILES:
            try:
                image = read_image(path, frame=frames)
            except DataError as err:
                assert path.name in str(err)
                refused[path.name] = str(err)
                continue
            assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] in (1, 3)
            assert np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1
            read.append(path.name)
    # the two files that once crashed with AttributeError are named errors now
    assert "meta_missing_tsyntax.dcm" in refused and "nested_priv_SQ.dcm" in refused
    # every compressed image decodes except two damaged codestreams (gdcm's test files)
    assert {"JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm",
            "SC_rgb_jpeg_gdcm.dcm", "image_dfl.dcm", "examples_palette.dcm"} <= set(read)
    multi = {"rtdose.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"}
    if frames == "middle":
        assert multi <= set(read) and len(read) >= 58  # 20 refused: reports, RT plans, damaged files
    else:
        assert all("multi-frame" in refused[name] for name in multi) and len(read) >= 51


def test_palette_colour_goes_through_its_colour_table() -> None:
    path = next(p for p in VENDOR_FILES if p.name == "examples_palette.dcm")
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    image = read_image(path)
    assert image.shape == (*ds.pixel_array.shape, 3)
    assert np.allclose(image, rgb / float(np.iinfo(rgb.dtype).max), atol=1e-6)


def test_datamodule_frames_all_middle_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for label in ("a", "b"):
        for n in range(3):
            _save(_image(np.roll(GRAY12, 3 * n + (20 if label == "b" else 0), axis=0)), root / label / f"{n}.dcm")
    cine, _ = _write(RLELossless, "gray", {}, root / "a" / "cine.dcm", frames=4)
    kwargs = {"image_size": 32, "num_workers": 0, "val_fraction": 0.4, "seed": 1}

    refused = FolderDataModule(str(root), **kwargs)
    with pytest.raises(DataError, match=r"cine\.dcm.*4 frames.*frames: middle"):
        refused.setup()
    report = check_data(str(root), progress=False)
    assert any("cine.dcm" in str(item) for f in report.errors for item in f.items)
    assert not check_data(str(root), progress=False, frames="middle").errors

    middle = FolderDataModule(str(root), frames="middle", **kwargs)
    middle.setup()
    every = FolderDataModule(str(root), frames="all", **kwargs)
    every.setup()
    n_middle = sum(len(d) for d in middle.datasets.values())
    assert n_middle == 7 and sum(len(d) for d in every.datasets.values()) == 7 - 1 + 4
    split = next(s for s in ("train", "val") if cine in every.paths(s))
    assert every.paths(split).count(cine) == 4 and every.frame_indices(split)[every.paths(split).index(cine):][:4] == [
        0, 1, 2, 3]
    other = "val" if split == "train" else "train"
    assert cine not in every.paths(other)  # a file's frames never straddle the split
    dataset = every.feature_source(split)  # the evaluation transform: no random augmentation
    first = every.paths(split).index(cine)
    views = [dataset[first + i]["image"] for i in range(4)]
    assert not np.allclose(views[0].numpy(), views[3].numpy())  # really different frames
    assert every.class_counts[0] == middle.class_counts[0] + (3 if split == "train" else 0)


@pytest.mark.parametrize("syntax,kind,kwargs", [(RLELossless, "gray", {}), (JPEGLSLossless, "gray", {}),
                                                (JPEG2000Lossless, "rgb", {}), (JPEGBaseline8Bit, "rgb", None),
                                                (ExplicitVRLittleEndian, "gray", None)],
                         ids=["rle", "jpegls", "j2k", "jpeg", "native"])
def test_damaged_files_only_ever_raise_data_errors(syntax: str, kind: str, kwargs: dict | None,
                                                   tmp_path: Path) -> None:
    """Truncations and flipped bytes anywhere in the file (header, codestream): a readable image
    or a DataError naming the file, never another exception."""
    good, _ = _write(syntax, kind, kwargs, tmp_path / "good.dcm", frames=2)
    data = good.read_bytes()
    rng = np.random.default_rng(7)
    damaged = tmp_path / "damaged.dcm"
    outcomes = {"read": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(40):
            blob = bytearray(data)
            if trial % 2:
                blob = blob[: int(rng.integers(132, len(blob)))]
            else:
                for pos in rng.integers(132, len(blob), 6):
                    blob[pos] = int(rng.integers(0, 256))
            damaged.write_bytes(bytes(blob))
            for frame in ("middle", 1):
                try:
                    image = read_image(damaged, frame=frame)
                    assert image.dtype == np.float32 and np.isfinite(image).all()
                    outcomes["read"] += 1
                except DataError as err:
                    assert "damaged.dcm" in str(err)
                    outcomes["refused"] += 1
    assert outcomes["refused"] > 0  # the damage is really seen
