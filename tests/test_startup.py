"""Start-up: the package and the command line import nothing heavy until a command needs it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "onnxruntime", "timm", "matplotlib", "numpy")

PROBE = """
import json, sys
import mobilenet_fn, mobilenet_fn.cli.main
print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))
"""


def _imported_by(code: str) -> list[str]:
    """Runs ``code`` in a fresh interpreter (the import state of this test process is no guide)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_imports_nothing_heavy():
    assert _imported_by(PROBE.format(heavy=HEAVY)) == []


def test_help_runs_without_torch():
    code = ("import json, sys, runpy\n"
            "sys.argv = ['mobilenet-fn', 'resize', '--help']\n"
            "try:\n    runpy.run_module('mobilenet_fn', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            f"print(json.dumps(sorted(n for n in {HEAVY!r} if n in sys.modules)))")
    assert _imported_by(code) == []


PUBLIC = {
    "Config": "model", "init": "model", "apply": "model", "features": "model", "fold_batchnorm": "model",
    "resolution_for_rho": "model", "count": "tables", "Weights": "weights", "load_weights": "weights",
    "save_weights": "weights",
}


def test_the_public_names_are_exactly_these():
    import mobilenet_fn

    assert sorted(mobilenet_fn.__all__) == sorted([*PUBLIC, "__version__"])
    assert isinstance(mobilenet_fn.__version__, str)
    assert set(mobilenet_fn.__all__) <= set(dir(mobilenet_fn))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_resolve_lazily_to_their_definitions(name):
    import mobilenet_fn

    module = importlib.import_module(f"mobilenet_fn.{PUBLIC[name]}")
    assert getattr(mobilenet_fn, name) is getattr(module, name)
    namespace: dict = {}
    exec(f"from mobilenet_fn import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_unknown_names_raise_attribute_error():
    import mobilenet_fn

    with pytest.raises(AttributeError, match="no_such_name"):
        mobilenet_fn.no_such_name  # noqa: B018
    assert not hasattr(mobilenet_fn, "no_such_name")


def test_the_training_path_imports_neither_importers_nor_export():
    code = ("import json, sys\n"
            "import mobilenet_fn.train, mobilenet_fn.rundir, mobilenet_fn.evaluate\n"
            "print(json.dumps(sorted(n for n in ('mobilenet_fn.importers', 'mobilenet_fn.export', 'mobilenet_fn.cli') "
            "if n in sys.modules)))")
    assert _imported_by(code) == []
