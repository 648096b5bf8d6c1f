"""Experiment trackers beside the run directory's CSV log: TensorBoard and MLflow, offline.

Every run logs to ``metrics.csv`` in its run directory (:class:`~visiontl.train.resume.RunLogger`,
the default). ``also_log_to`` adds Lightning's own loggers, pointed at the same run:

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``tensorboard --logdir runs`` shows every run);
- ``mlflow``: an MLflow store beside the runs, one SQLite file (``<save_dir>/mlflow.db``, MLflow's
  recommended local backend; one experiment per run name, one MLflow run per ``version_N``;
  ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``), or the tracking server
  ``MLFLOW_TRACKING_URI`` names.

Both are the ``tracking`` extra (``pip install 'visiontl[tracking]'``); without it, asking for one is
one line naming the extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visiontl.core.errors import UserError

__all__ = ["TRACKERS", "check_trackers", "tracker_loggers"]

TRACKERS = ("tensorboard", "mlflow")
"""The trackers ``also_log_to`` takes."""


def check_trackers(names: Sequence[str] | str | None) -> tuple[str, ...]:
    """``names`` as a tuple of known trackers (a single name is one tracker); a one-line
    :class:`~visiontl.core.errors.UserError` naming the choices for anything else."""
    if names is None:
        return ()
    items = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in items if n not in TRACKERS]
    if unknown:
        raise UserError(f"also_log_to: {', '.join(map(repr, unknown))} is not a tracker visiontl logs to; choose from "
                        f"{', '.join(TRACKERS)} (metrics.csv is always written).")
    return tuple(dict.fromkeys(items))


def tracker_loggers(names: Sequence[str], run: Path, save_dir: Path, experiment: str) -> list[Any]:
    """Lightning loggers for ``names``, writing into the run directory ``run`` (TensorBoard) or the
    MLflow store in ``save_dir`` (experiment ``experiment``, MLflow run named after ``run``)."""
    from visiontl.core.extras import require

    out: list[Any] = []
    for name in check_trackers(names):
        if name == "tensorboard":
            require("tensorboard", "tracking", "Logging to TensorBoard (also_log_to: tensorboard)")
            from pytorch_lightning.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(save_dir=str(run), name="", version="tensorboard", default_hp_metric=False))
        else:
            require("mlflow", "tracking", "Logging to MLflow (also_log_to: mlflow)")
            from pytorch_lightning.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(save_dir) / 'mlflow.db').absolute()}"
            out.append(MLFlowLogger(experiment_name=experiment, run_name=run.name, tracking_uri=uri))
    return out
