"""Data-parallel training with torchrun: 2 processes, Gloo on the loopback address, eager (no compile)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_trees_close, stop, training_process
from mobilenet_fn.checkpoint import load_checkpoint

pytestmark = pytest.mark.kernels  # trains: .ci/run runs these again with AVX2 kernels

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def torchrun(nproc: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    two = torchrun(2, str(HERE / "dist_worker.py"), str(out), "32")
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(HERE / "dist_worker.py"), str(out), "32"], capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt") for name in ("world2-rank0", "world2-rank1", "world1-rank0")}


def test_ranks_end_with_identical_parameters(worlds):
    a, b = worlds["world2-rank0"], worlds["world2-rank1"]
    assert_trees_close((a["params"], a["state"]), (b["params"], b["state"]), atol=0, rtol=0)


def test_two_processes_with_sync_bn_equal_one_process_on_the_global_batch(worlds):
    two, one = worlds["world2-rank0"], worlds["world1-rank0"]
    assert_trees_close(two["params"], one["params"], atol=1e-5, rtol=1e-5)
    assert_trees_close(two["state"], one["state"], atol=1e-5, rtol=1e-5)


def test_distributed_eval_equals_single_process_eval(worlds):
    # Same weights on both sides: each rank's final weights evaluated with and without sharding.
    two = worlds["world2-rank0"]
    from mobilenet_fn import Config
    from mobilenet_fn.preprocess import preprocess_for
    from mobilenet_fn.evaluate import evaluate

    sys.path.insert(0, str(HERE))
    from dist_worker import VAL_ITEMS, synthetic

    torch.set_default_dtype(torch.float64)  # as the workers trained and evaluated
    try:
        single = evaluate(Config(alpha=0.25, resolution=32, num_classes=4), two["params"], two["state"],
                          synthetic(VAL_ITEMS, 1), preprocess_for(32, crop_pct=1.0, stats={"mean": [0.5] * 3, "std": [0.25] * 3}),
                          batch_size=64)
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(single["confusion"], two["confusion"])
    assert single["n"] == two["val"]["n"] == VAL_ITEMS == 51
    assert single["top1"] == two["val"]["top1"] and single["top5"] == two["val"]["top5"]
    assert single["loss"] == pytest.approx(two["val"]["loss"], rel=1e-6)


CLI = [sys.executable, "-m", "mobilenet_fn", "train", "--alpha", "0.25", "--batch-size", "8", "--device", "cpu",
       "--workers", "0", "--compile", "off", "--resolution", "32"]
STEPS = 8  # an epoch of FOLDER with 2 processes: 128 training images in batches of 8 per process


@pytest.fixture(scope="module", autouse=True)
def folder(tmp_path_factory):
    """160 pictures in 4 classes (128 to train on), which every CLI run here trains on: seconds per epoch."""
    from test_train_cli import _colour_folder

    CLI.extend(["--data", str(_colour_folder(tmp_path_factory.mktemp("folder") / "data", n=40, classes=4))])
    yield
    del CLI[-2:]


EPOCHS = 8  # the SIGTERM test's job must still be training when the signal comes: an epoch takes 0.3 s


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A torchrun job of 2 processes trained straight through EPOCHS epochs (its run folder and stderr): what a
    job stopped and resumed must end as, and a run to resume with 1 process."""
    run = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run([*CLI, "--nproc", "2", "--epochs", str(EPOCHS), "--out", str(run)], capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done.stderr


def test_cli_nproc_2_then_resume_with_1_process(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    assert straight[1].count("Training on") == 1  # only rank 0 reports
    assert load_checkpoint(run / "last.ckpt")["world"] == 2
    more = subprocess.run([*CLI, "--resume", str(run), "--epochs", str(EPOCHS + 1)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert more.returncode == 0, more.stderr[-3000:]
    ckpt = load_checkpoint(run / "last.ckpt")
    assert ckpt["epoch"] == EPOCHS + 1 and ckpt["world"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == EPOCHS + 1


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_a_killed_rank_stops_the_whole_job_within_seconds(tmp_path):
    with training_process([*CLI, "--nproc", "2", "--epochs", "50", "--out", tmp_path / "run"], tmp_path / "run",
                          ENV) as proc:
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        _, stderr = proc.communicate(timeout=30)
        assert time.time() - killed < 15  # "within seconds", as docs/training.md says
    assert proc.returncode != 0
    assert "stopped" in stderr and "--resume" in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no rank left training
    load_checkpoint(tmp_path / "run" / "last.ckpt")  # still a valid checkpoint


def test_teardown_waits_for_every_rank_then_frees_the_group_and_its_threads():
    # Gloo threads left running into interpreter shutdown aborted rank 1 now and then (SIGABRT); here, after
    # teardown(), the group and its threads are gone on both ranks.
    done = torchrun(2, str(HERE / "teardown_worker.py"), "clean", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: torn down" in done.stdout and "rank 1: torn down" in done.stdout
    assert "outlives destroy_process_group" not in done.stderr


def test_a_failing_rank_tears_down_without_waiting_for_the_others():
    start = time.time()
    failed = torchrun(2, str(HERE / "teardown_worker.py"), "error", timeout=120)
    assert failed.returncode != 0
    assert "rank 0 fails" in failed.stderr
    assert time.time() - start < 60


@pytest.mark.slow
def test_a_torchrun_job_stopped_by_sigterm_saves_its_place_and_resumes_bit_identically(straight, tmp_path):
    # Stopped by SIGTERM wherever it happens to be after epoch 1, resumed with 2 processes: the same
    # parameters as a run straight through. (Resumed with another process count, the per-process batch makes it
    # another optimisation, so there only the position is checked: test_cli_nproc_2_then_resume_with_1_process.)
    run = tmp_path / "stopped"
    # As a scheduler does: SIGTERM to every process of the job (the launcher and both ranks).
    with training_process([*CLI, "--nproc", "2", "--epochs", str(EPOCHS), "--out", run], run, ENV) as proc:
        first_written = (run / "last.ckpt").stat().st_mtime_ns  # the end of epoch 1
        stderr = stop(proc, after=0.5)  # at once: a warm cache trains an epoch in well under a second
    assert proc.returncode == 143, stderr[-3000:]
    assert "Interrupted. Saved" in stderr and "--resume" in stderr
    stopped_at = load_checkpoint(run / "last.ckpt")
    assert stopped_at["epoch"] < EPOCHS and stopped_at["world"] == 2
    # Written again, where the signal stopped the job (on a loaded machine that may be before epoch 2's first step)
    assert (run / "last.ckpt").stat().st_mtime_ns > first_written and stopped_at["step"] >= STEPS
    assert stopped_at["step"] == stopped_at["epoch"] * STEPS + stopped_at["batch_in_epoch"]
    resumed = subprocess.run([*CLI, "--nproc", "2", "--resume", str(run)], capture_output=True, text=True,
                             timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(straight[0] / "last.ckpt"), load_checkpoint(run / "last.ckpt")
    assert b["epoch"] == EPOCHS and b["world"] == 2
    assert_trees_close((a["params"], a["state"], a["opt_state"]), (b["params"], b["state"], b["opt_state"]),
                       atol=0, rtol=0)
