"""MobileNet v1 (Howard et al. 2017, arXiv:1704.04861) as a pure function of a parameter tree.

    params, state = init(cfg, generator)
    logits, state = apply(cfg, params, state, x, train=True)

``params`` holds everything that is learned, ``state`` the BatchNorm running statistics (no gradient, no weight
decay). Both are nested dicts and lists of tensors, so ``torch.func`` and ``torch.utils._pytree`` walk them.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import layers

# The paper's Table 1: a 3x3 stem, then separable blocks (depthwise stride, pointwise output channels).
# Table 1 prints "s2" for the last depthwise layer, which contradicts its own 7x7 output: it is stride 1.
STEM = (2, 32)
BLOCKS = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)
SHALLOW_REMOVED = range(6, 11)  # Table 5: the five 14x14x512 blocks.

ACTIVATIONS = tuple(layers.ACTIVATIONS)
PADDINGS = ("torch", "tf")
MIN_RESOLUTION = 32


@dataclass(frozen=True)
class Config:
    """Everything that fixes the architecture. ``resolution`` is the nominal input size (counting and
    preprocessing); ``apply`` takes any input of at least 32 px."""

    alpha: float = 1.0
    resolution: int = 224
    num_classes: int = 1000
    in_channels: int = 3
    activation: str = "relu"  # the paper's; "relu6" as in the TF-slim, Keras and timm weights
    padding: str = "torch"  # symmetric 1; "tf" is TensorFlow SAME, needed for Google's weights
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1  # PyTorch convention: the weight of the new batch
    dropout: float = 0.0
    full_conv: bool = False  # Table 4 ablation: every separable block becomes a full 3x3 convolution
    shallow: bool = False  # Table 5 ablation: the five 14x14x512 blocks removed

    def __post_init__(self) -> None:
        problems = []
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if self.resolution < MIN_RESOLUTION:
            problems.append(f"resolution must be at least {MIN_RESOLUTION}, got {self.resolution}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be at least 1, got {self.num_classes}")
        if self.in_channels < 1:
            problems.append(f"in_channels must be at least 1, got {self.in_channels}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.padding not in PADDINGS:
            problems.append(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if not self.bn_eps > 0:
            problems.append(f"bn_eps must be > 0, got {self.bn_eps}")
        if not 0 <= self.bn_momentum <= 1:
            problems.append(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("; ".join(problems))

    def channels(self, c: int) -> int:
        """The width multiplier: int(c * alpha), at least 8."""
        return max(8, int(c * self.alpha))

    def blocks(self) -> list[tuple[int, int, int]]:
        """(stride, in_channels, out_channels) of each block after the stem, widths multiplied by alpha."""
        rows = [row for i, row in enumerate(BLOCKS) if not (self.shallow and i in SHALLOW_REMOVED)]
        out = []
        c_in = self.channels(STEM[1])
        for stride, c in rows:
            out.append((stride, c_in, self.channels(c)))
            c_in = self.channels(c)
        return out

    @property
    def feature_dim(self) -> int:
        return self.channels(BLOCKS[-1][1])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def resolution_for_rho(rho: float) -> int:
    """The resolution multiplier rho of the paper: input size round(224 * rho)."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    return round(224 * rho)


