"""The Trainer writes no file; the run folder writes every file, and reads back what it wrote."""

import os

import pytest
import torch

from conftest import assert_trees_close
from mobilenet_fn import Config
from mobilenet_fn.preprocess import preprocess_for
from mobilenet_fn.rundir import RunDir
from mobilenet_fn.options import TrainOptions
from mobilenet_fn.sources import Dataset, TensorSource
from mobilenet_fn.train import CheckpointEvent, EpochEvent, Trainer


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(48) % 3
    source = TensorSource(images, labels)
    return Dataset("tiny", ["a", "b", "c"], source, source,
                   preprocess_for(32, crop_pct=1.0, stats={"mean": [0.5] * 3, "std": [0.25] * 3}), {"kind": "tiny"})


def test_the_trainer_writes_no_file_and_hands_over_each_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(Config(alpha=0.25, resolution=32, num_classes=3),
                      TrainOptions(data="tiny", epochs=2, batch_size=16, compile="off", workers=0),
                      tiny_dataset(), torch.device("cpu"))
    trainer.start_fresh()
    events = list(trainer.run())
    assert os.listdir(tmp_path) == []
    handed = [e for e in events if isinstance(e, (CheckpointEvent, EpochEvent))]
    assert [type(e) for e in handed] == [CheckpointEvent, EpochEvent] * 2  # the files first, then the metrics
    last = [e for e in events if isinstance(e, CheckpointEvent)][-1]
    assert last.checkpoint["epoch"] == 2 and last.checkpoint["batch_in_epoch"] == 0
    assert_trees_close(last.checkpoint["params"], trainer.params, atol=0, rtol=0)
    assert handed[0].weights is not None  # the first epoch is the best so far


def test_the_run_folder_writes_each_file_and_reads_it_back(tmp_path):
    trainer = Trainer(Config(alpha=0.25, resolution=32, num_classes=3),
                      TrainOptions(data="tiny", epochs=1, batch_size=16, compile="off", workers=0),
                      tiny_dataset(), torch.device("cpu"))
    trainer.start_fresh()
    events = list(trainer.run())
    saved = next(e for e in events if isinstance(e, CheckpointEvent))
    metrics = next(e for e in events if isinstance(e, EpochEvent)).metrics

    run = RunDir.create(tmp_path / "run", config={"model": {}}, split={"kind": "tiny"})
    assert sorted(os.listdir(run.path)) == ["config.json", "split.json"]
    run.save_epoch(saved.checkpoint, None)  # not the best: last.ckpt only
    assert sorted(os.listdir(run.path)) == ["config.json", "last.ckpt", "split.json"]
    assert run.load_best() is None
    run.save_epoch(saved.checkpoint, saved.weights)
    run.append_metrics(metrics)
    run.plot_curves()
    assert sorted(os.listdir(run.path)) == ["best.ckpt", "config.json", "curves.png", "last.ckpt", "metrics.jsonl",
                                            "split.json", "weights.pkl"]

    again = RunDir.open(tmp_path / "run")
    assert again.metrics == [metrics]
    assert_trees_close(again.load_last()["params"], trainer.params, atol=0, rtol=0)
    assert again.load_best()["epoch"] == 1
    with pytest.raises(FileExistsError, match="--resume"):
        RunDir.create(tmp_path / "run", config={}, split={})
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        RunDir.open(tmp_path / "elsewhere")
