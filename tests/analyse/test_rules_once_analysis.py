"""Each analysis rule lives once (issue 32): the linear probe, BatchNorm re-estimation, quieting."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning  # noqa: F401 - its loggers at their configured levels, as in a run
import torch
from torch import nn

import visiontl
from helpers.shapes import make_folder
from visiontl.strategies.linear_probe import fit_probe, linear_probe_accuracy, probe_accuracy
from visiontl.strategies import LogisticRegression


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian classes in 8 dimensions (the same centres for every seed)."""
    centres = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 4
    labels = torch.arange(n) % 3
    return centres[labels] + torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), labels


def test_the_probe_is_logistic_regression_and_scores_top1() -> None:
    """fit_probe is what strategy logreg fits (same weights), takes arrays or tensors, draws nothing
    from the global RNG; probe_accuracy is the top-1 rate (3 of 4 labels right: 0.75)."""
    features, labels = _blobs(60, seed=1)
    state = torch.get_rng_state()
    head = fit_probe(features.numpy(), labels.tolist(), 3)
    assert torch.equal(torch.get_rng_state(), state)
    reference = nn.Linear(8, 3)
    LogisticRegression().fit(reference, features, labels, 3)
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    in_place = nn.Linear(8, 3)
    assert fit_probe(features, labels, 3, head=in_place) is in_place and torch.equal(in_place.weight, head.weight)
    val, val_labels = _blobs(40, seed=2)
    assert probe_accuracy(head, val, val_labels) == 1.0  # separable: every row right
    wrong = val_labels.clone()
    wrong[::4] = (wrong[::4] + 1) % 3  # every fourth label wrong
    assert probe_accuracy(head, val.numpy(), wrong.numpy()) == pytest.approx(0.75)
    assert linear_probe_accuracy((features, labels), (val, wrong), 3) == pytest.approx(0.75)
    assert probe_accuracy(nn.Identity(), torch.eye(3), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)


def test_the_negative_transfer_probe_is_the_features_probe(tmp_path: Path) -> None:
    """The frozen probe of the negative-transfer check scores, on the source validation and the
    labelled target images, what fit_probe / probe_accuracy give on the same pooled features."""
    from PIL import Image

    from visiontl.data import AdaptationDataModule
    from visiontl.tasks import AdaptationTask
    from visiontl.analyse.negative_transfer import frozen_probe_scores
    from visiontl.tasks.validators import predict_loader

    source = make_folder(tmp_path / "source", per_class=6)
    target, target_val = make_folder(tmp_path / "target", per_class=4, seed=5), make_folder(tmp_path / "tv", seed=9)
    for png in [*target.rglob("*.png"), *target_val.rglob("*.png")]:  # another "scanner": inverted contrast
        Image.fromarray(255 - np.asarray(Image.open(png).convert("RGB"))).save(png)
    dm = AdaptationDataModule(str(source), str(target), target_val_root=str(target_val), image_size=32,
                              num_workers=0, batch_size=4)
    dm.setup("fit")
    task = AdaptationTask("test_resnet", num_classes=3, class_names=dm.class_names, pretrained=False, method="coral",
                          strategy="full")
    dm.resolve_preprocessing(task.backbone_preprocessing())
    cpu = torch.device("cpu")
    scores = frozen_probe_scores(task, dm, cpu)
    assert scores is not None

    def features(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, _, labels = predict_loader(task.model, loader, task.channels_last, cpu)
        return pooled, labels

    head = fit_probe(*features(torch.utils.data.DataLoader(dm.feature_source("train"), batch_size=8)), 3)
    source_val, target_loader = dm.val_dataloader()
    assert scores["source_val_acc"] == pytest.approx(probe_accuracy(head, *features(source_val)), abs=1e-6)
    assert scores["target_acc"] == pytest.approx(probe_accuracy(head, *features(target_loader)), abs=1e-6)


def test_each_rule_has_one_home() -> None:
    """No second copy in the package: BatchNorm re-estimation in tasks/da.py, the L-BFGS logistic
    regression in strategies/heads.py (built for a probe only by linear_probe.fit_probe; the gradual
    strategy's LP head is the strategy itself), Lightning's log levels in quiet.py."""
    package = Path(visiontl.__file__).parent
    sources = {p.relative_to(package).as_posix(): p.read_text(encoding="utf-8") for p in package.rglob("*.py")}

    def homes(needle: str) -> list[str]:
        return sorted(name for name, text in sources.items() if needle in text)

    assert homes("reset_running_stats(") == ["tasks/da.py"]
    assert homes("_lbfgs(") == ["strategies/heads.py"]
    assert homes("LogisticRegression(") == ["strategies/gradual.py", "strategies/heads.py", "strategies/linear_probe.py"]
    assert homes(".setLevel(") == ["core/quiet.py"]
    assert homes("_quiet") == []


LOGGERS = ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "visiontl.models.features")
HEARD = ("pytorch_lightning", "visiontl")  # what reaches these (children propagate) gets through


