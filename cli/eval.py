from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import DEVICE, JSON, UserError, err, load_model, pick_device, print_json, user_errors

SHOWN_SKIPS = 10  # unreadable files listed one a line; --json lists them all


@user_errors
def evaluate(
    weights: Annotated[Path, typer.Argument(help="A weights .pkl (from train or convert), or an .onnx file from "
                                                 "export or quantize (run with onnxruntime).")],
    data: Annotated[Optional[str], typer.Option(help="sample, fashion-mnist (its test set), imagenette, or a "
                                                     "folder. Default: the validation split recorded in the file.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")] = 256,
    device: DEVICE = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers for image folders with --cache off.")] = 2,
    cache: Annotated[str, typer.Option(help="Image folders: read through the decoded cache train uses (auto, "
                                            "ram, disk) or decode the files (off).")] = "auto",
    json: JSON = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write the confusion matrix to this PNG.")] = None,
):
    """Top-1, top-5, loss and per-class accuracy of a weights file (BatchNorm in eval mode) or of an ONNX file."""
    from rich.console import Console
    from rich.table import Table

    from mobilenet_fn import data as data_lib
    from mobilenet_fn.cache import cached
    from mobilenet_fn.evaluate import evaluate as run_eval, evaluate_forward
    from mobilenet_fn.onnx_model import OnnxModel
    from mobilenet_fn.sources import DataError
    from mobilenet_fn.step import inference_policy, to_device

    from .progress import decoding, report_cache

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    w = load_model(weights, device)
    dev = pick_device(device)
    if data is None:
        if not w.data:
            raise UserError(f"{weights} records no validation data; pass --data")
        try:
            source = data_lib.validation_source(w.data, w.classes)
        except DataError as e:
            raise UserError(f"{e}; pass --data") from None
        where = f"the validation split recorded in {weights.name}"
    else:
        source = data_lib.eval_source(data, w.classes)
        where = data
    with decoding() as progress:  # the folder read through the decoded cache train uses
        source, report, unreadable = cached(source, w.preprocess, cache, device=dev, progress=progress)
    if report is not None:
        report_cache(report)
    with err.status(f"Evaluating {len(source)} images…"):
        if isinstance(w, OnnxModel):
            result = evaluate_forward(w, w.config.num_classes, source, w.preprocess, batch_size=batch_size,
                                      workers=workers)
        else:
            result = run_eval(w.config, to_device(w.params, dev), to_device(w.state, dev), source, w.preprocess,
                              batch_size=batch_size, policy=inference_policy(dev), workers=workers)
    if plot is not None:
        from mobilenet_fn.plots import plot_confusion

        plot_confusion(result["confusion"], w.classes, plot)
    per_class = {c: a for c, a in zip(w.classes, result["per_class"])}
    skipped = [{"path": getattr(s, "path", str(s)), "error": getattr(s, "reason", "unreadable")}
               for s in unreadable + result["skipped"]]  # the same shape as predict's
    if json:
        print_json({"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "n": result["n"],
                    "per_class": per_class, "skipped": skipped, "data": where})
        return
    out = Console()
    table = Table(title=f"Per-class accuracy on {where}")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("top-1", justify="right")
    counts = result["confusion"].sum(1).tolist()
    for c, n in zip(w.classes, counts):
        if n:
            table.add_row(c, str(n), f"{100 * per_class[c]:.2f}%")
    out.print(table)
    out.print(f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  loss {result['loss']:.4f}  "
              f"({result['n']} images)")
    for s in skipped[:SHOWN_SKIPS]:
        err.print(f"[yellow]Skipped[/] {escape(s['path'])}: {escape(s['error'])}", highlight=False, soft_wrap=True)
    if len(skipped) > SHOWN_SKIPS:
        err.print(f"Skipped {len(skipped)} unreadable file(s) in all; --json lists every one", highlight=False)
