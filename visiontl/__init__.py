"""visiontl: transfer learning on images.

Start from an ImageNet backbone (any timm model), pick a strategy on the fine-tuning ladder
(``probe`` -> ``partial`` -> ``gradual`` / ``full``, with ``scratch`` as the baseline) and train with
PyTorch Lightning. See README.md.
"""

from visiontl.api import FitResult, fine_tune
from visiontl.backbones import LayerGroup, create_backbone, data_config, layer_groups
from visiontl.data import BlueMarbleDataModule, CsvDataModule, FolderDataModule
from visiontl.strategies import Full, Gradual, Partial, Probe, Scratch, Strategy, get_strategy
from visiontl.tasks import ClassificationTask
from visiontl.weights import load_weights

__version__ = "0.1.0"

__all__ = [
    "BlueMarbleDataModule",
    "ClassificationTask",
    "CsvDataModule",
    "FitResult",
    "FolderDataModule",
    "Full",
    "Gradual",
    "LayerGroup",
    "Partial",
    "Probe",
    "Scratch",
    "Strategy",
    "__version__",
    "create_backbone",
    "data_config",
    "fine_tune",
    "get_strategy",
    "layer_groups",
    "load_weights",
]
