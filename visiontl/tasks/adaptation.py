"""Domain adaptation: labelled source, unlabelled target, one classifier for both.

Methods (``method=``):

- ``source_only``: cross-entropy on the source; the baseline every method must beat.
- ``dann`` (Ganin et al. 2016, JMLR): a domain discriminator on the pooled backbone features
  behind a gradient-reversal layer; the reversal coefficient ramps as ``2 / (1 + exp(-10 p)) - 1``
  with ``p`` the training progress, so early noisy features are not pushed around.
- ``coral`` (Sun and Saenko 2016, Deep CORAL): the distance between the source and target feature
  covariances, ``||C_s - C_t||_F^2 / (4 d^2)``; cheap, no extra network, often strong.

Source and target batches go through the backbone separately (``domain_bn``), so BatchNorm
normalises each domain by its own batch statistics in training; alignment then works on what is
left of the shift.

Any strategy of the ladder decides what trains (``partial``, ``full``, ``gradual``; ``probe``
trains the head only, so alignment cannot move the features).

Label-free model selection: every validation epoch logs, on the target images,
``target_entropy`` (mean prediction entropy, lower = more confident), ``target_im`` (information
maximisation: entropy of the mean prediction minus mean entropy; higher = confident *and* diverse)
and, for DANN, ``target_pad`` (proxy A-distance from the discriminator's domain error,
``2 (1 - 2 err)``: 0 = domains indistinguishable, 2 = fully separable). ``target_acc`` is logged
only when labelled target images are given (for evaluation, never for training).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from visiontl.features import classify_features, feature_width, pooled_features
from visiontl.speed import channels_last_input
from visiontl.tasks.classification import ClassificationTask

__all__ = ["METHODS", "AdaptationTask", "DomainDiscriminator", "coral_loss", "dann_coefficient",
           "gradient_reversal", "target_signals"]

METHODS = ("source_only", "dann", "coral")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def gradient_reversal(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient flows back multiplied by ``-coeff``."""
    return _GradientReversal.apply(x, float(coeff))


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s schedule: ``2 / (1 + exp(-gamma * p)) - 1`` for progress ``p`` in [0, 1]."""
    p = min(1.0, max(0.0, float(progress)))
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: squared Frobenius distance between feature covariances, over ``4 d^2``."""
    d = source.shape[1]

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=0, keepdim=True)
        return x.T @ x / max(1, x.shape[0] - 1)

    return (cov(source.float()) - cov(target.float())).pow(2).sum() / (4 * d * d)


class DomainDiscriminator(nn.Sequential):
    """Two hidden layers with batch norm, as in Ganin et al. and the Transfer-Learning-Library;
    outputs one logit: source (1) vs target (0)."""

    def __init__(self, in_features: int, hidden: int = 256) -> None:
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )


