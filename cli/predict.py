"""`mobilenet-fn predict`: the top classes of images, with the preprocessing stored in the weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import (DEVICE, FORCE, JSON, UserError, err, load_model, pick_device, print_json,
                     refuse_existing, user_errors)

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
    weights: Annotated[Path, typer.Argument(help="A weights file (.pkl) from train or convert, or an .onnx file "
                                                 "from export or quantize (run with onnxruntime).")],
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders walked for images.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show per image.")] = 5,
    csv: Annotated[Optional[Path], typer.Option(
        "--csv", help="Also write the table to this CSV file: file, then class and probability by rank.")] = None,
    force: FORCE = False,
    json: JSON = False,
    device: DEVICE = "auto",
):
    """The most probable classes of each image, preprocessed as the model's file says (resize, crop, mean/std):
    one table, a row per image.

    Unreadable images are reported and skipped.
    """
    import torch

    from mobilenet_fn.preprocess import IMAGE_ERRORS, eval_image, model_input

    if csv is not None:
        refuse_existing(csv, force)
    model = load_model(weights, device)
    if model.config.in_channels != 3:
        raise UserError(f"{weights}: the model takes {model.config.in_channels} channels; predict reads RGB images")
    forward, dev, channels_last = _forward(model, device)
    files = image_files(images)
    readable, skipped = [], []
    for path in files:
        try:
            readable.append((path, eval_image(path, model.preprocess)))
        except IMAGE_ERRORS as e:
            skipped.append({"path": str(path), "error": str(e) or type(e).__name__})
            err.print(f"[yellow]Skipped[/] {escape(str(path))}: {escape(skipped[-1]['error'])}", highlight=False,
                      soft_wrap=True)
    if not readable:
        raise UserError("no readable images" + (f" among {len(files)} file(s)" if files else " found"))
    predictions = []
    for start in range(0, len(readable), BATCH):
        chunk = readable[start: start + BATCH]
        x = model_input(torch.stack([t for _, t in chunk]).to(dev), model.preprocess, channels_last=channels_last)
        with torch.no_grad():
            probs = forward(x).float().softmax(-1).cpu()
        predictions += [{"path": str(p), "top": top_k(pr, top, model.classes)} for (p, _), pr in zip(chunk, probs)]
    if csv is not None:
        _write_csv(csv, predictions)
    if json:
        print_json({"predictions": predictions, "skipped": skipped})
        return
    _print_table(predictions)


def _forward(model, device: str):
    """(forward, device, channels_last): ``forward`` maps a normalised batch on ``device`` to logits; a weights
    file runs BatchNorm-folded as ``eval`` runs it, an ONNX model on the CPU with onnxruntime."""
    from mobilenet_fn.model import apply, fold_batchnorm
    from mobilenet_fn.onnx_model import OnnxModel
    from mobilenet_fn.step import inference_policy, to_device

    if isinstance(model, OnnxModel):
        import torch

        return model, torch.device("cpu"), False
    policy = inference_policy(pick_device(device))
    folded = fold_batchnorm(model.config, to_device(model.params, policy.device),
                            to_device(model.state, policy.device))
    return (lambda x: apply(model.config, folded, None, x, train=False)[0]), policy.device, policy.channels_last


def rows(predictions: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: file, then class and probability for each rank."""
    k = max(len(p["top"]) for p in predictions)
    header = ["file"] + [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("class", "prob")]
    return header, [[p["path"]] + [v for t in p["top"] for v in (t["class"], f"{t['prob']:.4f}")]
                    for p in predictions]


def _write_csv(path: Path, predictions: list[dict]) -> None:
    import csv
    import io

    from mobilenet_fn.files import write_bytes

    text = io.StringIO()
    writer = csv.writer(text)
    header, body = rows(predictions)
    writer.writerow(header)
    writer.writerows(body)
    write_bytes(path, text.getvalue().encode(), durable=False)


def _print_table(predictions: list[dict]) -> None:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    header, body = rows(predictions)
    table = Table()
    table.add_column("file", no_wrap=True)
    for rank in range(1, (len(header) - 1) // 2 + 1):
        table.add_column(f"#{rank}")
        table.add_column("prob", justify="right")
    for row in body:
        table.add_row(*row)
    out = Console()
    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    Console(width=max(out.width, width)).print(table)  # wider than the terminal, not cut: paths stay whole
