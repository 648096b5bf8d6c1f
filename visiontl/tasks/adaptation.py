"""Domain adaptation: labelled source, unlabelled target, one classifier for both.

Methods (``method=``):

- ``source_only``: cross-entropy on the source; the baseline every method must beat.
- ``dann`` (Ganin et al. 2016, JMLR): a domain discriminator on the pooled backbone features
  behind a gradient-reversal layer; the reversal coefficient ramps as ``2 / (1 + exp(-10 p)) - 1``
  with ``p`` the training progress, so early noisy features are not pushed around.
- ``coral`` (Sun and Saenko 2016, Deep CORAL): the distance between the source and target feature
  covariances, ``||C_s - C_t||_F^2 / (4 d^2)``; cheap, no extra network, often strong.
- ``mcc`` (Jin et al. 2020, Minimum Class Confusion): penalises the target predictions' class
  confusion (:func:`visiontl.tasks.da.mcc_loss`); no extra network.
- ``cdan_e`` (Long et al. 2018, CDAN+E): a domain discriminator on the multilinear map of features
  and class predictions (:func:`visiontl.tasks.da.multilinear_map`, randomised above 4,096
  entries), each sample weighted by its prediction's certainty; the same reversal schedule as DANN.

Source and target batches go through the backbone separately (``domain_bn``), so BatchNorm
normalises each domain by its own batch statistics in training; alignment then works on what is
left of the shift.

Any strategy of the ladder decides what trains (``partial``, ``full``, ``gradual``; ``probe``
trains the head only, so alignment cannot move the features).

Multi-label data (several tags per image; :class:`~visiontl.data.CsvAdaptationDataModule`): DANN,
CORAL and source-only train with the binary cross-entropy (they never read the labels to align);
MCC and CDAN+E, defined on one softmax per image, are refused, as are the softmax validators below;
the default is DANN with checkpoints by ``val_map`` (:func:`adaptation_defaults`).

Label-free model selection: every validation epoch logs, on the target images,
``target_entropy`` (mean prediction entropy, lower = more confident), ``target_im`` (information
maximisation: entropy of the mean prediction minus mean entropy; higher = confident *and* diverse),
``target_snd`` (soft neighbourhood density, Saito et al. 2021; higher = denser target neighbourhoods),
``target_dev`` (deep embedded validation, You et al. 2019: minus the source validation loss
importance-weighted towards the target; higher = lower estimated target risk) and, for DANN, ``target_pad`` (proxy A-distance from the discriminator's domain error,
``2 (1 - 2 err)``: 0 = domains indistinguishable, 2 = fully separable). ``target_acc`` is logged
only when labelled target images are given (for evaluation, never for training).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from visiontl.models.features import classify_features, feature_width, pooled_features
from visiontl.core.speed import channels_last_input
from visiontl.core.errors import UserError
from visiontl.strategies.base import Strategy
from visiontl.tasks.classification import ClassificationTask
from visiontl.tasks.da import (cdan_entropy_weights, deep_embedded_validation, information_maximisation, mcc_loss,
                               multilinear_map, soft_neighbourhood_density)
from visiontl.tasks.validators import tag_losses

__all__ = ["METHODS", "TAG_METHODS", "AdaptationTask", "DomainDiscriminator", "adaptation_defaults", "coral_loss",
           "dann_coefficient", "gradient_reversal", "target_signals"]

METHODS = ("source_only", "dann", "coral", "mcc", "cdan_e")
MONITORS = ("val_acc", "target_im", "target_snd", "target_dev")  # target labels never pick a checkpoint
# several tags per image: the methods and validators that never read a softmax over the classes
TAG_METHODS = ("source_only", "dann", "coral")
TAG_MONITORS = ("val_map", "target_dev")
_CDAN_MAX_DIM = 4096  # above this many features x classes, CDAN's randomised multilinear map (width 1024)


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


def adaptation_defaults(method: str | None, monitor: str | None, multilabel: bool) -> tuple[str, str]:
    """``(method, monitor)`` of an adaptation run: the defaults where not given (one class per image:
    ``mcc`` / ``target_im``, the best mean rank of ``benchmarks/adaptation.py``; several tags per
    image: ``dann`` / ``val_map``, the best DANN configuration there), and a one-line refusal of
    what the task cannot use."""
    if multilabel:
        method, monitor = method or "dann", monitor or "val_map"
        if method not in TAG_METHODS:
            known = "" if method in METHODS else "Unknown adaptation method; "
            raise UserError(f"{known}method {method!r} cannot adapt multi-label data (several tags per image): MCC and "
                             f"CDAN+E are defined on one softmax over the classes per image; use "
                             f"{', '.join(TAG_METHODS)} (dann is the multi-label default).")
        if monitor not in TAG_MONITORS:
            raise UserError(f"monitor {monitor!r} cannot pick checkpoints of multi-label data: information "
                             f"maximisation and neighbourhood density read one softmax per image; use "
                             f"{' or '.join(TAG_MONITORS)} (val_map is the multi-label default).")
        return method, monitor
    method, monitor = method or "mcc", monitor or "target_im"
    if method not in METHODS:
        raise UserError(f"Unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}.")
    if monitor not in MONITORS:
        raise UserError(f"monitor must be one of {', '.join(MONITORS)} (target labels never pick checkpoints), "
                         f"got {monitor!r}.")
    return method, monitor


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

    Needs an adaptation datamodule (batches ``{"source", "target"}``):
    :class:`~visiontl.data.AdaptationDataModule` (class folders) or
    :class:`~visiontl.data.CsvAdaptationDataModule` (CSVs; multi-label too).
    The defaults (``method``, ``monitor``, ``target_bn``) are the configuration with the best mean
    rank over the three pairs of ``benchmarks/adaptation.py`` (``benchmarks/results/adaptation.md``):
    checkpoints are picked by a label-free validator and the kept model gets the target's BatchNorm
    statistics. Target labels, when given, are for evaluation only. Exports and predicts like any
    classification run.

    Args:
        method: ``mcc`` (default), ``dann``, ``coral``, ``cdan_e`` or ``source_only``. Multi-label
            data (``task="multilabel"``, several tags per image, one sigmoid each): ``dann``
            (default), ``coral`` or ``source_only``; MCC and CDAN+E are defined on one softmax per
            image and are refused.
        adaptation_weight: weight of the adversarial / CORAL / MCC loss beside the source cross-entropy.
        discriminator_hidden: width of the DANN / CDAN discriminator.
        gamma: steepness of the DANN / CDAN coefficient schedule.
        mcc_temperature: MCC's softmax temperature (2.5, the paper's).
        target_bn: at the end of the fit, re-estimate the kept model's BatchNorm statistics on the
            target training images (AdaBN, :mod:`visiontl.analyse.targetbn`): ``best.ckpt`` (and what
            export deploys) becomes the model for the target; the trained one stays as
            ``best_source_bn.ckpt``; ``metrics.json`` records ``target_bn``. Default ``True``; a
            model without BatchNorm (ViTs) is left as it is.
        domain_bn: forward the source and the target batch separately, so that in training each
            is normalised by its own BatchNorm batch statistics and the low-level look of a domain
            (brightness, contrast, colour) is taken out before alignment (as in AdaBN / DSBN).
            ``False``: one forward of both batches concatenated (mixed statistics, as the
            Transfer-Learning-Library does). On Blue Marble -> shaded relief this decided whether
            DANN beat source-only (``benchmarks/results/adaptation_single_pair.md``). No effect on models
            without BatchNorm (ViTs use LayerNorm).
        monitor: the validation metric that picks the best checkpoint: a label-free target
            validator, ``target_im`` (default), ``target_snd`` or ``target_dev``, or the source
            validation accuracy ``val_acc``. Multi-label: ``val_map`` (default, the source
            validation macro mAP) or ``target_dev`` (DEV on per-image tag losses); information
            maximisation and neighbourhood density read a softmax and are refused.
        negative_transfer_check: at the end of the fit, compare the kept model with a frozen
            pretrained probe on the target by the label-free validator and warn when the probe
            scores higher (:mod:`visiontl.analyse.negative_transfer`); ``metrics.json`` records
            ``negative_transfer``.
        strategy: what trains (any strategy trained by gradient); default ``full`` with
            ``bn_stats="update"`` (``domain_bn`` needs BatchNorm in training mode), from the
            command line too.
        *args: see :class:`~visiontl.tasks.ClassificationTask`.
        **kwargs: see :class:`~visiontl.tasks.ClassificationTask`.
    """

    def __init__(self, *args: Any, method: Literal["source_only", "dann", "coral", "mcc", "cdan_e"] | None = None,
                 adaptation_weight: float = 1.0, discriminator_hidden: int = 256, gamma: float = 10.0,
                 domain_bn: bool = True,
                 monitor: Literal["val_acc", "val_map", "target_im", "target_snd", "target_dev"] | None = None,
                 mcc_temperature: float = 2.5, target_bn: bool = True, negative_transfer_check: bool = True,
                 strategy: Strategy | str | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, strategy=strategy, **kwargs)  # the None defaults: resolve_hparams
        if not self.strategy.sgd:
            raise ValueError(f"Strategy {self.strategy.name!r} fits a head in closed form; domain adaptation "
                             f"trains by gradient: use probe, partial, full or gradual.")
        if domain_bn and self.hparams["method"] != "source_only" and getattr(self.strategy, "bn_stats", "update") == "frozen" \
                and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            warnings.warn(f"domain_bn has no effect: strategy {self.strategy.name!r} keeps the BatchNorm statistics "
                          f"frozen (bn_stats='frozen'), so neither domain is normalised by its own batch; pass "
                          f"bn_stats='update' to the strategy, or domain_bn=False to silence this.", stacklevel=2)
        self.monitor = self.hparams["monitor"]

    def resolve_hparams(self) -> None:
        """The defaults left as None, from the data's task (:func:`adaptation_defaults`), and the
        strategy's (``full`` with ``bn_stats="update"``): resolved on the saved hyper-parameters, so
        a run from Python and one from the command line (which passes every default as given) get
        the same."""
        hp = self.hparams
        hp["method"], hp["monitor"] = adaptation_defaults(hp.get("method"), hp.get("monitor"),
                                                          hp.get("task", "multiclass") == "multilabel")
        if hp.get("strategy") is None:
            hp["strategy"] = {"name": "full", "bn_stats": "update"}

    @property
    def uses_feature_cache(self) -> bool:
        return False  # every step sees both domains through the backbone

    def configure_models(self) -> None:
        super().configure_models()
        width = feature_width(self.model)
        method = self.hparams["method"]
        self.cdan_projection: tuple[torch.Tensor, torch.Tensor] | None = None
        if method == "cdan_e":
            k = int(self.hparams["num_classes"])
            if width * k > _CDAN_MAX_DIM:  # fixed random matrices, seeded: the same map in every process
                generator = torch.Generator().manual_seed(0)
                self.register_buffer("cdan_rf", torch.randn(width, 1024, generator=generator), persistent=False)
                self.register_buffer("cdan_rg", torch.randn(k, 1024, generator=generator), persistent=False)
                width = 1024
            else:
                width = width * k
        self.discriminator = (DomainDiscriminator(width, self.hparams["discriminator_hidden"])
                              if method in ("dann", "cdan_e") else None)

    def configure_metrics(self) -> None:
        super().configure_metrics()
        k = self.hparams["num_classes"]  # with target labels: accuracy, or macro mAP of the tags
        self.target_accuracy = (MultilabelAveragePrecision(k, average="macro", ignore_index=-1) if self.multilabel
                                else MulticlassAccuracy(k, average="micro"))
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
        self.train_metrics.update(logits.detach(), ys.long() if self.multilabel else ys)
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
        elif method == "mcc":
            confusion = mcc_loss(classify_features(self.model, feats[n:]), self.hparams.get("mcc_temperature", 2.5))
            loss = loss + weight * confusion
            self.log("train_mcc", confusion, on_epoch=True, batch_size=n)
        elif method == "cdan_e":
            probs = torch.cat([logits, classify_features(self.model, feats[n:])]).softmax(dim=1)
            projection = (self.cdan_rf, self.cdan_rg) if hasattr(self, "cdan_rf") else None
            coeff = dann_coefficient(self._progress(), self.hparams["gamma"])
            joint = gradient_reversal(multilinear_map(feats, probs, projection), coeff)
            domain = self.discriminator(joint).squeeze(1)
            truth = torch.cat([torch.ones(n), torch.zeros(len(feats) - n)]).to(domain)
            adversarial = (F.binary_cross_entropy_with_logits(domain, truth, reduction="none")
                           * cdan_entropy_weights(probs, n)).mean()
            loss = loss + weight * adversarial
            self.log("train_domain_loss", adversarial, on_epoch=True, batch_size=n)
            self.log("grl_coeff", coeff, on_step=True, batch_size=n, sync_dist=True)
        # epoch means per rank: a synchronised one deadlocks Lightning's progress bar under DDP (#21264)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    # -- validation: source metrics, target signals --------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats = self._features(batch["image"])  # one backbone pass serves the classifier and the discriminator
        if dataloader_idx == 0:
            logits = classify_features(self.model, feats)
            self._eval_step(batch, "val", logits=logits)
            self._target.setdefault("source_features", []).append(feats.float())
            self._target.setdefault("source_losses", []).append(
                tag_losses(logits, batch["label"]) if self.multilabel
                else F.cross_entropy(logits.float(), batch["label"], reduction="none"))
            if self.hparams["method"] == "dann":  # the proxy A-distance of DANN's feature discriminator
                self._target.setdefault("source_domain", []).append(self.discriminator(feats).squeeze(1))
            return
        logits = classify_features(self.model, feats).float()
        self._target.setdefault("target_features", []).append(feats.float())
        if self.multilabel:  # no softmax signal; target tags, where given, for the target mAP
            labels = batch["label"]
            labelled = (labels >= 0).any(dim=1)
            if labelled.any():
                self.target_accuracy.update(logits.sigmoid()[labelled], labels[labelled].long())
        else:
            probs = logits.softmax(dim=1)
            self._target.setdefault("probs", []).append(probs)
            labelled = batch["label"] >= 0
            if labelled.any():
                self.target_accuracy.update(probs[labelled], batch["label"][labelled])
        if self.hparams["method"] == "dann":
            self._target.setdefault("target_domain", []).append(self.discriminator(feats).squeeze(1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        signals = target_signals(self._target)
        for name, value in signals.items():
            self.log(name, value, sync_dist=True)
        if self.target_accuracy.update_count:
            self.log("target_map" if self.multilabel else "target_acc", self.target_accuracy.compute(), prog_bar=True,
                     sync_dist=True)
        self.target_accuracy.reset()
        self._target = {}


def target_signals(collected: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Label-free signals from collected target probabilities and discriminator logits."""
    out: dict[str, float] = {}
    if collected.get("probs"):
        probs = torch.cat(collected["probs"]).clamp_min(1e-12)
        out["target_entropy"] = float(-(probs * probs.log()).sum(dim=1).mean())
        out["target_im"] = information_maximisation(probs)
        if len(probs) >= 2:
            out["target_snd"] = soft_neighbourhood_density(probs)
    source, target = collected.get("source_features"), collected.get("target_features")
    if source and target and sum(map(len, source)) >= 2 and sum(map(len, target)) >= 2:
        out["target_dev"] = -deep_embedded_validation(torch.cat(source).cpu(), torch.cat(collected["source_losses"]).cpu(),
                                                      torch.cat(target).cpu())
    if collected.get("source_domain") and collected.get("target_domain"):
        source, target = torch.cat(collected["source_domain"]), torch.cat(collected["target_domain"])
        correct = (source > 0).sum() + (target <= 0).sum()
        error = 1.0 - float(correct) / (len(source) + len(target))
        out["target_pad"] = 2.0 * (1.0 - 2.0 * min(error, 1.0 - error))
    return out
