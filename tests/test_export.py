"""ONNX export, checked here against onnxruntime independently of the exporter's own check; BatchNorm folding."""

import sys

import pytest
import torch
from typer.testing import CliRunner

from mobilenet_fn import Config, apply, load_weights, save_weights
from mobilenet_fn.cli.main import app
from test_weights import make_weights, one_line_error

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
runner = CliRunner()

# Small but complete: TF padding (the asymmetric pads) and ReLU6, as Google's weights need.
CFG = Config(alpha=0.25, resolution=64, num_classes=7, activation="relu6", padding="tf", bn_eps=1e-3)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["plain", "fold-bn"])
def test_onnxruntime_equals_apply_at_batch_1_and_3(tmp_path, fold_bn):
    w = make_weights(CFG, seed=3)
    save_weights(tmp_path / "w.pkl", w)
    args = ["export", str(tmp_path / "w.pkl"), "-o", str(tmp_path / "m.onnx")] + (["--fold-bn"] if fold_bn else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches" in result.output
    model = onnx.load(tmp_path / "m.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert ("BatchNormalization" in ops) != fold_bn
    batch_axis = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # symbolic, not fixed
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.randn(n, 3, 64, 64)
        ref = apply(w.config, w.params, w.state, x, train=False)[0]
        out = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
        assert out.shape == (n, 7)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert ref.abs().max() > 0.1  # logits that could be wrong


def test_output_is_never_replaced_without_force(tmp_path):
    save_weights(tmp_path / "w.pkl", make_weights(CFG))
    (tmp_path / "m.onnx").write_text("precious")
    one_line_error(runner.invoke(app, ["export", str(tmp_path / "w.pkl"), "-o", str(tmp_path / "m.onnx")]),
                   "--force")
    assert (tmp_path / "m.onnx").read_text() == "precious"


def test_a_model_onnxruntime_disagrees_with_is_not_written(tmp_path, monkeypatch):
    save_weights(tmp_path / "w.pkl", make_weights(CFG))
    monkeypatch.setattr("torch.onnx.export", lambda module, args, f, **kw: open(f, "wb").write(b"onnx"))
    monkeypatch.setattr("mobilenet_fn.export.check_onnx", lambda weights, path: 0.5)
    result = runner.invoke(app, ["export", str(tmp_path / "w.pkl"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "differ" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pkl"]


def test_missing_exporter_package_says_what_to_install(tmp_path, monkeypatch):
    save_weights(tmp_path / "w.pkl", make_weights(CFG))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    one_line_error(runner.invoke(app, ["export", str(tmp_path / "w.pkl"), "-o", str(tmp_path / "m.onnx")]),
                   "pip install onnxscript")
    assert load_weights(tmp_path / "w.pkl").config == CFG
