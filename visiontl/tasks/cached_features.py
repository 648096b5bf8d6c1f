"""Feature caching and head fitting for a run: the task only sees batches, never where they came from.

:class:`CachedFeatures` (added by every task, :meth:`visiontl.tasks.BaseTask.configure_callbacks`)
serves a frozen backbone's cached features (:mod:`visiontl.models.features`) in place of images and
fits a strategy's head on them before the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from visiontl.data.datamodules import FeatureDataset
from visiontl.data.protocols import LabelledSplits, ServesFeatures
from visiontl.models.features import split_features, supports_features
from visiontl.strategies.linear_probe import probe_score

__all__ = ["CachedFeatures"]


def _rank_zero_first(trainer: pl.Trainer, read: Callable[[bool], Any]) -> Any:
    """``read(compute)`` on every rank, rank 0 first: under DDP rank 0 extracts (or loads) the cache
    entry while the others wait, then they read it (``compute=False``), so it is written once."""
    if trainer.world_size <= 1:
        return read(True)
    if trainer.is_global_zero:
        result = read(True)
        trainer.strategy.barrier("visiontl-features")
        return result
    trainer.strategy.barrier("visiontl-features")
    return read(False)


class CachedFeatures(pl.Callback):
    """Feature caching and head fitting, a data concern: the task only sees batches of
    ``features`` or ``image`` and never where they came from.

    - ``setup``: when the task trains on cached features (``uses_feature_cache``: a strategy with
      ``cache_features`` and a timm backbone with one classifier), the images of every labelled
      split are replaced, in the datamodule (``set_features``), by the frozen backbone's pooled
      features from the on-disk cache (computed once).
    - ``on_fit_start``: when the strategy :attr:`~visiontl.strategies.Strategy.fits_head`, its
      :meth:`~visiontl.strategies.Strategy.fit_head` fits the classifier on the training features
      before the first step (not on a resume: the checkpoint holds the trained head); with a
      validation split, an SGD strategy's fitted head is scored alone (``head_fit.val_acc``: what
      fine-tuning then adds, LP-FT).
    """

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        dm = trainer.datamodule
        if not pl_module.uses_feature_cache or not isinstance(dm, ServesFeatures):
            return
        views = int(pl_module.strategy.views)
        pl_module.to(trainer.strategy.root_device)  # extract on the run's device (Lightning moves it there next)
        for split in ("train", "val", "test"):
            if split in dm.datasets:
                dm.set_features(split, *_rank_zero_first(trainer, lambda compute, split=split: split_features(
                    pl_module.model, pl_module.hparams["backbone"], dm, split, views, compute=compute)))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        strategy = pl_module.strategy
        if not strategy.fits_head or trainer.ckpt_path:
            return
        dm = trainer.datamodule
        model, backbone = pl_module.model, pl_module.hparams["backbone"]
        train = dm.datasets.get("train") if isinstance(dm, ServesFeatures) else None
        if isinstance(train, FeatureDataset):
            features, labels = train.features, train.labels
        elif isinstance(dm, ServesFeatures) and supports_features(model):
            features, labels = _rank_zero_first(trainer, lambda compute: split_features(model, backbone, dm, "train",
                                                                                        compute=compute))
        else:
            strategy.head_fit_unavailable(f"{backbone} (or this datamodule) gives no pooled features to fit a head on",
                                          distributed=trainer.world_size > 1)
            return
        head = model.get_classifier()
        weight = pl_module.class_weight if pl_module.hparams.get("class_weights") else None
        strategy.fit_head(head, torch.from_numpy(np.array(features, dtype=np.float32)),  # a writable copy
                          torch.from_numpy(np.array(labels, dtype=np.int64 if np.ndim(labels) == 1 else np.float32)),
                          int(pl_module.hparams["num_classes"]),
                          class_weight=weight)
        if trainer.world_size > 1:  # DDP synchronised the weights before this hook: every rank takes rank 0's head
            state = trainer.strategy.broadcast({k: v.detach().cpu() for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(state)
        message = f"[visiontl] {strategy.name} head fitted on {len(labels)} training features"
        if strategy.sgd and isinstance(dm, LabelledSplits) and "val" in dm.splits:
            val_features, val_labels = _rank_zero_first(trainer, lambda compute: split_features(
                model, backbone, dm, "val", compute=compute))
            metric, value = probe_score(head, val_features, val_labels)
            strategy.fit_report[metric] = round(value, 4)
            message += f" ({metric} {value:.3f}); fine-tuning starts from it"
        rank_zero_info(message)
