"""`predict`: probabilities against the model applied by hand to the same pixels, folders, bad images."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mobilenet_fn import Config, apply, save_weights
from mobilenet_fn.cli.main import app
from mobilenet_fn.preprocess import preprocess_for
from test_weights import make_weights, one_line_error

runner = CliRunner()
STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


@pytest.fixture
def weights(tmp_path):
    # crop_pct 1: the short side is resized to exactly the resolution, so a 32-px-high image is only cropped.
    w = make_weights(Config(alpha=0.25, resolution=32, num_classes=6), seed=5)
    w = w._replace(preprocess=preprocess_for(32, crop_pct=1.0, stats=STATS), classes=list("abcdef"))
    save_weights(tmp_path / "w.pkl", w)
    return w


def save_image(path, pixels: torch.Tensor) -> None:
    """(H, W, 3) uint8 -> a PNG."""
    Image.fromarray(pixels.numpy()).save(path)


def expected_probs(w, pixels: torch.Tensor) -> torch.Tensor:
    """The model on an image that needs no resizing: crop the centre, scale to [0, 1], normalise, apply."""
    h, w_ = pixels.shape[:2]
    top, left = (h - 32) // 2, (w_ - 32) // 2
    x = pixels[top: top + 32, left: left + 32].permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(STATS["mean"]).view(3, 1, 1)) / torch.tensor(STATS["std"]).view(3, 1, 1)
    return apply(w.config, w.params, w.state, x[None], train=False)[0].softmax(-1)[0]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_json_probabilities_match_the_model(tmp_path, weights):
    g = torch.Generator().manual_seed(0)
    square = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
    wide = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=g)
    save_image(tmp_path / "square.png", square)
    save_image(tmp_path / "wide.png", wide)
    result = invoke("predict", tmp_path / "w.pkl", tmp_path / "square.png", tmp_path / "wide.png", "--top", "3",
                    "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [p["path"] for p in out["predictions"]] == [str(tmp_path / "square.png"), str(tmp_path / "wide.png")]
    for pred, pixels in zip(out["predictions"], (square, wide)):
        probs = expected_probs(weights, pixels)
        values, indices = probs.topk(3)
        assert [t["index"] for t in pred["top"]] == indices.tolist()
        assert [t["class"] for t in pred["top"]] == [weights.classes[i] for i in indices.tolist()]
        torch.testing.assert_close(torch.tensor([t["prob"] for t in pred["top"]]), values, atol=1e-5, rtol=1e-5)
    assert out["skipped"] == []


def test_folder_walk_table_and_unreadable_images(tmp_path, weights):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    save_image(folder / "a.png", torch.full((40, 60, 3), 200, dtype=torch.uint8))
    Image.new("L", (50, 50), 90).save(folder / "sub" / "gray.jpg")  # grayscale is read as RGB
    (folder / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    result = invoke("predict", tmp_path / "w.pkl", folder, "--top", "10")
    assert result.exit_code == 0, result.output
    assert str(folder / "a.png") in result.output and str(folder / "sub" / "gray.jpg") in result.output
    assert "Skipped" in result.output and "broken.jpg" in result.output and "notes.txt" not in result.output
    # One table, a row per image; --top 10 shows the 6 classes there are.
    lines = result.output.splitlines()
    assert "┃ #6 " in result.output and "#7" not in result.output and result.output.count("┏") == 1
    assert [line.split("│")[1].strip() for line in lines if line.startswith("│")] == [
        str(folder / "a.png"), str(folder / "sub" / "gray.jpg")]

    result = invoke("predict", tmp_path / "w.pkl", folder, "--json")
    out = json.loads(result.stdout)
    assert len(out["predictions"]) == 2 and len(out["predictions"][0]["top"]) == 5
    assert [s["path"] for s in out["skipped"]] == [str(folder / "broken.jpg")]


def test_nothing_readable_and_missing_paths_are_one_line(tmp_path, weights):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    result = invoke("predict", tmp_path / "w.pkl", tmp_path / "broken.png")
    # Each unreadable file is reported on its own line first, then the error: one line each, no traceback.
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.rstrip("\n").split("\n") == [
        f"Skipped {tmp_path / 'broken.png'}: cannot identify image file '{tmp_path / 'broken.png'}'",
        "Error: no readable images among 1 file(s)"]
    one_line_error(invoke("predict", tmp_path / "w.pkl", tmp_path / "missing.jpg"), "no such file or folder")
    one_line_error(invoke("predict", tmp_path / "w.pkl", tmp_path / "broken.png", "--device", "cuda:7"), "cuda")


def test_eval_and_predict_preprocess_the_same_file_to_the_same_tensor(tmp_path):
    """One eval preprocessing: validation and `eval` (batches.batches on files) and `predict` (eval_image) give the
    same tensor for the same JPEG, and it is the resize and centre crop a reference computes independently."""
    import numpy as np
    from PIL import Image

    from mobilenet_fn.batches import batches
    from mobilenet_fn.sources import FileSource
    from mobilenet_fn.preprocess import eval_image, model_input

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "photo.jpg"
    Image.fromarray(torch.randint(0, 256, (61, 90, 3), dtype=torch.uint8, generator=g).numpy()).save(path, quality=95)
    pre = preprocess_for(32, crop_pct=0.875, stats=STATS, interpolation="bicubic")  # 61x90 -> short side 36 -> 32
    from_eval = next(batches(FileSource([(str(path), 0)]), pre, batch_size=4, train=False)).x
    from_predict = model_input(eval_image(path, pre)[None], pre)
    assert torch.equal(from_eval, from_predict)

    with Image.open(path) as im:
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
    resized = torch.nn.functional.interpolate(pixels[None], size=(36, 53), mode="bicubic", antialias=True,
                                              align_corners=False).clamp(0, 255).round()
    top, left = (36 - 32) // 2, (53 - 32) // 2
    expected = model_input(resized[:, :, top: top + 32, left: left + 32] / 255, pre)
    assert (from_predict - expected).abs().max() <= 1.01 / 255 / min(STATS["std"])  # within one grey level


def test_eval_per_class_accuracy_and_confusion_plot_match_the_model(tmp_path):
    # Classes listed in the weights in another order than the folders sort in: the labels must be remapped.
    w = make_weights(Config(alpha=0.25, resolution=32, num_classes=6), seed=5)
    w = w._replace(preprocess=preprocess_for(32, crop_pct=1.0, stats=STATS), classes=list("fedcba"))
    g = torch.Generator().manual_seed(1)
    images = {name: [torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
                     for _ in range(1 + label % 4)] for label, name in enumerate(w.classes)}  # 1 to 4 a class
    # A random network gives nearly every image the same class: centre the logits over these images (the bias)
    # and scale them, so that the predictions vary from image to image.
    logits = torch.stack([expected_probs(w, x).log() for xs in images.values() for x in xs])
    fc = {"weight": w.params["fc"]["weight"] * 30, "bias": -30 * (logits.mean(0) - w.params["fc"]["bias"])}
    w = w._replace(params={**w.params, "fc": fc})
    save_weights(tmp_path / "w.pkl", w)
    truth, predicted = [], []
    for label, name in enumerate(w.classes):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i, pixels in enumerate(images[name]):
            save_image(tmp_path / "data" / name / f"{i}.png", pixels)
            truth.append(label)
            predicted.append(expected_probs(w, pixels).argmax().item())
    counts = {c: truth.count(k) for k, c in enumerate(w.classes)}
    right = {c: sum(t == p == k for t, p in zip(truth, predicted)) for k, c in enumerate(w.classes)}
    expected = {c: right[c] / counts[c] for c in w.classes}
    assert 0 < sum(right.values()) < len(truth) and len(set(predicted)) > 1  # neither trivial nor constant

    args = ["eval", tmp_path / "w.pkl", "--data", tmp_path / "data", "--device", "cpu", "--workers", 0]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["per_class"] == pytest.approx(expected) and out["n"] == len(truth)
    assert out["top1"] == pytest.approx(sum(right.values()) / len(truth))

    result = invoke(*args, "--plot", tmp_path / "cm.png")
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert rows == [[c, str(counts[c]), f"{100 * expected[c]:.2f}%"] for c in w.classes]
    assert f"top-1 {100 * out['top1']:.2f}%" in result.stdout and f"({len(truth)} images)" in result.stdout
    png = (tmp_path / "cm.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(png) < 2_000_000
    with Image.open(tmp_path / "cm.png") as image:
        image.verify()
    with Image.open(tmp_path / "cm.png") as image:
        assert image.format == "PNG" and 200 <= min(image.size) and max(image.size) <= 4000
        assert len(image.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 10  # a figure, not a blank
