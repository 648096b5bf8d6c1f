"""The negative-transfer check of adaptation runs: is the adapted model worse than not adapting at all?

Fine-tuning on a labelled source can make a pretrained backbone *worse* on a shifted target than
the backbone as it was (negative transfer): a frozen ImageNet probe fitted on the same source
images may predict the target better. Without target labels this cannot be measured exactly, but
the label-free validator that picks checkpoints can be compared. At the end of an
:class:`~visiontl.tasks.AdaptationTask` fit (``negative_transfer_check: true``, the default),
:class:`NegativeTransferCheck`:

1. scores the model the run keeps (the best checkpoint, with target BatchNorm if that ran) on the
   target images with :func:`visiontl.tasks.validators.target_scores`;
2. builds the frozen probe: the backbone as the run started (pretrained weights, before any step)
   with a logistic-regression head fitted on the source training images' features
   (:func:`visiontl.strategies.linear_probe.fit_probe`, what ``strategy: logreg`` fits), and scores it the same way;
3. compares the two on the run's label-free validator (its ``monitor``; ``target_im`` when the
   run monitors source accuracy, ``target_dev`` for multi-label runs). If the probe scores higher, the run warns, naming the fallback
   (``strategy: logreg``), and ``metrics.json`` records ``negative_transfer`` with both scores
   (and both target accuracies when labelled target images were given, for evaluation).

Runs whose backbone does not change (``probe``) or that keep no starting weights are not checked;
the report says why.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from visiontl.analyse.targetbn import TargetBNRecord
from visiontl.data.adaptation import AdaptationData
from visiontl.tasks.protocols import PredictsTags
from visiontl.tasks.checkpoints import kept_model
from visiontl.strategies.linear_probe import fit_probe
from visiontl.tasks.validators import predict_loader, scores_from_outputs, target_scores

if TYPE_CHECKING:
    from visiontl.analyse.after_fit import FitContext

__all__ = ["FALLBACK", "NegativeTransferCheck", "NegativeTransferRecord", "NegativeTransferWarning", "frozen_probe_scores"]

FALLBACK = "strategy: logreg (a frozen-backbone probe fitted on the source images)"


class NegativeTransferWarning(UserWarning):
    """The adapted model scores worse on the target than a frozen probe (label-free validator)."""


@torch.no_grad()
def frozen_probe_scores(pl_module: Any, dm: Any, device: torch.device) -> dict[str, float] | None:
    """:func:`~visiontl.tasks.validators.target_scores` of the frozen probe (see the module
    docstring), or ``None`` when the run kept no starting weights that load back into its model."""
    start = pl_module.start_state
    if not start:
        return None
    probe = copy.deepcopy(pl_module.model)
    loaded = probe.load_state_dict(start, strict=False)  # the backbone as it started; the head is refitted below
    if loaded.unexpected_keys:  # a model that changed shape (PEFT modules wrap the layers): no clean start
        return None
    channels_last = bool(pl_module.channels_last)
    train = dm.feature_source("train")
    loader = torch.utils.data.DataLoader(train, batch_size=dm.eval_batch_size(len(train), len(train)), num_workers=0)
    feats, _, labels = predict_loader(probe, loader, channels_last, device)
    head = fit_probe(feats, labels, int(pl_module.hparams["num_classes"]))
    source_val, target = dm.val_dataloader()

    def outputs(loader: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f, _, y = predict_loader(probe, loader, channels_last, device)
        return f, head(f), y

    return scores_from_outputs(outputs(target), outputs(source_val), multilabel=isinstance(pl_module, PredictsTags) and pl_module.multilabel)


@dataclass(frozen=True)
class NegativeTransferRecord:
    """The negative-transfer check: ``metrics.json``'s ``negative_transfer``."""

    key: ClassVar[str | None] = "negative_transfer"
    validator: str
    note: str | None = None
    model: dict[str, float] | None = None
    frozen_probe: dict[str, float] | None = None
    warned: bool | None = None
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from visiontl.analyse.after_fit import record_dict

        return record_dict(self)


class NegativeTransferCheck:
    """See the module docstring: a step of :mod:`visiontl.analyse.after_fit` that follows target BatchNorm
    (it scores the model target BatchNorm left, from that step's record) and returns a
    :class:`NegativeTransferRecord`."""

    name = "negative_transfer"

    def run(self, ctx: FitContext) -> NegativeTransferRecord | None:
        trainer, pl_module, dm = ctx.trainer, ctx.task, ctx.datamodule
        if (not pl_module.hparams.get("negative_transfer_check", True) or not isinstance(dm, AdaptationData)
                or "target" not in dm.datasets):
            return None
        monitor = pl_module.monitor
        tags = isinstance(pl_module, PredictsTags) and pl_module.multilabel
        validator = monitor if monitor.startswith("target_") else "target_dev" if tags else "target_im"
        report: dict[str, Any] = {"validator": validator}
        strategy = pl_module.strategy
        if not strategy.sgd or not strategy.uses_pretrained or strategy.name == "probe":
            report["note"] = f"strategy {strategy.name!r} does not change a pretrained backbone: nothing to compare"
            return NegativeTransferRecord(**report)
        device = next(pl_module.model.parameters()).device
        probe = frozen_probe_scores(pl_module, dm, device)
        if probe is None:
            report["note"] = ("the run kept no starting weights it can load back (measure_drift: false, or a PEFT "
                              "strategy): no frozen probe to compare")
            return NegativeTransferRecord(**report)
        target_bn = ctx.records.get("target_bn")
        adapted = target_bn.after if isinstance(target_bn, TargetBNRecord) else None  # it scored the kept model
        if adapted is None:
            source_val, target = dm.val_dataloader()
            adapted = target_scores(kept_model(trainer, pl_module)[0], target,
                                    bool(pl_module.channels_last), device, source_val, multilabel=tags)
        worse = validator in adapted and validator in probe and adapted[validator] < probe[validator]
        report.update(model=adapted, frozen_probe=probe, warned=bool(worse))
        if worse:
            report["fallback"] = FALLBACK
            warnings.warn(
                f"Possible negative transfer: the adapted model's {validator} on the target images "
                f"({adapted[validator]:.4f}) is worse than a frozen pretrained backbone's with a head fitted on the "
                f"source ({probe[validator]:.4f}). The fine-tuning may have hurt on this target; try the fallback "
                f"{FALLBACK}, and compare both on a few labelled target images if you can.",
                NegativeTransferWarning, stacklevel=1)
        return NegativeTransferRecord(**report)
