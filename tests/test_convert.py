"""Importers against the models they import: randomly initialised timm and transformers MobileNet v1s (the real
weights cannot be downloaded here), BatchNorm statistics randomised, logits compared on the same input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import randomize_batchnorm
from mobilenet_fn import apply, load_weights
from mobilenet_fn.cli.main import app
from mobilenet_fn.importers import convert_file, imagenet_classes
from mobilenet_fn.checkpoint import save_checkpoint
from test_weights import assert_trees_equal, make_checkpoint, make_weights, one_line_error

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
runner = CliRunner()


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """He-normal convolutions and a classifier of unit-scale logits, so that every layer (and so any mistake in
    padding, activation or epsilon) shows in the output; BatchNorm affine and running statistics random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    randomize_batchnorm(module, g)
    return module.eval()


def logits(weights, x, **changes):
    cfg = weights.config.replace(**changes) if changes else weights.config
    return apply(cfg, weights.params, weights.state, x, train=False)[0]


def assert_matches_and_could_fail(weights, reference, x, wrong: dict):
    """Within 1e-4 of the reference, while the same weights under a wrong config are visibly off."""
    with torch.no_grad():
        ref = reference(x)
    torch.testing.assert_close(logits(weights, x), ref, atol=1e-4, rtol=1e-4)
    assert (logits(weights, x, **wrong) - ref).abs().max() > 1e-2


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------------
# timm


@pytest.fixture(scope="module")
def timm_model():
    return randomize(timm.create_model("mobilenetv1_100", act_layer="relu6"), seed=1)


@pytest.mark.parametrize("size", [224, 200])
def test_timm_pth_matches_timm(tmp_path, timm_model, size):
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    result = invoke("convert", tmp_path / "timm.pth", "-o", tmp_path / "w.pkl")
    assert result.exit_code == 0, result.output
    w = load_weights(tmp_path / "w.pkl")
    assert (w.config.alpha, w.config.activation, w.config.padding, w.config.bn_eps) == (1.0, "relu6", "torch", 1e-5)
    assert w.preprocess == {"resolution": 224, "resize": 256, "crop_pct": 0.875, "interpolation": "bicubic",
                            "mean": [0.5] * 3, "std": [0.5] * 3}
    assert w.classes == imagenet_classes() and w.classes[0] == "tench" and len(w.classes) == 1000
    assert_matches_and_could_fail(w, timm_model, torch.randn(2, 3, size, size), {"padding": "tf"})


def test_timm_safetensors_and_125(tmp_path):
    from safetensors.torch import save_file

    model = randomize(timm.create_model("mobilenetv1_125", num_classes=10), seed=2)
    save_file(model.state_dict(), tmp_path / "timm.safetensors")
    w = convert_file(tmp_path / "timm.safetensors")
    assert w.config.alpha == 1.25 and w.config.num_classes == 10 and w.preprocess["crop_pct"] == 0.9
    assert w.classes == [f"class {i}" for i in range(10)]
    assert_matches_and_could_fail(w, model, torch.randn(2, 3, 224, 224), {"activation": "relu"})


def test_timm_training_checkpoint_wrapper_and_ddp_prefix(tmp_path, timm_model):
    sd = {f"module.{k}": v for k, v in timm_model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "ckpt.pth.tar")
    w = convert_file(tmp_path / "ckpt.pth.tar", kind="timm")
    assert_matches_and_could_fail(w, timm_model, torch.randn(1, 3, 96, 96), {"padding": "tf"})


