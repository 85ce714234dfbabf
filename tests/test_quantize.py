"""int8 ONNX (`quantize`) and ONNX files in `eval` and `predict`: outputs against `apply`, the metadata that makes
an ONNX file usable alone, the check that keeps a bad int8 model from being written, and bad input."""

import csv
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mobilenet_fn import Config, apply, save_weights
from mobilenet_fn.cli.main import app
from mobilenet_fn.data import load, preprocess_for
from test_weights import make_weights, one_line_error

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
runner = CliRunner()
STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210), "grey": (128, 128, 128)}


def colour_folders(root, per_class=40, seed=0):
    """A data set a tiny model learns in a few steps: one class folder per colour, 36 x 36 images of that colour
    at a random brightness, a tenth of the pixels replaced by noise."""
    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.tensor(rgb, dtype=torch.float).view(1, 1, 3) * (0.6 + 0.8 * torch.rand(1, generator=g))
            pixels = pixels.expand(36, 36, 3).clone()
            noisy = torch.rand(36, 36, generator=g) < 0.1
            pixels[noisy] = torch.rand(int(noisy.sum()), 3, generator=g) * 255
            Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """(data folder, weights): α 0.25 at 32 px, trained for 30 full-batch steps on the training part of the colour
    folders (what ``quantize --calibrate`` draws from), then BatchNorm's running statistics set to those of that
    part (one pass in training mode with momentum 1), so that its predictions mean something: 100 % on the rest."""
    from mobilenet_fn.data import batches
    from mobilenet_fn.optim import sgd
    from mobilenet_fn.step import build_step, device_policy, initial_state
    from mobilenet_fn.weights import Weights

    root = colour_folders(tmp_path_factory.mktemp("colours") / "data")
    ds = load(str(root))
    cfg = Config(alpha=0.25, resolution=32, num_classes=len(ds.classes))
    pre = preprocess_for(32, crop_pct=1.0, stats=STATS)
    train = next(batches(ds.train, pre, batch_size=len(ds.train), train=False))
    optimizer = sgd(momentum=0.9, nesterov=True)
    params, state, opt_state = initial_state(cfg, optimizer, "cpu", seed=0)
    step = build_step(cfg, optimizer, device_policy(torch.device("cpu"), compile="off", amp="off"))
    for _ in range(30):
        params, state, opt_state, _ = step(params, state, opt_state, (train.x, train.y), torch.tensor(0.1))
    _, state = apply(cfg.replace(bn_momentum=1.0), params, state, train.x, train=True)
    return root, Weights(cfg, params, state, ds.classes, pre)


@pytest.fixture
def trained(tmp_path, colours):
    save_weights(tmp_path / "w.pkl", colours[1])
    return colours


def trained_like(cfg: Config, classes: list[str], seed: int = 0):
    """Random weights with the given class names and ``STATS`` preprocessing (crop_pct 1)."""
    w = make_weights(cfg, seed)
    return w._replace(classes=list(classes), preprocess=preprocess_for(cfg.resolution, crop_pct=1.0, stats=STATS))


def class_folders(root, classes, per_class=4, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
            Image.fromarray(pixels.numpy()).save(root / c / f"{i}.png")
    return root


def quantize(tmp_path, data, *extra):
    return invoke("quantize", tmp_path / "w.pkl", "--calibrate", data, "-o", tmp_path / "m.int8.onnx", *extra)


def test_export_carries_classes_and_preprocessing_and_runs_as_apply(tmp_path):
    from mobilenet_fn.onnx_model import load_onnx

    w = trained_like(Config(alpha=0.25, resolution=32, num_classes=6), list("abcdef"), seed=2)
    w = w._replace(params={**w.params, "fc": {"weight": w.params["fc"]["weight"] * 10, "bias": w.params["fc"]["bias"]}})
    save_weights(tmp_path / "w.pkl", w)
    assert invoke("export", tmp_path / "w.pkl", "-o", tmp_path / "m.onnx").exit_code == 0
    model = load_onnx(tmp_path / "m.onnx")
    assert (model.config, model.classes, model.preprocess) == (w.config, w.classes, w.preprocess)
    assert model.quantization is None
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(x), apply(w.config, w.params, w.state, x, train=False)[0],
                               atol=1e-4, rtol=1e-4)


