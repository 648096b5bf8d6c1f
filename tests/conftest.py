"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set before timm loads."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from helpers.shapes import make_folder, make_splits  # noqa: E402 - tests/helpers: pytest puts this folder on the path
from visiontl import fine_tune  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in datasets (Blue Marble tiles) go to a per-session cache, not ~/.cache."""
    os.environ["VISIONTL_CACHE"] = str(tmp_path_factory.mktemp("visiontl-cache"))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-per-folder set: 3 classes x 12 RGB 32 px images."""
    return make_folder(tmp_path_factory.mktemp("shapes"), per_class=12)


@pytest.fixture(scope="session")
def shapes_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/``, ``val/`` and ``test/`` folders (8 / 4 / 4 per class)."""
    return make_splits(tmp_path_factory.mktemp("shapes_splits"), {"train": 8, "val": 4, "test": 4})


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test_resnet weight file with its 1000-class classifier, as ImageNet weights come."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(path))
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: notebooks, real weights, recipe runs, benchmark smoke runs "
                                       "(the second tier: pytest -m slow; .ci/run runs both tiers)")


@pytest.fixture(scope="module")
def run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A trained run (test_resnet, 32 px, strategy full), one per test module."""
    return fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32,
                     steps=30, out=tmp_path_factory.mktemp("runs"), data_kwargs={"num_workers": 0},
                     trainer_kwargs={"enable_progress_bar": False})
