"""`mobilenet-fn train` end to end on a tiny folder of pictures (α 0.25, 32 px: a run takes seconds)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_trees_close, stop, training_process
from mobilenet_fn import batches as batch_lib
from mobilenet_fn.cli.main import app
from mobilenet_fn.checkpoint import load_checkpoint
from mobilenet_fn.weights import load_weights
from test_weights import one_line_error

pytestmark = pytest.mark.kernels  # trains: .ci/run runs these again with AVX2 kernels

runner = CliRunner()
FAST = ["--alpha", "0.25", "--batch-size", "8", "--device", "cpu", "--compile", "off", "--workers", "0",
        "--resolution", "32"]
TINY: Path  # the folder every train() reads unless given --data: made once per session (``tiny_folder``)


@pytest.fixture(scope="module", autouse=True)
def tiny_folder(tmp_path_factory):
    """48 pictures of 40 x 40 in 4 classes: 4 or 5 training batches of 8 an epoch, seconds per run."""
    global TINY
    TINY = _colour_folder(tmp_path_factory.mktemp("tiny") / "data", n=12, classes=4)
    return TINY


def train(*args):
    """``mobilenet-fn train`` quickly, on TINY unless ``args`` has --data (a later flag overrides FAST's)."""
    data = [] if "--data" in map(str, args) else ["--data", TINY]
    return runner.invoke(app, ["train", *FAST, *map(str, data), *map(str, args)])


def _interrupt_after(monkeypatch, epoch: int, batches: int):
    """Ctrl-C once ``batches`` batches of ``epoch`` (0-based) have been trained on."""
    real = batch_lib.batches

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if kwargs.get("train") and kwargs["epoch"] == epoch and i == batches:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(batch_lib, "batches", interrupted)


# Every training ingredient at once: on the device for in-memory and cached data, in the workers with --cache off.
EVERYTHING = ["--auto-augment", "trivial", "--reprob", "0.5", "--mixup", "0.2", "--cutmix", "1.0", "--ema", "0.9",
              "--clip-grad", "2.0"]


@pytest.mark.slow
def test_run_folder_and_resume_after_ctrl_c_is_bit_identical(tmp_path, monkeypatch):
    straight = train("--epochs", 2, "--batch-size", 4, *EVERYTHING, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "straight"
    assert {p.name for p in run.iterdir()} >= {"config.json", "split.json", "metrics.jsonl", "last.ckpt",
                                              "best.ckpt", "weights.pkl", "curves.png"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "seconds"):
        assert key in lines[0]
    assert all(0 <= m[k] <= 1 for m in lines for k in ("train_top1", "val_top1", "val_top5"))

    with monkeypatch.context() as m:
        _interrupt_after(m, epoch=1, batches=5)  # mid-epoch 2: only the Ctrl-C handler can have saved this
        stopped = train("--epochs", 2, "--batch-size", 4, *EVERYTHING, "--out", tmp_path / "resumed")
    assert stopped.exit_code == 130
    assert "--resume" in stopped.output
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 5)
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "resumed"), "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    a = load_checkpoint(run / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert "ema" in a["opt_state"]
    assert_trees_close((a["params"], a["state"], a["opt_state"]), (b["params"], b["state"], b["opt_state"]),
                       atol=0, rtol=0)


@pytest.mark.slow
def test_with_ema_validation_best_ckpt_and_weights_use_the_average(tmp_path):
    assert train("--epochs", 1, "--ema", "0.9", "--out", tmp_path / "run").exit_code == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["val_weights"] == "ema"
    best, weights = load_checkpoint(run / "best.ckpt"), load_weights(run / "weights.pkl")
    kept = best["opt_state"]["ema"]
    assert_trees_close((weights.params, weights.state), (kept["params"], kept["state"]), atol=0, rtol=0)
    assert not torch.equal(weights.params["fc"]["weight"], best["params"]["fc"]["weight"])
    result = runner.invoke(app, ["eval", str(run / "weights.pkl"), "--json", "--device", "cpu"])
    assert json.loads(result.stdout)["top1"] == pytest.approx(metrics["val_top1"], abs=1e-9)
    converted = runner.invoke(app, ["convert", str(run / "best.ckpt"), "-o", str(tmp_path / "c.pkl")])
    assert converted.exit_code == 0, converted.output
    assert_trees_close(load_weights(tmp_path / "c.pkl").params, kept["params"], atol=0, rtol=0)


