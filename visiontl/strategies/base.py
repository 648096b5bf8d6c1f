"""The strategy contract: which layer groups train, at which learning rate, and BatchNorm policy.

A strategy never names an architecture's layers: it sees the ordered :class:`LayerGroup` list
(stem -> head) from :func:`visiontl.models.backbones.layer_groups` and decides, per group, a learning
rate (0 = never trains in this run) and whether the group trains from the first step.

What a strategy needs from the rest is declared, never asked for with ``isinstance``:

- class attributes: ``sgd`` (anything trains by gradient descent), ``cache_features`` (training
  reads cached backbone features), ``views`` (augmented views per image in that cache);
- hooks the task and its callbacks call: :meth:`Strategy.fit_head` (fit the classifier on the
  frozen backbone's training features before any gradient step, when :attr:`Strategy.fits_head`),
  :meth:`Strategy.prepare` (change the freshly built model: inject LoRA or adapters, add prompts)
  and :meth:`Strategy.merge` (fold such changes back into a plain model for export).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
from pytorch_lightning import Callback
from torch import nn

from visiontl.core.errors import UserError
from visiontl.models.backbones import LayerGroup

__all__ = ["Discriminative", "GroupPlan", "Strategy", "StrategyError", "decays", "discriminative_lrs",
           "check_head_init", "init_head", "no_weight_decay_names", "set_trainable"]

HEAD_INITS = ("zero", "model")


class StrategyError(UserError):
    """A strategy that cannot be applied as configured."""


def check_head_init(how: str, strategy: str) -> str:
    """``how`` if it names a head initialisation, else a :class:`StrategyError` naming the choices."""
    if how not in HEAD_INITS:
        raise StrategyError(f"{strategy}: head_init must be one of {', '.join(HEAD_INITS)}, got {how!r}.")
    return how


def init_head(model: nn.Module, how: str, strategy: str) -> nn.Module:
    """Start the backbone's new classifier as ``how`` says.

    ``"zero"``: a linear classifier gets zero weights and bias, so the first steps learn a head
    instead of undoing a random one (and, in fine-tuning, no random head's gradient reaches the
    pretrained layers before the head has learned something); a head of several layers keeps its
    own initialisation, since zeroing every layer would stop all gradients. ``"model"``: the
    backbone's own initialisation. A checkpoint's weights replace either later.
    """
    check_head_init(how, strategy)
    head = getattr(model, "get_classifier", lambda: None)()
    if how == "zero" and isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    return model


@dataclass
class GroupPlan:
    """What happens to one layer group.

    Attributes:
        name: the group's name.
        numel: number of scalar parameters in it.
        lr: its peak learning rate; 0 means the group stays frozen for the whole run.
        trainable: whether it trains from the first step (gradual unfreezing starts some later).
    """

    name: str
    numel: int
    lr: float
    trainable: bool


def discriminative_lrs(
    n: int, lr: float, decay: float = 1.0, lr_range: tuple[float, float] | None = None
) -> list[float]:
    """Learning rates for ``n`` groups ordered stem -> head.

    ``lr * decay ** distance_from_head`` (the head, last, gets ``lr``), or with
    ``lr_range=(lr_min, lr_max)`` a geometric progression from ``lr_min`` (first group) to
    ``lr_max`` (last group), like fastai's ``slice(lr_min, lr_max)``.
    """
    if n <= 0:
        return []
    if lr_range is not None:
        lo, hi = (float(v) for v in lr_range)
        if not 0 < lo <= hi:
            raise StrategyError(f"lr_range must be (lr_min, lr_max) with 0 < lr_min <= lr_max, got {lr_range}.")
        if n == 1:
            return [hi]
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
    if lr <= 0:
        raise StrategyError(f"lr must be > 0, got {lr}.")
    if not 0 < decay <= 1:
        raise StrategyError(f"decay must be in (0, 1], got {decay}.")
    return [lr * decay ** (n - 1 - i) for i in range(n)]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The model's own no-weight-decay names or patterns (timm's ``no_weight_decay()``: position
    embeddings, class tokens, relative-position tables)."""
    method = getattr(model, "no_weight_decay", None)
    return set(method()) if callable(method) else set()


