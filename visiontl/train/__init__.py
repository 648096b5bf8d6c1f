"""Running a fit: ``fine_tune``, the run driver and the run directory, resume, distillation, WiSE-FT.

Every door (``fine_tune``, ``visiontl fit``, ``distill``, a bench cell) trains through
:func:`visiontl.train.finetune.fit_task` or the command line's Trainer, and both attach the same run
callbacks (:func:`attach_run_callbacks`). Names are imported lazily.
"""

from __future__ import annotations

from visiontl.core.lazy import lazy_exports

_EXPORTS = {
    "FitResult": "visiontl.train.finetune",
    "fine_tune": "visiontl.train.finetune",
    "fit_task": "visiontl.train.finetune",
    "attach_run_callbacks": "visiontl.train.run",
    "distill": "visiontl.train.distill",
    "lr_find": "visiontl.train.lrfinder",
    "LRFinding": "visiontl.train.lrfinder",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports("visiontl.train", globals(), _EXPORTS)
