"""visiontl: transfer learning on images.

Start from an ImageNet backbone (any timm model), pick a strategy on the fine-tuning ladder
(``probe`` -> ``partial`` -> ``gradual`` / ``full``, with ``scratch`` as the baseline) and train with
PyTorch Lightning. See README.md and the documentation site (docs/).

Names are imported lazily, so that light modules (``visiontl.deploy.predict``: ONNX Runtime only) do not
pull in torch and Lightning.
"""

from __future__ import annotations

from visiontl.core.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "FitResult": "visiontl.train.finetune",
    "fine_tune": "visiontl.train.finetune",
    "LayerGroup": "visiontl.models.backbones",
    "create_backbone": "visiontl.models.backbones",
    "data_config": "visiontl.models.backbones",
    "layer_groups": "visiontl.models.backbones",
    "BlueMarbleDataModule": "visiontl.data",
    "CsvDataModule": "visiontl.data",
    "FolderDataModule": "visiontl.data",
    "Full": "visiontl.strategies",
    "Gradual": "visiontl.strategies",
    "Partial": "visiontl.strategies",
    "Probe": "visiontl.strategies",
    "Scratch": "visiontl.strategies",
    "Strategy": "visiontl.strategies",
    "get_strategy": "visiontl.strategies",
    "ClassificationTask": "visiontl.tasks",
    "DistillationTask": "visiontl.tasks",
    "load_weights": "visiontl.models.weights",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__, __dir__ = lazy_exports("visiontl", globals(), _EXPORTS)