def test_timm_variant_with_a_head_conv_is_refused(tmp_path):
    torch.save(timm.create_model("mobilenetv1_100h", num_classes=10).state_dict(), tmp_path / "h.pth")
    one_line_error(invoke("convert", tmp_path / "h.pth", "-o", tmp_path / "w.pkl"), "conv_head", "does not have")


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face (Google's TF-slim weights: TF padding, ReLU6, eps 1e-3, 1001 classes)


def hf_model(tmp_path, depth_multiplier: float, seed: int, image_processor: bool = False):
    cfg = transformers.MobileNetV1Config(depth_multiplier=depth_multiplier, num_labels=1001, tf_padding=True)
    model = randomize(transformers.MobileNetV1ForImageClassification(cfg), seed)
    folder = tmp_path / f"hf-{depth_multiplier}"
    model.save_pretrained(folder)
    if image_processor:
        transformers.MobileNetV1ImageProcessor().save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("depth_multiplier", [0.25, 1.0])
def test_hf_folder_matches_transformers_at_224_and_200(tmp_path, depth_multiplier):
    model, folder = hf_model(tmp_path, depth_multiplier, seed=3)
    result = invoke("convert", folder, "-o", tmp_path / "w.pkl")
    assert result.exit_code == 0, result.output
    w = load_weights(tmp_path / "w.pkl")
    cfg = w.config
    assert (cfg.alpha, cfg.padding, cfg.activation, cfg.bn_eps, cfg.num_classes) == (
        depth_multiplier, "tf", "relu6", 1e-3, 1001)
    # The port's two traps: 0.999 is TF's keep probability, 0.9997 TF's BatchNorm decay.
    assert cfg.dropout == pytest.approx(0.001) and cfg.bn_momentum == pytest.approx(0.0003)
    assert w.classes[0] == "background" and w.classes[1] == "tench"
    # At 224 every stride-2 layer pads asymmetrically (0 before, 1 after); at 200 the 25 -> 13 layer pads
    # symmetrically. Torch's symmetric padding is off at both.
    for size in (224, 200):
        reference = lambda x: model(x).logits  # noqa: E731
        assert_matches_and_could_fail(w, reference, torch.randn(2, 3, size, size), {"padding": "torch"})


def test_hf_drop_background_and_preprocessor(tmp_path):
    model, folder = hf_model(tmp_path, 0.25, seed=4, image_processor=True)
    w = convert_file(folder, drop_background=True)
    assert w.config.num_classes == 1000 and w.classes == imagenet_classes()
    assert w.preprocess == {"resolution": 224, "resize": 256, "crop_pct": 0.875, "interpolation": "bilinear",
                            "mean": [0.5] * 3, "std": [0.5] * 3}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x).logits[:, 1:]
    torch.testing.assert_close(logits(w, x), ref, atol=1e-4, rtol=1e-4)


def test_hf_bin_beside_its_config(tmp_path):
    model, folder = hf_model(tmp_path, 0.25, seed=5)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    w = convert_file(folder / "pytorch_model.bin")
    assert_matches_and_could_fail(w, lambda x: model(x).logits, torch.randn(1, 3, 200, 200), {"padding": "torch"})
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        convert_file(folder / "pytorch_model.bin")


HUB_ID = "google/mobilenet_v1_1.0_224"


def isolated_hub(tmp_path, monkeypatch):
    """An empty Hugging Face home and hub cache in ``tmp_path``, offline: no cache of this machine's (nor the
    network) can answer. huggingface_hub reads these variables when it is imported, which may already have
    happened (transformers imports it), so its constants are set too."""
    import huggingface_hub.constants

    home, cache = tmp_path / "hf-home", tmp_path / "hf-home" / "hub"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    isolated_hub(tmp_path, monkeypatch)
    one_line_error(invoke("convert", HUB_ID, "-o", tmp_path / "w.pkl"), HUB_ID, "Hugging Face hub")
    assert not (tmp_path / "w.pkl").exists()


