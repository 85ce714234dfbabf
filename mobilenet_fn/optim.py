"""Functional optimizers and learning-rate schedules.

An optimizer is an ``(init, update)`` pair over parameter trees, every update out of place:

    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params, lr)      # lr: a 0-d tensor

``lr`` is a tensor so a compiled step sees a changing learning rate as data, not as a new constant. Weight decay
skips depthwise filters, BatchNorm and biases (paper section 4): only full convolutions, pointwise and classifier
weights decay.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch.utils._pytree import tree_map, tree_map_with_path

OPTIMIZERS = ("rmsprop", "sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


class Optimizer(NamedTuple):
    init: Callable
    update: Callable


def decays(path) -> bool:
    """Whether the leaf at a pytree key path gets weight decay: 'weight' of conv, pw and fc only."""
    keys = [getattr(k, "key", None) for k in path]
    return keys[-1] == "weight" and any(k in ("conv", "pw", "fc") for k in keys[:-1])


def decay_mask(params) -> dict:
    """A tree of bools shaped like ``params``: True where weight decay applies."""
    return tree_map_with_path(lambda path, _: decays(path), params)


def _zeros(params, fill: float = 0.0):
    return tree_map(lambda p: torch.full_like(p, fill, memory_format=torch.contiguous_format), params)


def _map(fn, *trees):
    # .contiguous() keeps every returned leaf in the layout it came in with (params are made contiguous),
    # even when a gradient came back channels-last: a compiled step then never sees new strides.
    return tree_map(lambda *leaves: fn(*leaves).contiguous(), *trees)


def _with_decay(grads, params, weight_decay: float):
    """L2 regularisation coupled into the gradient (SGD, RMSprop), masked by ``decay_mask``."""
    if not weight_decay:
        return grads
    return tree_map(lambda g, p, m: g + weight_decay * p if m else g, grads, params, decay_mask(params))


def sgd(momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0) -> Optimizer:
    def init(params):
        return {"momentum": _zeros(params)}

    def update(grads, opt_state, params, lr):
        grads = _with_decay(grads, params, weight_decay)
        buf = _map(lambda b, g: momentum * b + g, opt_state["momentum"], grads)
        direction = _map(lambda g, b: g + momentum * b, grads, buf) if nesterov else buf
        return _map(lambda p, d: p - lr * d, params, direction), {"momentum": buf}

    return Optimizer(init, update)


def rmsprop(decay: float = 0.9, momentum: float = 0.9, eps: float = 1e-3, weight_decay: float = 0.0) -> Optimizer:
    """RMSprop as TensorFlow defines it (what the paper trained with): the mean square starts at 1 and eps is
    added inside the square root, which keeps the first steps small."""

    def init(params):
        return {"square_avg": _zeros(params, 1.0), "momentum": _zeros(params)}

    def update(grads, opt_state, params, lr):
        grads = _with_decay(grads, params, weight_decay)
        sq = _map(lambda s, g: decay * s + (1 - decay) * g * g, opt_state["square_avg"], grads)
        buf = _map(lambda b, g, s: momentum * b + lr * g * torch.rsqrt(s + eps), opt_state["momentum"], grads, sq)
        return _map(lambda p, b: p - b, params, buf), {"square_avg": sq, "momentum": buf}

    return Optimizer(init, update)


def adamw(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    """Adam with decoupled weight decay (Loshchilov & Hutter), the decay masked by ``decay_mask``."""

    def init(params):
        return {"count": torch.zeros(()), "m": _zeros(params), "v": _zeros(params)}

    def update(grads, opt_state, params, lr):
        count = opt_state["count"] + 1
        m = _map(lambda m, g: b1 * m + (1 - b1) * g, opt_state["m"], grads)
        v = _map(lambda v, g: b2 * v + (1 - b2) * g * g, opt_state["v"], grads)
        c1, c2 = 1 - b1**count, 1 - b2**count
        mask = decay_mask(params)

        def new(p, m, v, decay):
            step = (m / c1) / ((v / c2).sqrt() + eps)
            if decay and weight_decay:
                step = step + weight_decay * p
            return p - lr * step

        return _map(new, params, m, v, mask), {"count": count, "m": m, "v": v}

    return Optimizer(init, update)


def make_optimizer(name: str, *, weight_decay: float = 0.0, momentum: float = 0.9) -> Optimizer:
    if name == "sgd":
        return sgd(momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "rmsprop":
        return rmsprop(momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return adamw(weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def make_schedule(
    name: str, base_lr: float, total_steps: int, *, warmup_steps: int = 0, decay_every: int = 0, gamma: float = 0.1
) -> Callable[[int], float]:
    """step -> learning rate. ``cosine``: linear warmup then cosine to 0; ``step``: times ``gamma`` every
    ``decay_every`` steps (default: a third of the run); ``constant``: warmup then flat."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")
    every = decay_every or max(1, math.ceil(total_steps / 3))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        if name == "cosine":
            t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if name == "step":
            return base_lr * gamma ** (step // every)
        return base_lr

    return schedule
