"""Importers from timm and Hugging Face, and ONNX export.

Each importer maps a foreign state dict onto this project's (params, state) trees; the layouts differ only in
naming and in the 1x1 and depthwise kernels' trailing singleton axes, which einops strips.
"""

from __future__ import annotations

import re

import torch
from einops import rearrange

from .model import Config


def _bn(sd: dict, prefix: str) -> tuple[dict, dict]:
    params = {"weight": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}
    state = {"mean": sd[f"{prefix}.running_mean"], "var": sd[f"{prefix}.running_var"]}
    return params, state


def _numeric_key(prefix: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", prefix))


def from_timm(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """timm ``mobilenetv1_*`` state dict -> (params, state). Keys: conv_stem, bn1, blocks.S.B.{conv_dw, bn1,
    conv_pw, bn2}, classifier."""
    sd = {k: v.detach().float().clone() for k, v in sd.items()}
    stem_bn, stem_bn_state = _bn(sd, "bn1")
    params = {"stem": {"conv": {"weight": sd["conv_stem.weight"]}, "bn": stem_bn}, "blocks": []}
    state = {"stem": {"bn": stem_bn_state}, "blocks": []}
    prefixes = sorted((k[: -len(".conv_dw.weight")] for k in sd if k.endswith(".conv_dw.weight")), key=_numeric_key)
    for p in prefixes:
        dw_bn, dw_state = _bn(sd, f"{p}.bn1")
        pw_bn, pw_state = _bn(sd, f"{p}.bn2")
        params["blocks"].append({
            "dw": {"weight": rearrange(sd[f"{p}.conv_dw.weight"], "c 1 kh kw -> c kh kw")},
            "dw_bn": dw_bn,
            "pw": {"weight": rearrange(sd[f"{p}.conv_pw.weight"], "o i 1 1 -> o i")},
            "pw_bn": pw_bn,
        })
        state["blocks"].append({"dw_bn": dw_state, "pw_bn": pw_state})
    params["fc"] = {"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]}
    return params, state