def test_a_config_file_sets_options_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('epochs = 1\nlabel-smoothing = 0.0\nreprob = 0.25\nema = 0.5\nbatch_size = 100\n'
                      'lr = 0.3\ncrop-scale = 0.6\n')
    result = train("--config", recipe, "--lr", "0.02", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    opts = config["train"]
    assert (opts["epochs"], opts["label_smoothing"], opts["reprob"], opts["ema"]) == (1, 0.0, 0.25, 0.5)
    assert opts["crop_scale"] == 0.6
    assert opts["lr"] == 0.02 and opts["batch_size"] == 8  # given as flags (FAST has --batch-size 8)
    assert config["recipe"] == str(recipe)


@pytest.mark.parametrize("text, message", [
    ("epochs = 1\nwarp-speed = 9\n", "unknown option(s) warp-speed"),
    ("epochs = [1, 2]\n", "epochs must be a single value"),
    ("epochs = \n", "not valid TOML"),
    ("reprob = 2.0\n", "--reprob must be in [0, 1]"),
    ("crop-scale = 0\n", "--crop-scale must be in (0, 1]"),
    ("auto-augment = \"rand\"\n", "--auto-augment must be one of none, trivial"),
])
def test_a_bad_config_file_is_one_line_exit_2(tmp_path, text, message):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    result = train("--config", recipe, "--out", tmp_path / "run")
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()
    missing = train("--config", tmp_path / "nope.toml", "--out", tmp_path / "run")
    one_line_error(missing, "no such file")


@pytest.mark.slow
def test_weights_are_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    # Real training, with validation results crafted so that epoch 2 is worse than epoch 1.
    from mobilenet_fn.train import Trainer

    real = Trainer.validate
    top1 = {1: 0.9, 2: 0.1}

    def validate(self, source, params=None, state=None):
        result = real(self, source, params, state)
        return {**result, "top1": top1[self.epoch]} if source is self.dataset.val else result

    monkeypatch.setattr(Trainer, "validate", validate)
    result = train("--epochs", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "Best val top-1 90.00% (epoch 1)" in result.output
    run = tmp_path / "run"
    best, last, weights = (load_checkpoint(run / "best.ckpt"), load_checkpoint(run / "last.ckpt"),
                           load_weights(run / "weights.pkl"))
    assert (best["epoch"], last["epoch"]) == (1, 2)
    assert_trees_close((weights.params, weights.state), (best["params"], best["state"]), atol=0, rtol=0)
    assert not torch.equal(weights.params["fc"]["weight"], last["params"]["fc"]["weight"])
    assert not torch.equal(weights.state["stem"]["bn"]["mean"], last["state"]["stem"]["bn"]["mean"])
    assert weights.metrics["epoch"] == 1 and weights.metrics["val_top1"] == 0.9


@pytest.mark.slow
def test_one_epoch_then_resume_with_more_epochs_is_bit_identical(tmp_path):
    # A constant schedule does not depend on the total, so raising --epochs on resume changes nothing.
    assert train("--epochs", 2, "--schedule", "constant", "--out", tmp_path / "a").exit_code == 0
    assert train("--epochs", 1, "--schedule", "constant", "--out", tmp_path / "b").exit_code == 0
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "b"), "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    a, b = load_checkpoint(tmp_path / "a" / "last.ckpt"), load_checkpoint(tmp_path / "b" / "last.ckpt")
    assert b["epoch"] == 2
    assert_trees_close(a["params"], b["params"], atol=0, rtol=0)


@pytest.mark.slow
def test_a_cuda_graph_run_resumes_on_the_cpu(tmp_path):
    from mobilenet_fn.checkpoint import save_checkpoint

    assert train("--epochs", 1, "--out", tmp_path / "run").exit_code == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    save_checkpoint(tmp_path / "run" / "last.ckpt", {**ckpt, "run": {**ckpt["run"], "compile": "cudagraphs"}})
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["epoch"] == 2


@pytest.mark.slow
def test_weights_reproduce_the_reported_validation_accuracy(tmp_path):
    assert train("--epochs", 1, "--out", tmp_path / "run").exit_code == 0
    reported = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]
    result = runner.invoke(app, ["eval", str(tmp_path / "run" / "weights.pkl"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == pytest.approx(reported, abs=1e-9)


@pytest.mark.slow
def test_compiles_once_over_two_epochs_with_a_changing_learning_rate(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # Dynamo's graphs are what is counted; eager runs them at once, where Inductor would take a minute to compile.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **{**options, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    result = train("--compile", "on", "--epochs", "2", "--out", tmp_path / "run",
                   "--ema", "0.99", "--clip-grad", "1", "--mixup", "0.2", "--reprob", "0.25")
    assert result.exit_code == 0, result.output
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] != lrs[1]
    assert counters["stats"]["unique_graphs"] == 1


def test_existing_out_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    one_line_error(train("--epochs", 1, "--out", tmp_path / "taken"), "--resume")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def _image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "one-class"])
def test_bad_data_is_one_line_exit_2(tmp_path, case):
    target = tmp_path / "data"
    if case == "file":
        target.write_text("not a folder")
    elif case == "empty":
        target.mkdir()
    elif case == "one-class":
        for i in range(4):
            _image(target / "cats" / f"{i}.png", (i, 0, 0))
    one_line_error(train("--data", target, "--epochs", 1, "--out", tmp_path / "run"), str(target))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [["--batch-size", "1"], ["--lr", "-1"], ["--optimizer", "lion"], ["--alpha", "0"],
                                  ["--device", "cuda:7"], ["--augment", "lots"],
                                  ["--compile", "cudagraphs", "--device", "cpu"]])
