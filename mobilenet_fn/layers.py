"""Layers as (init, apply) pairs of pure functions.

Every ``*_init`` takes shapes and a ``torch.Generator`` and returns a dict of tensors; every ``*_apply`` takes
that dict and an activation and returns a new activation. Nothing is mutated: BatchNorm returns its new running
statistics instead of writing them. Weight layouts are named with einops so they read like the paper:

    conv       (o, i, kh, kw)   a full convolution (the stem, or every block in the Table 4 ablation)
    depthwise  (c, kh, kw)      one 3x3 filter per channel, applied with groups=c
    pointwise  (o, i)           a 1x1 convolution, i.e. a matrix over channels
    linear     (o, i) + (o,)    the classifier

A convolution followed by BatchNorm in eval mode is one affine map: ``fold_batchnorm`` turns the pair into the
convolution alone with a bias, which every ``*_apply`` takes when the dict holds one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

Tree = dict[str, torch.Tensor]


def _kaiming_normal(shape: tuple[int, ...], fan_out: int, generator: torch.Generator | None) -> torch.Tensor:
    # He et al. 2015, fan-out mode: what torchvision and timm use for convolutions followed by ReLU.
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_out)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial axis: (before, after), the extra pixel going after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad(x: torch.Tensor, kernel: int, stride: int, padding: str) -> tuple[torch.Tensor, int]:
    """Returns the input to convolve and the symmetric padding to pass to ``F.conv2d``."""
    if padding == "torch" or kernel == 1:
        return x, kernel // 2
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top == bottom and left == right and top == left:
        return x, top
    return F.pad(x, (left, right, top, bottom)), 0


def _channels_last(x: torch.Tensor) -> bool:
    """Whether (N, C, H, W) ``x`` lies in memory channel-fastest (NHWC), as every N x C x 1 x 1 tensor does."""
    return x.stride(1) == 1


def _ohwi_as_oihw(weight: torch.Tensor) -> torch.Tensor:
    """A (o, kh, kw, i) weight viewed as (o, i, kh, kw) with channels-last strides, copying nothing.

    PyTorch's convolutions run channels-last when the input or the weight has channels-last strides. An
    N x C x 1 x 1 input has both layouts, so the weight decides: with NCHW strides, the 1 x 1 depthwise layers of
    a 32 px input took oneDNN's NCHW backward, ten times slower than its channels-last one.
    """
    return weight.permute(0, 3, 1, 2)


def conv_init(in_ch: int, out_ch: int, kernel: int, generator: torch.Generator | None = None) -> Tree:
    return {"weight": _kaiming_normal((out_ch, in_ch, kernel, kernel), out_ch * kernel * kernel, generator)}


def conv_apply(params: Tree, x: torch.Tensor, *, stride: int = 1, padding: str = "torch") -> torch.Tensor:
    """(N, i, H, W) -> (N, o, H/stride, W/stride), plus ``params["bias"]`` when there is one."""
    weight = params["weight"]
    x, pad = _pad(x, weight.shape[-1], stride, padding)
    return F.conv2d(x, weight, params.get("bias"), stride=stride, padding=pad)


# Training in bf16 on the CPU (autocast; oneDNN with AVX-512 BF16, with and without AMX): oneDNN's bf16 depthwise
# convolution, forward and backward, is slower than float32's with stride 2 at every map size and on maps of 2 x 2
# and 1 x 1, faster with stride 1 on maps of 8 x 8 and more (bench/depthwise_bf16.py; docs/performance.md). Those
# run in bf16; every other depthwise layer that a backward will follow runs in float32.
BF16_DEPTHWISE_MIN_PIXELS = 64


def _cpu_bf16_training(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled())


def _depthwise_in_float32(x: torch.Tensor, stride: int) -> bool:
    """Whether a depthwise layer on ``x`` runs in float32 inside a CPU bf16 training step (see above)."""
    return _cpu_bf16_training(x) and (stride > 1 or x.shape[-2] * x.shape[-1] < BF16_DEPTHWISE_MIN_PIXELS)


def depthwise_init(channels: int, kernel: int = 3, generator: torch.Generator | None = None) -> Tree:
    return {"weight": _kaiming_normal((channels, kernel, kernel), kernel * kernel, generator)}


def depthwise_apply(params: Tree, x: torch.Tensor, *, stride: int = 1, padding: str = "torch") -> torch.Tensor:
    """(N, c, H, W) -> (N, c, H/stride, W/stride), each channel filtered by its own kernel (plus the bias)."""
    w, bias = params["weight"], params.get("bias")
    kernel = w.shape[-1]
    if x.shape[-2:] == (1, 1) and kernel % 2:
        # On a 1 x 1 map (the last blocks at 32 px), either padding leaves only the centre tap on the pixel.
        y = x * rearrange(w[:, kernel // 2, kernel // 2].to(x.dtype), "c -> 1 c 1 1")  # as autocast's conv
        return y if bias is None else y + rearrange(bias, "c -> 1 c 1 1")
    if _channels_last(x):
        weight = _ohwi_as_oihw(rearrange(w, "c kh kw -> c kh kw 1"))
    else:
        weight = rearrange(w, "c kh kw -> c 1 kh kw")
    in_float32 = _depthwise_in_float32(x, stride)
    x, pad = _pad(x, kernel, stride, padding)
    if in_float32:
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x.float(), weight, bias, stride=stride, padding=pad, groups=weight.shape[0])
    return F.conv2d(x, weight, bias, stride=stride, padding=pad, groups=weight.shape[0])


def pointwise_init(in_ch: int, out_ch: int, generator: torch.Generator | None = None) -> Tree:
    return {"weight": _kaiming_normal((out_ch, in_ch), out_ch, generator)}


# Up to this many pixels per map, a channels-last pointwise layer runs as a matrix product over channels: on the
# CPU, oneDNN's 1x1 convolution (forward and backward) is the slower of the two on 2x2 and 1x1 maps (the last
# blocks at 32 px), the faster from 4x4 maps up (bench/throughput.py).
POINTWISE_MATMUL_MAX_PIXELS = 4


def pointwise_apply(params: Tree, x: torch.Tensor) -> torch.Tensor:
    """(N, i, H, W) -> (N, o, H, W), plus the bias when there is one."""
    w, bias = params["weight"], params.get("bias")
    if not _channels_last(x):
        return F.conv2d(x, rearrange(w, "o i -> o i 1 1"), bias)
    if x.shape[-2] * x.shape[-1] <= POINTWISE_MATMUL_MAX_PIXELS:
        y = F.linear(rearrange(x, "n c h w -> n h w c"), w, bias)  # a view of the channels-last memory
        return rearrange(y, "n h w o -> n o h w")
    return F.conv2d(x, _ohwi_as_oihw(rearrange(w, "o i -> o 1 1 i")), bias)


def batchnorm_init(channels: int) -> tuple[Tree, Tree]:
    """Returns (params, state): the learned scale and shift, and the running statistics."""
    params = {"weight": torch.ones(channels), "bias": torch.zeros(channels)}
    state = {"mean": torch.zeros(channels), "var": torch.ones(channels)}
    return params, state


def batchnorm_apply(
    params: Tree, state: Tree, x: torch.Tensor, *, train: bool, momentum: float, eps: float, reduce=None
) -> tuple[torch.Tensor, Tree]:
    """Normalises (N, C, H, W) per channel; returns the output and the new running statistics.

    PyTorch's conventions: in training the batch statistics normalise, ``momentum`` weights the new batch in the
    running mean/var, and the running variance is the unbiased one. In eval the running statistics normalise
    and the state comes back unchanged. ``reduce`` (a sum across processes) makes the batch statistics those of
    the global batch: synchronised BatchNorm.
    """
    if not train:
        y = F.batch_norm(x, state["mean"], state["var"], params["weight"], params["bias"], False, 0.0, eps)
        return y, state
    if reduce is not None:
        return _synced_batchnorm(params, state, x, momentum=momentum, eps=eps, reduce=reduce)
    # Fresh copies for the fused kernel to update, so the caller's state is never written.
    mean, var = state["mean"].clone(), state["var"].clone()
    y = F.batch_norm(x, mean, var, params["weight"], params["bias"], True, momentum, eps)
    return y, {"mean": mean, "var": var}


class _SyncedBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of every process's batch, with the analytic backward (as torch.nn.SyncBatchNorm):
    autograd through the decomposed statistics cancels large terms and loses float32 precision.

    ``reduce`` sums a tensor over processes (no gradient). Forward: two sums (mean, then the variance about it).
    Backward: one sum of (sum dy, sum dy * x_hat), so that each process gets its share of d(sum of losses)/dx.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reduce):
        n_local = x.numel() // x.shape[1]
        first = reduce(torch.cat([x.sum((0, 2, 3)), x.new_full((1,), float(n_local))]))
        count = first[-1]
        mean = first[:-1] / count
        centered = x - mean.view(1, -1, 1, 1)
        var = reduce((centered * centered).sum((0, 2, 3))) / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centered * invstd.view(1, -1, 1, 1)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.reduce = reduce
        return x_hat * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), mean, var * count / (count - 1)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x_hat, weight, invstd, count = ctx.saved_tensors
        local = torch.stack([dy.sum((0, 2, 3)), (dy * x_hat).sum((0, 2, 3))])
        total = ctx.reduce(local) / count
        dx = (dy - total[0].view(1, -1, 1, 1) - x_hat * total[1].view(1, -1, 1, 1)) * (invstd * weight).view(1, -1, 1, 1)
        return dx, local[1], local[0], None, None


def _synced_batchnorm(params: Tree, state: Tree, x: torch.Tensor, *, momentum: float, eps: float, reduce):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in at least float32
    y, mean, unbiased_var = _SyncedBatchNorm.apply(xf, params["weight"], params["bias"], eps, reduce)
    new_state = {
        "mean": (1 - momentum) * state["mean"] + momentum * mean.detach(),
        "var": (1 - momentum) * state["var"] + momentum * unbiased_var.detach(),
    }
    return y.to(x.dtype), new_state


def fold_batchnorm(conv: Tree, bn: Tree, bn_state: Tree, eps: float) -> Tree:
    """A convolution and the eval-mode BatchNorm after it as one convolution with a bias: BatchNorm's per-channel
    scale goes into the weight's output axis (the first, in every layout here), its shift into the bias."""
    weight = conv["weight"]
    scale = bn["weight"] / torch.sqrt(bn_state["var"] + eps)
    return {"weight": weight * scale.view(-1, *[1] * (weight.dim() - 1)),
            "bias": bn["bias"] - bn_state["mean"] * scale}


def linear_init(in_features: int, out_features: int, generator: torch.Generator | None = None) -> Tree:
    # torch.nn.Linear's default: uniform in +-1/sqrt(fan_in) for the weight, zero bias as in timm.
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand((out_features, in_features), generator=generator) * 2 - 1) * bound
    return {"weight": weight, "bias": torch.zeros(out_features)}


def linear_apply(params: Tree, x: torch.Tensor) -> torch.Tensor:
    """(N, i) -> (N, o)."""
    return F.linear(x, params["weight"], params["bias"])


ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6}
