"""int8 ONNX: the BatchNorm-folded model exported, then statically quantized with ONNX Runtime's tools and kept
only if it agrees with the float model on held-out images.

    calibration, held_out = quantization_sources("sample", weights.classes)
    result = quantize_onnx(weights, "model.int8.onnx", calibration, held_out)

QDQ format, int8 weights per output channel, uint8 activations with ranges calibrated on images that the weights
file's own preprocessing prepares. Per-channel matters for depthwise filters, whose ranges differ by orders of
magnitude from one channel to the next: one range per tensor collapses them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data as data_lib
from .export import export_onnx
from .extras import require
from .files import atomic_write
from .onnx_model import OnnxModel, description, load_onnx, write_description
from .weights import Weights

# onnxruntime.quantization.CalibrationMethod's members by the names the command takes.
# ("distribution" is left out: it calibrates for float8, and gave 10 % top-1 on the sample.)
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
DEFAULT_METHOD = "minmax"
CALIBRATION_IMAGES = 300
CHECK_IMAGES = 2000
MIN_AGREEMENT = 0.98  # of the int8 model's top-1 with the float model's, on held-out images
MAX_DROP = 0.01  # of top-1 accuracy, float to int8
BATCH = 64
CALIBRATION_BATCH = 50


class QuantizeError(RuntimeError):
    """The quantized model failed its check against the float model; nothing was written."""


@dataclass(frozen=True)
class Comparison:
    """The int8 model against the float one on ``n`` labelled images (fractions in [0, 1])."""

    n: int
    float_top1: float
    int8_top1: float
    agreement: float  # images where both models predict the same class

    @property
    def drop(self) -> float:
        return self.float_top1 - self.int8_top1

    def passes(self, min_agreement: float = MIN_AGREEMENT, max_drop: float = MAX_DROP) -> bool:
        return self.agreement >= min_agreement and self.drop <= max_drop


def quantization_sources(data: str, classes: list[str]) -> tuple[data_lib.Source, data_lib.Source]:
    """The images to calibrate on (the training part of ``data``) and the held-out ones to check on (its
    validation part), labelled in the order of ``classes``; a DataError when ``data``'s classes differ."""
    ds = data_lib.load(data)
    return (data_lib.relabel(ds.train, ds.classes, classes, data),
            data_lib.relabel(ds.val, ds.classes, classes, data))


def subset(source: data_lib.Source, n: int, seed: int = 0) -> data_lib.Source:
    """``n`` items of ``source`` drawn at random (seeded), or all of them if it holds no more."""
    if len(source) <= n:
        return source
    pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(source, data_lib.TensorSource):
        return data_lib.TensorSource(source.images[pick], source.labels[pick])
    return data_lib.FileSource([source.samples[i] for i in pick.tolist()])


def model_batches(source: data_lib.Source, preprocess: dict, batch_size: int = BATCH):
    """The readable images of ``source`` as (x, y): normalised contiguous float (N, C, R, R) and labels."""
    for batch in data_lib.batches(source, preprocess, batch_size=batch_size, train=False):
        yield batch.x, batch.y


def calibration_inputs(source: data_lib.Source, preprocess: dict) -> list:
    """The calibration batches as the numpy arrays onnxruntime's calibrator reads, all of one size (its histogram
    methods stack them): batches of ``CALIBRATION_BATCH``, a last partial one dropped unless it is the only one.
    A DataError if no image is readable."""
    images = [x for x, _ in model_batches(source, preprocess)]
    if not images:
        raise data_lib.DataError(f"no readable images among the {len(source)} drawn for calibration")
    chunks = torch.cat(images).split(CALIBRATION_BATCH)
    if len(chunks) > 1 and len(chunks[-1]) < CALIBRATION_BATCH:
        chunks = chunks[:-1]
    return [c.numpy() for c in chunks]


def compare(float_model: OnnxModel, int8_model: OnnxModel, source: data_lib.Source) -> Comparison:
    """Top-1 of both models and how often they agree, on the readable images of ``source``."""
    n = float_right = int8_right = same = 0
    for x, y in model_batches(source, float_model.preprocess):
        a, b = float_model(x).argmax(1), int8_model(x).argmax(1)
        n += len(y)
        float_right += (a == y).sum().item()
        int8_right += (b == y).sum().item()
        same += (a == b).sum().item()
    if not n:
        raise data_lib.DataError(f"no readable images among the {len(source)} held out for the check")
    return Comparison(n, float_right / n, int8_right / n, same / n)


def quantize_onnx(weights: Weights, path: str | Path, calibration: data_lib.Source, held_out: data_lib.Source, *,
                  method: str = DEFAULT_METHOD, calibration_images: int = CALIBRATION_IMAGES,
                  check_images: int = CHECK_IMAGES, min_agreement: float = MIN_AGREEMENT,
                  max_drop: float = MAX_DROP, seed: int = 0) -> Comparison:
    """Writes the int8 model to ``path`` (atomically) if it passes its check on up to ``check_images`` held-out
    images: top-1 agreement with the float model of at least ``min_agreement`` and top-1 accuracy at most
    ``max_drop`` below it. Otherwise raises QuantizeError and writes nothing. Returns the comparison."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    quantization = require("onnxruntime.quantization", "quantizing to int8", "export")
    shape_inference = require("onnxruntime.quantization.shape_inference", "quantizing to int8", "export")
    inputs = calibration_inputs(subset(calibration, calibration_images, seed), weights.preprocess)
    held_out = subset(held_out, check_images, seed)
    result = None

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(inputs)

        def get_next(self):
            return {"image": x} if (x := next(self.batches, None)) is not None else None

    with tempfile.TemporaryDirectory(prefix="mobilenet-fn-quantize-") as tmpdir:
        float_path = Path(tmpdir) / "float.onnx"
        prepared_path = Path(tmpdir) / "prepared.onnx"
        export_onnx(weights, float_path, fold_bn=True)
        float_model = load_onnx(float_path)
        with quiet():  # onnxruntime's tools print progress and log advice on stdout and stderr
            shape_inference.quant_pre_process(str(float_path), str(prepared_path))

        def write(tmp: str) -> None:
            nonlocal result
            with quiet():
                quantization.quantize_static(
                    str(prepared_path), tmp, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                    activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                    calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION_METHODS[method]),
                    extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})  # float logits: no ties
            write_description(tmp, description(weights, quantization={
                "method": method, "calibration_images": sum(len(x) for x in inputs), "format": "QDQ",
                "weights": "int8 per channel", "activations": "uint8"}))
            result = compare(float_model, load_onnx(tmp), held_out)
            if not result.passes(min_agreement, max_drop):
                raise QuantizeError(f"{path}: not written: {summary(result)}; the check asks for agreement "
                                    f"≥ {100 * min_agreement:.1f}% and a drop ≤ {100 * max_drop:.1f} points")

        atomic_write(path, write, suffix=".onnx")
    return result


@contextlib.contextmanager
def quiet():
    """Nothing printed or logged (below errors) by the code inside."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def summary(c: Comparison) -> str:
    """e.g. "on 500 held-out images: top-1 float 91.20%, int8 91.00% (-0.20 points), agreement 99.40%"."""
    return (f"on {c.n} held-out images: top-1 float {100 * c.float_top1:.2f}%, int8 {100 * c.int8_top1:.2f}% "
            f"({-100 * c.drop:+.2f} points), agreement {100 * c.agreement:.2f}%")


def as_dict(c: Comparison) -> dict:
    return {**asdict(c), "drop": c.drop}
