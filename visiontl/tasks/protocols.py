"""What a task offers its data link, the run report and the after-fit analyses, as Protocols.

The datamodule's side is :mod:`visiontl.data.protocols`. Checked with ``isinstance`` (runtime-checkable),
never attribute by attribute.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from visiontl.data.preprocessing import Preprocessing

__all__ = ["Calibrated", "PredictsTags", "ReportsConfusion", "ReportsTags", "ReportsStrategy", "StartsFromPretrained", "TakesClassCounts",
           "TakesPreprocessing"]


@runtime_checkable
class TakesPreprocessing(Protocol):
    """Gives its backbone's input convention and records the one its data resolved (every task)."""

    def backbone_preprocessing(self) -> Preprocessing: ...

    def set_preprocessing(self, pre: Preprocessing) -> None: ...


@runtime_checkable
class PredictsTags(Protocol):
    """Says whether it predicts several tags per image (multi-label) or one class (classification tasks)."""

    multilabel: bool


@runtime_checkable
class Calibrated(Protocol):
    """Divides its logits by a calibration temperature (one, or one per tag) before the probabilities
    (classification tasks; :mod:`visiontl.analyse.calibration`)."""

    temperature: Any

    def calibrated(self, logits: Any) -> Any: ...

    def set_temperature(self, temperature: Any) -> None: ...


@runtime_checkable
class ReportsTags(Protocol):
    """Multi-label: the per-tag table and precision-recall curves of its last evaluation per split
    (:func:`visiontl.tasks.multilabel.tag_report`; empty for one class per image)."""

    last_tags: dict[str, dict[str, Any]]


@runtime_checkable
class TakesClassCounts(Protocol):
    """Weighs its loss by the training class counts (classification tasks)."""

    def set_class_counts(self, counts: list[int], total: int | None = None) -> None: ...


@runtime_checkable
class ReportsStrategy(Protocol):
    """Reports its strategy's plan: trainable and total parameters, each group's learning rate (every task)."""

    def strategy_report(self) -> dict[str, Any]: ...


@runtime_checkable
class ReportsConfusion(Protocol):
    """Keeps the last confusion matrix of each split it scored, with the class names (classification)."""

    class_names: list[str]
    last_confusion: dict[str, Any]


@runtime_checkable
class StartsFromPretrained(Protocol):
    """Keeps the pretrained weights it started from (forgetting, drift and the negative-transfer
    check compare with them), in the memory format it trains in."""

    start_state: dict[str, Any] | None
    channels_last: bool
