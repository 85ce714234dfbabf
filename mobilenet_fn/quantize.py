"""int8 ONNX: the BatchNorm-folded model exported, then statically quantized with ONNX Runtime's tools and kept
only if it agrees with the float model on held-out images.

    calibration, held_out = quantization_sources("sample", weights.classes)
    result = quantize_onnx(weights, "model.int8.onnx", calibration, held_out)

QDQ format, int8 weights per output channel, uint8 activations with ranges calibrated on images that the weights
file's own preprocessing prepares. Per-channel matters for depthwise filters, whose ranges differ by orders of
magnitude from one channel to the next: one range per tensor collapses them.

The weights are chosen so that the file computes the same on every x86 CPU. Without VNNI (AVX2, or AVX-512
without VNNI), ONNX Runtime's u8s8 matrix kernels (MLAS's ConvSym kernel for the stem and pointwise convolutions,
QGemm for MatMul and Gemm) multiply with vpmaddubsw, which adds two adjacent uint8 × int8 products into an int16 and
saturates: with full 8-bit weights a pair reaches 2 · 255 · 127 = 64770, and the sum is clipped to 32767, silently (a
model checked on a VNNI machine agreed 83.6 % with float on an AVX2 one). Those weights are therefore 7-bit
(onnxruntime's ``reduce_range``: symmetric, |w| ≤ 64), and a pair is at most 2 · 255 · 64 = 32640: no input can
saturate it. Depthwise filters keep their 8 bits (|w| ≤ 127): every depthwise kernel of MLAS multiplies one uint8
input by one weight at a time, widened first (ConvSym's AVX2 kernel zero- and sign-extends both to 32 bits for
vpmaddwd; its AVX-512 kernel leaves a zero byte beside each, so a vpmaddubsw pair is one product, at most 255 · 128 =
32640; the VNNI kernels accumulate in 32 bits; the generic kernel that takes channel counts not a multiple of 16
widens to 16 bits), so they cannot saturate. Depthwise filters are also where 7 bits cost most top-1; unsigned
8-bit weights everywhere (MLAS's U8U8 kernels, exact on every CPU) kept the accuracy but lost most of the speed.
Both are measured by bench/quantize.py (docs/deployment.md, int8).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .batches import batches
from .data import load, relabel
from .export import export_onnx
from .extras import require
from .files import atomic_write
from .onnx_model import OnnxModel, description, load_onnx, write_description
from .quantize_options import (
    CALIBRATION_IMAGES, CALIBRATION_METHODS, CHECK_IMAGES, DEFAULT_METHOD, MAX_DROP, MIN_AGREEMENT, NEAR_TIE,
)
from .sources import DataError, Source
from .weights import Weights

MAX_WEIGHT = 64  # |int8 weight| with reduce_range: 2 · 255 · 64 ≤ 32767, no u8s8 pair sum can saturate
MAX_DEPTHWISE_WEIGHT = 127  # |int8 weight| of a depthwise filter: MLAS multiplies those one product at a time
BATCH = 64
CALIBRATION_BATCH = 50


class QuantizeError(RuntimeError):
    """The quantized model failed its check against the float model; nothing was written."""


@dataclass(frozen=True)
class Comparison:
    """The int8 model against the float one on ``n`` labelled images (fractions in [0, 1]).

    ``agreement`` counts the images where both pick the same class. ``decisive_agreement`` forgives a different
    pick where the float model gives it a probability within ``near_tie`` of its own top class's, and is what the
    check asks for. The reason: were the float model's probabilities calibrated, trading its top class c for c'
    would lower the expected accuracy on that image by p(c) - p(c'); a flip inside a near-tie costs less than
    ``near_tie`` in expectation, and what such flips cost together is measured by the drop in top-1, which the
    check bounds too. A weakly trained model has many near-ties (on 11 classes its top class often holds 0.3), so
    the plain agreement of a faithful int8 copy falls to 90 % there while top-1 moves by 0.2 points. Real damage
    (a layer whose weights collapse, a saturating kernel) sends images to classes the float model rules out, and
    those count in full."""

    n: int
    float_top1: float
    int8_top1: float
    agreement: float
    decisive_agreement: float
    near_tie: float

    @property
    def drop(self) -> float:
        return self.float_top1 - self.int8_top1

    def passes(self, min_agreement: float = MIN_AGREEMENT, max_drop: float = MAX_DROP) -> bool:
        return self.decisive_agreement >= min_agreement and self.drop <= max_drop


def comparison(float_logits: torch.Tensor, int8_logits: torch.Tensor, labels: torch.Tensor,
               near_tie: float = NEAR_TIE) -> Comparison:
    """The Comparison of the (N, classes) logits of both models on N images labelled ``labels``."""
    float_pick, int8_pick = float_logits.argmax(1), int8_logits.argmax(1)
    p = float_logits.float().softmax(1)
    gap = p.gather(1, float_pick[:, None]) - p.gather(1, int8_pick[:, None])  # (N, 1), ≥ 0: how much worse
    same = float_pick == int8_pick
    n = len(labels)
    return Comparison(n, (float_pick == labels).sum().item() / n, (int8_pick == labels).sum().item() / n,
                      same.sum().item() / n, (same | (gap[:, 0] < near_tie)).sum().item() / n, near_tie)


def quantization_sources(name: str, classes: list[str]) -> tuple[Source, Source]:
    """The images to calibrate on (the training part of the data set ``name``) and the held-out ones to check on
    (its validation part), labelled in the order of ``classes``; a DataError when its classes differ."""
    dataset = load(name)
    return (relabel(dataset.train, dataset.classes, classes, name),
            relabel(dataset.val, dataset.classes, classes, name))


def random_subset(source: Source, n: int, seed: int = 0) -> Source:
    """``n`` items of ``source`` drawn at random (seeded), in source order, or all of them if it holds no more."""
    if len(source) <= n:
        return source
    pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
    return source.subset(pick.sort().values)


def model_batches(source: Source, preprocess: dict, batch_size: int = BATCH):
    """The readable images of ``source`` as (x, y): normalised contiguous float (N, C, R, R) and labels."""
    for batch in batches(source, preprocess, batch_size=batch_size, train=False):
        yield batch.x, batch.y


def calibration_inputs(source: Source, preprocess: dict) -> list:
    """The calibration batches as the numpy arrays onnxruntime's calibrator reads, all of one size (its histogram
    methods stack them): batches of ``CALIBRATION_BATCH``, a last partial one dropped unless it is the only one.
    A DataError if no image is readable."""
    images = [x for x, _ in model_batches(source, preprocess)]
    if not images:
        raise DataError(f"no readable images among the {len(source)} drawn for calibration")
    chunks = torch.cat(images).split(CALIBRATION_BATCH)
    if len(chunks) > 1 and len(chunks[-1]) < CALIBRATION_BATCH:
        chunks = chunks[:-1]
    return [c.numpy() for c in chunks]


def compare(float_model: OnnxModel, int8_model: OnnxModel, source: Source,
            near_tie: float = NEAR_TIE) -> Comparison:
    """Top-1 of both models and how often they agree, on the readable images of ``source``."""
    float_logits, int8_logits, labels = [], [], []
    for x, y in model_batches(source, float_model.preprocess):
        float_logits.append(float_model(x))
        int8_logits.append(int8_model(x))
        labels.append(y)
    if not labels:
        raise DataError(f"no readable images among the {len(source)} held out for the check")
    return comparison(torch.cat(float_logits), torch.cat(int8_logits), torch.cat(labels), near_tie)


def depthwise_weights(model) -> list[str]:
    """The names of the weight initializers of ``model``'s (an onnx.ModelProto) depthwise convolutions: a Conv
    whose weight (C, 1, kh, kw) gives each of its ``group`` = C channels a filter of its own."""
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if shape is not None and group > 1 and shape[:2] == (group, 1):
            names.append(node.input[1])
    return names


def quantize_onnx(weights: Weights, path: str | Path, calibration: Source, held_out: Source, *,
                  method: str = DEFAULT_METHOD, calibration_images: int = CALIBRATION_IMAGES,
                  check_images: int = CHECK_IMAGES, min_agreement: float = MIN_AGREEMENT,
                  max_drop: float = MAX_DROP, near_tie: float = NEAR_TIE, seed: int = 0) -> Comparison:
    """Writes the int8 model to ``path`` (atomically) if it passes its check on up to ``check_images`` held-out
    images: top-1 agreement with the float model, outside near-ties (see Comparison), of at least
    ``min_agreement``, and top-1 accuracy at most ``max_drop`` below the float model's. Otherwise raises
    QuantizeError and writes nothing. Returns the comparison."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    quantization = require("onnxruntime.quantization", "quantizing to int8", "export")
    shape_inference = require("onnxruntime.quantization.shape_inference", "quantizing to int8", "export")
    onnx = require("onnx", "quantizing to int8", "export")
    inputs = calibration_inputs(random_subset(calibration, calibration_images, seed), weights.preprocess)
    held_out = random_subset(held_out, check_images, seed)
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
        full_range = {name: [{"axis": 0, "reduce_range": False}]  # 8-bit: see the module's docstring
                      for name in depthwise_weights(onnx.load(prepared_path))}

        def write(tmp: str) -> None:
            nonlocal result
            with quiet():
                quantization.quantize_static(
                    str(prepared_path), tmp, Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                    reduce_range=True,  # MAX_WEIGHT, but for the depthwise filters in full_range
                    activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                    calibrate_method=getattr(quantization.CalibrationMethod, CALIBRATION_METHODS[method]),
                    extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"],  # float logits: no ties
                                   "TensorQuantOverrides": full_range})
            write_description(tmp, description(weights, quantization={
                "method": method, "calibration_images": sum(len(x) for x in inputs), "format": "QDQ",
                "weights": f"int8 per output channel, symmetric: |w| ≤ {MAX_DEPTHWISE_WEIGHT} in depthwise "
                           f"convolutions, |w| ≤ {MAX_WEIGHT} (7-bit) in the others and the classifier",
                "activations": "uint8",
                "assumes": f"ONNX Runtime's x86 kernels: those that add uint8 x int8 products in pairs into a "
                           f"saturating int16 on CPUs without VNNI (convolutions other than depthwise, MatMul, Gemm) "
                           f"get 7-bit weights (2 · 255 · {MAX_WEIGHT} ≤ 32767); its depthwise kernels multiply one "
                           f"product at a time in 16 or 32 bits and get 8. The same results on every x86 CPU"}))
            result = compare(float_model, load_onnx(tmp), held_out, near_tie)
            if not result.passes(min_agreement, max_drop):
                raise QuantizeError(f"{path}: not written: {summary(result)}; the check asks for agreement outside "
                                    f"near-ties ≥ {100 * min_agreement:.1f}% and a drop ≤ {100 * max_drop:.1f} "
                                    "points")

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
    """e.g. "on 500 held-out images: top-1 float 91.20%, int8 91.00% (-0.20 points), agreement 97.40%, 99.60%
    outside near-ties (float probability gap < 0.05)"."""
    return (f"on {c.n} held-out images: top-1 float {100 * c.float_top1:.2f}%, int8 {100 * c.int8_top1:.2f}% "
            f"({-100 * c.drop:+.2f} points), agreement {100 * c.agreement:.2f}%, "
            f"{100 * c.decisive_agreement:.2f}% outside near-ties (float probability gap < {c.near_tie:g})")


def as_dict(c: Comparison) -> dict:
    return {**asdict(c), "drop": c.drop}
