"""LightningModules: classification, domain adaptation, distillation, continued self-supervised pretraining."""

from visiontl.tasks.adaptation import AdaptationTask
from visiontl.tasks.base import BaseTask, warmup_cosine
from visiontl.tasks.classification import ClassificationTask
from visiontl.tasks.distill import DistillationTask
from visiontl.tasks.pretrain import ContinuedPretraining

__all__ = ["AdaptationTask", "BaseTask", "ClassificationTask", "ContinuedPretraining", "DistillationTask",
           "warmup_cosine"]