def test_bad_options_are_one_line_exit_2(tmp_path, args):
    one_line_error(runner.invoke(app, ["train", "--epochs", "1", *args, "--out", str(tmp_path / "run")]), args[0].lstrip("-"))
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_a_message_and_keeps_no_bad_weights(tmp_path):
    result = train("--epochs", 1, "--lr", "1e30", "--label-smoothing", "0", "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert "NaN" in result.output
    assert not (tmp_path / "run" / "weights.pkl").exists()


def test_folder_with_corrupt_images_trains_and_records_the_split(tmp_path):
    root = tmp_path / "photos"
    for c, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for i in range(20):
            _image(root / c / f"{i:02d}.png", tuple(max(0, v - 3 * i) for v in color))
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "blue" / "labels.csv").write_text("not an image")
    result = train("--data", root, "--resolution", "32", "--batch-size", "8", "--epochs", "1",
                   "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "Skipped 1 unreadable image" in result.output
    assert "Ignored 1 file(s) that are not images" in result.output and "labels.csv" in result.output
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["skipped_files"] == 1
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["kind"] == "split" and len(split["val"]) == 2 * 4 + 0  # 20% of 20 (+ the broken file: 21)
    w = load_weights(tmp_path / "run" / "weights.pkl")
    assert w.classes == ["blue", "red"] and w.config.num_classes == 2


def test_fine_tune_from_weights_reinitialises_a_different_head(tmp_path):
    assert train("--epochs", 1, "--out", tmp_path / "base").exit_code == 0
    root = tmp_path / "two"
    for c, color in (("a", (250, 250, 250)), ("b", (0, 0, 0))):
        for i in range(10):
            _image(root / c / f"{i}.png", color)
    result = runner.invoke(app, ["train", "--init", str(tmp_path / "base" / "weights.pkl"), "--freeze-backbone",
                                 "--data", str(root), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                                 "--workers", "0", "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    base, ft = load_weights(tmp_path / "base" / "weights.pkl"), load_weights(tmp_path / "ft" / "weights.pkl")
    assert ft.config.num_classes == 2 and ft.config.alpha == base.config.alpha
    assert torch.equal(ft.params["blocks"][3]["pw"]["weight"], base.params["blocks"][3]["pw"]["weight"])
    assert_trees_close(ft.state, base.state, atol=0, rtol=0)
    clash = runner.invoke(app, ["train", "--init", str(tmp_path / "base" / "weights.pkl"), "--alpha", "1",
                                "--out", str(tmp_path / "x")])
    one_line_error(clash, "--alpha")


def test_fine_tuning_converted_timm_weights_trains_a_new_head_on_the_kept_backbone(tmp_path):
    timm = pytest.importorskip("timm")
    from mobilenet_fn import layers

    model = timm.create_model("mobilenetv1_100", num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    assert runner.invoke(app, ["convert", str(tmp_path / "timm.pth"), "-o", str(tmp_path / "timm.pkl")]).exit_code == 0
    result = runner.invoke(app, ["train", "--init", str(tmp_path / "timm.pkl"), "--freeze-backbone", "--data", str(TINY),
                                 "--resolution", "32", "--batch-size", "8", "--epochs", "1", "--device", "cpu",
                                 "--compile", "off", "--workers", "0", "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    tuned, start = load_weights(tmp_path / "ft" / "weights.pkl"), load_weights(tmp_path / "timm.pkl")
    assert tuned.config.activation == "relu6" and tuned.config.alpha == 1.0 and tuned.config.num_classes == 4
    # timm's backbone, kept as converted; a 4-class head drawn anew (seed 0) and then trained.
    assert_trees_close({k: v for k, v in tuned.params.items() if k != "fc"},
                       {k: v for k, v in start.params.items() if k != "fc"}, atol=0, rtol=0)
    assert_trees_close(tuned.state, start.state, atol=0, rtol=0)
    drawn = layers.linear_init(1024, 4, torch.Generator().manual_seed(0))
    assert drawn["weight"].shape == tuned.params["fc"]["weight"].shape
    assert not torch.equal(drawn["weight"], tuned.params["fc"]["weight"])


def _colour_folder(root, n=20, classes=2):
    """``classes`` classes of noisy pictures (a random crop or flip of each changes its pixels), n each: red ones,
    blue ones, green ones, then dark ones."""
    g = torch.Generator().manual_seed(0)
    for c, channel in list((("red", 0), ("blue", 2), ("green", 1), ("dark", None))[:classes]):
        for i in range(n):
            pixels = torch.randint(0, 120, (40, 40, 3), dtype=torch.uint8, generator=g)
            if channel is not None:
                pixels[..., channel] += 120
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(root / c / f"{i:02d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("workers, cache, extra", [(0, "off", []), (1, "off", []), (2, "off", EVERYTHING),
                                                   (0, "ram", []), (0, "disk", EVERYTHING)])
def test_a_folder_run_stopped_mid_epoch_resumes_bit_identically(tmp_path, monkeypatch, workers, cache, extra):
    # Each image's augmentation is drawn from (seed, epoch, image) with --cache off, from (seed, epoch, batch)
    # through the decoded cache: not from the worker that loads it, nor from where in the epoch the run started.
    # Dropout draws from torch's RNG, which the checkpoint restores.
    root = _colour_folder(tmp_path / "photos")
    args = ["--data", root, "--resolution", "32", "--batch-size", "8", "--epochs", "2", "--workers", workers,
            "--dropout", "0.2", "--cache", cache, *extra]
    assert train(*args, "--out", tmp_path / "straight").exit_code == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, epoch=1, batches=2)
        stopped = train(*args, "--out", tmp_path / "resumed")
    assert stopped.exit_code == 130 and "--resume" in stopped.output
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 2)  # written by the Ctrl-C handler, mid-epoch
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "resumed"), "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    a, b = load_checkpoint(tmp_path / "straight" / "last.ckpt"), load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    assert_trees_close((a["params"], a["state"], a["opt_state"]), (b["params"], b["state"], b["opt_state"]),
                       atol=0, rtol=0)


@pytest.mark.slow
def test_sigterm_saves_the_position_says_how_to_resume_and_exits_143(tmp_path):
    import sys

    root = _colour_folder(tmp_path / "photos", n=60)  # 96 training images: 24 steps of 4 an epoch
    run = tmp_path / "run"
    # Its own process group, signalled as a whole, as schedulers do: the loader's worker gets SIGTERM too.
    with training_process([sys.executable, "-m", "mobilenet_fn", "train", *FAST[:-2], "--workers", "1",
                           "--cache", "off",
                           "--data", root, "--resolution", "32", "--batch-size", "4", "--epochs", "100",
                           "--out", run], run) as proc:
        first_written = (run / "last.ckpt").stat().st_mtime_ns
        first = load_checkpoint(run / "last.ckpt")["step"]  # the end of epoch 1 or later (each write is whole)
        stderr = stop(proc, after=1.5)  # in epoch 2 or later: in a step, in validation or between epochs
    assert proc.returncode == 143, stderr[-2000:]
    assert "Interrupted. Saved" in stderr and f"--resume {run}" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(run / "last.ckpt")
    # Written again, where the signal stopped the run (on a loaded machine that may be before epoch 2's first step)
    assert (run / "last.ckpt").stat().st_mtime_ns > first_written and ckpt["step"] >= first
    assert ckpt["step"] == ckpt["epoch"] * 24 + ckpt["batch_in_epoch"] and ckpt["epoch"] >= 1


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_shipped_recipes_name_only_trains_options_with_valid_values(recipe):
    import dataclasses
    import inspect
    import tomllib

    from mobilenet_fn.cli.train import train as command
    from mobilenet_fn.options import TrainOptions

    values = {k.replace("-", "_"): v for k, v in tomllib.loads(recipe.read_text()).items()}
    assert set(values) <= set(inspect.signature(command).parameters) - {"config", "resume"}
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in values.items() if k in fields})
    assert opts.data == "fashion-mnist" and opts.ema > 0


def test_train_takes_its_defaults_from_train_options():
    import dataclasses
    import inspect

    from mobilenet_fn.cli.train import train as command
    from mobilenet_fn.options import DEFAULTS

    cli = {name: p.default for name, p in inspect.signature(command).parameters.items()}
    shared = [f.name for f in dataclasses.fields(DEFAULTS) if f.name in cli]
    assert len(shared) > 20
    special = {"epochs": None, "batch_size": str(DEFAULTS.batch_size), "device": "auto"}  # resolved in the command
    for name in shared:
        assert cli[name] == special.get(name, getattr(DEFAULTS, name)), name
    assert DEFAULTS.lr == 0.1  # what users got from the command line before the defaults moved here
