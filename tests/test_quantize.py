"""int8 ONNX (`quantize`) and ONNX files in `eval` and `predict`: outputs against `apply`, the metadata that makes
an ONNX file usable alone, the check that keeps a bad int8 model from being written, and bad input."""

import csv
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mobilenet_fn import Config, apply, init, save_weights
from mobilenet_fn.cli.main import app
from mobilenet_fn.data import load
from mobilenet_fn.preprocess import preprocess_for
from test_weights import make_weights, one_line_error

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.kernels  # quantizes: .ci/run runs these again with AVX2 kernels
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
runner = CliRunner()
STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210), "grey": (128, 128, 128)}
GREY_LOGIT = 3.0  # the grey class's constant logit; a colour's is its chromatic part, which is 0 for grey


def colour_folders(root, per_class=40, seed=0):
    """One class folder per colour: 36 x 36 images of that colour at a random brightness (0.6 to 1.4 times), each
    pixel jittered by up to 8 levels."""
    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.tensor(rgb, dtype=torch.float).view(1, 1, 3) * (0.6 + 0.8 * torch.rand(1, generator=g))
            pixels = pixels + 16 * torch.rand(36, 36, 3, generator=g) - 8
            Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


def colour_reader(classes: list[str]):
    """Weights built, not trained, that tell the colours apart by a wide margin whatever the CPU's kernels: α 0.25
    at 32 px, ``STATS`` preprocessing. The stem copies each normalised input channel x into two channels, relu(x)
    and relu(-x); every depthwise filter is its centre tap and every pointwise layer the identity on those six,
    so the pooled features are relu(±x) of the top-left pixel. The classifier scores a colour class by the
    pixel's chromatic part (its RGB minus their mean) projected on the class's, over 1000: at least 6.9 for its
    own colour at the dimmest brightness, 0 for grey and below 0 for the others, against grey's constant 3.

    The first pointwise layer also holds a dead channel, as trained networks do: weights of 1000 on those six
    inputs and a bias that keeps it below 0, so that ReLU zeroes it. Quantized per channel it is harmless;
    with one range per tensor, its weights set the scale and every other weight of the layer rounds to 0."""
    from mobilenet_fn.weights import Weights

    cfg = Config(alpha=0.25, resolution=32, num_classes=len(classes))
    params, state = init(cfg)
    bn_params = [params["stem"]["bn"]] + [b[k] for b in params["blocks"] for k in ("dw_bn", "pw_bn")]
    bn_states = [state["stem"]["bn"]] + [b[k] for b in state["blocks"] for k in ("dw_bn", "pw_bn")]
    for bn, bn_state in zip(bn_params, bn_states):  # BatchNorm as the identity: it folds into scale 1, shift 0
        bn["weight"], bn["bias"] = torch.ones_like(bn["weight"]), torch.zeros_like(bn["bias"])
        bn_state["mean"], bn_state["var"] = torch.zeros_like(bn_state["mean"]), torch.full_like(
            bn_state["var"], 1 - cfg.bn_eps)
    stem = torch.zeros_like(params["stem"]["conv"]["weight"])  # (8, 3, 3, 3)
    for k in range(3):
        stem[2 * k, k, 1, 1], stem[2 * k + 1, k, 1, 1] = 1.0, -1.0
    params["stem"]["conv"]["weight"] = stem
    for block in params["blocks"]:
        block["dw"]["weight"] = torch.zeros_like(block["dw"]["weight"])  # (C, 3, 3)
        block["dw"]["weight"][:, 1, 1] = 1.0
        block["pw"]["weight"] = torch.zeros_like(block["pw"]["weight"])  # (C_out, C_in)
        block["pw"]["weight"][range(6), range(6)] = 1.0
    dead = params["blocks"][0]
    dead["pw"]["weight"][6, :6] = 1000.0
    dead["pw_bn"]["bias"][6] = -1000.0 * 6 * 10  # each input is relu(±x) with |x| < 10

    # logit_c = u_c . rgb / 1000 with rgb = 255 (mean + std x) and x = relu(x) - relu(-x): affine in the features
    mean, std = torch.tensor(STATS["mean"]), torch.tensor(STATS["std"])
    weight, bias = torch.zeros(cfg.num_classes, cfg.feature_dim), torch.zeros(cfg.num_classes)
    for c, name in enumerate(classes):
        rgb = torch.tensor(COLOURS[name], dtype=torch.float)
        u = rgb - rgb.mean()
        weight[c, 0:6:2] = 255 * u * std / 1000
        weight[c, 1:6:2] = -weight[c, 0:6:2]
        bias[c] = GREY_LOGIT if name == "grey" else 255 * (u * mean).sum() / 1000
    params["fc"] = {"weight": weight, "bias": bias}
    return Weights(cfg, params, state, list(classes), preprocess_for(32, crop_pct=1.0, stats=STATS))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """(data folder, weights): the colour folders and ``colour_reader`` for their classes."""
    root = colour_folders(tmp_path_factory.mktemp("colours") / "data")
    return root, colour_reader(load(str(root)).classes)


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


