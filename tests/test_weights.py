"""The .pkl format: round trips, atomic writes, checkpoints, and every way a file can be bad or hostile."""

import os
import pickle
import zipfile

import pytest
import torch
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from mobilenet_fn import Config, Weights, init, load_weights, save_weights
from mobilenet_fn.checkpoint import FORMAT as CHECKPOINT_FORMAT
from mobilenet_fn.checkpoint import load_checkpoint, save_checkpoint, weights_from_checkpoint
from mobilenet_fn.cli.main import app
from mobilenet_fn.data import IMAGENET_STATS
from mobilenet_fn.preprocess import preprocess_for
from mobilenet_fn.weights import FORMAT, WeightsError, pickle_globals

runner = CliRunner()


def make_weights(cfg: Config | None = None, seed: int = 0) -> Weights:
    """Random weights of a small model, BatchNorm statistics randomised so that they matter."""
    cfg = cfg or Config(alpha=0.25, resolution=32, num_classes=3)
    g = torch.Generator().manual_seed(seed)
    params, state = init(cfg, g)
    for bn in [state["stem"]["bn"]] + [b for block in state["blocks"] for b in block.values()]:
        bn["mean"] = torch.rand(bn["mean"].shape, generator=g) - 0.5
        bn["var"] = torch.rand(bn["var"].shape, generator=g) + 0.5
    params["fc"]["bias"] = torch.randn(cfg.num_classes, generator=g)
    classes = [f"c{i}" for i in range(cfg.num_classes)]
    return Weights(cfg, params, state, classes, preprocess_for(cfg.resolution, crop_pct=0.875, stats=IMAGENET_STATS))


def assert_trees_equal(a, b):
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


