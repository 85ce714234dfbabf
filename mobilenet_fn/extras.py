"""Optional dependencies, imported where they are used, with a one-line error that names the extra to install."""

from __future__ import annotations

import importlib


def require(module: str, purpose: str, extra: str, package: str | None = None):
    """Imports ``module``, or raises an ImportError of one line: what needs it and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split(".")[0]
        raise ImportError(f"{purpose} needs {package}: pip install 'mobilenet-fn[{extra}]' (or pip install "
                          f"{package})") from None
