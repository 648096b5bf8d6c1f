"""A learning-rate finder: Lightning's ``Tuner.lr_find`` on a visiontl task, with its plot.

The finder trains for a few steps while the learning rate grows exponentially from ``min_lr`` to
``max_lr`` (Smith 2017, "Cyclical Learning Rates"), records the loss at each, and suggests the
rate where the loss falls fastest. It is Lightning's finder, run on the task as a fit would run it
(the datamodule link, cached features and a fitted head for LP-FT first), on a Trainer of its own:
nothing is checkpointed and the run's weights are put back afterwards.

Lightning sweeps one learning rate for every parameter group, so the suggestion is for the
strategy's ``lr`` (its head's): ``decay`` (or ``lr_range``) then spreads it down the layer groups as
in training. Strategies that fit their head in closed form (``logreg``, ``knn``, ``prototype``) have
no learning rate to find.

>>> from visiontl.train import lr_find
>>> found = lr_find("data/xrays", backbone="resnet18", strategy="full")  # doctest: +SKIP
>>> found.suggestion, found.plot  # doctest: +SKIP

``visiontl lr-find --config recipe:folder --data.init_args.root data/xrays`` does the same from a
recipe. Both write ``lr_find.png`` and ``lr_find.json`` to ``out/name``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontl.core.errors import UserError

__all__ = ["LRFinding", "find_lr", "lr_find", "save_lr_plot"]


@dataclass
class LRFinding:
    """What the finder found.

    Attributes:
        suggestion: the suggested learning rate for the strategy's ``lr`` (``None`` when the loss
            never fell: try a wider range or more steps).
        lrs: the learning rates tried, in order.
        losses: the smoothed training loss at each.
        plot: ``lr_find.png``: loss against learning rate, the suggestion marked.
        record: ``lr_find.json``: everything above, with the task's backbone and strategy.
    """

    suggestion: float | None
    lrs: list[float] = field(repr=False)
    losses: list[float] = field(repr=False)
    plot: Path
    record: Path


def find_lr(task: Any, dm: Any, *, out: str | os.PathLike[str] = "runs", name: str = "lr-find",
            steps: int = 100, min_lr: float = 1e-6, max_lr: float = 1.0,
            trainer_kwargs: dict[str, Any] | None = None, verbose: bool = False) -> LRFinding:
    """Run the finder on a built task and datamodule; write the plot and the record to ``out/name``.

    Raises:
        UserError: a strategy without a learning rate, a range that is not ``0 < min_lr < max_lr``,
            fewer than 10 steps.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    from visiontl.core import files
    from visiontl.core.devices import resolve_precision
    from visiontl.core.quiet import quiet

    strategy = task.strategy
    if not strategy.sgd:
        raise UserError(f"lr-find: strategy {strategy.name!r} fits its head in closed form; it has no learning rate "
                        f"to find. Use probe, partial, full, gradual or a PEFT strategy.")
    if not 0 < min_lr < max_lr:
        raise UserError(f"lr-find: the range must satisfy 0 < min_lr < max_lr, got {min_lr} and {max_lr}.")
    if steps < 10:
        raise UserError(f"lr-find: {steps} steps are too few to read a curve from; give at least 10 (100 is usual).")
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"max_steps": steps, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
                              "num_sanity_val_steps": 0, "enable_model_summary": False,
                              "default_root_dir": str(folder), "enable_progress_bar": verbose}
    kwargs.update(trainer_kwargs or {})
    kwargs["precision"] = resolve_precision(kwargs.get("precision"), kwargs.get("accelerator", "auto"))
    with quiet(verbose):
        trainer = pl.Trainer(**kwargs)
        finder = Tuner(trainer).lr_find(task, datamodule=dm, min_lr=min_lr, max_lr=max_lr, num_training=steps,
                                        update_attr=False)
    if finder is None:  # another rank
        raise UserError("lr-find: run it in one process (devices: 1).")
    lrs = [float(v) for v in finder.results["lr"]]
    losses = [float(v) for v in finder.results["loss"]]
    suggestion = finder.suggestion()
    suggestion = float(suggestion) if suggestion is not None and math.isfinite(suggestion) else None
    plot = save_lr_plot(lrs, losses, suggestion, folder / "lr_find.png",
                        title=f"Learning-rate finder: {task.hparams['backbone']}, strategy {strategy.name}")
    record = folder / "lr_find.json"
    files.write_json(record, {"suggestion": suggestion, "backbone": task.hparams["backbone"],
                              "strategy": strategy.name, "steps": steps, "min_lr": min_lr, "max_lr": max_lr,
                              "lrs": lrs, "losses": losses})
    return LRFinding(suggestion, lrs, losses, plot, record)


def save_lr_plot(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None, path: Path,
                 title: str = "Learning-rate finder") -> Path:
    """Training loss against learning rate (log scale), the suggestion marked."""
    from matplotlib.figure import Figure

    from visiontl.analyse.plots import save_figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", label="training loss (smoothed)")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


def lr_find(data: Any, backbone: str = "resnet18", strategy: Any = "gradual", *, pretrained: bool = True,
            weights: str | None = None, image_size: int | None = None, seed: int = 0, steps: int = 100,
            min_lr: float = 1e-6, max_lr: float = 1.0, out: str | os.PathLike[str] = "runs",
            name: str | None = None, data_kwargs: dict[str, Any] | None = None,
            task_kwargs: dict[str, Any] | None = None, trainer_kwargs: dict[str, Any] | None = None,
            verbose: bool = False) -> LRFinding:
    """Find a learning rate for ``strategy`` on ``data``, with the data and task built as
    :func:`visiontl.fine_tune` builds them (same arguments); writes ``out/name/lr_find.png`` and
    ``.json`` (``name`` default ``<backbone>-<strategy>-lr-find``)."""
    from visiontl.train.finetune import prepare_task

    dm, task = prepare_task(data, backbone, strategy, pretrained=pretrained, weights=weights, image_size=image_size,
                            seed=seed, data_kwargs=data_kwargs, task_kwargs=task_kwargs)
    return find_lr(task, dm, out=out, name=name or f"{backbone}-{task.strategy.name}-lr-find", steps=steps,
                   min_lr=min_lr, max_lr=max_lr, trainer_kwargs=trainer_kwargs, verbose=verbose)
