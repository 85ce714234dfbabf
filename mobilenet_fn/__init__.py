"""MobileNet v1 as a pure function of a parameter tree, trained with torch.func and torch.compile.

The public names below are imported on first use (PEP 562), so ``import mobilenet_fn`` (and the command line,
whose ``--help`` and ``resize`` never need it) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name → the submodule that defines it
_LAZY = {
    "Config": "model", "init": "model", "apply": "model", "features": "model", "fold_batchnorm": "model",
    "resolution_for_rho": "model",
    "count": "tables",
    "Weights": "weights", "load_weights": "weights", "save_weights": "weights",
}

__all__ = ["Config", "init", "apply", "features", "fold_batchnorm", "resolution_for_rho", "count", "Weights",
           "load_weights", "save_weights", "__version__"]

if TYPE_CHECKING:
    from .tables import count
    from .model import Config, apply, features, fold_batchnorm, init, resolution_for_rho
    from .weights import Weights, load_weights, save_weights


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
