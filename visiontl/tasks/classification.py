"""Image classification: a timm backbone with a new head, trained by any strategy."""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassSpecificity,
)

from visiontl.models.backbones import create_backbone, layer_groups
from visiontl.data.preprocessing import Preprocessing
from visiontl.tasks.delta import DeltaCheckpoint, base_record
from visiontl.core.errors import UserError, one_line
from visiontl.models.features import (
    classify_features,
    feature_width,
    pooled_features,
    supports_features,
)
from visiontl.core.speed import channels_last_input, is_cnn
from visiontl.strategies import Strategy, StrategyError, replace_classifier
from visiontl.strategies.regularizers import l2sp_penalty
from visiontl.models.weights import classifier_names
from visiontl.tasks.base import BaseTask
from visiontl.models.ood import DEFAULT_SCORE, SCORES, OODDetector
from visiontl.tasks.guard import DivergenceGuard
from visiontl.tasks.multilabel import (
    TASKS,
    decisions,
    multilabel_loss,
    multilabel_scores,
    rescale_thresholds,
    tag_report,
    tune_thresholds,
)
from visiontl.tasks.regularisers import BatchMixer, WeightEMA

__all__ = ["ClassificationTask"]


class ClassificationTask(BaseTask):
    """Fine-tune a timm backbone for ``num_classes`` classes.

    Args:
        backbone: timm model name.
        num_classes: number of classes (linked from the datamodule in recipes).
        class_names: class names in label order (linked from the datamodule in recipes).
        strategy: ``probe``, ``partial``, ``full``, ``gradual``, ``scratch``, a
            ``{"name": ..., **kwargs}`` dict or a :class:`~visiontl.strategies.Strategy`.
        pretrained: start from timm's pretrained weights (hub or cache).
        weights: a local checkpoint or named source instead of the hub (no network).
        in_chans: input channels (the pretrained stem is adapted when not 3).
        weight_decay: AdamW weight decay.
        warmup: fraction of the steps spent warming the learning rate up.
        class_weights: ``"balanced"`` (inverse class frequency from the training set), a list
            with one weight per class, or ``None``.
        label_smoothing: cross-entropy label smoothing.
        drop_rate: dropout before the classifier.
        converter: key converter for foreign ``weights`` (``auto`` detects it).
        channels_last: NHWC memory format (``None``: on for CNNs, where it trains faster on CPU;
            off for transformers).
        compile: run the model through ``torch.compile`` (pays off after ~100 steps here).
        preprocessing: the resolved :class:`~visiontl.data.preprocessing.Preprocessing` as a dict:
            recorded at set-up from the datamodule (:class:`~visiontl.tasks.link.DataLink`) and
            given back by checkpoints; export and predict read it. For a task used without a
            datamodule, some of its fields (``{"size": 32}``) are laid over the backbone's. With a
            datamodule, the datamodule is the one place to change the input (``image_size``,
            ``mean`` / ``std``, ``crop_pct``, ``interpolation``).
        grad_clip: largest gradient norm for strategies that train the backbone (``None``: no
            clipping; a Trainer's own ``gradient_clip_val`` takes precedence).
        divergence_guard: watch for divergence and collapse and repair them
            (:class:`~visiontl.tasks.guard.DivergenceGuard`); any SGD strategy.
        last_every_n_steps: write ``checkpoints/last.ckpt`` every this many steps (``None``: not by
            steps); it is also written when training ends (:class:`~visiontl.train.resume.LastCheckpoint`).
        last_every_minutes: and whenever this many minutes have passed (``None``: not by time).
        measure_drift: at the end of a fit that changed a pretrained backbone, report how far it
            moved and what it forgot (:mod:`visiontl.analyse.forgetting`: CKA, per-group weight distance,
            ImageNet agreement, retention on the datamodule's ``retain`` set) in ``metrics.json``.
        mixup: Mixup's Beta alpha (timm's ``Mixup``; 0.2 to 0.8 are usual; 0: off): training images
            and their labels are mixed in pairs (:mod:`visiontl.tasks.regularisers`).
        cutmix: CutMix's Beta alpha (0: off); with ``mixup`` too, each batch takes one of the two.
            Both mix images, so a strategy that trains on cached features refuses them.
        ema: keep an exponential moving average of the weights with this decay per step (timm's
            ``ModelEmaV3``; 0.999 is usual; ``None``: off); validation, the best checkpoint and
            export use the average.
        early_stopping: stop training when the monitored validation score (:attr:`monitor`) has not
            improved for this many validations (Lightning's ``EarlyStopping``); ``None``: train the
            whole budget. The best checkpoint is what the run keeps either way. Strategies that fit
            their head in closed form have nothing to stop.
        task: ``multiclass`` (one class per image) or ``multilabel`` (several tags per image, each a
            yes / no decision: :mod:`visiontl.tasks.multilabel`); set from the datamodule by
            ``fine_tune`` and the CLI. With ``multilabel``, ``class_names`` are the tags,
            ``class_weights="balanced"`` weighs each tag's positives, and ``val_map`` picks the
            best checkpoint.
        thresholds: multi-label: fixed decision thresholds, one per tag (``None``: tuned on the
            validation images for each tag's best F1).
        ood_score: the out-of-distribution score fitted after the fit, whose threshold flags
            predictions on unfamiliar images ``abstain`` (:mod:`visiontl.analyse.ood`: ``knn``,
            ``mahalanobis``, ``energy`` or ``msp``; ``None``: none).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        strategy: Strategy | str = "probe",
        pretrained: bool = True,
        weights: str | None = None,
        in_chans: int = 3,
        weight_decay: float = 0.01,
        warmup: float = 0.05,
        class_weights: Literal["balanced"] | list[float] | None = None,
        label_smoothing: float = 0.0,
        drop_rate: float = 0.0,
        converter: str | None = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        preprocessing: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        divergence_guard: bool = True,
        last_every_n_steps: int | None = 50,
        last_every_minutes: float | None = 5.0,
        measure_drift: bool = True,
        early_stopping: int | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        ema: float | None = None,
        task: str = "multiclass",
        thresholds: list[float] | None = None,
        ood_score: str | None = DEFAULT_SCORE,
    ) -> None:
        if num_classes is None and class_names:
            num_classes = len(class_names)
        if num_classes is None:
            raise UserError(
                "ClassificationTask needs num_classes or class_names (recipes link them from the "
                "datamodule; in Python pass num_classes=datamodule.num_classes)."
            )
        if early_stopping is not None and (isinstance(early_stopping, bool) or int(early_stopping) < 1):
            raise UserError(f"early_stopping is a patience in validations (a whole number >= 1) or None, got "
                            f"{early_stopping!r}.")
        if class_names is not None and len(class_names) != num_classes:
            raise UserError(f"class_names has {len(class_names)} names but num_classes is {num_classes}.")
        if task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
        if thresholds is not None and (task != "multilabel" or len(thresholds) != num_classes
                                       or not all(0.0 < float(t) < 1.0 for t in thresholds)):
            raise UserError(f"thresholds are for multi-label tasks: one per tag ({num_classes}), each between 0 and 1; "
                            f"got {thresholds!r}.")
        if ood_score is not None and ood_score not in SCORES:
            raise UserError(f"ood_score must be one of {', '.join(SCORES)} or None, got {ood_score!r}.")
        super().__init__()
        self.__dict__["_ood"] = None  # fitted after the fit (visiontl.analyse.ood); not in the state dict
        if self.multilabel:
            if self.strategy.name in ("knn", "prototype"):
                raise StrategyError(f"Strategy {self.strategy.name!r} scores one class per image; for multi-label data "
                                    f"(several tags per image) use logreg (one-vs-rest), gradual or an SGD strategy.")
            self.monitor = "val_map"  # threshold-free: picks checkpoints before any threshold is tuned

    @property
    def multilabel(self) -> bool:
        """Several tags per image (``task="multilabel"``) rather than one class."""
        return self.hparams.get("task", "multiclass") == "multilabel"

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (``class_0``... when none were given)."""
        names = self.hparams.get("class_names")
        return list(names) if names else [f"class_{i}" for i in range(self.hparams["num_classes"])]

    # -- construction -------------------------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        pretrained = hp["pretrained"] and self.strategy.uses_pretrained
        weights = hp["weights"] if self.strategy.uses_pretrained else None  # loaded whatever `pretrained` says
        self.model = create_backbone(
            hp["backbone"],
            hp["num_classes"],
            pretrained=pretrained,
            weights=weights,
            in_chans=hp["in_chans"],
            converter=hp["converter"],
            drop_rate=hp["drop_rate"],
        )
        # what a PEFT checkpoint is checked against: the base weights as built, as loaded (before
        # any resizing or training)
        self.base_weights = (base_record(self.model, hp["backbone"], weights, pretrained)
                             if self.strategy.peft else None)
        given = hp.get("preprocessing")
        if given:  # recorded, or some fields laid over the backbone's: completed and recorded whole
            pre = Preprocessing.from_dict({**self.backbone_preprocessing().to_dict(), **dict(given)})
            hp["preprocessing"] = pre.to_dict()
            self._fit_input_size(pre.size)
        self.channels_last = is_cnn(self.model) if hp["channels_last"] is None else bool(hp["channels_last"])
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # not a registered submodule: the state dict keeps the model's own parameter names
        self.__dict__["_compiled"] = torch.compile(self.model) if hp["compile"] else None
        width = feature_width(self.model)
        head = self.strategy.make_head(width, hp["num_classes"])
        if head is not None:
            replace_classifier(self.model, head)
        self._snapshot_start()

    def _snapshot_start(self, prepared: bool = False) -> None:
        """Keep the pretrained backbone as it starts (resized, before any step or resumed checkpoint):
        what L2-SP pulls towards and what the drift report (:mod:`visiontl.analyse.forgetting`) compares
        with; out of the state dict. Only for strategies that change a pretrained backbone."""
        strategy = self.strategy
        changes_backbone = strategy.sgd and strategy.uses_pretrained and not strategy.cache_features
        wanted = (changes_backbone and self.hparams.get("measure_drift", True)) or strategy.regularizer is not None
        head_keys = tuple(f"{name}." for name in classifier_names(self.model))
        # once prepared (LoRA injected), the plain model it computes: the names the drift report uses
        model = self.strategy.merge(copy.deepcopy(self.model)) if prepared and strategy.peft else self.model
        self.__dict__["start_state"] = ({k: v.detach().clone() for k, v in model.state_dict().items()
                                         if not k.startswith(head_keys)} if wanted else None)

    def configure_losses(self) -> None:
        weights = self.hparams["class_weights"]
        tensor = None
        if isinstance(weights, (list, tuple)):
            if len(weights) != self.hparams["num_classes"]:
                raise ValueError(f"class_weights has {len(weights)} values for {self.hparams['num_classes']} classes.")
            tensor = torch.tensor(weights, dtype=torch.float32)
        elif weights not in (None, "balanced"):
            raise ValueError(f"class_weights must be 'balanced', a list or None, got {weights!r}.")
        self.register_buffer("class_weight", tensor if tensor is not None else torch.ones(self.hparams["num_classes"]))
        hp = self.hparams
        # the calibration temperature (one, or one per tag): 1 while training, fitted after the fit
        # (visiontl.analyse.calibration); in the state dict, so every checkpoint, export and prediction applies it
        self.register_buffer("temperature", torch.ones(hp["num_classes"] if self.multilabel else 1))
        mixing = hp.get("mixup", 0.0) or hp.get("cutmix", 0.0)
        if self.multilabel:
            fixed = hp.get("thresholds")
            # in the state dict: every checkpoint, export and prediction applies its own weights' thresholds
            self.register_buffer("thresholds", torch.tensor(fixed if fixed else [0.5] * hp["num_classes"],
                                                            dtype=torch.float32))
            if mixing:
                raise ValueError("mixup / cutmix mix one class per image; for multi-label data leave them at 0.")
        self.__dict__["mixer"] = (BatchMixer(hp.get("mixup", 0.0), hp.get("cutmix", 0.0), hp["num_classes"],
                                             hp["label_smoothing"]) if mixing else None)
        if mixing and type(self).training_step is not ClassificationTask.training_step:
            raise ValueError(f"{type(self).__name__} trains with its own objective; mixup / cutmix are options of "
                             f"ClassificationTask.")
        if mixing and self.uses_feature_cache:
            raise StrategyError(f"mixup / cutmix mix images, but strategy {self.strategy.name!r} trains on cached "
                                f"features; use gradual, partial, full or a PEFT strategy, or leave them at 0.")

    def configure_metrics(self) -> None:
        k = self.hparams["num_classes"]
        self.last_confusion: dict[str, torch.Tensor] = {}
        self.last_tags: dict[str, dict[str, Any]] = {}  # multi-label: per-tag table and PR curves per split
        if self.multilabel:
            self.train_metrics = multilabel_scores(k, full=False).clone(prefix="train_")
            self.train_loss_mean = MeanMetric()
            self.val_metrics = multilabel_scores(k, full=True).clone(prefix="val_")
            self.test_metrics = multilabel_scores(k, full=True).clone(prefix="test_")
            # the scores and targets themselves, synchronised across processes: thresholds and per-tag rates
            self.val_probs, self.val_targets = CatMetric(), CatMetric()
            self.test_probs, self.test_targets = CatMetric(), CatMetric()
            return
        scores = MetricCollection({
            "acc": MulticlassAccuracy(k, average="micro"),
            "balanced_acc": MulticlassAccuracy(k, average="macro"),
            "f1": MulticlassF1Score(k, average="macro"),
        })
        self.train_metrics = scores.clone(prefix="train_")
        self.train_loss_mean = MeanMetric()
        full = MetricCollection({**scores.clone(), "auroc": MulticlassAUROC(k, average="macro")})
        self.val_metrics = full.clone(prefix="val_")
        self.test_metrics = full.clone(prefix="test_")
        self.val_recall = MulticlassRecall(k, average=None)
        self.test_recall = MulticlassRecall(k, average=None)
        self.val_specificity = MulticlassSpecificity(k, average=None)
        self.test_specificity = MulticlassSpecificity(k, average=None)
        self.val_confmat = MulticlassConfusionMatrix(k)
        self.test_confmat = MulticlassConfusionMatrix(k)

    def set_preprocessing(self, pre: Preprocessing) -> None:
        super().set_preprocessing(pre)
        if self._fit_input_size(pre.size):
            self.groups = layer_groups(self.model)  # the position embedding is a new parameter
            self.set_trainable_groups(self.trainable_groups)
            if self.__dict__.get("start_state") is not None:  # at set-up, before any step: still pretrained
                self._snapshot_start(prepared=True)

    def set_class_counts(self, counts: list[int], total: int | None = None) -> None:
        """Training samples per class (from the datamodule, at set-up): ``class_weights='balanced'``
        weighs each class by the inverse of its frequency; for multi-label data (``counts``: images
        with each tag, ``total``: training images) each tag's positives by negatives / positives."""
        if self.hparams["class_weights"] == "balanced":
            c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
            if self.multilabel:
                if total is None:
                    raise ValueError("class_weights='balanced' on multi-label data needs the number of training images.")
                self.class_weight.copy_((float(total) - c).clamp(min=1) / c)
            else:
                self.class_weight.copy_(c.sum() / (len(c) * c))
            self._counts_set = True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams["class_weights"] == "balanced" and not getattr(self, "_counts_set", False):
            raise ValueError("class_weights='balanced' needs a datamodule with class_counts.")

    def _fit_input_size(self, size: int) -> bool:
        """Resample a transformer's position embedding to the training size once (timm's
        ``set_input_size``), so nothing is resized per forward and the model exports cleanly."""
        patch = getattr(self.model, "patch_embed", None)
        current = getattr(patch, "img_size", None)
        if not hasattr(self.model, "set_input_size") or current is None or tuple(current) == (size, size):
            return False
        self.model.set_input_size(img_size=size)
        return True

    @property
    def uses_feature_cache(self) -> bool:
        """Whether training reads cached backbone features (a frozen backbone and a timm head)."""
        return bool(self.strategy.cache_features) and supports_features(self.model)

    def checkpoint_callbacks(self) -> list[Callback]:
        # best.ckpt by the monitored metric (last.ckpt, always the latest state, is the run's)
        best = ModelCheckpoint(filename="best", monitor=self.monitor, mode="max", save_last=False,
                               auto_insert_metric_name=False)
        delta = [DeltaCheckpoint()] if self.strategy.peft else []
        return [best, *super().checkpoint_callbacks(), *delta]

    def task_callbacks(self) -> list[Callback]:
        guard = [DivergenceGuard()] if self.strategy.sgd and self.hparams.get("divergence_guard", True) else []
        decay = self.hparams.get("ema")
        average = [WeightEMA(decay)] if decay is not None and self.strategy.sgd else []
        patience = self.hparams.get("early_stopping")
        stop = ([EarlyStopping(monitor=self.monitor, mode="max", patience=int(patience), check_on_train_epoch_end=False)]
                if patience is not None and self.strategy.sgd else [])
        return [*super().task_callbacks(), *guard, *average, *stop]

    monitor = "val_acc"
    """The validation metric (higher is better) that picks the best checkpoint."""

    # -- steps ----------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return multilabel_loss(logits, y, pos_weight=self.class_weight, smoothing=self.hparams["label_smoothing"])
        return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.hparams["label_smoothing"])

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.strategy.sgd:
            self.trainer.should_stop = True  # fitted once; one pass is the whole "training"
            return
        # logged once per epoch: logging the collection every step cost more than a head's step
        if any(metric.update_count for metric in self.train_metrics.values()):  # a resumed, empty epoch: none
            self.log_dict(self.train_metrics.compute(), sync_dist=True)
        if self.train_loss_mean.update_count:
            self.log("train_loss_epoch", self.train_loss_mean.compute(), sync_dist=True)
        self.train_metrics.reset()
        self.train_loss_mean.reset()

    def _start_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The pretrained snapshot on ``device`` (moved once)."""
        start = self.__dict__.get("start_state") or {}
        if start and next(iter(start.values())).device != device:
            start = {k: v.to(device) for k, v in start.items()}
            self.__dict__["start_state"] = start
        return start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.__dict__.get("_compiled") or self.model)(channels_last_input(x, self.channels_last))

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        if "features" in batch:
            return classify_features(self.model, batch["features"])
        return self(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        if not self.strategy.sgd:
            return None
        if self.mixer is not None and "image" in batch:  # Mixup / CutMix: mixed images, soft targets
            images, soft = self.mixer(batch["image"], batch["label"])
            logits = self(images)
            loss = F.cross_entropy(logits, soft, weight=self.class_weight)
        else:
            logits = self._logits(batch)
            loss = self._loss(logits, batch["label"])
        if self.strategy.regularizer == "l2sp":
            penalty = l2sp_penalty(self.model, self._start_on(loss.device), self.strategy.alpha, self.strategy.beta)
            self.log("train_l2sp", penalty.detach(), on_step=True, on_epoch=True, batch_size=len(batch["label"]))
            loss = loss + penalty
        size = len(batch["label"])
        if self.multilabel:  # targets as the metrics take them (1 / 0, -1 left out); no single prediction to watch
            self.train_metrics.update(logits.detach(), batch["label"].long())
            out = {"loss": loss}
        else:
            self.train_metrics.update(logits.detach(), batch["label"])  # computed once per epoch
            out = {"loss": loss, "preds": logits.detach().argmax(1)}  # predictions for the divergence guard
        # the epoch mean is kept here and logged at the epoch's end, synchronised there: an epoch value
        # logged from a step with sync_dist is reduced when first read, and Lightning's progress bar
        # reads it on rank 0 alone (Lightning #21264: DDP deadlocks)
        self.train_loss_mean.update(loss.detach(), size)
        # a step on cached features takes ~0.1 ms, Lightning's self.log ~1 ms: there, log the step loss
        # only when the logger writes it
        if "features" not in batch or (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train_loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size, sync_dist=True)
        return out

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` divided by the calibration temperature: what the probabilities are computed from."""
        return logits / self.temperature.to(device=logits.device, dtype=logits.dtype)

    def set_temperature(self, temperature: Any) -> None:
        """Apply a calibration temperature (one number, or one per tag). A multi-label model's
        thresholds move with it, so every decision stays the same: a tag is decided when its logit
        passes the same cut, now stated as a calibrated probability."""
        new = torch.as_tensor(temperature, dtype=torch.float32).reshape(self.temperature.shape).to(self.temperature)
        if not bool((new > 0).all()):
            raise ValueError(f"a calibration temperature must be positive, got {new.tolist()}.")
        if self.multilabel:
            self.thresholds.copy_(rescale_thresholds(self.thresholds, self.temperature, new))
        self.temperature.copy_(new)

    @property
    def ood(self) -> OODDetector | None:
        """The out-of-distribution detector of the kept model (None before the fit ends, or without one)."""
        return self.__dict__.get("_ood")

    def set_ood(self, detector: OODDetector | None) -> None:
        """Use ``detector`` for the abstention of predictions (None: no abstention)."""
        self.__dict__["_ood"] = detector

    def _eval_step(self, batch: dict[str, Any], split: str, logits: torch.Tensor | None = None) -> None:
        logits = self._logits(batch) if logits is None else logits
        y = batch["label"]
        scaled = self.calibrated(logits)  # temperature 1 while training: the probabilities as trained
        if self.multilabel:
            probs = scaled.sigmoid()
            getattr(self, f"{split}_metrics").update(probs, y.long())
            getattr(self, f"{split}_probs").update(probs.float())
            getattr(self, f"{split}_targets").update(y.float())
            self.log(f"{split}_loss", self._loss(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y),
                     add_dataloader_idx=False, sync_dist=True)
            return
        probs = scaled.softmax(dim=1)
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(probs, y)
        getattr(self, f"{split}_recall").update(probs, y)
        getattr(self, f"{split}_specificity").update(probs, y)
        getattr(self, f"{split}_confmat").update(probs, y)
        self.log(f"{split}_loss", self._loss(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y),
                 add_dataloader_idx=False, sync_dist=True)

    def _tag_epoch_end(self, split: str) -> None:
        """Multi-label: threshold-free scores, thresholds tuned on validation (unless fixed), per-tag rates."""
        metrics = getattr(self, f"{split}_metrics")
        self.log_dict(metrics.compute(), prog_bar=True, sync_dist=True)
        metrics.reset()
        probs_metric, targets_metric = getattr(self, f"{split}_probs"), getattr(self, f"{split}_targets")
        if not probs_metric.update_count:  # nothing validated (a resumed, empty epoch)
            return
        probs, targets = probs_metric.compute().cpu(), targets_metric.compute().cpu()
        probs_metric.reset()
        targets_metric.reset()
        probs, targets = probs.reshape(-1, self.hparams["num_classes"]), targets.reshape(-1, self.hparams["num_classes"])
        if split == "val" and not self.hparams.get("thresholds") and not self.trainer.sanity_checking:
            tuned, _ = tune_thresholds(probs, targets)
            self.thresholds.copy_(tuned)
        report = tag_report(probs, targets, self.thresholds.cpu(), self.class_names)
        self.last_tags[split] = report
        f1s = [row["f1"] for row in report["rows"] if row["support"] > 0]
        self.log(f"{split}_f1", torch.tensor(sum(f1s) / len(f1s) if f1s else float("nan")), prog_bar=True)
        for j, row in enumerate(report["rows"]):
            self.log(f"{split}_threshold/{row['tag']}", self.thresholds[j].float())  # exact: what predictions apply
            for key in ("ap", "f1", "sensitivity", "specificity"):
                self.log(f"{split}_{key}/{row['tag']}", torch.tensor(float(row[key])))

    def _eval_epoch_end(self, split: str) -> None:
        if self.multilabel:
            self._tag_epoch_end(split)
            return
        metrics = getattr(self, f"{split}_metrics")
        self.log_dict(metrics.compute(), prog_bar=True, sync_dist=True)
        metrics.reset()
        # per class, as clinicians read them: sensitivity (= recall) and specificity, one-vs-rest
        for kind, attr in (("sensitivity", "recall"), ("specificity", "specificity")):
            metric = getattr(self, f"{split}_{attr}")
            for name, value in zip(self.class_names, metric.compute()):
                self.log(f"{split}_{kind}/{name}", value, sync_dist=True)
            metric.reset()
        confmat = getattr(self, f"{split}_confmat")
        self.last_confusion[split] = confmat.compute().cpu()
        confmat.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry the validation metrics and confusion matrix they were saved with,
        so the best checkpoint's numbers need no second validation pass (see :func:`visiontl.tasks.checkpoints.checkpoint_record`)."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith(("val_", "target_")) and isinstance(v, torch.Tensor) and v.numel() == 1}
        confusion = self.last_confusion.get("val")
        checkpoint["visiontl"] = {"val_metrics": metrics,
                                  "val_confusion": confusion.tolist() if confusion is not None else None,
                                  "base_weights": self.base_weights}
        if self.last_tags.get("val") is not None:  # multi-label: the per-tag table and PR curves of these weights
            checkpoint["visiontl"]["val_tags"] = self.last_tags["val"]
        if self.ood is not None:
            checkpoint["visiontl"]["ood"] = self.ood.record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and "temperature" not in state:  # saved before calibration was kept: none
            state["temperature"] = torch.ones_like(self.temperature)
        record = checkpoint.get("visiontl")
        recorded = record.get("base_weights") if isinstance(record, dict) else None
        if isinstance(recorded, dict) and {"sha256", "source"} <= set(recorded):
            self.base_weights = {"sha256": str(recorded["sha256"]), "source": str(recorded["source"])}
        ood = record.get("ood") if isinstance(record, dict) else None
        if ood is not None:  # saved by a run since abstention landed
            from visiontl.tasks.checkpoints import CheckpointError

            try:
                self.set_ood(OODDetector.from_record(ood, feature_width(self.model)))
            except ValueError as err:
                raise CheckpointError(f"checkpoint: {err}; damaged or edited (export and predict need it whole).") from err

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        detector = self.ood
        if detector is None:
            logits = self.calibrated(self._logits(batch))
            out = {"index": batch["index"]}
        else:  # the pooled features too: the detector reads them
            features = batch["features"] if "features" in batch else pooled_features(
                self.model, channels_last_input(batch["image"], self.channels_last))
            logits = self.calibrated(classify_features(self.model, features))
            scores = detector.to(features.device)(features, logits)
            out = {"index": batch["index"], "ood_score": scores, "abstain": detector.abstains(scores)}
        if self.multilabel:
            probs = logits.sigmoid()
            return {**out, "probs": probs, "label": decisions(probs, self.thresholds)}
        probs = logits.softmax(dim=1)
        return {**out, "probs": probs, "label": probs.argmax(dim=1)}

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], map_location: str = "cpu") -> ClassificationTask:
        """Load a trained task from a Lightning checkpoint without unpickling anything.

        The checkpoint is read by :func:`visiontl.tasks.checkpoints.read_checkpoint`
        (``torch.load(weights_only=True)``); the backbone is rebuilt from the saved
        hyper-parameters with no download and no weights file.

        Raises:
            CheckpointError: the file is missing, not a torch checkpoint, pickles objects, is not
                a visiontl task's checkpoint, or its tensors do not fit the model it describes
                (one line naming the file, and the field or tensor).
        """
        from visiontl.tasks.checkpoints import MODEL_PREFIX, CheckpointError

        ckpt, hp, strategy = _read_checkpoint(path, map_location)
        hp.update(pretrained=False, weights=None)
        task = _build_task(cls, path, hp, strategy)
        # the classifier network only: training-time modules (a domain discriminator...) stay behind
        state = {k: v for k, v in ckpt["state_dict"].items()
                 if k.startswith(MODEL_PREFIX) or k in ("class_weight", "thresholds", "temperature")}
        state.setdefault("temperature", torch.ones_like(task.temperature))  # saved before calibration was kept
        try:
            task.load_state_dict(state)
        except RuntimeError as err:  # keys or shapes that do not fit: one line naming the first
            raise CheckpointError(f"{path}: {_misfit(state, task.state_dict()) or one_line(err, 300)}; its state_dict "
                                  f"does not fit the model its hyper_parameters describe (damaged or edited).") from err
        try:
            task.on_load_checkpoint(ckpt)  # the base weights it was trained on, its abstention detector
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {str(err).removeprefix('checkpoint: ')}") from err
        return task.eval()

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], strategy: Strategy) -> ClassificationTask:
        """The task that recorded hyper-parameters describe, with ``strategy`` (rebuilt by the
        caller from registered strategies only); entries that are not ``__init__`` arguments of
        ``cls`` are left out."""
        names = _init_args(cls)
        return cls(strategy=strategy, **{k: v for k, v in hparams.items() if k in names})

    @classmethod
    def start_of(cls, path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None
                 ) -> ClassificationTask:
        """The task a checkpoint's run started from: the same configuration on the pretrained weights
        it recorded (its weights file, named source or timm's hub), or on ``weights``; the head is
        a fresh one. Loads weights (safetensors or ``weights_only``), never code.

        Raises:
            WeightsError: the recorded weights cannot be had here (give ``weights``).
        """
        from visiontl.models.weights import WeightsError

        _, hp, strategy = _read_checkpoint(path)
        if weights is not None:
            hp.update(pretrained=False, weights=str(weights))
        elif not hp.get("pretrained") and not hp.get("weights"):
            raise WeightsError(f"{path}: its run started from random weights; there is no pretrained model to go back "
                               f"to (give weights= to use some).")
        try:
            task = cls.from_hparams(hp, strategy)
        except (OSError, RuntimeError) as err:  # no hub access, a weights file gone
            raise WeightsError(f"{path}: the pretrained weights it started from ({hp.get('weights') or 'timm hub'}) "
                               f"cannot be loaded here ({err}); give the weights file.") from err
        return task.eval()