class AdaptationTask(ClassificationTask):
    """A :class:`~visiontl.tasks.ClassificationTask` trained on a source and a target domain.

    Needs an :class:`~visiontl.data.AdaptationDataModule` (batches ``{"source", "target"}``).
    Checkpoints are picked by source validation accuracy (``monitor``): target labels, when
    given, are for evaluation only. Exports and predicts like any classification run.

    Args:
        method: ``source_only``, ``dann`` or ``coral``.
        adaptation_weight: weight of the adversarial / CORAL loss beside the source cross-entropy.
        discriminator_hidden: width of the DANN discriminator.
        gamma: steepness of the DANN coefficient schedule.
        domain_bn: forward the source and the target batch separately, so that in training each
            is normalised by its own BatchNorm batch statistics and the low-level look of a domain
            (brightness, contrast, colour) is taken out before alignment (as in AdaBN / DSBN).
            ``False``: one forward of both batches concatenated (mixed statistics, as the
            Transfer-Learning-Library does). On Blue Marble -> shaded relief this decided whether
            DANN beat source-only (``benchmarks/results/adaptation.md``). No effect on models
            without BatchNorm (ViTs use LayerNorm).
        monitor: the validation metric that picks the best checkpoint: ``val_acc`` (source,
            default) or a label-free one: ``target_im``.
        *args: see :class:`~visiontl.tasks.ClassificationTask` (strategy default ``full``).
        **kwargs: see :class:`~visiontl.tasks.ClassificationTask`.
    """

    def __init__(self, *args: Any, method: Literal["source_only", "dann", "coral"] = "dann",
                 adaptation_weight: float = 1.0, discriminator_hidden: int = 256, gamma: float = 10.0,
                 domain_bn: bool = True, monitor: Literal["val_acc", "target_im"] = "val_acc",
                 **kwargs: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}.")
        if monitor not in ("val_acc", "target_im"):
            raise ValueError(f"monitor must be 'val_acc' or 'target_im' (target labels never pick checkpoints), "
                             f"got {monitor!r}.")
        kwargs.setdefault("strategy", "full")
        super().__init__(*args, **kwargs)
        if not self.strategy.sgd:
            raise ValueError(f"Strategy {self.strategy.name!r} fits a head in closed form; domain adaptation "
                             f"trains by gradient: use probe, partial, full or gradual.")
        self.monitor = monitor

    @property
    def uses_feature_cache(self) -> bool:
        return False  # every step sees both domains through the backbone

    def configure_models(self) -> None:
        super().configure_models()
        width = feature_width(self.model)
        self.discriminator = (DomainDiscriminator(width, self.hparams["discriminator_hidden"])
                              if self.hparams["method"] == "dann" else None)

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.target_accuracy = MulticlassAccuracy(self.hparams["num_classes"], average="micro")
        self._target: dict[str, list[torch.Tensor]] = {}

    def optimizer_groups(self) -> list[dict[str, Any]]:
        groups = super().optimizer_groups()
        if self.discriminator is not None:  # a new network: the head's learning rate
            groups.append({"params": list(self.discriminator.parameters()), "lr": self.strategy.lr,
                           "weight_decay": self.hparams.get("weight_decay", 0.0), "name": "discriminator"})
        return groups

    # -- training -------------------------------------------------------------------------------
    def _progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return self.global_step / total if total and math.isfinite(total) else 0.0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, channels_last_input(x, self.channels_last))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        source, target = batch["source"], batch["target"]
        ys, n = source["label"], len(source["label"])
        method = self.hparams["method"]
        if method == "source_only":
            feats = self._features(source["image"])
        elif self.hparams.get("domain_bn", True):  # each domain's batch normalised by its own statistics
            feats = torch.cat([self._features(source["image"]), self._features(target["image"])])
        else:  # one forward: BatchNorm statistics mix the two domains
            feats = self._features(torch.cat([source["image"], target["image"]]))
        logits = classify_features(self.model, feats[:n])
        loss = self._loss(logits, ys)
        self.train_metrics.update(logits.detach(), ys)
        weight = float(self.hparams["adaptation_weight"])
        if method == "dann":
            coeff = dann_coefficient(self._progress(), self.hparams["gamma"])
            domain = self.discriminator(gradient_reversal(feats, coeff)).squeeze(1)
            truth = torch.cat([torch.ones(n), torch.zeros(len(feats) - n)]).to(domain)
            adversarial = F.binary_cross_entropy_with_logits(domain, truth)
            loss = loss + weight * adversarial
            self.log("train_domain_loss", adversarial, on_epoch=True, batch_size=n)
            self.log("train_domain_acc", ((domain > 0).float() == truth).float().mean(), on_epoch=True, batch_size=n)
            self.log("grl_coeff", coeff, on_step=True, batch_size=n, sync_dist=True)
        elif method == "coral":
            alignment = coral_loss(feats[:n], feats[n:])
            loss = loss + weight * alignment
            self.log("train_coral", alignment, on_epoch=True, batch_size=n)
        # epoch means per rank: a synchronised one deadlocks Lightning's progress bar under DDP (#21264)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    # -- validation: source metrics, target signals --------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats = self._features(batch["image"])  # one backbone pass serves the classifier and the discriminator
        if dataloader_idx == 0:
            self._eval_step(batch, "val", logits=classify_features(self.model, feats))
            if self.discriminator is not None:
                self._target.setdefault("source_domain", []).append(self.discriminator(feats).squeeze(1))
            return
        probs = classify_features(self.model, feats).float().softmax(dim=1)
        self._target.setdefault("probs", []).append(probs)
        labelled = batch["label"] >= 0
        if labelled.any():
            self.target_accuracy.update(probs[labelled], batch["label"][labelled])
        if self.discriminator is not None:
            self._target.setdefault("target_domain", []).append(self.discriminator(feats).squeeze(1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        signals = target_signals(self._target)
        for name, value in signals.items():
            self.log(name, value, sync_dist=True)
        if self.target_accuracy.update_count:
            self.log("target_acc", self.target_accuracy.compute(), prog_bar=True, sync_dist=True)
        self.target_accuracy.reset()
        self._target = {}


def target_signals(collected: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Label-free signals from collected target probabilities and discriminator logits."""
    out: dict[str, float] = {}
    if collected.get("probs"):
        probs = torch.cat(collected["probs"]).clamp_min(1e-12)
        entropy = -(probs * probs.log()).sum(dim=1).mean()
        mean = probs.mean(dim=0)
        diversity = -(mean * mean.log()).sum()
        out["target_entropy"] = float(entropy)
        out["target_im"] = float(diversity - entropy)
    if collected.get("source_domain") and collected.get("target_domain"):
        source, target = torch.cat(collected["source_domain"]), torch.cat(collected["target_domain"])
        correct = (source > 0).sum() + (target <= 0).sum()
        error = 1.0 - float(correct) / (len(source) + len(target))
        out["target_pad"] = 2.0 * (1.0 - 2.0 * min(error, 1.0 - error))
    return out
