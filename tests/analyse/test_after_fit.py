"""What follows a fit runs as a stated sequence of steps, each returning a typed record; nothing is
passed through attributes on the LightningModule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from visiontl.analyse.after_fit import AfterFitStep, FitContext, Record, run_steps
from visiontl.analyse.sequence import after_fit_steps


@dataclass(frozen=True)
class _Seen:
    key: ClassVar[str | None] = "seen"
    before: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"before": list(self.before)}


class _Step:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, ctx: FitContext) -> _Seen:
        return _Seen(tuple(ctx.records))


def test_steps_run_in_order_and_each_sees_the_records_before_it() -> None:
    steps = [_Step("a"), _Step("b"), _Step("c")]
    assert all(isinstance(s, AfterFitStep) for s in steps)
    records = run_steps(steps, FitContext(trainer=None, task=None, datamodule=None))
    assert list(records) == ["a", "b", "c"]
    assert [r.before for r in records.values()] == [(), ("a",), ("a", "b")]
    assert all(isinstance(r, Record) for r in records.values())


def test_the_sequence_follows_the_task() -> None:
    from visiontl.tasks import AdaptationTask, ClassificationTask

    plain = ClassificationTask("test_resnet", num_classes=3, pretrained=False)
    assert [s.name for s in after_fit_steps(plain)] == ["forgetting", "calibration", "abstention", "errors",
                                                      "divergence_guard"]
    adapted = AdaptationTask("test_resnet", num_classes=3, pretrained=False)
    names = [s.name for s in after_fit_steps(adapted)]
    assert names == ["forgetting", "target_bn", "negative_transfer", "calibration", "abstention", "errors",
                     "divergence_guard"]  # target BN first
    assert all(isinstance(s, AfterFitStep) for s in after_fit_steps(adapted))


def test_no_result_is_passed_through_an_attribute_on_the_module() -> None:
    package = Path(__file__).parents[2] / "visiontl"
    found = [f"{p.relative_to(package)}: {m.group(0)}" for p in package.rglob("*.py")
             for m in re.finditer(r"pl_module\.\w*report\w* =|getattr\(pl_module, \"\w*report\"", p.read_text())]
    assert found == []
