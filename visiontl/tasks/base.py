"""Shared LightningModule machinery: backbone + strategy + optimizer + schedule + freezing.

Subclasses fill the torchgeo-style hooks ``configure_models``, ``configure_losses`` and
``configure_metrics``, which run after ``save_hyperparameters()``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from visiontl.models.backbones import LayerGroup, data_config, layer_groups
from visiontl.data.preprocessing import Preprocessing
from visiontl.data.protocols import Preprocessed
from visiontl.strategies import Strategy, StrategyError, get_strategy, no_weight_decay_names, set_trainable

__all__ = ["BaseTask", "warmup_cosine"]



def warmup_cosine(total_steps: int, warmup: float = 0.05, floor: float = 0.01):
    """LR multiplier: linear warm-up over ``warmup`` of the steps, cosine decay to ``floor``."""
    warm = max(1, round(total_steps * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class BaseTask(pl.LightningModule):
    """A backbone trained with a :class:`~visiontl.strategies.Strategy`.

    Subclasses set ``self.model`` in :meth:`configure_models`. After that the layer groups are
    computed, the strategy freezes what it must, and frozen normalisation layers are held in
    eval mode across every ``train()`` call, so their running statistics never move.
    """

    uses_feature_cache: bool = False
    """Whether training reads cached backbone features instead of images (classification tasks decide)."""

    strategy: Strategy

    def resolve_hparams(self) -> None:
        """Fill the hyper-parameters a subclass leaves as None by default (what they resolve to can
        depend on other arguments, e.g. the task), before the strategy and the model are built.
        Runs on the saved hyper-parameters: the same from Python and from the command line."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()  # the subclass's __init__ arguments
        self.resolve_hparams()
        strategy_spec = self.hparams.get("strategy", "probe")
        self.strategy = get_strategy(strategy_spec)
        self.hparams["strategy"] = self.strategy.to_config()  # plain data: safe checkpoints
        self.frozen_norms: set[str] = set()
        self.configure_models()
        self.model = self.strategy.prepare(self.model)  # LoRA / adapters / prompts, before the groups
        self.groups: list[LayerGroup] = layer_groups(self.model)
        self.set_trainable_groups(self.strategy.initial_trainable(self.groups))
        self.configure_losses()
        self.configure_metrics()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, with the checkpoint read as data.

        The file is read by :func:`visiontl.tasks.checkpoints.read_checkpoint` first (``weights_only``;
        a pickle or a damaged file is one line naming it). Its recorded strategy is rebuilt from the
        registered strategies only (Lightning would hand the recorded ``class_path`` to the task,
        which imports it), and the model is built without pretrained weights (the checkpoint
        brings its own; a recorded ``weights`` path is never read). Keyword arguments still
        override the recorded hyper-parameters, as in Lightning.
        """
        import inspect

        from visiontl.tasks.checkpoints import read_checkpoint, task_spec, weights_only_kwargs

        if isinstance(checkpoint_path, (str, os.PathLike)):
            hp = read_checkpoint(checkpoint_path, mmap=True)["hyper_parameters"]
            if "strategy" not in kwargs and "backbone" in hp:
                _, kwargs["strategy"] = task_spec(hp, str(checkpoint_path))
        params = inspect.signature(cls.__init__).parameters
        for name, value in (("pretrained", False), ("weights", None)):
            if name in params:
                kwargs.setdefault(name, value)
        load = super().load_from_checkpoint
        for name, value in weights_only_kwargs(load).items():  # the caller's own choice stands
            kwargs.setdefault(name, value)
        return load(checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, **kwargs)

    # -- hooks for subclasses -----------------------------------------------------------------
    def configure_models(self) -> None:
        """Create ``self.model``."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Create ``self.criterion``."""

    def configure_metrics(self) -> None:
        """Create metric collections."""

    def checkpoint_callbacks(self) -> list[pl.Callback]:
        """Callbacks that write the task's checkpoints (skipped when the Trainer has checkpointing
        off); none here. ``last.ckpt`` is the run's (:func:`visiontl.train.run.attach_run_callbacks`)."""
        return []

    def task_callbacks(self) -> list[pl.Callback]:
        """Further callbacks of the task and its strategy."""
        return list(self.strategy.callbacks())

    def run_summary(self) -> dict[str, Any]:
        """The task's own entries of ``metrics.json`` (none here)."""
        return {}

    def configure_callbacks(self) -> list[pl.Callback]:
        """What the task needs to train, in this order: its checkpoints (when the Trainer
        checkpoints), the set-up link with the datamodule (:class:`~visiontl.tasks.link.DataLink`),
        feature caching and head fitting (:class:`~visiontl.tasks.cached_features.CachedFeatures`)
        and the task's and strategy's callbacks. What the run leaves behind (run report, after-fit
        analyses, ``last.ckpt``, learning rates) is the run driver's:
        :func:`visiontl.train.run.attach_run_callbacks`."""
        from visiontl.tasks.cached_features import CachedFeatures
        from visiontl.tasks.link import DataLink

        callbacks: list[pl.Callback] = [DataLink(), CachedFeatures(), *self.task_callbacks()]
        trainer = self._trainer
        if trainer is None or trainer.checkpoint_callback is not None:
            callbacks[:0] = self.checkpoint_callbacks()
        return callbacks

    # -- freezing -------------------------------------------------------------------------------
    def set_trainable_groups(self, names: list[str]) -> None:
        """Train exactly the named layer groups; everything else (and its statistics) is frozen.

        The normalisation layers' modes follow at once (those of newly unfrozen groups train when
        the task is training), so they are a function of the trainable set alone: a run resumed in
        the middle of a gradual schedule is in exactly the state of an uninterrupted one."""
        self.frozen_norms = set_trainable(self.model, self.groups, names, self.strategy.train_bn,
                                          freeze_stats=self.strategy.bn_stats == "frozen", trains=self.strategy.trains)
        self.trainable_groups = list(names)
        if self.training:
            self.train(True)

    def train(self, mode: bool = True) -> BaseTask:
        super().train(mode)
        if mode:
            for name in self.frozen_norms:
                self.model.get_submodule(name).eval()
        return self

    # -- preprocessing (see visiontl.data.preprocessing for the direction of flow) ---------------
    def backbone_preprocessing(self) -> Preprocessing:
        """The backbone's own input convention (timm's pretrained config of the model as built:
        its input channels and size); the datamodule refines it (:class:`~visiontl.tasks.link.DataLink`)."""
        return Preprocessing.from_timm(data_config(self.model))

    @property
    def preprocessing(self) -> Preprocessing:
        """What the model sees: the resolved preprocessing recorded by :meth:`set_preprocessing`
        (and carried by the checkpoint), else the backbone's."""
        recorded = self.hparams.get("preprocessing")
        return Preprocessing.from_dict(recorded) if recorded else self.backbone_preprocessing()

    def set_preprocessing(self, pre: Preprocessing) -> None:
        """Record the resolved preprocessing (the datamodule's, given by
        :class:`~visiontl.tasks.link.DataLink` at set-up): export and predict read it back."""
        self.hparams["preprocessing"] = pre.to_dict()

    @property
    def data_config(self) -> dict[str, Any]:
        """:attr:`preprocessing` as a timm data config (``input_size`` (C, H, W), ``mean``...)."""
        return self.preprocessing.timm_config()

    def strategy_report(self) -> dict[str, Any]:
        """Strategy, trainable / total parameters and each group's learning rate."""
        report = self.strategy.describe(self.groups)
        report["trainable_now"] = (sum(p.numel() for p in self.model.parameters() if p.requires_grad)
                                   - getattr(self.strategy, "pinned", 0))  # LoRA's key rows, held at zero
        return report

    # -- optimisation ---------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: the strategy's, one per layer group (subclasses add their own
        modules, e.g. a domain discriminator, as further groups)."""
        return self.strategy.param_groups(self.groups, self.hparams.get("weight_decay", 0.0),
                                          no_weight_decay_names(self.model))

    def configure_optimizers(self) -> dict[str, Any] | None:
        groups = self.optimizer_groups()
        if not groups:  # heads fitted in closed form: no gradient descent at all
            return None
        optimizer = torch.optim.AdamW(groups)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(total) or total <= 0:
            return {"optimizer": optimizer}
        schedule = warmup_cosine(int(total), self.hparams.get("warmup", 0.05))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradient norm to ``grad_clip`` when the backbone trains, unless the Trainer sets its own."""
        if gradient_clip_val is None and self.hparams.get("grad_clip") and self._trains_backbone():
            gradient_clip_val, gradient_clip_algorithm = float(self.hparams["grad_clip"]), "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _trains_backbone(self) -> bool:
        return any(plan.lr > 0 for plan in self.strategy.plan(self.groups)[:-1])

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        norms = (torch.nn.modules.batchnorm._BatchNorm,)
        if (stage == "fit" and self.trainer.world_size > 1 and isinstance(dm, Preprocessed) and dm.batch_size == 1
                and self.strategy.bn_stats == "update" and any(isinstance(m, norms) for m in self.model.modules())):
            raise StrategyError(
                f"batch_size 1 per device across {self.trainer.world_size} processes: BatchNorm would normalise "
                f"each image by itself (batch_size is per device under DDP). Give batch_size >= 2 per device, or a "
                f"strategy with bn_stats='frozen' (gradual's default).")
        # before Lightning converts the BatchNorm layers and DDP refuses them with a bare ValueError
        sync = getattr(self.trainer.strategy, "_layer_sync", None) is not None  # Trainer(sync_batchnorm=True)
        if sync and self.trainer.strategy.root_device.type == "cpu":
            raise StrategyError(
                "sync_batchnorm=True on the CPU: PyTorch's SyncBatchNorm runs on GPUs only (not with gloo). Leave "
                "--trainer.sync_batchnorm off here (each process then normalises with its own batch), or train on "
                "GPUs.")

    def on_fit_start(self) -> None:
        report = self.strategy_report()
        lines = [f"[visiontl] strategy {self.strategy!r}: {report['trainable_now']:,} of "
                 f"{report['total_params']:,} parameters train now, {report['trainable_params']:,} during the run"]
        for g in report["groups"]:
            state = "frozen" if g["lr"] == 0 else ("trains" if g["trainable"] else "later")
            lines.append(f"    {g['name']:<10} {g['numel']:>12,}  {state:<6}  lr={g['lr']:.3g}")
        rank_zero_info("\n".join(lines))
        if self.logger is not None:
            self.logger.log_hyperparams({"trainable_params": report["trainable_params"],
                                         "total_params": report["total_params"]})

    def on_train_epoch_end(self) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log("trainable_params", float(trainable), on_epoch=True, sync_dist=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