def quantized_operands(path):
    """For each Conv, MatMul and Gemm of the QDQ file at ``path``: (op type, whether it is depthwise, its int8
    weight as numpy, the type of the quantized activation it reads, the number of weight scales)."""
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    operands = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            activation_dq, weight_dq = producer[node.input[0]], producer[node.input[1]]
            assert weight_dq.op_type == activation_dq.op_type == "DequantizeLinear", node.name
            activation_type = inits[activation_dq.input[2]].data_type  # the zero point's type is the tensor's
            weight = inits[weight_dq.input[0]]
            assert weight.data_type == onnx.TensorProto.INT8, node.name
            w = numpy_helper.to_array(weight)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            depthwise = node.op_type == "Conv" and group > 1 and w.shape[:2] == (group, 1)
            operands.append((node.op_type, depthwise, w, activation_type,
                             int(numpy_helper.to_array(inits[weight_dq.input[1]]).size)))
    return operands


def test_int8_file_tracks_apply_and_cannot_saturate_without_vnni(tmp_path, trained):
    from mobilenet_fn.batches import batches
    from mobilenet_fn.onnx_model import load_onnx
    from mobilenet_fn.quantize import MAX_DEPTHWISE_WEIGHT, MAX_WEIGHT

    data, w = trained
    result = quantize(tmp_path, data, "--json", "--images", 100)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 32 and report["float_top1"] == 1.0  # the validation fifth of 160 images, all told apart
    assert report["agreement"] == report["decisive_agreement"] == 1.0 and report["drop"] == 0.0
    assert report["check"] == {"statistic": "decisive_agreement", "min_agreement": 0.98, "max_drop": 0.01}
    assert report["near_tie"] == 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "w.pkl"]  # no temporary file left

    ops = [n.op_type for n in onnx.load(tmp_path / "m.int8.onnx").graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") > 27  # activations between the layers
    operands = quantized_operands(tmp_path / "m.int8.onnx")
    # the stem, 12 depthwise and 11 pointwise convolutions, the layers on 1 x 1 maps as MatMul (pointwise) and Mul
    # (the last depthwise filter: its centre tap), the classifier
    assert [(op, dw) for op, dw, *_ in operands].count(("Conv", True)) == 12
    assert [op for op, *_ in operands].count("Conv") == 24 and {op for op, *_ in operands} == {"Conv", "MatMul",
                                                                                              "Gemm"}
    for i, (op, depthwise, weight, activation_type, scales) in enumerate(operands):
        assert activation_type == onnx.TensorProto.UINT8, (i, op)
        largest = abs(weight.astype(int)).max()
        if depthwise:  # one product at a time in every MLAS depthwise kernel: the full 8 bits, used
            assert largest == MAX_DEPTHWISE_WEIGHT == 127, i
        else:  # without VNNI, ONNX Runtime adds two uint8 x int8 products in a saturating int16: unreachable
            assert 2 * 255 * largest <= 32767, (i, op)
            assert largest == MAX_WEIGHT, (i, op)  # the range is used: each layer has a weight of 1
        if op == "Conv":
            assert scales == weight.shape[0], i  # one scale per output channel
    assert operands[0][4] == 8 and not operands[0][1]  # the stem: int(32 * 0.25) output channels

    model = load_onnx(tmp_path / "m.int8.onnx")
    assert model.quantization["method"] == "minmax" and model.quantization["calibration_images"] == 100
    assert f"|w| ≤ {MAX_WEIGHT}" in model.quantization["weights"] and "VNNI" in model.quantization["assumes"]
    assert f"|w| ≤ {MAX_DEPTHWISE_WEIGHT} in depthwise" in model.quantization["weights"]
    assert (model.classes, model.preprocess) == (w.classes, w.preprocess)
    x = torch.cat([b.x for b in batches(load(str(data)).val, w.preprocess, batch_size=64, train=False)])
    ref = apply(w.config, w.params, w.state, x, train=False)[0]
    out = model(x)
    assert 0 < (out - ref).abs().max() < 0.5  # uint8 steps of features near 3 (and margins of at least 2.4)
    assert torch.equal(out.argmax(1), ref.argmax(1)) and ref.argmax(1).unique().numel() == 4


def test_depthwise_weights_are_the_convolutions_with_a_filter_per_channel(tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mobilenet_fn.export import export_onnx
    from mobilenet_fn.quantize import depthwise_weights

    w = trained_like(Config(alpha=0.25, resolution=64, num_classes=3), list("abc"))  # no 1 x 1 map: 13 Convs
    export_onnx(w, tmp_path / "m.onnx", fold_bn=True)
    quant_pre_process(str(tmp_path / "m.onnx"), str(tmp_path / "prepared.onnx"))  # as quantize_onnx reads it
    model = onnx.load(tmp_path / "prepared.onnx")
    names = depthwise_weights(model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert len(names) == 13 and all(inits[n][1:] == (1, 3, 3) for n in names)
    convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) > 13 and all(inits[n][1:] != (1, 3, 3) for n in convs if n not in names)


def test_the_check_forgives_near_ties_and_counts_decisive_flips():
    from mobilenet_fn.quantize import comparison

    p = torch.tensor([[0.40, 0.38, 0.12, 0.10],  # float's top class 0 by 0.02 over class 1: a near-tie
                      [0.70, 0.10, 0.10, 0.10],  # decisive
                      [0.10, 0.20, 0.65, 0.05],
                      [0.25, 0.25, 0.25, 0.25]])  # an exact tie: argmax picks class 0
    float_logits = p.log() + 7  # softmax gives p back
    int8_picks = torch.tensor([1, 1, 2, 3])  # a near-tie flip, a decisive flip, agreement, a flip inside a tie
    int8_logits = torch.nn.functional.one_hot(int8_picks, 4).float()
    labels = torch.tensor([1, 0, 2, 3])
    c = comparison(float_logits, int8_logits, labels, near_tie=0.05)
    assert (c.n, c.float_top1, c.int8_top1, c.agreement, c.drop) == (4, 0.5, 0.75, 0.25, -0.25)
    assert c.decisive_agreement == 0.75 and c.near_tie == 0.05
    assert c.passes(0.75, 0.0) and not c.passes(0.76, 0.0)  # the decisive flip counts; the near-ties do not
    assert not c.passes(0.5, -0.3)  # and the drop is checked too
    strict = comparison(float_logits, int8_logits, labels, near_tie=0.0)
    assert strict.decisive_agreement == strict.agreement == 0.25  # --near-tie 0: every disagreement counts
    assert comparison(float_logits, int8_logits, labels, near_tie=0.7).decisive_agreement == 1.0


def test_one_weight_range_per_tensor_is_refused(tmp_path, colours):
    """A dead channel with large weights (as trained networks have) sets a shared weight range for its whole layer:
    every other weight of it rounds to 0, and the check must see the damage."""
    from onnxruntime import quantization as q

    from mobilenet_fn.export import export_onnx
    from mobilenet_fn.onnx_model import description, load_onnx, write_description
    from mobilenet_fn.quantize import calibration_inputs, compare, quantization_sources
    from mobilenet_fn.quantize_options import MIN_AGREEMENT

    data, w = colours
    export_onnx(w, tmp_path / "float.onnx", fold_bn=True)
    calibration, held_out = quantization_sources(str(data), w.classes)
    batches = iter(calibration_inputs(calibration, w.preprocess))

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return {"image": x} if (x := next(batches, None)) is not None else None

    q.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "tensor.onnx"), Reader(),
                      quant_format=q.QuantFormat.QDQ, per_channel=False, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    write_description(tmp_path / "tensor.onnx", description(w))
    result = compare(load_onnx(tmp_path / "float.onnx"), load_onnx(tmp_path / "tensor.onnx"), held_out)
    assert result.float_top1 == 1.0 and result.decisive_agreement < MIN_AGREEMENT and not result.passes()
    assert result.decisive_agreement == result.agreement  # confident float logits: no flip is a near-tie


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
    assert result.exit_code == 1 and "not written" in result.output
    assert "agreement outside near-ties ≥ 101.0%" in result.output
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