def one_line_error(result, *needles):
    """A mistake: exit code 2 and exactly one line, "Error: ...", without a traceback. fail() prints with
    soft_wrap=True, so rich never breaks a long message at the terminal's width (CliRunner's is 80 columns)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.output.rstrip("\n").split("\n")
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_round_trip_keeps_everything(tmp_path):
    w = make_weights()._replace(data={"kind": "sample"}, metrics={"val_top1": 0.5})
    save_weights(tmp_path / "w.pkl", w)
    back = load_weights(tmp_path / "w.pkl")
    assert back.config == w.config and back.classes == w.classes and back.preprocess == w.preprocess
    assert back.data == {"kind": "sample"} and back.metrics == {"val_top1": 0.5}
    assert_trees_equal(back.params, w.params)
    assert_trees_equal(back.state, w.state)
    raw = torch.load(tmp_path / "w.pkl", weights_only=True)
    assert raw["format"] == FORMAT and raw["config"] == w.config.to_dict()  # plain values, readable anywhere
    assert sorted(raw) == sorted(["format", "config", "params", "state", "classes", "preprocess", "data", "metrics"])


def test_save_leaves_no_temporary_file_and_respects_overwrite(tmp_path):
    path = tmp_path / "w.pkl"
    save_weights(path, make_weights(seed=0))
    before = path.read_bytes()
    with pytest.raises(WeightsError, match="already exists"):
        save_weights(path, make_weights(seed=1), overwrite=False)
    assert path.read_bytes() == before
    save_weights(path, make_weights(seed=1))
    assert path.read_bytes() != before
    assert os.listdir(tmp_path) == ["w.pkl"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not mkstemp's 0600


def test_a_crash_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.pkl"
    save_weights(path, make_weights())
    before = path.read_bytes()

    def crash(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("mobilenet_fn.weights.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_weights(path, make_weights(seed=1))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.pkl"]


def test_weights_that_contradict_their_config_are_not_written(tmp_path):
    w = make_weights()
    with pytest.raises(WeightsError, match="not written"):
        save_weights(tmp_path / "w.pkl", w._replace(config=w.config.replace(alpha=0.5)))
    assert not (tmp_path / "w.pkl").exists()


def make_checkpoint(w: Weights | None = None, **run) -> dict:
    """A checkpoint as ``Trainer.checkpoint`` makes one (without ``format``, which save_checkpoint adds)."""
    from dataclasses import asdict

    from mobilenet_fn.optim import make_optimizer
    from mobilenet_fn.options import TrainOptions

    w = w or make_weights()
    opts = TrainOptions(**{"lr": 0.1, "epochs": 3, **run})
    optimizer = make_optimizer(opts.optimizer, weight_decay=opts.weight_decay, momentum=opts.momentum)
    return {
        "config": w.config.to_dict(), "params": w.params, "state": w.state,
        "opt_state": optimizer.init({"fc": w.params["fc"]} if opts.freeze_backbone else w.params),
        "classes": w.classes, "preprocess": w.preprocess, "data": {"kind": "sample"},
        "metrics": {"val_top1": 0.25}, "epoch": 2, "step": 20, "batch_in_epoch": 0,
        "epoch_progress": {"loss": 0.0, "correct": 0, "seen": 0, "trained": False},
        "rng": {"torch": torch.get_rng_state()}, "run": asdict(opts), "world": 1,
    }


def test_checkpoint_round_trip_and_conversion_drops_the_optimizer(tmp_path):
    w = make_weights()
    ckpt = make_checkpoint(w)
    save_checkpoint(tmp_path / "last.ckpt", ckpt)
    back = load_checkpoint(tmp_path / "last.ckpt")
    assert back["format"] == CHECKPOINT_FORMAT and back["epoch"] == 2 and torch.equal(back["rng"]["torch"],
                                                                                      ckpt["rng"]["torch"])
    weights = weights_from_checkpoint(back)
    assert weights.config == w.config and weights.metrics == {"val_top1": 0.25}
    assert_trees_equal(weights.params, w.params)
    with pytest.raises(WeightsError, match="training checkpoint.*convert"):
        load_weights(tmp_path / "last.ckpt")
    del ckpt["opt_state"]
    save_checkpoint(tmp_path / "bad.ckpt", ckpt)
    with pytest.raises(WeightsError, match="opt_state is missing"):
        load_checkpoint(tmp_path / "bad.ckpt")


def test_a_checkpoint_of_format_1_is_refused_in_one_line_that_points_to_its_weights(tmp_path):
    ckpt = make_checkpoint()
    del ckpt["epoch_progress"], ckpt["world"]
    torch.save({**ckpt, "format": "mobilenet-fn-checkpoint/1"}, tmp_path / "last.ckpt")
    with pytest.raises(WeightsError, match=r"last\.ckpt: .*format 1.*cannot be resumed.*weights\.pkl"):
        load_checkpoint(tmp_path / "last.ckpt")


# ---------------------------------------------------------------------------------------------------------------
# Bad files: each one line, naming the file, exit 2 on the command line


def _valid(tmp_path):
    save_weights(tmp_path / "ok.pkl", make_weights())
    return (tmp_path / "ok.pkl").read_bytes()


def _payload(tmp_path, **changes):
    w = make_weights()
    obj = {"format": FORMAT, "config": w.config.to_dict(), "params": w.params, "state": w.state,
           "classes": w.classes, "preprocess": w.preprocess, "data": None, "metrics": None}
    obj.update(changes)
    torch.save(obj, tmp_path / "bad.pkl")


def _resnet_state_dict(tmp_path):
    from torchvision.models import resnet18

    torch.save(resnet18(num_classes=10).state_dict(), tmp_path / "bad.pkl")


BAD_FILES = {
    "empty": (lambda tmp: (tmp / "bad.pkl").write_bytes(b""), "is empty"),
    "truncated": (lambda tmp: (tmp / "bad.pkl").write_bytes(_valid(tmp)[:3000]), "truncated"),
    "text": (lambda tmp: (tmp / "bad.pkl").write_text("hello, I am not a model\n"), "not a file written by torch"),
    "other architecture": (_resnet_state_dict, "no format field"),
    "shapes contradict config": (
        lambda tmp: _payload(tmp, config={**make_weights().config.to_dict(), "alpha": 0.5}),
        "the config implies"),
    "missing block": (lambda tmp: _payload(tmp, params={**make_weights().params,
                                                        "blocks": make_weights().params["blocks"][:-1]}),
                      "['blocks'][12]"),
    "invalid config": (lambda tmp: _payload(tmp, config={"alpha": -1.0}), "invalid config"),
    "unknown config key": (lambda tmp: _payload(tmp, config={"depth": 3}), "unknown config keys"),
    "class count": (lambda tmp: _payload(tmp, classes=["a"]), "1 class names for 3 classes"),
    "newer format": (lambda tmp: _payload(tmp, format="mobilenet-fn/9"), "upgrade"),
    "not a dict": (lambda tmp: torch.save([torch.ones(1)], tmp / "bad.pkl"), "not a dict"),
    "integer tensor": (lambda tmp: _payload(tmp, state={**make_weights().state, "stem": {"bn": {
        "mean": torch.zeros(8, dtype=torch.long), "var": torch.ones(8)}}}), "not a floating-point tensor"),
    "no preprocess": (lambda tmp: _payload(tmp, preprocess={"resolution": 32}), "preprocess lacks"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_weights_file_is_one_line_exit_2(tmp_path, case):
    make, needle = BAD_FILES[case]
    make(tmp_path)
    path = tmp_path / "bad.pkl"
    with pytest.raises(WeightsError) as info:
        load_weights(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message
    (tmp_path / "img.png").write_bytes(b"")
    one_line_error(runner.invoke(app, ["predict", str(path), str(tmp_path / "img.png")]), str(path), needle)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(tmp_path / "nope.pkl")
    with pytest.raises(WeightsError, match="is a folder"):
        load_weights(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Hostile pickles: refused by reading their opcodes, and never executed


class _CreatesFile:
    """Unpickling this object opens (creates) a file: the kind of code a hostile .pkl carries."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def _write_plain_pickle(path, target):
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "params": _CreatesFile(target)}, f)


