"""MobileNet v1 as a pure function of a parameter tree, trained with torch.func and torch.compile."""

from .count import count
from .model import Config, apply, features, init, resolution_for_rho

__version__ = "0.1.0"

__all__ = ["Config", "init", "apply", "features", "count", "resolution_for_rho", "__version__"]
