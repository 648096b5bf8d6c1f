"""What a task and a datamodule offer each other are Protocols (visiontl.data.protocols,
visiontl.tasks.protocols), checked with isinstance, not attribute probes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from visiontl.data import FolderDataModule, UnlabelledDataModule
from visiontl.data.protocols import LabelledData, LabelledSplits, Preprocessed, ServesFeatures
from visiontl.tasks import ClassificationTask, ContinuedPretraining
from visiontl.tasks.protocols import (ReportsConfusion, ReportsStrategy, StartsFromPretrained, TakesClassCounts,
                                      TakesPreprocessing)

PACKAGE = Path(__file__).resolve().parents[2] / "visiontl"


def test_the_datamodules_offer_what_their_protocols_say(shapes_root: Path) -> None:
    labelled = FolderDataModule(str(shapes_root), image_size=32, num_workers=0)
    labelled.setup("fit")
    assert all(isinstance(labelled, p) for p in (Preprocessed, LabelledSplits, LabelledData, ServesFeatures))
    assert labelled.class_counts == [8, 8, 8] or sum(labelled.class_counts) == labelled.train_size
    unlabelled = UnlabelledDataModule(str(shapes_root), image_size=32, num_workers=0)
    unlabelled.setup("fit")
    assert isinstance(unlabelled, Preprocessed)
    assert not any(isinstance(unlabelled, p) for p in (LabelledSplits, LabelledData, ServesFeatures))


def test_the_tasks_offer_what_their_protocols_say() -> None:
    task = ClassificationTask("test_resnet", num_classes=3, pretrained=False, strategy="full")
    assert all(isinstance(task, p) for p in (TakesPreprocessing, TakesClassCounts, ReportsStrategy, ReportsConfusion,
                                             StartsFromPretrained))
    ssl = ContinuedPretraining("test_resnet", pretrained=False)
    assert isinstance(ssl, TakesPreprocessing) and isinstance(ssl, ReportsStrategy)
    assert not isinstance(ssl, TakesClassCounts) and not isinstance(ssl, ReportsConfusion)


@pytest.mark.parametrize("layer", ["tasks", "analyse", "train"])
def test_no_attribute_probes_on_a_datamodule_or_a_task(layer: str) -> None:
    """Where a task, its datamodule and the run meet, the contract is a Protocol: no
    ``getattr(dm, ...)`` / ``hasattr(pl_module, ...)``."""
    probe = re.compile(r"\b(?:getattr|hasattr)\((?:dm|datamodule|trainer\.datamodule|pl_module|task|ctx\.task|"
                       r"ctx\.datamodule|like)\b")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted((PACKAGE / layer).rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if probe.search(line)]
    assert found == []
    assert probe.search('x = getattr(dm, "splits", {})')  # the pattern does see a probe
