"""`mobilenet-fn convert`: a checkpoint, a timm state dict or a Hugging Face model -> weights.pkl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .common import FORCE, err, refuse_existing, user_errors

def describe(weights) -> str:
    cfg, pre = weights.config, weights.preprocess
    return (f"MobileNet v1 α={cfg.alpha:g}, {cfg.num_classes} classes, {cfg.activation}, {cfg.padding} padding, "
            f"BN eps {cfg.bn_eps:g}; preprocess: resize {pre['resize']} {pre['interpolation']}, crop "
            f"{pre['resolution']}, mean {pre['mean']}, std {pre['std']}")


@user_errors
def convert(
    src: Annotated[str, typer.Argument(help="A training checkpoint, a timm mobilenetv1_100/125 state dict (.pth, "
                                            ".bin, .safetensors), a Hugging Face save_pretrained folder or hub id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The weights file to write (.pkl).")],
    source: Annotated[str, typer.Option("--from", help="What SRC is: auto, checkpoint, timm or hf.")] = "auto",
    classes_file: Annotated[Path | None, typer.Option(
        "--classes-file", help="Class names, one per line in label order (default: ImageNet's for 1000/1001).")] = None,
    drop_background: Annotated[bool, typer.Option(
        "--drop-background", help="Google's 1001 classes -> 1000: drop the background class at index 0.")] = False,
    force: FORCE = False,
):
    """Make an inference weights file from a training checkpoint, timm or Hugging Face MobileNet v1 weights.

    Pickled Python objects (a whole nn.Module) are refused without being loaded: loading them would run code.
    """
    from mobilenet_fn.importers import convert_file, read_classes_file
    from mobilenet_fn.weights import save_weights

    refuse_existing(output, force)
    classes = read_classes_file(classes_file) if classes_file is not None else None
    with err.status(escape(f"Converting {src}")):
        weights = convert_file(src, kind=source, classes=classes, drop_background=drop_background)
        save_weights(output, weights, overwrite=force)
    err.print(escape(f"Wrote {output}: {describe(weights)}"), highlight=False, soft_wrap=True)
