import contextlib
import functools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from mobilenet_fn import Config, init


def build_the_command_line_once() -> None:
    """typer's CliRunner builds the click command from the app's signatures on every invoke (about 30 ms: it
    evaluates each option's annotations); the app does not change under the tests, so they build it once."""
    import typer.testing

    build = getattr(typer.testing, "_get_command", None)  # typer's own name: without it, tests build it each time
    if build is not None and not hasattr(build, "cache_info"):
        typer.testing._get_command = functools.cache(build)


build_the_command_line_once()


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


def brightest_channel_weights(cfg: Config, scale: float = 10.0, shift: float = 3.0) -> tuple[dict, dict]:
    """(params, state) of a MobileNet built by hand whose class k is input channel k (k < 3): every layer passes
    the three normalised colour channels on unchanged (shifted by ``shift`` in the stem, so that no ReLU cuts
    them; a strided layer samples a pixel, the pooling averages) and the classifier scores channel k times
    ``scale``. It sorts images whose colour lies in one channel with a margin that no CPU's rounding can move: a
    trained model's behaviour without the luck of a training run."""
    params, state = init(cfg, torch.Generator().manual_seed(0))
    rgb = [0, 1, 2]
    with torch.no_grad():
        for path, leaf in tree_flatten_with_path(params)[0]:
            is_bn_scale = path[-1].key == "weight" and path[-2].key.endswith("bn")
            leaf.fill_(1.0 if is_bn_scale else 0.0)
        for path, leaf in tree_flatten_with_path(state)[0]:
            leaf.fill_(1 - cfg.bn_eps if path[-1].key == "var" else 0.0)  # BatchNorm: the identity, plus its bias
        params["stem"]["conv"]["weight"][rgb, rgb, 1, 1] = 1.0  # (O, I, 3, 3): the centre tap
        params["stem"]["bn"]["bias"][rgb] = shift
        for block in params["blocks"]:
            block["dw"]["weight"][:, 1, 1] = 1.0  # (C, 3, 3)
            block["pw"]["weight"][rgb, rgb] = 1.0  # (O, I)
        params["fc"]["weight"][rgb, rgb] = scale  # (classes, features)
        params["fc"]["bias"][rgb] = -scale * shift
    return params, state
