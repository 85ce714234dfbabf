"""Export: the eval-mode model as ONNX, checked against onnxruntime before the file is put in place.

The exported graph is the model's own walk (``model.apply``) on the parameter tree, or on its BatchNorm-folded
tree (``model.fold_batchnorm``), registered as buffers of a small ``nn.Module`` that ``torch.onnx`` traces.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

from .extras import require
from .files import atomic_write
from .model import apply, fold_batchnorm
from .onnx_model import description, session_for, write_description
from .weights import Weights


class InferenceModule(torch.nn.Module):
    """The eval-mode model as an ``nn.Module`` for exporters: the trees are registered as buffers (named by their
    path, e.g. ``params_blocks_0_dw_weight``) and ``forward`` calls ``apply`` on them (folded or not)."""

    def __init__(self, weights: Weights, fold_bn: bool = False):
        super().__init__()
        cfg = weights.config
        self.cfg = cfg
        trees = {"params": fold_batchnorm(cfg, weights.params, weights.state)} if fold_bn else {
            "params": weights.params, "state": weights.state}
        leaves, self.spec = tree_flatten_with_path(trees)
        self.names = [re.sub(r"\W+", "_", keystr(path)).strip("_") for path, _ in leaves]
        for name, (_, t) in zip(self.names, leaves):
            self.register_buffer(name, t.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trees = tree_unflatten([getattr(self, n) for n in self.names], self.spec)
        return apply(self.cfg, trees["params"], trees.get("state"), x, train=False)[0]  # state None: folded


class ExportError(RuntimeError):
    """The exported model does not compute what ``apply`` computes."""


ONNX_TOLERANCE = 1e-4


def export_onnx(weights: Weights, path: str | Path, fold_bn: bool = False, opset: int = 18, *,
                check: bool = True) -> float | None:
    """Writes an ONNX model, input "image" (N, C, R, R) with a dynamic batch axis N, output "logits"
    (N, num_classes), where R is the config's resolution; its metadata carries the class names and preprocessing
    (``onnx_model.description``). With ``check``, onnxruntime runs it at batch sizes 1
    and 3 before it is put in place; returns the largest difference from ``apply``'s logits, relative to their
    scale (``check_onnx``; an ExportError above 1e-4). The file appears atomically: a temporary file beside ``path``, then a rename."""
    require("onnxscript", "exporting ONNX", "export")
    require("onnx", "exporting ONNX", "export")
    cfg = weights.config
    module = InferenceModule(weights, fold_bn).eval()
    example = torch.zeros(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    diff = None

    def write(tmp: str) -> None:
        nonlocal diff
        torch.onnx.export(module, (example,), tmp, dynamo=True, input_names=["image"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=opset,
                          external_data=False, verbose=False)
        diff = check_onnx(weights, tmp) if check else None
        if diff is not None and diff > ONNX_TOLERANCE:
            raise ExportError(f"{path}: not written: onnxruntime's logits differ from apply's by {diff:.2e} (relative)")
        write_description(tmp, description(weights))

    atomic_write(path, write, suffix=".onnx")
    return diff


def check_onnx(weights: Weights, path: str | Path, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
    """The largest absolute difference between onnxruntime's logits and ``apply``'s on random inputs, divided by
    the largest |logit| where that is above 1: float32's rounding grows with the values, so a model with larger
    logits differs more in absolute terms (2e-4 at logits of 8, for one)."""
    cfg = weights.config
    session = session_for(path)
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batch_sizes:
        x = torch.randn(n, cfg.in_channels, cfg.resolution, cfg.resolution, generator=generator)
        with torch.no_grad():
            ref = apply(cfg, weights.params, weights.state, x, train=False)[0]
        out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        worst = max(worst, (out - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
    return worst