def test_hub_id_is_converted_from_the_local_hub_cache(tmp_path, monkeypatch):
    # The hub cache's layout: models--<org>--<name>/refs/main names the snapshot folder holding the files.
    cache = isolated_hub(tmp_path, monkeypatch)
    model, folder = hf_model(tmp_path, 0.25, seed=6, image_processor=True)  # whatever the id says: the files rule
    repo, commit = cache / "models--google--mobilenet_v1_1.0_224", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / commit)
    result = invoke("convert", HUB_ID, "-o", tmp_path / "w.pkl")
    assert result.exit_code == 0, result.output
    w = load_weights(tmp_path / "w.pkl")
    assert (w.config.alpha, w.config.padding, w.config.num_classes) == (0.25, "tf", 1001)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(logits(w, x), model(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, options, mistakes


def test_checkpoint_to_weights_drops_the_optimizer(tmp_path):
    w = make_weights()
    ckpt = {**make_checkpoint(w), "metrics": {"val_top1": 0.75}}
    save_checkpoint(tmp_path / "best.ckpt", ckpt)
    result = invoke("convert", tmp_path / "best.ckpt", "-o", tmp_path / "w.pkl")
    assert result.exit_code == 0, result.output
    raw = torch.load(tmp_path / "w.pkl", weights_only=True)
    assert "opt_state" not in raw and "rng" not in raw
    back = load_weights(tmp_path / "w.pkl")
    assert back.data == {"kind": "sample"} and back.metrics == {"val_top1": 0.75}
    assert_trees_equal(back.params, w.params)


def test_output_is_never_replaced_without_force(tmp_path, timm_model):
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    (tmp_path / "w.pkl").write_text("precious")
    one_line_error(invoke("convert", tmp_path / "timm.pth", "-o", tmp_path / "w.pkl"), "--force")
    assert (tmp_path / "w.pkl").read_text() == "precious"
    assert invoke("convert", tmp_path / "timm.pth", "-o", tmp_path / "w.pkl", "--force").exit_code == 0
    assert load_weights(tmp_path / "w.pkl").config.num_classes == 1000


def test_classes_file(tmp_path):
    w = make_weights()
    save_checkpoint(tmp_path / "c.ckpt", {**make_checkpoint(w), "data": None, "metrics": {}})
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    assert invoke("convert", tmp_path / "c.ckpt", "-o", tmp_path / "w.pkl", "--classes-file",
                  tmp_path / "names.txt").exit_code == 0
    assert load_weights(tmp_path / "w.pkl").classes == ["cat", "dog", "bird"]
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    one_line_error(invoke("convert", tmp_path / "c.ckpt", "-o", tmp_path / "w2.pkl", "--classes-file",
                          tmp_path / "names.txt"), "2 class names", "3 classes")
    one_line_error(invoke("convert", tmp_path / "c.ckpt", "-o", tmp_path / "w2.pkl", "--drop-background"),
                   "1001-class")


def test_mistakes_are_one_line(tmp_path, timm_model):
    from torchvision.models import resnet18

    torch.save(resnet18(num_classes=10).state_dict(), tmp_path / "resnet.pth")
    one_line_error(invoke("convert", tmp_path / "resnet.pth", "-o", tmp_path / "w.pkl"), "not a MobileNet v1")
    torch.save(timm_model.state_dict(), tmp_path / "timm.pth")
    one_line_error(invoke("convert", tmp_path / "timm.pth", "-o", tmp_path / "w.pkl", "--from", "hf"),
                   "--from hf", "timm")
    one_line_error(invoke("convert", tmp_path / "timm.pth", "-o", tmp_path / "w.pkl", "--from", "keras"), "--from")
    narrow = {k: v for k, v in timm_model.state_dict().items() if k != "blocks.3.5.bn2.running_var"}
    torch.save(narrow, tmp_path / "narrow.pth")
    one_line_error(invoke("convert", tmp_path / "narrow.pth", "-o", tmp_path / "w.pkl"),
                   "missing blocks.3.5.bn2.running_var")
    sd = dict(timm_model.state_dict(), **{"blocks.2.0.conv_pw.weight": torch.zeros(200, 128, 1, 1)})
    torch.save(sd, tmp_path / "bent.pth")
    one_line_error(invoke("convert", tmp_path / "bent.pth", "-o", tmp_path / "w.pkl"), "the config implies")
    one_line_error(invoke("convert", tmp_path / "nothing.pth", "-o", tmp_path / "w.pkl"), "no such file")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    one_line_error(invoke("convert", tmp_path / "broken.safetensors", "-o", tmp_path / "w.pkl"), "safetensors")
    assert not (tmp_path / "w.pkl").exists()


def test_a_missing_optional_package_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "m.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    one_line_error(invoke("convert", tmp_path / "m.safetensors", "-o", tmp_path / "w.pkl"),
                   "pip install safetensors")


def test_no_importer_or_exporter_package_is_loaded_until_used():
    code = ("import sys, mobilenet_fn, mobilenet_fn.importers, mobilenet_fn.export, mobilenet_fn.weights, "
            "mobilenet_fn.cli.main; "
            "print([m for m in ('timm', 'transformers', 'onnx', 'onnxruntime', 'onnxscript', 'safetensors', "
            "'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []
