"""Optional dependencies: a feature whose library is an extra says, in one line, which extra to install.

The core (``pip install visiontl``) trains, evaluates and exports classifiers on common image
formats. Libraries that only one feature uses are extras: ``tiff`` (multiband and 16-bit TIFF),
``dicom`` (DICOM, with its compressed-syntax decoders), ``ssl`` (continued self-supervised
pretraining), ``lowres`` (the bundled 8 px digits set), and the others named in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from visiontl.core.errors import UserError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(UserError, ImportError):
    """A feature's optional library is not installed; the message names the extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'visiontl[{extra}]'.") from err
