"""`mobilenet-fn export`: weights.pkl -> ONNX, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .common import FORCE, err, fail, refuse_existing, user_errors


@user_errors
def export(
    weights: Annotated[Path, typer.Argument(help="A weights file (.pkl) from train or convert.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The ONNX file to write.")],
    fold_bn: Annotated[bool, typer.Option(
        "--fold-bn", help="Fold each BatchNorm into the convolution before it (fewer operators).")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 18,
    force: FORCE = False,
):
    """Export to ONNX (input "image" with a dynamic batch axis, output "logits"), checked against onnxruntime.

    The file is written only if onnxruntime's logits match the model's within 1e-4 (relative to the largest logit
    where that is above 1) at batch sizes 1 and 3. Its metadata carries the class names and preprocessing, so
    `eval` and `predict` can run it.
    """
    from mobilenet_fn.export import ExportError, export_onnx
    from mobilenet_fn.weights import load_weights

    refuse_existing(output, force)
    w = load_weights(weights)
    try:
        with err.status(escape(f"Exporting {weights} to ONNX")):
            diff = export_onnx(w, output, fold_bn=fold_bn, opset=opset)
    except ExportError as e:
        fail(str(e), code=1)
    cfg = w.config
    shapes = f"image (N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}) -> logits (N, {cfg.num_classes})"
    folded = ", BatchNorm folded" if fold_bn else ""
    err.print(escape(f"Wrote {output}: {shapes}, opset {opset}{folded}; onnxruntime matches at batch 1 and 3 "
                     f"(max relative |diff| {diff:.1e})"), highlight=False, soft_wrap=True)
