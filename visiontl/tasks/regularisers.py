"""Training-time regularisers from timm: Mixup / CutMix on image batches, and an EMA of the weights.

- :class:`BatchMixer`: timm's ``Mixup`` (Zhang et al. 2018; Yun et al. 2019, CutMix) on a batch of
  images, with soft targets (label smoothing folded in). timm mixes pairs, so an odd batch keeps its
  last image unmixed (with its smoothed one-hot target). It draws from NumPy's global generator,
  which ``seed_everything`` seeds: a run is repeatable, though a resumed run draws other pairs.
- :class:`WeightEMA`: timm's ``ModelEmaV3``, an exponential moving average of the network's weights
  updated after every optimisation step. Validation scores the averaged weights, so the best
  checkpoint (what export, the after-fit analyses and ``fine_tune``'s result use) holds them; the
  training weights carry on underneath, and ``last.ckpt`` keeps both, so a resume continues exactly.

Both are options of :class:`~visiontl.tasks.ClassificationTask` (``mixup``, ``cutmix``, ``ema``), off
by default.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

__all__ = ["BatchMixer", "WeightEMA"]


class BatchMixer:
    """Mixup (``mixup`` alpha) and / or CutMix (``cutmix`` alpha) on image batches; with both, each
    batch picks one of the two at random (timm's ``switch_prob`` 0.5)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, label_smoothing: float = 0.0) -> None:
        from timm.data import Mixup

        for name, value in (("mixup", mixup), ("cutmix", cutmix)):
            if value < 0:
                raise ValueError(f"{name} is a Beta distribution's alpha (> 0 to mix, 0: off), got {value}.")
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)
        self._mix = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), label_smoothing=self.label_smoothing,
                          num_classes=self.num_classes)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Smoothed one-hot targets of unmixed images."""
        off = self.label_smoothing / self.num_classes
        return F.one_hot(labels, self.num_classes).float() * (1.0 - self.label_smoothing) + off

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and their soft targets (``n x num_classes``)."""
        n = len(labels) - len(labels) % 2
        if n < 2:
            return images, self.targets(labels)
        mixed, soft = self._mix(images[:n].clone(), labels[:n])
        if n == len(labels):
            return mixed, soft
        return torch.cat([mixed, images[n:]]), torch.cat([soft, self.targets(labels[n:]).to(soft)])


class WeightEMA(pl.Callback):
    """Keep an EMA of ``pl_module.model``'s weights; validate (and so checkpoint) the average.

    Args:
        decay: the average's decay per optimisation step (0.999: about the last 1,000 steps).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema is a decay per step in (0, 1) (0.999 is usual), got {decay}.")
        self.decay = float(decay)
        self._ema: Any = None
        self._held: dict[str, torch.Tensor] | None = None  # the training weights while the average is in the model
        self._restored: dict[str, Any] | None = None

    # -- state: last.ckpt carries the average and, when it is swapped in, the training weights ---------
    def state_dict(self) -> dict[str, Any]:
        if self._ema is None:
            return {}
        return {"ema": self._ema.module.state_dict(), "held": self._held}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from timm.utils import ModelEmaV3

        model = pl_module.model
        if self._restored and self._restored.get("held") is not None:
            model.load_state_dict(self._restored["held"])  # the checkpoint's model is the average: train on
        self._ema = ModelEmaV3(model, decay=self.decay)
        if self._restored and self._restored.get("ema") is not None:
            self._ema.module.load_state_dict(self._restored["ema"])
        self._held, self._restored = None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._swap_out(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._ema is not None:
            self._ema.update(pl_module.model, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ema is None or trainer.sanity_checking or self._held is not None:
            return
        model = pl_module.model
        self._held = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self._ema.module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        """Put the training weights back (the average stays in the model from a validation until the
        next step, so the checkpoints written after it hold the average)."""
        if self._held is not None:
            pl_module.model.load_state_dict(self._held)
            self._held = None
