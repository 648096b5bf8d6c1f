"""LightningModules: classification now; adaptation tasks (DANN, continued SSL) later."""

from visiontl.tasks.base import BaseTask, warmup_cosine
from visiontl.tasks.classification import ClassificationTask

__all__ = ["BaseTask", "ClassificationTask", "warmup_cosine"]
