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
    from mobilenet_fn.data import images_in

    files = []
    for arg in args:
        if arg.is_dir():
            found, _ = images_in(arg)
            if not found:
                err.print(f"[yellow]No images in[/] {escape(str(arg))}", highlight=False)
            files.extend(found)
        elif arg.exists():
            files.append(arg)
        else:
            raise UserError(f"{arg}: no such file or folder")
    return files


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

    from mobilenet_fn.model import apply, fold_batchnorm
    from mobilenet_fn.preprocess import IMAGE_ERRORS, eval_image, model_input
    from mobilenet_fn.step import inference_policy, to_device
    from mobilenet_fn.weights import load_weights

    w = load_weights(weights)
    if w.config.in_channels != 3:
        raise UserError(f"{weights}: the model takes {w.config.in_channels} channels; predict reads RGB images")
    policy = inference_policy(pick_device(device))
    folded = fold_batchnorm(w.config, to_device(w.params, policy.device), to_device(w.state, policy.device))
    files = image_files(images)
    readable, skipped = [], []
    for path in files:
        try:
            readable.append((path, eval_image(path, w.preprocess)))
        except IMAGE_ERRORS as e:
            skipped.append({"path": str(path), "error": str(e) or type(e).__name__})
            err.print(f"[yellow]Skipped[/] {escape(str(path))}: {escape(skipped[-1]['error'])}", highlight=False,
                      soft_wrap=True)
    if not readable:
        raise UserError("no readable images" + (f" among {len(files)} file(s)" if files else " found"))
    predictions = []
    for start in range(0, len(readable), BATCH):
        chunk = readable[start: start + BATCH]
        x = model_input(torch.stack([t for _, t in chunk]).to(policy.device), w.preprocess,
                        channels_last=policy.channels_last)
        with torch.no_grad():
            probs = apply(w.config, folded, None, x, train=False)[0].softmax(-1).cpu()
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
