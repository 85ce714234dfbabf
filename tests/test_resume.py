"""A run stopped anywhere (in a batch, in validation, between the epoch's files and its metrics line, in the final
test pass) and resumed ends with the files of a run straight through: the same metrics lines (but for the timing
fields), best.ckpt, weights.pkl and parameters, bit for bit."""

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from conftest import assert_trees_close
from mobilenet_fn import Config, distributed
from mobilenet_fn import data as data_lib
from mobilenet_fn import options as options_lib
from mobilenet_fn import train as train_lib
from mobilenet_fn.cli.main import app
from mobilenet_fn.rundir import RunDir
from mobilenet_fn.checkpoint import checkpoint_from_dict, load_checkpoint, save_checkpoint
from mobilenet_fn.weights import WeightsError, load_weights
from test_train_cli import _colour_folder, _interrupt_after
from test_weights import one_line_error

pytestmark = pytest.mark.kernels  # trains: .ci/run runs these again with AVX2 kernels
runner = CliRunner()
ARGS = ["--alpha", "0.25", "--resolution", "32", "--batch-size", "8", "--epochs", "2", "--device", "cpu",
        "--compile", "off", "--workers", "0", "--cache", "off", "--dropout", "0.2"]
TIMING = ("seconds", "img_per_s", "data_wait")


def _with_test_set(load):
    """``data.load`` with the validation images as a test set too, as fashion-mnist has one: the last epoch then
    ends with a test pass of the best epoch."""
    def load_with_test_set(*args, **kwargs):
        dataset = load(*args, **kwargs)
        return dataclasses.replace(dataset, test=dataset.val)

    return load_with_test_set


@pytest.fixture(scope="module", autouse=True)
def _test_set():
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data_lib, "load", _with_test_set(data_lib.load))
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _colour_folder(tmp_path_factory.mktemp("data") / "photos")


def train(*args):
    return runner.invoke(app, ["train", *ARGS, *map(str, args)])


