"""The analyses that follow a fit, in the order they run: one explicit sequence for every task.

1. forgetting and drift (:class:`~visiontl.analyse.forgetting.Forgetting`);
2. for a domain-adaptation run, target BatchNorm (:class:`~visiontl.analyse.targetbn.TargetBatchNorm`),
   then the negative-transfer check, which scores the model target BatchNorm left
   (:class:`~visiontl.analyse.negative_transfer.NegativeTransferCheck`);
3. calibration: temperature scaling of the kept model, measured on the validation images
   (:class:`~visiontl.analyse.calibration.Calibration`);
4. abstention: the out-of-distribution detector and its threshold
   (:class:`~visiontl.analyse.ood.Abstention`);
5. error analysis: the top-losses gallery, the per-class table and the most-confused pairs
   (:class:`~visiontl.analyse.interpretation.ErrorAnalysis`);
6. the divergence guard's report (:class:`~visiontl.analyse.after_fit.DivergenceReport`).

The run report (:class:`visiontl.train.run.RunReport`) runs them (:func:`visiontl.analyse.after_fit.run_steps`)
and writes their records to ``metrics.json``.
"""

from __future__ import annotations

from typing import Any

from visiontl.analyse.after_fit import AfterFitStep, DivergenceReport
from visiontl.analyse.calibration import Calibration
from visiontl.analyse.forgetting import Forgetting
from visiontl.analyse.interpretation import ErrorAnalysis
from visiontl.analyse.ood import Abstention
from visiontl.analyse.negative_transfer import NegativeTransferCheck
from visiontl.analyse.targetbn import TargetBatchNorm
from visiontl.tasks.adaptation import AdaptationTask

__all__ = ["after_fit_steps"]


def after_fit_steps(task: Any) -> list[AfterFitStep]:
    """The after-fit steps of ``task``, in order."""
    adaptation: list[AfterFitStep] = [TargetBatchNorm(), NegativeTransferCheck()] if isinstance(task, AdaptationTask) else []
    return [Forgetting(), *adaptation, Calibration(), Abstention(), ErrorAnalysis(), DivergenceReport()]
