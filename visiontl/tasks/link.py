"""The one place where a task and its datamodule meet, at set-up (:class:`DataLink`).

Lightning calls the datamodule's ``setup``, then the callbacks' ``setup``, then the task's. In
between, :class:`DataLink` hands the backbone's :class:`~visiontl.data.Preprocessing` to the
datamodule, which refines it from the data (:mod:`visiontl.data.preprocessing` draws the flow), and
gives the resolved one and the training class counts to the task. Then, for strategies that read
cached features or fit a head on them, :class:`~visiontl.tasks.cached_features.CachedFeatures` does its
work. Neither side imports or inspects the other: a datamodule only needs ``resolve_preprocessing``
(and ``class_counts`` for balanced class weights); a task only ``backbone_preprocessing`` and
``set_preprocessing``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from visiontl.core.devices import trainer_device_kind
from visiontl.core.errors import UserError
from visiontl.data.protocols import LabelledData, Preprocessed, TaggedData
from visiontl.tasks.protocols import PredictsTags, TakesClassCounts, TakesPreprocessing

__all__ = ["DataLink", "link"]


def link(dm: Preprocessed | Any, task: TakesPreprocessing | Any, device: str = "cpu") -> None:
    """The hand-over, in one place: the datamodule learns the device its loaders feed, refines the
    backbone's preprocessing from its data and gives the result, and its training class counts,
    to the task. Plain Lightning datamodules (no ``resolve_preprocessing``) are left alone: the
    task keeps the backbone's preprocessing."""
    if not isinstance(dm, Preprocessed) or not isinstance(task, TakesPreprocessing):
        return
    dm.feeds = device  # pinned memory and workers follow the device
    task.set_preprocessing(dm.resolve_preprocessing(task.backbone_preprocessing()))
    data_multilabel = isinstance(dm, TaggedData) and dm.multilabel
    task_multilabel = isinstance(task, PredictsTags) and task.multilabel
    if data_multilabel != task_multilabel:
        raise UserError(
            "The data has several tags per image (multi-label) but the model was built for one class per image: pass "
            "task='multilabel' to it (fine_tune and the CLI take it from the data)." if data_multilabel else
            "The model was built for multi-label data (task='multilabel') but the data has one class per image: "
            "leave task at multiclass, or give multi-label data (tag_columns, or tags joined by '|').")
    if isinstance(dm, LabelledData) and isinstance(task, TakesClassCounts):
        task.set_class_counts(dm.class_counts, total=dm.train_size)


class DataLink(pl.Callback):
    """Resolve preprocessing once per set-up: backbone -> datamodule -> task (:func:`link`)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        link(trainer.datamodule, pl_module, trainer_device_kind(trainer))
