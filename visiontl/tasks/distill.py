"""Knowledge distillation: a small student trained to match a fine-tuned teacher (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network").

The loss (:func:`distillation_loss`) mixes the KL divergence between the temperature-softened
teacher and student distributions, scaled by ``T**2`` so its gradients keep their size whatever
``T``, with the cross-entropy on the labels::

    loss = alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

Multi-label runs (several tags per image, each a yes / no decision) distil each tag's Bernoulli
distribution instead: the teacher's tempered sigmoid outputs are the soft targets, the KL divergence
of two Bernoulli distributions per (image, tag) pair, averaged over pairs and scaled by ``T**2``,
and the labels' term is the binary cross-entropy on the labelled pairs (``-1``, uncertain or
unlabelled, left out)::

    loss = alpha * T**2 * mean KL(Bern(sigmoid(teacher / T)) || Bern(sigmoid(student / T))) + (1 - alpha) * BCE(student, y)

The KL term covers every image of the batch, the cross-entropy only the labelled ones: unlabelled
images (a datamodule's ``unlabelled`` folder) give the teacher more to say.

The teacher runs online, in eval mode and without gradients, on the same augmented crop as the
student ("consistent" teaching, Beyer et al., CVPR 2022, "Knowledge distillation: A good teacher is
patient and consistent"): precomputed teacher logits of un-augmented images overfit. Each model gets
its own preprocessing of that crop (:func:`teacher_view`): the student's batch is taken back to
``[0, 1]`` pixels, resized to the teacher's input size and normalised with the teacher's mean / std.
The teacher thus sees the crop at the student's resolution, resampled: when that costs it accuracy
(``val_teacher_acc`` against its own run's), train the student at a larger ``image_size``.

timm (>= 1.0.23) has a ``LogitDistillationTask`` with the same KL term (the tests check that the two
agree by value). It is not used here because it is a whole training loop's module, not a loss: its
forward needs a label for every image (no unlabelled images), feeds the teacher the student's input
size, and takes both models' normalisation from timm's pretrained configs rather than the recorded
preprocessing of each run (dataset statistics of 16-bit or multiband images).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from visiontl.data.images import DataError
from visiontl.data.preprocessing import Preprocessing
from visiontl.core.losses import IGNORE, multilabel_loss
from visiontl.core.speed import channels_last_input
from visiontl.strategies import StrategyError
from visiontl.tasks.classification import ClassificationTask

__all__ = ["DistillationTask", "distillation_loss", "teacher_view"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = 4.0, alpha: float = 0.5, class_weight: torch.Tensor | None = None,
                      label_smoothing: float = 0.0, multilabel: bool = False) -> dict[str, torch.Tensor]:
    """Hinton et al.'s distillation loss.

    Args:
        student: student logits ``(N, K)``.
        teacher: teacher logits ``(N, K)`` (no gradient flows into them).
        labels: class indices ``(N,)``, ``-1`` for unlabelled images (KL term only); ``None``: all
            unlabelled.
        temperature: softmax temperature ``T`` of both distributions (the KL term is scaled by ``T**2``).
        alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy.
        class_weight: per-class weights of the cross-entropy.
        label_smoothing: label smoothing of the cross-entropy.
        multilabel: several tags per image: ``labels`` are ``(N, K)`` targets (1 / 0, ``-1`` left
            out), the KL term is per (image, tag) Bernoulli pair with the teacher's tempered
            sigmoid as the target, the labels' term binary cross-entropy (``class_weight`` is its
            ``pos_weight``).

    Returns:
        ``loss``, ``kd`` (the ``T**2``-scaled KL, mean over all images) and ``ce`` (mean over the
        labelled images; 0 when there are none).
    """
    _check_mix(temperature, alpha)
    t = float(temperature)
    if multilabel:
        return _multilabel_distillation(student, teacher, labels, t, alpha, class_weight, label_smoothing)
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.detach().float() / t, dim=1)
    kd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * t * t
    labelled = labels >= 0 if labels is not None else torch.zeros(len(student), dtype=torch.bool,
                                                                   device=student.device)
    if labelled.any():
        ce = F.cross_entropy(student[labelled].float(), labels[labelled], weight=class_weight,
                             label_smoothing=label_smoothing)
    else:
        ce = student.new_zeros((), dtype=torch.float32)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


def _multilabel_distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, t: float,
                             alpha: float, pos_weight: torch.Tensor | None, smoothing: float) -> dict[str, torch.Tensor]:
    s, q = student.float() / t, teacher.detach().float() / t
    p = q.sigmoid()
    # KL(Bern(p) || Bern(sigmoid(s))) = BCE(s, p) - H(p); H(p) = BCE(q, p): 0 when the two agree
    kd = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
          - F.binary_cross_entropy_with_logits(q, p, reduction="none")).mean() * t * t
    if labels is not None and bool((labels >= 0).any()):
        ce = multilabel_loss(student.float(), labels, pos_weight=pos_weight, smoothing=smoothing)
    else:
        ce = student.new_zeros((), dtype=torch.float32)
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


def _check_mix(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the distillation term) must be in [0, 1], got {alpha}.")


def teacher_view(x: torch.Tensor, student: Preprocessing, teacher: Preprocessing) -> torch.Tensor:
    """The teacher's input for the student's normalised batch ``x``: the same crop, back in
    ``[0, 1]`` pixels, resized to the teacher's size (its interpolation, antialiased) and normalised
    with the teacher's mean / std."""
    if student.in_chans != teacher.in_chans:
        raise ValueError(f"The student takes {student.in_chans} channel(s) and the teacher {teacher.in_chans}.")
    if (student.size, student.mean, student.std) == (teacher.size, teacher.mean, teacher.std):
        return x

    def stats(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    pixels = x * stats(student.std) + stats(student.mean)
    if teacher.size != student.size:
        mode = "bicubic" if teacher.interpolation == "bicubic" else "bilinear"
        pixels = F.interpolate(pixels, size=(teacher.size, teacher.size), mode=mode, align_corners=False,
                               antialias=teacher.size < student.size)
    return (pixels - stats(teacher.mean)) / stats(teacher.std)


class DistillationTask(ClassificationTask):
    """A student :class:`~visiontl.tasks.ClassificationTask` trained to match a teacher run.

    The student is an ordinary classification run: its checkpoint loads with
    ``ClassificationTask.from_checkpoint``, exports and predicts like any other (the teacher is not
    part of it). The teacher is loaded from its run directory or checkpoint (weights only, never
    code), frozen and kept in eval mode; nothing of it enters the student's state dict.

    Args:
        teacher: the teacher's run directory, ``.ckpt`` or PEFT checkpoint.
        temperature: softmax temperature ``T`` (:func:`distillation_loss`).
        alpha: weight of the distillation term; ``1 - alpha`` weighs the cross-entropy on labels.
        teacher_weights: base weights of a PEFT teacher, when not where it was trained.
        *args: see :class:`~visiontl.tasks.ClassificationTask` (the student).
        **kwargs: see :class:`~visiontl.tasks.ClassificationTask`; the student's ``class_names``
            must be the teacher's.
    """

    def __init__(self, *args: Any, teacher: str = "", temperature: float = 4.0, alpha: float = 0.5,
                 teacher_weights: str | None = None, **kwargs: Any) -> None:
        if not teacher:
            raise ValueError("DistillationTask needs teacher: the teacher's run directory or checkpoint.")
        _check_mix(temperature, alpha)
        # not a submodule (plain __dict__ entry): outside the state dict, the optimizer and train()
        self.__dict__["_teacher_task"] = load_teacher(teacher, teacher_weights)
        theirs, ours = self._teacher_task.hparams.get("task", "multiclass"), kwargs.get("task", "multiclass")
        if theirs != ours:
            raise DataError(f"The teacher {teacher} is a {theirs} run and the student's data is read as {ours}: distil "
                            f"on the teacher's data (its splits.csv, the default of visiontl distill), or give data "
                            f"read as {theirs} (a CSV with task: {theirs}).")
        names = kwargs.get("class_names")
        if names is not None and list(names) != self._teacher_task.class_names:
            raise DataError(f"The teacher {teacher} predicts the classes {self._teacher_task.class_names} but the "
                            f"student's data has {list(names)}: distil on the teacher's data (its splits.csv, the "
                            f"default of visiontl distill), or on data with exactly those class folders.")
        chans = self._teacher_task.preprocessing.in_chans
        kwargs.setdefault("in_chans", chans)  # the student reads what the teacher reads
        try:
            super().__init__(*args, **kwargs)
        except (RuntimeError, AssertionError, TypeError) as err:  # what timm raises for a stem it cannot adapt
            if kwargs["in_chans"] == 3:
                raise
            raise StrategyError(f"The student backbone {kwargs.get('backbone', args[0] if args else '?')} cannot take "
                                f"the teacher's {kwargs['in_chans']} input channels ({type(err).__name__}: {err}); "
                                f"choose a timm backbone that accepts in_chans={kwargs['in_chans']} (ResNets, "
                                f"EfficientNets, MobileNets, ConvNeXts, most ViTs).") from err
        if not self.strategy.sgd:
            raise StrategyError(f"Strategy {self.strategy.name!r} fits a head in closed form; distillation trains by "
                                f"gradient: use probe, partial, full, gradual or lora.")
        if self.hparams["in_chans"] != self._teacher_task.preprocessing.in_chans:
            raise ValueError(f"The teacher takes {self._teacher_task.preprocessing.in_chans} channel(s); build the "
                             f"student with in_chans={self._teacher_task.preprocessing.in_chans} (got "
                             f"{self.hparams['in_chans']}).")

    def configure_metrics(self) -> None:
        super().configure_metrics()
        k = self.hparams["num_classes"]
        if self.multilabel:  # the teacher's macro mAP, and the share of (image, tag) decisions both take alike
            self.val_teacher_map = MultilabelAveragePrecision(k, average="macro", ignore_index=IGNORE)
            self.val_teacher_agreement = MeanMetric()
        else:
            self.val_teacher_acc = MulticlassAccuracy(k, average="micro")
            self.val_teacher_agreement = MulticlassAccuracy(k, average="micro")
        self._teacher_val_cache: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}

    @property
    def teacher(self) -> torch.nn.Module:
        """The teacher's network (frozen, eval mode, not a submodule: outside the state dict)."""
        return self._teacher_task.model

    @property
    def teacher_preprocessing(self) -> Preprocessing:
        """The teacher's recorded input convention."""
        return self._teacher_task.preprocessing

    @property
    def uses_feature_cache(self) -> bool:
        return False  # the teacher needs every augmented image

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        task = self._teacher_task
        if task.device != x.device:
            task.to(x.device)
        task.eval()
        view = teacher_view(x, self.preprocessing, task.preprocessing)
        with torch.no_grad():
            return task.model(channels_last_input(view, task.channels_last))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        if "source" in batch:  # paired with unlabelled images: labels -1 there
            source, target = batch["source"], batch["target"]
            images = torch.cat([source["image"], target["image"]])
            shape = (len(target["image"]), *source["label"].shape[1:])  # (N,) or (N, tags)
            unknown = torch.full(shape, IGNORE, dtype=source["label"].dtype, device=source["label"].device)
            labels = torch.cat([source["label"], unknown])
        else:
            images, labels = batch["image"], batch["label"]
        logits = self(images)
        # alpha 0 is training on labels alone (the baseline): the teacher's logits would weigh nothing
        teacher = self._teacher_logits(images) if self.hparams["alpha"] > 0 else logits.detach()
        parts = distillation_loss(logits, teacher, labels, self.hparams["temperature"],
                                  self.hparams["alpha"], self.class_weight, self.hparams["label_smoothing"],
                                  multilabel=self.multilabel)
        labelled = (labels >= 0).any(1) if self.multilabel else labels >= 0
        n = int(labelled.sum())
        self.train_metrics.update(logits.detach()[labelled], labels[labelled].long() if self.multilabel else labels[labelled])
        # epoch means per rank: a synchronised one deadlocks Lightning's progress bar under DDP (#21264)
        self.log("train_loss", parts["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train_kd", parts["kd"], on_step=False, on_epoch=True, batch_size=len(labels))
        self.log("train_ce", parts["ce"], on_step=False, on_epoch=True, batch_size=n)
        if self.multilabel:  # no single prediction per image for the divergence guard to watch
            return {"loss": parts["loss"]}
        return {"loss": parts["loss"], "preds": logits.detach()[labelled].argmax(1)}

    def _teacher_val_logits(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The teacher's logits on a validation batch: the frozen teacher on the same deterministic
        batch gives the same logits every epoch, so they are computed once (the batch is recognised
        by its shape and sum) and reused: a large teacher would otherwise cost more than training."""
        key = (tuple(x.shape), float(x.double().sum()))
        cached = self._teacher_val_cache.get(batch_idx)
        if cached is None or cached[0] != key:
            cached = (key, self._teacher_logits(x))
            self._teacher_val_cache[batch_idx] = cached
        return cached[1]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self._logits(batch)
        self._eval_step(batch, "val", logits=logits)
        teacher = self._teacher_val_logits(batch["image"], batch_idx)
        if self.multilabel:
            self.val_teacher_map.update(teacher.sigmoid(), batch["label"].long())
            # each model's decisions as it takes them: its thresholds are stated on its calibrated probabilities
            ours = self.calibrated(logits).sigmoid() >= self.thresholds.to(logits.device)
            theirs = self._teacher_task.calibrated(teacher).sigmoid() >= self._teacher_task.thresholds.to(teacher.device)
            self.val_teacher_agreement.update((ours == theirs).float().mean(), len(logits))
            return
        self.val_teacher_acc.update(teacher, batch["label"])
        self.val_teacher_agreement.update(logits, teacher.argmax(1))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for name in ("val_teacher_map" if self.multilabel else "val_teacher_acc", "val_teacher_agreement"):
            self.log(name, getattr(self, name).compute(), sync_dist=True)
            getattr(self, name).reset()

    def run_summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records of the distillation (:class:`~visiontl.train.run.RunReport`)."""
        hp = self.hparams
        return {"distillation": {"teacher": str(hp["teacher"]), "temperature": float(hp["temperature"]),
                                 "alpha": float(hp["alpha"]), "teacher_backbone": self._teacher_task.hparams["backbone"],
                                 "teacher_preprocessing": self.teacher_preprocessing.to_dict(),
                                 "teacher_task": self._teacher_task.hparams.get("task", "multiclass"),
                                 f"teacher_{self._teacher_task.recorded_metric}_own_run":
                                     self._teacher_task.recorded_score}}


def load_teacher(source: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None) -> ClassificationTask:
    """A teacher run (directory, ``.ckpt`` or PEFT checkpoint), loaded weights-only, frozen, in eval mode.
    ``recorded_score`` is the validation score its checkpoint was saved with (or None):
    ``recorded_metric`` names it (``val_acc``, or ``val_map`` for a multi-label teacher)."""
    from visiontl.tasks.trained import load_task, run_checkpoint
    from visiontl.tasks.checkpoints import checkpoint_record

    task = load_task(source, weights=weights)
    task.requires_grad_(False)
    path = run_checkpoint(source)
    record = checkpoint_record(path) if path.suffix == ".ckpt" else None
    task.recorded_metric = "val_map" if task.hparams.get("task") == "multilabel" else "val_acc"
    task.recorded_score = (record or {}).get("val_metrics", {}).get(task.recorded_metric)
    return task.eval()