def test_int8_model_tracks_apply_and_is_per_channel(tmp_path, trained):
    from mobilenet_fn.data import batches
    from mobilenet_fn.onnx_model import load_onnx

    data, w = trained
    result = quantize(tmp_path, data, "--json", "--images", 100)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 32 and report["float_top1"] > 0.9  # the validation fifth of 160 images; a real model
    assert report["agreement"] >= 0.98 and report["drop"] <= 0.01  # the default check passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "w.pkl"]  # no temporary file left

    graph = onnx.load(tmp_path / "m.int8.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") > 27  # activations between the layers
    inits = {i.name: i for i in graph.initializer}
    stem = next(n for n in graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in graph.node if n.output[0] == stem.input[1])
    assert inits[weight_dq.input[0]].data_type == onnx.TensorProto.INT8
    assert list(inits[weight_dq.input[1]].dims) == [8]  # one scale per output channel (8 = int(32 * 0.25))
    activation_q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    assert inits[activation_q.input[2]].data_type == onnx.TensorProto.UINT8

    model = load_onnx(tmp_path / "m.int8.onnx")
    assert model.quantization["method"] == "minmax" and model.quantization["calibration_images"] == 100
    assert (model.classes, model.preprocess) == (w.classes, w.preprocess)
    x = torch.cat([b.x for b in batches(load(str(data)).val, w.preprocess, batch_size=64, train=False)])
    ref = apply(w.config, w.params, w.state, x, train=False)[0]
    out = model(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < 0.3  # int8 steps from apply's logits (8-channel layers quantize coarsely), not another model
    assert torch.equal(out.argmax(1), ref.argmax(1)) and ref.argmax(1).unique().numel() == 4


def test_eval_and_predict_run_onnx_files_as_the_weights(tmp_path):
    w = trained_like(Config(alpha=0.25, resolution=32, num_classes=3), ["cat", "dog", "fox"], seed=4)
    save_weights(tmp_path / "w.pkl", w)
    data = class_folders(tmp_path / "data", w.classes, size=32)
    assert invoke("export", tmp_path / "w.pkl", "-o", tmp_path / "m.onnx", "--fold-bn").exit_code == 0
    by_weights = json.loads(invoke("eval", tmp_path / "w.pkl", "--data", data, "--json", "--device", "cpu").stdout)
    result = invoke("eval", tmp_path / "m.onnx", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    by_onnx = json.loads(result.stdout)
    assert by_onnx["n"] == 12 and by_onnx["top1"] == by_weights["top1"] and by_onnx["per_class"] == by_weights[
        "per_class"]
    assert by_onnx["loss"] == pytest.approx(by_weights["loss"], abs=1e-4)

    result = invoke("predict", tmp_path / "m.onnx", data, "--top", 2, "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == 12
    pixels = torch.from_numpy(__import__("numpy").array(Image.open(data / "dog" / "1.png"))).permute(2, 0, 1)
    x = (pixels[None].float() / 255 - torch.tensor(STATS["mean"]).view(3, 1, 1)) / torch.tensor(
        STATS["std"]).view(3, 1, 1)
    probs = apply(w.config, w.params, w.state, x, train=False)[0].softmax(-1)[0]
    dog = next(p for p in predictions if p["path"] == str(data / "dog" / "1.png"))
    assert [t["index"] for t in dog["top"]] == probs.topk(2).indices.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in dog["top"]]), probs.topk(2).values,
                               atol=1e-5, rtol=1e-4)


def test_predict_one_table_and_csv(tmp_path):
    w = trained_like(Config(alpha=0.25, resolution=32, num_classes=3), ["cat", "dog", "fox"], seed=4)
    save_weights(tmp_path / "w.pkl", w)
    data = class_folders(tmp_path / "data", w.classes, per_class=2, size=32)
    result = invoke("predict", tmp_path / "w.pkl", data, "--top", 2, "--csv", tmp_path / "out.csv", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.count("┏") == 1  # one table
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "class_1", "prob_1", "class_2", "prob_2"] and len(rows) == 7
    table_rows = [line.split("│")[1:-1] for line in result.output.splitlines() if line.startswith("│")]
    assert [[cell.strip() for cell in r] for r in table_rows] == rows[1:]  # the same rows
    assert all(float(r[2]) >= float(r[4]) for r in rows[1:])
    one_line_error(invoke("predict", tmp_path / "w.pkl", data, "--csv", tmp_path / "out.csv"), "--force")
    assert invoke("predict", tmp_path / "w.pkl", data, "--csv", tmp_path / "out.csv", "--force").exit_code == 0


def test_a_failed_check_writes_nothing(tmp_path, trained):
    result = quantize(tmp_path, trained[0], "--min-agreement", 1.01)
    assert result.exit_code == 1 and "not written" in result.output and "agreement ≥ 101.0%" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pkl"]


def test_bad_calibration_data_is_one_line_and_writes_nothing(tmp_path, trained):
    (tmp_path / "empty").mkdir()
    one_line_error(quantize(tmp_path, tmp_path / "empty"), "no images found")
    one_line_error(quantize(tmp_path, tmp_path / "missing"), "no such folder")
    broken = tmp_path / "broken"
    for c in COLOURS:
        (broken / c).mkdir(parents=True)
        for i in range(3):
            (broken / c / f"{i}.png").write_bytes(b"\x89PNG not really")
    one_line_error(quantize(tmp_path, broken), "no readable images")
    one_line_error(quantize(tmp_path, "sample"), "10 classes do not match the weights' 4")
    one_line_error(quantize(tmp_path, trained[0], "--method", "magic"), "--method")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "w.pkl"]
    (tmp_path / "m.int8.onnx").write_text("precious")
    one_line_error(quantize(tmp_path, trained[0]), "--force")
    assert (tmp_path / "m.int8.onnx").read_text() == "precious"


def test_onnx_files_from_elsewhere_are_one_line(tmp_path):
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "other", [image], [logits])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "other.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07 not protobuf")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    for command in (["eval", "--data", tmp_path], ["predict", tmp_path / "x.png"]):
        one_line_error(invoke(command[0], tmp_path / "other.onnx", *command[1:]), "not an ONNX file from mobilenet-fn")
        one_line_error(invoke(command[0], tmp_path / "garbage.onnx", *command[1:]), "onnxruntime cannot read")
        one_line_error(invoke(command[0], tmp_path / "none.onnx", *command[1:]), "no such file")

    ours = make_weights(Config(alpha=0.25, resolution=32, num_classes=3))
    save_weights(tmp_path / "w.pkl", ours)
    assert invoke("export", tmp_path / "w.pkl", "-o", tmp_path / "m.onnx").exit_code == 0
    model = onnx.load(tmp_path / "m.onnx")
    meta = next(p for p in model.metadata_props if p.key == "mobilenet_fn")
    meta.value = meta.value.replace('"classes": ["c0", "c1", "c2"]', '"classes": ["c0"]')
    onnx.save(model, tmp_path / "m.onnx")
    one_line_error(invoke("predict", tmp_path / "m.onnx", tmp_path / "x.png"), "1 class names for 3 classes")
    one_line_error(invoke("eval", tmp_path / "m.onnx", "--data", tmp_path, "--device", "cuda"), "--device cpu")
