"""`mobilenet-fn quantize`: weights.pkl -> int8 ONNX, calibrated on the user's images, checked against float."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mobilenet_fn.quantize_options import (
    CALIBRATION_IMAGES, CALIBRATION_METHODS, CHECK_IMAGES, DEFAULT_METHOD, MAX_DROP, MIN_AGREEMENT, NEAR_TIE,
)

from .common import FORCE, JSON, err, fail, print_json, refuse_existing, user_errors


@user_errors
def quantize(
    weights: Annotated[Path, typer.Argument(help="A weights file (.pkl) from train or convert.")],
    calibrate: Annotated[str, typer.Option(
        "--calibrate", help="sample, fashion-mnist or a folder of class folders: calibration images are drawn from "
                            "its training part, the check runs on its validation part.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The int8 ONNX file to write.")],
    images: Annotated[int, typer.Option(
        "--images", "-n", min=1, help="Calibration images (drawn at random).")] = CALIBRATION_IMAGES,
    method: Annotated[str, typer.Option(
        "--method", help="Calibration of activation ranges: " + ", ".join(CALIBRATION_METHODS) + ".")] = DEFAULT_METHOD,
    check_images: Annotated[int, typer.Option(
        "--check-images", min=1,
        help="Held-out images the int8 model is checked on against the float model.")] = CHECK_IMAGES,
    min_agreement: Annotated[float, typer.Option(
        "--min-agreement",
        help="Least share of held-out images where int8 picks the float model's top class or, in a near-tie, a class "
             "the float model rates within --near-tie of it.")] = MIN_AGREEMENT,
    max_drop: Annotated[float, typer.Option(
        "--max-drop", help="Largest drop in top-1 accuracy from float to int8, as a fraction.")] = MAX_DROP,
    near_tie: Annotated[float, typer.Option(
        "--near-tie", min=0.0, max=1.0,
        help="Float probability gap under which a different int8 pick is not counted against --min-agreement "
             "(its cost shows in --max-drop); 0 counts every disagreement.")] = NEAR_TIE,
    force: FORCE = False,
    json: JSON = False,
):
    """Quantize to int8 ONNX (QDQ: int8 weights per channel, uint8 activations) with onnxruntime.

    BatchNorm is folded, the model exported, its activation ranges calibrated on images prepared with the weights
    file's own preprocessing. Weights are 7-bit (|w| ≤ 64) where ONNX Runtime adds products in pairs into a
    saturating int16 on CPUs without VNNI, 8-bit in depthwise filters, whose kernels cannot saturate: the file gives
    the same results on every x86 CPU. It is written only if, on held-out images, the
    int8 model's top class agrees with the float model's often enough (near-ties aside) and its top-1 accuracy
    drops little enough.
    """
    from mobilenet_fn.export import ExportError
    from mobilenet_fn.quantize import QuantizeError, as_dict, quantization_sources, quantize_onnx, summary
    from mobilenet_fn.weights import load_weights

    if method not in CALIBRATION_METHODS:
        fail(f"--method {method}: use one of {', '.join(CALIBRATION_METHODS)}")
    refuse_existing(output, force)
    w = load_weights(weights)
    calibration, held_out = quantization_sources(calibrate, w.classes)
    try:
        with err.status(escape(f"Quantizing {weights} on {min(images, len(calibration))} images of {calibrate}")):
            result = quantize_onnx(w, output, calibration, held_out, method=method, calibration_images=images,
                                   check_images=check_images, min_agreement=min_agreement, max_drop=max_drop,
                                   near_tie=near_tie)
    except (QuantizeError, ExportError) as e:  # a model that fails its check: a failure of the run, exit 1
        fail(str(e), code=1)
    if json:
        print_json({"output": str(output), "method": method, "bytes": output.stat().st_size, **as_dict(result),
                    "check": {"statistic": "decisive_agreement", "min_agreement": min_agreement,
                              "max_drop": max_drop}})
        return
    err.print(escape(f"Wrote {output} ({output.stat().st_size / 1e6:.2f} MB, int8, {method} calibration): "
                     f"{summary(result)}"), highlight=False, soft_wrap=True)
