"""What follows a fit: an explicit, ordered sequence of analyses whose results are typed records.

A task states its sequence (:meth:`visiontl.tasks.BaseTask.after_fit_steps`); at the end of the
fit the run report (:class:`visiontl.train.run.RunReport`) runs the steps in that order on rank 0,
hands each the records of the steps before it (:class:`FitContext`), and writes every record to
``metrics.json``: nothing is passed by setting attributes on the LightningModule.

The steps, in the order a task lists them:

1. forgetting and drift (:class:`visiontl.analyse.forgetting.Forgetting` -> ``ForgettingRecord``, at the
   top level of ``metrics.json``: ``drift``, ``retain_acc_before`` / ``after``, ``forgetting``);
2. for adaptation runs, target BatchNorm (:class:`visiontl.analyse.targetbn.TargetBatchNorm` ->
   ``target_bn``), then the negative-transfer check, which scores the model target BatchNorm
   left (:class:`visiontl.analyse.negative_transfer.NegativeTransferCheck` -> ``negative_transfer``);
3. the divergence guard's report (:class:`DivergenceReport` -> ``divergence_guard``).

The scratch comparison of :func:`visiontl.fine_tune` trains further runs, so it follows the fit
rather than ending it, and adds its record with :func:`visiontl.train.run.add_to_metrics`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["AfterFitStep", "DivergenceRecord", "DivergenceReport", "FitContext", "Record", "run_steps"]


@runtime_checkable
class Record(Protocol):
    """A step's result: ``key`` is its ``metrics.json`` entry (None: its fields go to the top level)."""

    key: ClassVar[str | None]

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class FitContext:
    """What a step sees: the finished fit, and the records of the steps before it, by step name."""

    trainer: Any
    task: Any
    datamodule: Any
    records: dict[str, Record] = field(default_factory=dict)
    _outputs: dict[str, Any] = field(default_factory=dict, repr=False)

    def validation_outputs(self) -> tuple[Any, Any] | None:
        """``(logits, labels)`` of the kept model on the validation images: :meth:`outputs` of ``val``."""
        val = self.outputs("val")
        return None if val is None else (val[1], val[2])

    def outputs(self, split: str, limit: int | None = None) -> tuple[Any, Any, Any] | None:
        """``(pooled features, logits, labels)`` of the kept model on ``split``'s images read as for
        evaluation (an adaptation run's: the source's), on the CPU, in the datamodule's order; None
        without that split. ``limit``: at most that many images, a seeded subset in order (a large
        training split). Computed once, when a step first asks, and shared (calibration, error
        analysis, abstention): the steps that change the kept model (target BatchNorm) come before
        the first that reads them."""
        key = split if limit is None else f"{split}:{limit}"
        if key not in self._outputs:
            from visiontl.tasks.validators import predict_loader

            from visiontl.data.protocols import ServesFeatures

            dm = self.datamodule
            if not isinstance(dm, ServesFeatures) or split not in dm.datasets:
                self._outputs[key] = None
            else:
                import torch

                # the images, read as for evaluation: a run on cached features validates on features
                images = dm.feature_source(split)
                if limit is not None and len(images) > limit:
                    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit]
                    images = torch.utils.data.Subset(images, rows.sort().values.tolist())
                loader = torch.utils.data.DataLoader(
                    images, batch_size=dm.eval_batch_size(len(dm.samples("train")), len(images)), num_workers=0)
                model = self.kept()[0]
                device = next(self.task.model.parameters()).device
                self._outputs[key] = predict_loader(model, loader, bool(self.task.channels_last), device)
        return self._outputs[key]

    def kept(self) -> tuple[Any, dict[str, Any] | None, str]:
        """:func:`~visiontl.tasks.checkpoints.kept_model` of the run (the network, its checkpoint and
        path), read once: a step that rewrites the checkpoint (calibration) updates this one too."""
        if "kept" not in self._outputs:
            from visiontl.tasks.checkpoints import kept_model

            self._outputs["kept"] = kept_model(self.trainer, self.task)
        return self._outputs["kept"]

    def kept_buffer(self, name: str) -> Any:
        """A buffer of the kept model's task (``thresholds``: multi-label; ``temperature``) as a CPU float tensor:
        from its checkpoint where it has one (the in-memory task holds the last validation's), else
        the task's; None when the task has no such buffer."""
        _, ckpt, _ = self.kept()
        if ckpt is not None and name in ckpt["state_dict"]:
            return ckpt["state_dict"][name].detach().float().cpu()
        from visiontl.tasks.protocols import Calibrated, PredictsTags

        buffer = {"temperature": self.task.temperature if isinstance(self.task, Calibrated) else None,
                  "thresholds": self.task.thresholds if isinstance(self.task, PredictsTags) and self.task.multilabel
                  else None}.get(name)
        return None if buffer is None else buffer.detach().float().cpu()

    @property
    def run_dir(self) -> Path:
        from visiontl.core.rundir import run_dir

        return run_dir(self.trainer)


@runtime_checkable
class AfterFitStep(Protocol):
    """One analysis after a fit: ``run`` returns its record, or None when it does not apply."""

    name: str

    def run(self, ctx: FitContext) -> Record | None: ...


def record_dict(record: Any) -> dict[str, Any]:
    """A dataclass record's fields as ``metrics.json`` writes them (fields left None are omitted)."""
    return {k: v for k, v in asdict(record).items() if v is not None}


@dataclass(frozen=True)
class DivergenceRecord:
    """What the divergence guard did (:class:`visiontl.tasks.guard.DivergenceGuard`)."""

    key: ClassVar[str | None] = "divergence_guard"
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report)


class DivergenceReport:
    """The divergence guard's report, where the run had one."""

    name = "divergence_guard"

    def run(self, ctx: FitContext) -> DivergenceRecord | None:
        from visiontl.tasks.guard import DivergenceGuard

        guard = next((c for c in ctx.trainer.callbacks if isinstance(c, DivergenceGuard)), None)
        return DivergenceRecord(guard.report()) if guard is not None else None


def run_steps(steps: list[AfterFitStep], ctx: FitContext) -> dict[str, Record]:
    """Run ``steps`` in order; each sees the records of the ones before it. Returns all records."""
    for step in steps:
        record = step.run(ctx)
        if record is not None:
            ctx.records[step.name] = record
    return ctx.records
