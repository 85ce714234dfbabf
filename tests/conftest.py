import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

from mobilenet_fn import Config


@pytest.fixture(autouse=True, scope="session")
def _cache_folder(tmp_path_factory):
    """Decoded caches go to a temporary folder, never the user's ~/.cache (subprocesses inherit it)."""
    os.environ["MOBILENET_FN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_batchnorm(module: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Gives every BatchNorm of an nn.Module non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


@pytest.fixture
def small_cfg() -> Config:
    return Config(alpha=0.25, resolution=32, num_classes=10)


def assert_trees_close(a, b, **kw):
    """Same tree structure, and every pair of leaves close (exactly equal with atol=rtol=0)."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **kw)


@contextlib.contextmanager
def training_process(cmd: list, run: Path, env: dict | None = None):
    """Starts the training command ``cmd`` (which writes the run folder ``run``) in its own process group, as a
    scheduler would, and yields it once its first last.ckpt exists; whatever is left of the group is killed on the
    way out."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (run / "last.ckpt").exists(), f"training did not get going (exit code {proc.poll()})"
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, *, after: float = 0.0, timeout: float = 60) -> str:
    """Sends ``sig`` to the whole process group ``after`` seconds; returns its stderr once it has exited."""
    time.sleep(after)
    os.killpg(proc.pid, sig)
    return proc.communicate(timeout=timeout)[1]