def decays(name: str, param: nn.Parameter, no_weight_decay: Collection[str] = ()) -> bool:
    """Whether weight decay applies to a parameter, by timm's rule: not to 1-D parameters (norm
    scales, biases) nor to names matching the model's ``no_weight_decay()`` set."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(name == pattern or fnmatchcase(name, pattern) for pattern in no_weight_decay)


class Strategy:
    """Base class. Subclasses implement :meth:`plan`; the rest is shared.

    Args:
        lr: peak learning rate of the head (``None``: the strategy's ``default_lr``).
        train_bn: let BatchNorm layers inside frozen groups train (affine parameters and running
            statistics, fastai's behaviour). Off by default: frozen means frozen, statistics too.
    """

    name: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3
    uses_pretrained: ClassVar[bool] = True
    sgd: ClassVar[bool] = True
    """Whether anything trains by gradient descent (False for heads fitted in closed form)."""
    cache_features: bool = False
    """Whether training reads cached backbone features instead of images (a frozen backbone)."""
    views: int = 1
    """Augmented views per training image in the feature cache."""
    peft: ClassVar[bool] = False
    """Whether it trains a small part of a frozen pretrained model (bitfit, lora, adapter, vpt):
    runs then also write a PEFT checkpoint of the trained tensors alone (:mod:`visiontl.tasks.delta`)."""
    regularizer: str | None = None
    """A loss term the task adds (``l2sp``; :class:`Discriminative` strategies), or ``None``."""
    bn_stats: str = "update"
    """``update``: normalisation layers of training groups update their running statistics from
    each batch (PyTorch's default); ``frozen``: they stay in inference mode (statistics frozen, affine
    parameters still train), as Keras advises for fine-tuning."""

    def __init__(self, lr: float | None = None, train_bn: bool = False) -> None:
        self.lr = float(lr) if lr is not None else self.default_lr
        if self.lr <= 0:
            raise StrategyError(f"{type(self).__name__}: lr must be > 0, got {lr}.")
        self.train_bn = train_bn
        self.fit_report: dict[str, Any] = {}
        """What :meth:`fit_head` found (penalty, cross-validation scores, the fitted head's
        validation accuracy): ``head_fit`` in the strategy report."""

    # -- what subclasses decide -------------------------------------------------------------
    def plan(self, groups: list[LayerGroup]) -> list[GroupPlan]:
        """Learning rate and initial trainability of every group."""
        raise NotImplementedError

    def callbacks(self) -> list[Callback]:
        """Lightning callbacks the strategy needs (gradual unfreezing)."""
        return []

    @property
    def fits_head(self) -> bool:
        """Whether :meth:`fit_head` runs before the first gradient step (the fitted heads, and
        ``gradual``'s LP-FT)."""
        return False

    def fit_head(self, head: nn.Module, features: Any, labels: Any, num_classes: int,
                 class_weight: Any = None) -> None:
        """Fit ``head`` (the model's classifier) on the frozen backbone's training ``features``
        (N x D tensor) and ``labels``; what it found goes to :attr:`fit_report`."""
        raise StrategyError(f"Strategy {self.name!r} fits no head.")

    def head_fit_unavailable(self, reason: str, distributed: bool = False) -> None:
        """Called instead of :meth:`fit_head` when no pooled features can be had (``reason``
        says why; ``distributed``: under DDP): an error unless the strategy has a fallback."""
        raise StrategyError(reason)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Change the freshly built backbone before its layer groups are taken (inject LoRA or
        adapters, add prompt tokens); the default leaves it as it is."""
        return model

    def trains(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        """Whether a parameter of a group the plan trains really trains (every one by default;
        ``bitfit`` keeps to biases and normalisation affine parameters below the head)."""
        return True

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain model computing the same function as a :meth:`prepare`-d one (LoRA folded into
        the weights), for export; called on a copy. The default returns it unchanged."""
        return model

    def make_head(self, in_features: int, num_classes: int) -> nn.Module | None:
        """A replacement classifier, or ``None`` to keep the model's linear one."""
        return None

    # -- shared machinery ---------------------------------------------------------------------
    def param_groups(self, groups: list[LayerGroup], weight_decay: float = 0.0,
                     no_weight_decay: Collection[str] = ()) -> list[dict[str, Any]]:
        """Optimizer parameter groups for every layer group that ever trains, named after it.

        Each layer group gives up to two, at its learning rate: ``<name>`` with ``weight_decay``
        and ``<name>/no_decay`` with none, for 1-D parameters (norms, biases) and names matching
        ``no_weight_decay`` (the model's :func:`no_weight_decay_names`), as timm builds them.
        Groups that start frozen but unfreeze later (gradual) are included from the start with
        their final learning rate; their parameters have no gradient until unfrozen, so the
        optimizer skips them, and the optimizer and scheduler never change shape mid-run. Returns
        ``[]`` for strategies that train nothing by gradient descent (``sgd = False``).
        """
        if not self.sgd:
            return []
        if getattr(self, "regularizer", None) == "l2sp":
            weight_decay = 0.0  # L2-SP's loss term replaces decay towards zero
        out = []
        for group, plan in zip(groups, self.plan(groups)):
            named = [(n, p) for n, p in zip(group.param_names, group.params)
                     if plan.lr == 0 or self._selected(group, n, p)]
            lr = plan.lr
            if lr == 0 and self.train_bn and group.norm_modules:
                named = [(n, p) for n, p in named if _is_norm_param(n, group)]
                lr = self.lr
            if lr <= 0 or not named:
                continue
            decay = [p for n, p in named if weight_decay and decays(n, p, no_weight_decay)]
            ids = {id(p) for p in decay}
            rest = [p for _, p in named if id(p) not in ids]
            if decay:
                out.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": group.name})
            if rest:
                out.append({"params": rest, "lr": lr, "weight_decay": 0.0,
                            "name": f"{group.name}/no_decay" if decay else group.name})
        if not out:
            raise StrategyError(f"{self.name}: no parameter would train.")
        return out

    def _selected(self, group: LayerGroup, name: str, param: nn.Parameter) -> bool:
        """Whether a parameter of a training group trains: :meth:`trains` says so, or it belongs to
        a normalisation layer and ``train_bn`` is on."""
        return self.trains(group, name, param) or (self.train_bn and _is_norm_param(name, group))

    def initial_trainable(self, groups: list[LayerGroup]) -> list[str]:
        """Names of the groups that train from the first step."""
        return [p.name for p in self.plan(groups) if p.trainable and p.lr > 0]

    def describe(self, groups: list[LayerGroup]) -> dict[str, Any]:
        """A JSON-able summary: strategy config, trainable/total parameters, each group's LR."""
        plans = self.plan(groups)
        total = sum(g.numel for g in groups)
        trainable = sum(p.numel() for g, plan in zip(groups, plans) if plan.lr > 0  # at any point of the run
                        for n, p in zip(g.param_names, g.params) if self._selected(g, n, p))
        report = {
            "strategy": self.to_config(),
            "trainable_params": trainable,
            "total_params": total,
            "groups": [asdict(p) for p in plans],
        }
        if self.fit_report:
            report["head_fit"] = self.fit_report
        return report

    def to_config(self) -> dict[str, Any]:
        """Plain data in recipe form (``class_path`` / ``init_args``), accepted by ``get_strategy``."""
        sig = inspect.signature(type(self).__init__)
        args = {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
        }

    def __repr__(self) -> str:
        args = self.to_config()["init_args"]
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


class Discriminative(Strategy):
    """Base for strategies with layer-wise learning rates (``decay`` or an ``lr_range``).

    Args:
        lr: learning rate of the head.
        decay: per-group decay going down from the head: ``lr * decay ** distance_from_head``
            (1 = one learning rate for every group).
        lr_range: fastai-style ``(lr_min, lr_max)``: geometric from the lowest trainable group to
            the head, instead of ``decay``.
        train_bn: let BatchNorm layers of frozen groups train.
        bn_stats: ``update`` (running statistics follow the training batches) or ``frozen``
            (normalisation layers stay in inference mode; their affine parameters still train);
            ``None``: ``update`` with ``train_bn``, else ``frozen``.
        regularizer: ``None`` or ``"l2sp"``: a loss term ``alpha / 2 * ||w - w0||^2`` over the
            pretrained backbone weights ``w0`` plus ``beta / 2 * ||w_head||^2`` over the new head
            (L2-SP, Li et al., ICML 2018), logged as ``train_l2sp``. It replaces AdamW's weight
            decay (which pulls towards zero, away from the pretrained start), as in the paper;
            the learning rates stay discriminative.
        alpha: L2-SP's weight on the distance from the pretrained backbone.
        beta: L2-SP's weight on the new head's norm.
    """

    def __init__(
        self,
        lr: float | None = None,
        decay: float = 0.7,
        lr_range: tuple[float, float] | None = None,
        train_bn: bool = False,
        bn_stats: str | None = "update",
        regularizer: str | None = None,
        alpha: float = 0.1,
        beta: float = 0.01,
    ) -> None:
        super().__init__(lr=lr, train_bn=train_bn)
        if regularizer not in (None, "l2sp"):
            raise StrategyError(f"{type(self).__name__}: regularizer must be 'l2sp' or None, got {regularizer!r}.")
        if alpha < 0 or beta < 0:
            raise StrategyError(f"{type(self).__name__}: alpha and beta must be >= 0, got {alpha} and {beta}.")
        self.regularizer, self.alpha, self.beta = regularizer, float(alpha), float(beta)
        if bn_stats is None:
            bn_stats = "update" if train_bn else "frozen"
        if bn_stats not in ("update", "frozen"):
            raise StrategyError(f"{type(self).__name__}: bn_stats must be 'update' or 'frozen', got {bn_stats!r}.")
        self.bn_stats = bn_stats
        self.decay = decay
        self.lr_range = tuple(lr_range) if lr_range is not None else None
        discriminative_lrs(2, self.lr, decay, self.lr_range)  # validate early

    def lrs(self, n: int) -> list[float]:
        """Learning rates of ``n`` trainable groups, lowest first, head last."""
        return discriminative_lrs(n, self.lr, self.decay, self.lr_range)


def _is_norm_param(param_name: str, group: LayerGroup) -> bool:
    return any(param_name.startswith(m + ".") for m in group.norm_modules)


def set_trainable(model: nn.Module, groups: list[LayerGroup], names: list[str], train_bn: bool,
                  freeze_stats: bool = False, trains: Any = None) -> set[str]:
    """Set ``requires_grad`` per group and return the norm modules whose statistics stay frozen.

    Args:
        model: the backbone.
        groups: its layer groups.
        names: groups that train now.
        train_bn: whether norm layers in frozen groups still train.
        freeze_stats: keep every norm layer in inference mode, training groups' too.
        trains: ``(group, name, param) -> bool``: which parameters of a training group train
            (:meth:`Strategy.trains`; default: all of them).

    Returns:
        Names of modules to keep in eval mode (running statistics frozen).
    """
    frozen_norms: set[str] = set()
    wanted = set(names)
    for group in groups:
        on = group.name in wanted
        for pname, param in zip(group.param_names, group.params):
            selected = on and (trains is None or trains(group, pname, param))
            param.requires_grad_(selected or (train_bn and _is_norm_param(pname, group)))
        if (not on and not train_bn) or freeze_stats:
            frozen_norms.update(group.norm_modules)
    for name in frozen_norms:
        model.get_submodule(name).eval()
    return frozen_norms
