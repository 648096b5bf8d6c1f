"""The evaluation geometry shared by training evaluation, the feature cache, export and predict."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from visiontl.data.geometry import eval_resize
from visiontl.data.transforms import build_transforms
from visiontl.deploy.predict import preprocess


def test_small_images_are_upsampled_whole_never_cropped() -> None:
    image = np.zeros((10, 10), np.float32)
    image[:, 0] = image[:, -1] = 1.0  # borders a centre crop would cut off
    out = eval_resize(image, 64, crop_pct=0.875)
    assert out.shape == (64, 64)
    assert np.allclose(out, cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR))
    assert out[:, 0].min() > 0.5 and out[:, -1].min() > 0.5  # both borders survive


def test_large_images_are_resized_then_centre_cropped() -> None:
    image = np.random.default_rng(0).random((200, 300, 3), dtype=np.float32)
    out = eval_resize(image, (64, 64), crop_pct=0.8)
    big = cv2.resize(image, (80, 80), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out, big[8:72, 8:72])
    assert np.array_equal(eval_resize(image, 64, crop_pct=1.0), cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
    with pytest.raises(ValueError, match="crop_pct"):
        eval_resize(image, 64, crop_pct=0.0)


@pytest.mark.parametrize("bands", [1, 5, 13])
def test_multiband_images_resize_band_by_band_like_opencv(bands: int) -> None:
    """OpenCV's area resize refuses more than 4 channels at a non-integer scale (a 13-band
    Sentinel-2 tile broke evaluation and prepare-data); each band resizes as it would alone."""
    image = np.random.default_rng(1).random((20, 24, bands), dtype=np.float32)
    for size in (16, 40):  # shrink (area) and enlarge (linear)
        out = eval_resize(image, size)
        assert out.shape == (size, size, bands)
        flag = cv2.INTER_AREA if size < 20 else cv2.INTER_LINEAR
        for b in range(bands):
            np.testing.assert_allclose(out[:, :, b], cv2.resize(image[:, :, b], (size, size), interpolation=flag),
                                       atol=1e-6)


@pytest.mark.parametrize("side", [12, 120])
def test_training_evaluation_and_predictor_see_the_same_pixels(side: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(side)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    transform = build_transforms("natural", False, 48, mean, std, crop_pct=0.875, interpolation="bicubic")
    image = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    seen_in_training = transform(image=image)["image"].numpy()
    seen_in_deployment = preprocess(path, (48, 48), 3, crop_pct=0.875)
    normalised = (seen_in_deployment - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(seen_in_training, normalised, atol=1e-5)


def test_training_crops_keep_most_of_a_small_image() -> None:
    """An 8 px image gets the mild crop (>= 85 % of its area), a large one the preset's."""
    from visiontl.data.transforms import SizeAwareCrop

    crop = SizeAwareCrop(64, 64, scale=(0.35, 1.0), ratio=(0.75, 4 / 3))
    crop.set_random_seed(0)
    small = np.zeros((8, 8), np.float32)
    small[:, 0] = small[:, -1] = small[0, :] = small[-1, :] = 1.0  # a frame: any big crop cuts into it
    kept = [crop(image=small)["image"] for _ in range(20)]
    assert all(k.shape == (64, 64) for k in kept)
    assert min(float(k.mean()) for k in kept) > 0.25  # the frame (44 % of the pixels) mostly survives
    large = np.zeros((256, 256), np.float32)
    large[:, :8] = large[:, -8:] = large[:8, :] = large[-8:, :] = 1.0
    cut = [float(crop(image=large)["image"].mean()) for _ in range(20)]
    assert min(cut) < 0.02  # the preset's crops (down to 35 % of the area) often miss the frame entirely


def test_augmentations_are_reproducible_under_a_seeded_compose() -> None:
    import albumentations as A

    def run(seed: int) -> np.ndarray:
        pipeline = build_transforms("natural", True, 32, [0.5] * 3, [0.5] * 3)
        pipeline = A.Compose(pipeline.transforms, seed=seed)
        image = np.random.default_rng(0).random((10, 10, 3), dtype=np.float32)
        return np.stack([pipeline(image=image)["image"].numpy() for _ in range(3)])

    assert np.array_equal(run(7), run(7)) and not np.array_equal(run(7), run(8))
