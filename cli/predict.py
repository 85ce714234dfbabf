"""`mobilenet-fn predict`: the top classes of images, with the preprocessing stored in the weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .common import DEVICE, JSON, UserError, err, pick_device, print_json, user_errors

BATCH = 32


def image_files(args: list[Path]) -> list[Path]:
    """The files named, and the images found in the folders named (walked recursively, sorted)."""
    from mobilenet_fn.data import _images_in

    files = []
    for arg in args:
        if arg.is_dir():
            found = _images_in(arg)
            if not found:
                err.print(f"[yellow]No images in[/] {escape(str(arg))}", highlight=False)
            files.extend(found)
        elif arg.exists():
            files.append(arg)
        else:
            raise UserError(f"{arg}: no such file or folder")
    return files


def read_image(path: Path, preprocess: dict):
    """An image file -> (3, R, R) normalised float: short side resized, centre-cropped, as the weights expect."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from mobilenet_fn.data import normalize, resize_center_crop

    with Image.open(path) as im:
        x = pil_to_tensor(im.convert("RGB")).unsqueeze(0).float() / 255  # (1, 3, H, W) in [0, 1]
    x = resize_center_crop(x, preprocess).clamp(0, 1)  # bicubic overshoots; a uint8 pipeline would clip too
    return normalize(x, preprocess)[0]


def top_k(probs, k: int, classes: list[str]) -> list[dict]:
    values, indices = probs.topk(min(k, len(classes)))
    return [{"class": classes[i], "index": i, "prob": p} for p, i in zip(values.tolist(), indices.tolist())]


@user_errors
def predict(
    weights: Annotated[Path, typer.Argument(help="A weights file (.pkl) from train or convert.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders walked for images.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show per image.")] = 5,
    json: JSON = False,
    device: DEVICE = "auto",
):
    """The most probable classes of each image, preprocessed as the weights file says (resize, crop, mean/std).

    Unreadable images are reported and skipped.
    """
    import torch
    from PIL import Image
    from torch.utils._pytree import tree_map

    from mobilenet_fn.convert import fold_batchnorm, folded_apply
    from mobilenet_fn.weights import load_weights

    w = load_weights(weights)
    if w.config.in_channels != 3:
        raise UserError(f"{weights}: the model takes {w.config.in_channels} channels; predict reads RGB images")
    dev = pick_device(device)
    folded = fold_batchnorm(w.config, *tree_map(lambda t: t.to(dev), (w.params, w.state)))
    files = image_files(images)
    readable, skipped = [], []
    for path in files:
        try:
            readable.append((path, read_image(path, w.preprocess)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            skipped.append({"path": str(path), "error": str(e) or type(e).__name__})
            err.print(f"[yellow]Skipped[/] {escape(str(path))}: {escape(skipped[-1]['error'])}", highlight=False,
                      soft_wrap=True)
    if not readable:
        raise UserError("no readable images" + (f" among {len(files)} file(s)" if files else " found"))
    predictions = []
    for start in range(0, len(readable), BATCH):
        chunk = readable[start: start + BATCH]
        x = torch.stack([t for _, t in chunk]).to(dev).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            probs = folded_apply(w.config, folded, x).softmax(-1).cpu()
        predictions += [{"path": str(p), "top": top_k(pr, top, w.classes)} for (p, _), pr in zip(chunk, probs)]
    if json:
        print_json({"predictions": predictions, "skipped": skipped})
        return
    _print_tables(predictions)


def _print_tables(predictions: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console()
    for pred in predictions:
        out.print(Text(pred["path"], style="bold"), soft_wrap=True)  # a long path stays whole
        table = Table()
        for col, justify in (("#", "right"), ("class", "left"), ("index", "right"), ("prob", "right")):
            table.add_column(col, justify=justify)
        for rank, row in enumerate(pred["top"], 1):
            table.add_row(str(rank), row["class"], str(row["index"]), f"{row['prob']:.4f}")
        out.print(table)