def _read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu"
                     ) -> tuple[dict[str, Any], dict[str, Any], Strategy]:
    """A visiontl checkpoint's contents, hyper-parameters and strategy (registered strategies only:
    a checkpoint never makes visiontl import anything), read by :mod:`visiontl.tasks.checkpoints`."""
    from visiontl.tasks.checkpoints import read_checkpoint, task_spec

    ckpt = read_checkpoint(path, map_location)
    hp, strategy = task_spec(ckpt["hyper_parameters"], str(path))
    return ckpt, hp, strategy


def _misfit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first tensor of ``state`` whose shape differs from ``expected`` (both shapes), or the names
    missing or left over; None when the names and shapes agree."""
    for name, value in state.items():
        if name in expected and tuple(value.shape) != tuple(expected[name].shape):
            return f"tensor {name} has shape {list(value.shape)} but the model has {list(expected[name].shape)}"
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    parts = ([f"it lacks {', '.join(missing[:5])}"] if missing else []) + (
        [f"it has tensors the model has no place for ({', '.join(unexpected[:5])})"] if unexpected else [])
    return " and ".join(parts) or None


def _build_task(cls: type, path: str | os.PathLike[str], hp: dict[str, Any], strategy: Strategy) -> Any:
    """``cls`` rebuilt from recorded hyper-parameters; a value it refuses is a
    :class:`~visiontl.tasks.checkpoints.CheckpointError` naming ``path``."""
    from visiontl.tasks.checkpoints import CheckpointError
    from visiontl.core.errors import UserError

    try:
        task = cls.from_hparams(hp, strategy)
        task.preprocessing  # noqa: B018 - the recorded preprocessing, checked now rather than at export
    except UserError as err:
        raise CheckpointError(f"{path}: {one_line(err)}") from err
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: its hyper_parameters do not rebuild a model ({type(err).__name__}: "
                              f"{one_line(err, 200)}); the checkpoint is damaged or was edited.") from err
    return task


def _init_args(cls: type) -> frozenset[str]:
    """The named ``__init__`` arguments of ``cls`` (what a checkpoint's hyper-parameters may pass
    back), without ``self`` and ``strategy`` (rebuilt separately, registered strategies only)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind in kinds) - {"self", "strategy"}