@pytest.fixture(scope="module")
def straight(photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    result = train("--data", photos, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def _interrupt_call(monkeypatch, owner, name: str, call: int, *, after: bool = False):
    """Ctrl-C at the ``call``-th call (1-based) of ``owner.name``: before it runs, or once it has returned."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if len(calls) == call:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(owner, name, interrupted)


PLACES = {
    "in a batch of epoch 2": lambda m: _interrupt_after(m, epoch=1, batches=2),
    "in validation of epoch 1": lambda m: _interrupt_call(m, train_lib, "evaluate", 1),
    "in validation of epoch 2": lambda m: _interrupt_call(m, train_lib, "evaluate", 2),
    "between epoch 1's files and its metrics line": lambda m: _interrupt_call(m, RunDir, "append_metrics", 1),
    "right after epoch 1's metrics line": lambda m: _interrupt_call(m, RunDir, "append_metrics", 1, after=True),
    "in the final test pass": lambda m: _interrupt_call(m, train_lib.Trainer, "test_best", 1),
    "after the final test pass": lambda m: _interrupt_call(m, RunDir, "append_metrics", 2),
}


def _lines(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def assert_same_checkpoints(a: dict, b: dict):
    """Every key of two checkpoints equal, tensors bit for bit, but for the best epoch's timing."""
    assert a.keys() == b.keys()
    assert _untimed(a.pop("metrics")) == _untimed(b.pop("metrics"))
    leaves_a, structure_a = tree_flatten(a)
    leaves_b, structure_b = tree_flatten(b)
    assert structure_a == structure_b
    for x, y in zip(leaves_a, leaves_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize("place", PLACES)
def test_a_run_stopped_and_resumed_ends_with_the_files_of_a_straight_run(place, photos, straight, tmp_path,
                                                                          monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        PLACES[place](m)
        stopped = train("--data", photos, "--out", run)
    assert stopped.exit_code == 130, stopped.output
    assert "--resume" in stopped.output
    resumed = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output

    assert _lines(run) == _lines(straight)
    assert [m["epoch"] for m in _lines(run)] == [1, 2] and "test_top1" in _lines(run)[-1]
    for name in ("best.ckpt", "last.ckpt"):
        assert_same_checkpoints(load_checkpoint(straight / name), load_checkpoint(run / name))
    a, b = load_weights(straight / "weights.pkl"), load_weights(run / "weights.pkl")
    assert _untimed(a.metrics) == _untimed(b.metrics)
    assert_trees_close((a.params, a.state), (b.params, b.state), atol=0, rtol=0)


def _trainer(photos, ckpt: dict, rank: int = 0, world: int = 1) -> train_lib.Trainer:
    """A Trainer of ``rank`` of ``world`` processes restored from ``ckpt`` (no process group: nothing trains)."""
    opts = options_lib.TrainOptions(**{**ckpt["run"], "device": "cpu"})
    trainer = train_lib.Trainer(Config.from_dict(ckpt["config"]), opts, data_lib.load(str(photos), resolution=32),
                                torch.device("cpu"), dist=distributed.Context(rank, world))
    trainer.restore(ckpt)
    return trainer


def test_the_epoch_under_way_carries_over_to_another_number_of_processes(photos, straight):
    ckpt = load_checkpoint(straight / "last.ckpt")
    sums = {"loss": 3.0, "correct": 10, "seen": 16}
    mid = {**ckpt, "epoch": 1, "batch_in_epoch": 2, "world": 1, "epoch_progress": {**sums, "trained": False}}
    one = _trainer(photos, mid)
    assert (one.batch_in_epoch, one.global_step) == (2, 6)
    assert one.checkpoint()["epoch_progress"] == {**sums, "trained": False}
    # With two processes rank 0 holds what was carried in, so that their sum at the epoch's end counts it once.
    first, second = _trainer(photos, mid, 0, 2), _trainer(photos, mid, 1, 2)
    assert first.batch_in_epoch == 1 and (first.loss_sum.item(), first.correct.item(), first.seen) == (6.0, 10, 16)
    assert (second.loss_sum.item(), second.correct.item(), second.seen) == (0.0, 0, 0)
    assert first.checkpoint()["epoch_progress"] == {**sums, "trained": False}
    # Saved by two processes once epoch 2 was trained, before its end: its totals, whatever the processes.
    trained = {**mid, "epoch": 2, "batch_in_epoch": 0, "world": 2, "epoch_progress": {**sums, "trained": True}}
    one = _trainer(photos, trained)
    assert (one.epoch, one.batch_in_epoch, one.global_step) == (2, 0, 8)
    assert one.checkpoint()["epoch_progress"] == {**sums, "trained": True}


@pytest.mark.parametrize("progress, message", [
    ({"loss": float("nan")}, "epoch_progress.loss must be a finite number"),
    ({"loss": 1.0, "correct": 9, "seen": 8, "trained": False}, "epoch_progress: 9 right answers of 8 images"),
    ({"loss": 1.0, "correct": 1, "seen": 8}, "epoch_progress lacks trained"),
    ({"trained": 1}, "epoch_progress.trained must be true or false"),
    ({"batches": 3}, "unknown epoch_progress keys: 'batches'"),
    ([1.0, 2, 3], "epoch_progress must be a dict"),
])
def test_a_checkpoint_with_bad_epoch_progress_is_refused_in_one_line(straight, tmp_path, progress, message):
    shutil.copytree(straight, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    save_checkpoint(tmp_path / "run" / "last.ckpt", {**ckpt, "epoch_progress": progress})
    one_line_error(runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs", "3"]), message)


def test_a_checkpoint_without_epoch_progress_is_refused(straight):
    ckpt = load_checkpoint(straight / "last.ckpt")
    assert checkpoint_from_dict(ckpt, "last.ckpt") is ckpt
    del ckpt["epoch_progress"]
    with pytest.raises(WeightsError, match="last.ckpt: epoch_progress is missing"):
        checkpoint_from_dict(ckpt, "last.ckpt")