def init(cfg: Config, generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """Returns (params, state) for ``cfg``, drawn from ``generator`` (torch's default RNG when None)."""
    stem_out = cfg.channels(STEM[1])
    stem_bn, stem_bn_state = layers.batchnorm_init(stem_out)
    params = {"stem": {"conv": layers.conv_init(cfg.in_channels, stem_out, 3, generator), "bn": stem_bn}}
    state = {"stem": {"bn": stem_bn_state}}
    params["blocks"], state["blocks"] = [], []
    for _, c_in, c_out in cfg.blocks():
        if cfg.full_conv:
            bn, bn_state = layers.batchnorm_init(c_out)
            params["blocks"].append({"conv": layers.conv_init(c_in, c_out, 3, generator), "bn": bn})
            state["blocks"].append({"bn": bn_state})
            continue
        dw_bn, dw_bn_state = layers.batchnorm_init(c_in)
        pw_bn, pw_bn_state = layers.batchnorm_init(c_out)
        params["blocks"].append(
            {
                "dw": layers.depthwise_init(c_in, 3, generator),
                "dw_bn": dw_bn,
                "pw": layers.pointwise_init(c_in, c_out, generator),
                "pw_bn": pw_bn,
            }
        )
        state["blocks"].append({"dw_bn": dw_bn_state, "pw_bn": pw_bn_state})
    params["fc"] = layers.linear_init(cfg.feature_dim, cfg.num_classes, generator)
    return params, state


# Each convolution of a tree and the BatchNorm after it. A tree made by ``fold_batchnorm`` has the convolutions
# alone, each with a bias: the same walk runs both.
BATCHNORM_OF = {"conv": "bn", "dw": "dw_bn", "pw": "pw_bn"}


def fold_batchnorm(cfg: Config, params: dict, state: dict) -> dict:
    """The eval-mode model with every BatchNorm folded into the convolution before it: the same tree without the
    BatchNorm entries, each convolution a {"weight", "bias"}. ``apply(cfg, folded, None, x, train=False)`` and
    ``features`` run it, faster than BatchNorm in eval (``bench/throughput.py`` measures both)."""

    def fold(p: dict, s: dict) -> dict:
        folded = {name: layer for name, layer in p.items() if name not in BATCHNORM_OF.values()}
        for conv, bn in BATCHNORM_OF.items():
            if bn in p:
                folded[conv] = layers.fold_batchnorm(p[conv], p[bn], s[bn], cfg.bn_eps)
        return folded

    return {"stem": fold(params["stem"], state["stem"]),
            "blocks": [fold(p, s) for p, s in zip(params["blocks"], state["blocks"])], "fc": params["fc"]}


def _trunk(cfg: Config, params: dict, state: dict | None, x: torch.Tensor, train: bool, endpoints: dict | None,
           bn_reduce=None):
    """Stem and blocks: (N, C, H, W) -> (N, feature_dim, H/32, W/32) and the new state; ``params`` may be folded
    (then ``state`` is None and the new state holds empty dicts)."""
    # In place on BatchNorm's (or a folded convolution's) fresh output, as timm does: saves a pass over memory
    # and stays pure from outside.
    act = functools.partial(layers.ACTIVATIONS[cfg.activation], inplace=True)
    bn = dict(train=train, momentum=cfg.bn_momentum, eps=cfg.bn_eps, reduce=bn_reduce)

    def unit(convolve, p: dict, s: dict, name: str, x: torch.Tensor, new: dict) -> torch.Tensor:
        """Convolution ``name`` of the block ``p``, its BatchNorm unless folded, the activation."""
        x = convolve(p[name], x)
        norm = BATCHNORM_OF[name]
        if norm in p:
            x, new[norm] = layers.batchnorm_apply(p[norm], s[norm], x, **bn)
        return act(x)

    def record(x: torch.Tensor, stride: int) -> None:
        if endpoints is not None:
            endpoints[f"stride{stride}"] = x  # the last activation at each output stride wins

    if state is None:  # a folded tree: no BatchNorm, so no running statistics
        state = {"stem": {}, "blocks": [{}] * len(params["blocks"])}
    new_state = {"stem": {}, "blocks": []}
    conv = functools.partial(layers.conv_apply, padding=cfg.padding)
    x = unit(functools.partial(conv, stride=STEM[0]), params["stem"], state["stem"], "conv", x, new_state["stem"])
    stride = STEM[0]
    record(x, stride)
    for (s, _, _), p, st in zip(cfg.blocks(), params["blocks"], state["blocks"]):
        new = {}
        if cfg.full_conv:
            x = unit(functools.partial(conv, stride=s), p, st, "conv", x, new)
        else:
            x = unit(functools.partial(layers.depthwise_apply, stride=s, padding=cfg.padding), p, st, "dw", x, new)
            x = unit(layers.pointwise_apply, p, st, "pw", x, new)
        new_state["blocks"].append(new)
        stride *= s
        record(x, stride)
    return x, new_state


def _check_input(cfg: Config, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"expected input of shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    if min(x.shape[-2:]) < MIN_RESOLUTION:
        raise ValueError(f"input must be at least {MIN_RESOLUTION}x{MIN_RESOLUTION}, got {tuple(x.shape[-2:])}")


def apply(
    cfg: Config, params: dict, state: dict | None, x: torch.Tensor, *, train: bool, bn_reduce=None
) -> tuple[torch.Tensor, dict | None]:
    """(N, C, H, W) images -> ((N, num_classes) logits, new state). Pure: nothing passed in is modified.

    In training, BatchNorm normalises with batch statistics and the returned state holds the updated running
    statistics, and dropout (when ``cfg.dropout`` > 0) draws from torch's RNG. In eval, the state comes back as is.
    ``bn_reduce``, a sum across processes, synchronises BatchNorm's batch statistics. A ``fold_batchnorm`` tree
    runs with ``state=None``.
    """
    _check_input(cfg, x)
    x, new_state = _trunk(cfg, params, state, x, train, None, bn_reduce)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, C); its backward keeps channels-last, unlike mean()
    x = F.dropout(x, cfg.dropout, training=train)
    return layers.linear_apply(params["fc"], x), (new_state if train else state)


def features(cfg: Config, params: dict, state: dict | None, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backbone's endpoints in eval mode: {"stride2": (N, C, H/2, W/2), ..., "stride32": (N, C, H/32, W/32)}.
    ``params`` may be a ``fold_batchnorm`` tree (``state`` None)."""
    _check_input(cfg, x)
    endpoints: dict[str, torch.Tensor] = {}
    _trunk(cfg, params, state, x, False, endpoints)
    return endpoints


def with_classifier_for(cfg: Config, params: dict, generator: torch.Generator | None = None) -> dict:
    """``params`` (of a model with any number of classes) with a classifier for ``cfg.num_classes``: kept when it
    has that many outputs, else drawn anew from ``generator`` (fine-tuning on other classes)."""
    if params["fc"]["weight"].shape[0] == cfg.num_classes:
        return params
    return {**params, "fc": layers.linear_init(cfg.feature_dim, cfg.num_classes, generator)}
