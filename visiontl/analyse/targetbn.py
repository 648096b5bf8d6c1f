"""Target BatchNorm (AdaBN) for adaptation runs: the kept model normalises with the target's statistics.

:class:`TargetBatchNorm` runs at the end of an :class:`~visiontl.tasks.AdaptationTask` fit with
``target_bn: true``. It takes the model the run keeps (the best checkpoint's weights), re-estimates
every BatchNorm layer's running statistics on the unlabelled target training images with the
evaluation transform (:func:`visiontl.tasks.da.reestimate_batchnorm`: weights untouched), and
makes that the run's ``checkpoints/best.ckpt``, so ``visiontl export`` and ``predict-onnx`` deploy
the model for the target. The checkpoint as trained (source statistics) stays as
``checkpoints/best_source_bn.ckpt``. ``metrics.json`` (``target_bn``) records the layers, the
images, both checkpoints and the label-free target signals (and target accuracy when labelled
target images were given) before and after.

Models without BatchNorm (ViTs) are left as they are, and the report says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pytorch_lightning.utilities import rank_zero_info

from visiontl.core import files
from visiontl.data.adaptation import AdaptationData
from visiontl.tasks.protocols import PredictsTags
from visiontl.models.features import pooled_features
from visiontl.core.speed import channels_last_input
from visiontl.tasks.da import reestimate_batchnorm
from visiontl.tasks.checkpoints import kept_model, save_checkpoint, with_model_state
from visiontl.tasks.validators import target_scores

if TYPE_CHECKING:
    from visiontl.analyse.after_fit import FitContext

__all__ = ["TargetBatchNorm", "TargetBNRecord"]


@dataclass(frozen=True)
class TargetBNRecord:
    """What target BatchNorm did: ``metrics.json``'s ``target_bn``."""

    key: ClassVar[str | None] = "target_bn"
    layers: int
    images: int
    batch_size: int
    before: dict[str, float]
    after: dict[str, float] | None = None
    note: str | None = None
    checkpoint: str | None = None
    source_bn_checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from visiontl.analyse.after_fit import record_dict

        return record_dict(self)


class TargetBatchNorm:
    """AdaBN after the fit (see the module docstring): a step of :mod:`visiontl.analyse.after_fit`,
    returning a :class:`TargetBNRecord`."""

    name = "target_bn"

    def run(self, ctx: FitContext) -> TargetBNRecord | None:
        trainer, pl_module, dm = ctx.trainer, ctx.task, ctx.datamodule
        if not pl_module.hparams.get("target_bn") or not isinstance(dm, AdaptationData) or "target" not in dm.datasets:
            return None
        model, ckpt, best = kept_model(trainer, pl_module)
        device = next(model.parameters()).device
        channels_last = bool(pl_module.channels_last)
        images = dm.feature_source("target")
        batch_size = dm.eval_batch_size(len(dm.samples("train")), len(images))
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=0)
        source_val, scored = dm.val_dataloader()  # the images scored each epoch (target: labelled, if given)
        tags = isinstance(pl_module, PredictsTags) and pl_module.multilabel
        before = target_scores(model, scored, channels_last, device, source_val, multilabel=tags)
        layers = reestimate_batchnorm(
            model, (channels_last_input(b["image"].to(device), channels_last) for b in loader),
            forward=lambda x: pooled_features(model, x))
        report: dict[str, Any] = {"layers": layers, "images": len(images), "batch_size": batch_size, "before": before}
        if not layers:
            report["note"] = "the model has no BatchNorm layer: nothing to re-estimate"
            return TargetBNRecord(**report)
        report["after"] = target_scores(model, scored, channels_last, device, source_val, multilabel=tags)
        if ckpt is not None:  # the kept checkpoint becomes the target model; the trained one stays beside it
            source = Path(best).with_name("best_source_bn.ckpt")
            files.write_bytes(source, Path(best).read_bytes())
            ckpt["state_dict"] = with_model_state(ckpt["state_dict"], model.state_dict())
            ckpt.setdefault("visiontl", {})["target_bn"] = {"layers": layers, "images": len(images)}
            save_checkpoint(ckpt, best)
            report.update(checkpoint=str(best), source_bn_checkpoint=str(source))
        pl_module.model.load_state_dict(model.state_dict())  # what fit_task hands back is the target model too
        changes = ", ".join(f"{k} {before[k]:.3f} -> {report['after'][k]:.3f}"
                            for k in ("target_im", "target_dev", "target_acc", "target_map")
                            if k in before and k in report["after"])
        rank_zero_info(f"[visiontl] target BatchNorm: {layers} layers re-estimated on {len(images)} target images; "
                       f"{changes} ({os.path.basename(str(best)) or 'no checkpoint'})")
        return TargetBNRecord(**report)
