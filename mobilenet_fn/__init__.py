"""MobileNet v1 as a pure function of a parameter tree, trained with torch.func and torch.compile."""

from .count import count
from .model import Config, apply, features, init, resolution_for_rho
from .weights import Weights, load_weights, save_weights

__version__ = "0.1.0"

__all__ = ["Config", "init", "apply", "features", "count", "resolution_for_rho", "Weights", "load_weights",
           "save_weights", "__version__"]