def _emit() -> None:
    """One of each kind of output a cell can produce."""
    warnings.warn("The number of training batches (3) is smaller than the logging interval", UserWarning)
    warnings.warn_explicit("old API", DeprecationWarning, "dep.py", 1, module="somelib.sub")
    warnings.warn_explicit("a dependency's own warning", UserWarning, "dep.py", 2, module="somelib.sub")
    warnings.warn("[visiontl] data check: 3 image(s) have a side below 32 px", UserWarning)
    logging.getLogger("pytorch_lightning").info("GPU available: False, used: False")
    logging.getLogger("pytorch_lightning").info("\N{ELECTRIC LIGHT BULB} Tip: try litlogger")
    logging.getLogger("pytorch_lightning").info("  | Name  | Type")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").info("[visiontl] train features cached in x")
    logging.getLogger("visiontl.models.features").warning("ONNX Runtime features differ from PyTorch")


def _shown(run: Callable[[], Any]) -> list[str]:
    """The warnings and log lines that get through while ``run()`` runs, sorted."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    loggers = [logging.getLogger(name) for name in HEARD]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    return sorted([str(w.message) for w in caught] + seen)


@pytest.mark.parametrize("verbose", [False, True])
def test_a_quiet_bench_filters_exactly_what_quiet_filters(verbose: bool, shapes_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's feature pass and cells run under quiet(): the same lines get through as from a
    quiet command (the data warning, a dependency's own warning, visiontl's log warnings; with
    verbose, Lightning's information lines too), and the log levels are put back."""
    from visiontl.benchmark import load_config, run_bench, runner
    from visiontl.core.quiet import quiet

    def cell(cell: Any, out: Any, **_: Any) -> dict[str, Any]:
        _emit()
        return {"key": cell.key(), "data": cell.data.name, "backbone": cell.backbone.label,
                "strategy": cell.strategy_label, "shots": cell.shots_label, "seed": cell.seed, "val_acc": 0.5,
                "wall_s": 1.0}

    def scores(cell: Any, out: Any) -> dict[str, Any]:
        _emit()
        return {"data": cell.data.name, "backbone": cell.backbone.label}

    monkeypatch.setattr(runner, "run_cell", cell)
    monkeypatch.setattr(runner, "score_transferability", scores)
    config = load_config({"data": [str(shapes_root)], "backbones": ["test_resnet=random"], "image_size": 32,
                          "steps": 2, "strategies": ["logreg"], "shots": "2", "seeds": 1})
    levels = [logging.getLogger(name).level for name in LOGGERS]

    def quiet_command() -> None:
        with quiet(verbose):
            _emit()

    expected = sorted(["[visiontl] data check: 3 image(s) have a side below 32 px", "a dependency's own warning",
                       "ONNX Runtime features differ from PyTorch"]
                      + (["  | Name  | Type", "[visiontl] train features cached in x"] if verbose else []))
    assert _shown(quiet_command) == expected
    bench = _shown(lambda: run_bench(config, tmp_path / "bench", log=lambda *_: None, verbose=verbose))
    assert bench == sorted(expected * 2)  # the feature pass and the one cell
    assert [logging.getLogger(name).level for name in LOGGERS] == levels