def _write_torch_archive(path, target):
    torch.save({"format": FORMAT, "params": {"w": torch.ones(2)}, "x": _CreatesFile(target)}, path)


@pytest.mark.parametrize("write", [_write_plain_pickle, _write_torch_archive], ids=["plain pickle", "torch.save"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, write):
    # The payload is live: an unsafe load (plain pickle, or torch.load without weights_only) creates the file.
    write(tmp_path / "probe.pkl", tmp_path / "probe-created")
    if zipfile.is_zipfile(tmp_path / "probe.pkl"):
        torch.load(tmp_path / "probe.pkl", weights_only=False)
    else:
        pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert (tmp_path / "probe-created").exists()

    target = tmp_path / "pwned"
    write(tmp_path / "evil.pkl", target)
    assert any(g.endswith(".open") for g in pickle_globals(tmp_path / "evil.pkl"))
    with pytest.raises(WeightsError, match=r"would run code"):
        load_weights(tmp_path / "evil.pkl")
    one_line_error(runner.invoke(app, ["convert", str(tmp_path / "evil.pkl"), "-o", str(tmp_path / "w.pkl")]),
                   "would run code", "open")
    (tmp_path / "img.png").write_bytes(b"")
    one_line_error(runner.invoke(app, ["predict", str(tmp_path / "evil.pkl"), str(tmp_path / "img.png")]),
                   "would run code")
    assert not target.exists() and not (tmp_path / "w.pkl").exists()


class Net(torch.nn.Module):
    """What the original project pickled: a whole module of its own class."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)


@pytest.mark.parametrize("module", [Net, lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))],
                         ids=["own class", "torch class"])
def test_a_whole_pickled_module_is_refused_with_what_to_do(tmp_path, module):
    torch.save(module(), tmp_path / "model.pkl")
    result = runner.invoke(app, ["convert", str(tmp_path / "model.pkl"), "-o", str(tmp_path / "w.pkl")])
    one_line_error(result, "would run code", "state_dict")
    assert ("test_weights.Net" if module is Net else "torch.nn.modules.container.Sequential") in result.output
