"""Parameters and mult-adds per layer, laid out like the paper's Tables 1 and 2.

Parameters are counted from the tree ``init`` makes, BatchNorm scale and shift included (as the paper does).
Mult-adds count the convolutions and the classifier only, at the nominal ``cfg.resolution``.
"""

from __future__ import annotations

from .model import STEM, Config, init

LAYER_TYPES = ("conv", "depthwise", "pointwise", "fc")


def _numel(tree: dict) -> int:
    return sum(t.numel() for t in tree.values())


def _out_size(size: int, stride: int) -> int:
    # Both paddings give ceil(size / stride) for a 3x3 kernel ("torch": floor((size - 1) / stride) + 1).
    return -(-size // stride)


def count(cfg: Config) -> dict:
    """{"params", "macs", "by_type": {type: {"params", "macs"}}, "layers": [row, ...]} for ``cfg``.

    Each row: name, type, stride, filter (kh, kw, in, out; depthwise: kh, kw, channels), input (H, W, C),
    params, macs.
    """
    params, _ = init(cfg)
    size = cfg.resolution
    rows = []

    def add(name, kind, stride, filt, c_in, n_params, macs_per_pixel):
        nonlocal size
        out = _out_size(size, stride)
        rows.append(
            {
                "name": name,
                "type": kind,
                "stride": stride,
                "filter": list(filt),
                "input": [size, size, c_in],
                "params": n_params,
                "macs": out * out * macs_per_pixel,
            }
        )
        size = out

    stem_w = params["stem"]["conv"]["weight"]
    o, i, k, _ = stem_w.shape
    add("conv1", "conv", STEM[0], (k, k, i, o), i, _numel(params["stem"]["conv"]) + _numel(params["stem"]["bn"]),
        k * k * i * o)
    for n, ((stride, c_in, c_out), p) in enumerate(zip(cfg.blocks(), params["blocks"]), start=1):
        if cfg.full_conv:
            add(f"conv{n + 1}", "conv", stride, (3, 3, c_in, c_out), c_in, _numel(p["conv"]) + _numel(p["bn"]),
                9 * c_in * c_out)
            continue
        add(f"block{n}.dw", "depthwise", stride, (3, 3, c_in), c_in, _numel(p["dw"]) + _numel(p["dw_bn"]), 9 * c_in)
        add(f"block{n}.pw", "pointwise", 1, (1, 1, c_in, c_out), c_in, _numel(p["pw"]) + _numel(p["pw_bn"]),
            c_in * c_out)
    c = cfg.feature_dim
    rows.append({"name": "pool", "type": "pool", "stride": 1, "filter": [size, size], "input": [size, size, c],
                 "params": 0, "macs": 0})
    rows.append({"name": "fc", "type": "fc", "stride": 1, "filter": [c, cfg.num_classes], "input": [1, 1, c],
                 "params": _numel(params["fc"]), "macs": c * cfg.num_classes})

    by_type = {t: {"params": 0, "macs": 0} for t in LAYER_TYPES}
    for row in rows:
        if row["type"] in by_type:
            by_type[row["type"]]["params"] += row["params"]
            by_type[row["type"]]["macs"] += row["macs"]
    return {
        "config": cfg.to_dict(),
        "params": sum(r["params"] for r in rows),
        "macs": sum(r["macs"] for r in rows),
        "by_type": by_type,
        "layers": rows,
    }
