"""ONNX files that describe themselves, run with onnxruntime: what ``eval`` and ``predict`` use for a ``.onnx``.

``export`` and ``quantize`` write the weights file's description (config, class names, preprocessing, the data
split) as JSON under one metadata key, so the ONNX file alone is enough to evaluate or predict with:

    model = load_onnx("model.int8.onnx")
    logits = model(x)  # (N, C, R, R) normalised float -> (N, num_classes), on the CPU
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .extras import require
from .model import Config
from .weights import Weights, description_problem

METADATA_KEY = "mobilenet_fn"
ONNX_FORMAT = "mobilenet-fn-onnx/1"
INPUT, OUTPUT = "image", "logits"


class OnnxModelError(ValueError):
    """An ONNX file that onnxruntime cannot read, or that mobilenet-fn did not write."""


def description(weights: Weights, **extra) -> dict:
    """What an ONNX file carries of ``weights`` besides the graph; ``extra`` adds entries (how it was quantized)."""
    return {"format": ONNX_FORMAT, "config": weights.config.to_dict(), "classes": list(weights.classes),
            "preprocess": dict(weights.preprocess), "data": weights.data, **extra}


def write_description(path: str | Path, desc: dict) -> None:
    """Stores ``desc`` in the metadata of the ONNX file at ``path`` (rewritten in place: a temporary file)."""
    onnx = require("onnx", "writing ONNX metadata", "export")
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(desc))
    onnx.save(model, str(path))


@dataclass
class OnnxModel:
    """An ONNX file of ours, ready to run: the same fields as ``Weights`` describe it."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    config: Config
    classes: list[str]
    preprocess: dict
    data: dict | None
    quantization: dict | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, R, R) normalised float -> (N, num_classes) float32 logits, on the CPU."""
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: image})[0])


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def session_for(path: str | Path):
    """An onnxruntime CPU session with onnxruntime's default options (one thread per physical core)."""
    ort = require("onnxruntime", "running ONNX models", "export")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path) -> OnnxModel:
    """Opens an ONNX file written by ``export`` or ``quantize`` and checks its description; anything else is a
    one-line OnnxModelError. To run it with other onnxruntime options (a thread count, for one), replace its
    session: ``dataclasses.replace(model, session=onnxruntime.InferenceSession(path, options))``."""
    path = Path(path)
    if not path.exists():
        raise OnnxModelError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxModelError(f"{path}: is a folder, not an ONNX file")
    try:
        session = session_for(path)
    except ImportError:
        raise
    except Exception:  # onnxruntime's message for a bad file is long and varies; the user gets one line
        raise OnnxModelError(f"{path}: onnxruntime cannot read it as an ONNX model") from None
    desc = _description(path, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if inputs != [INPUT] or outputs[:1] != [OUTPUT]:
        raise OnnxModelError(f"{path}: expected input {INPUT!r} and output {OUTPUT!r}, found {inputs} and {outputs}")
    return OnnxModel(path, session, Config.from_dict(desc["config"]), desc["classes"], desc["preprocess"],
                     desc.get("data"), desc.get("quantization"))


def _description(path: Path, text: str | None) -> dict:
    not_ours = (f"{path}: not an ONNX file from mobilenet-fn (it lacks the {METADATA_KEY!r} metadata with class "
                f"names and preprocessing); write one with `mobilenet-fn export` or `mobilenet-fn quantize`")
    if text is None:
        raise OnnxModelError(not_ours)
    try:
        desc = json.loads(text)
    except ValueError:
        raise OnnxModelError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON") from None
    if not isinstance(desc, dict) or desc.get("format") != ONNX_FORMAT:
        found = desc.get("format") if isinstance(desc, dict) else type(desc).__name__
        raise OnnxModelError(f"{path}: metadata format {found!r}, expected {ONNX_FORMAT!r}")
    quantization = desc.get("quantization")
    if quantization is not None and not isinstance(quantization, dict):
        raise OnnxModelError(f"{path}: quantization must be a dict, not {type(quantization).__name__}")
    problem = description_problem({k: v for k, v in desc.items() if k not in ("format", "quantization")})
    if problem:
        raise OnnxModelError(f"{path}: {problem}")
    return desc
