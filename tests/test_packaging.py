"""The built wheel, installed into a fresh venv, holds one top-level package and trains on its embedded sample."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads; copied, so that no build/ or *.egg-info of an earlier build (stale files) leaks in.
SOURCE = ("pyproject.toml", "README.md", "LICENSE", "mobilenet_fn", "cli", "data")
FAST = ["--alpha", "0.25", "--batch-size", "128", "--device", "cpu", "--workers", "0"]


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_installs_alone_and_trains_from_elsewhere(tmp_path):
    # Build from a clean copy, offline: this environment's setuptools, no dependencies fetched.
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w",
                  tmp_path / "wheels"])
    assert "would be ignored" not in built.stdout + built.stderr
    (wheel,) = (tmp_path / "wheels").glob("mobilenet_fn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"mobilenet_fn"}
    assert "mobilenet_fn/cli/main.py" in names and "mobilenet_fn/sample/sample/NOTICE.md" in names
    assert sum(n.startswith("mobilenet_fn/sample/sample/train/") and n.endswith(".png") for n in names) > 100

    # A fresh venv that sees this environment's packages (torch…) through a .pth file; directories listed in a
    # .pth file are not scanned for .pth files, so an editable install of the source tree does not leak in.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))
    before = set(os.listdir(site))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    added = set(os.listdir(site)) - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"mobilenet_fn"}, added

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import mobilenet_fn, mobilenet_fn.cli.main as m; print(mobilenet_fn.__file__);"
                  "print(m.__file__)"], cwd=work, env=env).stdout.split()
    assert all(Path(w).is_relative_to(site / "mobilenet_fn") for w in where), where
    for name in ("cli", "data"):
        assert not (site / name).exists() and not (site / f"{name}.py").exists()

    _run([venv / "bin" / "mobilenet-fn", "train", "--data", "sample", "--epochs", "1", "--compile", "off", *FAST,
          "--out", tmp_path / "run"], cwd=work, env=env, timeout=600)
    assert (tmp_path / "run" / "weights.pkl").stat().st_size > 0
