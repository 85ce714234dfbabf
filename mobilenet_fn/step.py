"""The training step, built in one place, and the device policy that every command asks.

    policy = device_policy(device, compile="auto", resolution=224, batch=64, images=total_images)
    step = build_step(cfg, optimizer, policy, label_smoothing=0.1)
    params, state, opt_state, metrics = step(params, state, opt_state, (x, y), lr)

``opt_state`` holds the optimizer's buffers and, when the step keeps a weight EMA, an "ema" entry (``optim.ema``):
everything the step updates besides the params and state, so that checkpoints carry it as they are.

The step is a pure function built from ``torch.func.grad_and_value`` and an optimizer update, compiled with
``torch.compile`` where that is faster on the device at hand. The policy says how a model runs on a device
(compiled or eager, CUDA graphs, channels-last, autocast); its rules are fixed, taken from bench/throughput.py,
not measured at run time. ``Trainer``, ``--batch-size auto`` and the benchmark build their steps here, and
``eval`` and ``predict`` take ``inference_policy``, so what is measured is what runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .model import Config, apply, init
from .optim import clip_grad_norm, ema


# On the CPU the compiled step is faster than the eager one from about 128 px, even at 32 px, and takes a minute or
# two to compile on 2 cores (bench/throughput.py; docs/performance.md): worth it from about this much training in a
# run, counted in 32 x 32 images (the step's cost grows with the pixels). `make train` is 60,000; a Fashion-MNIST
# run of 20 epochs 1.1 M.
CPU_COMPILE_MIN_WORK = 500_000

# CUDA graphs replay a whole step as one launch: they pay while a step holds few pixels (launch-bound), not once
# it is GPU-bound (bench/throughput.py on an H100; docs/performance.md).
CUDA_GRAPHS_MAX_PIXELS = 256 * 128 * 128  # batch x height x width: 128 px x 256, or 224 px x 83


@dataclass(frozen=True)
class Policy:
    """How the model runs on ``device``: a compiled or eager step (replayed as CUDA graphs or not), activations and
    weights channels-last or not, autocast to ``amp`` (None: float32), and why that precision (``precision``)."""

    device: torch.device
    compiled: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    amp: torch.dtype | None = None
    precision: str = ""  # e.g. "bfloat16 (the CPU computes bf16 natively: AMX)"

    @property
    def amp_name(self) -> str | None:
        return str(self.amp).removeprefix("torch.") if self.amp else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def describe(self) -> str:
        """e.g. "compiled, CUDA graphs, channels-last, bfloat16"."""
        return ", ".join(x for x in ("compiled" if self.compiled else "eager", "CUDA graphs" if self.cuda_graphs
                                     else None, "channels-last" if self.channels_last else None,
                                     self.precision or self.amp_name) if x)


def use_compile(flag: str, device: torch.device, resolution: int = 224, images: int | None = None) -> bool:
    """--compile auto: always on CUDA; on the CPU when the run (``images`` trained on in all, None for a long run)
    is long enough to repay the compilation."""
    if flag != "auto":
        return flag != "off"
    if device.type != "cpu":
        return device.type == "cuda"
    return images is None or images * (resolution / 32) ** 2 >= CPU_COMPILE_MIN_WORK


def use_cuda_graphs(flag: str, device: torch.device, resolution: int = 224, batch: int = 256) -> bool:
    """Whether the compiled step replays as CUDA graphs (torch.compile's "reduce-overhead"): --compile cudagraphs,
    or auto on CUDA for steps of up to ``CUDA_GRAPHS_MAX_PIXELS``."""
    if flag != "auto":
        return flag == "cudagraphs"
    return device.type == "cuda" and batch * resolution**2 <= CUDA_GRAPHS_MAX_PIXELS


def use_channels_last(flag: str, device: torch.device) -> bool:
    """auto: on for the CPU and CUDA, where PyTorch's channels-last kernels were the faster ones."""
    return flag == "on" or (flag == "auto" and device.type in ("cuda", "cpu"))


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA) that still allow its
# native bf16 kernels: AVX-512 BF16 from AVX512_CORE_BF16 up, AMX from AVX512_CORE_AMX up. Under a lower cap
# (AVX2, AVX512_CORE, ...) oneDNN emulates bf16, as on a CPU without it.
ONEDNN_ISAS_WITH = {
    "AVX-512 BF16": {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL"},
    "AMX": {"AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16",
            "AVX10_2_512_AMX_2", "ALL"},
}


@functools.cache
def cpu_native_bf16() -> str | None:
    """The x86 features with which this CPU computes bf16 natively ("AVX-512 BF16", "AMX"), or None.

    Read from the CPU (PyTorch's cpuinfo), not guessed from the vendor: AVX-512 BF16 (Intel Cooper Lake and later,
    AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later), which oneDNN's bf16 kernels use. Without them
    oneDNN emulates bf16, slower than float32. A feature counts only where the kernels may use it: PyTorch's own
    at AVX-512 (not capped by ATEN_CPU_CAPABILITY) and oneDNN's not capped below it (ONEDNN_MAX_CPU_ISA)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    onednn_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    found = [name for name, probe in (("AVX-512 BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
             if getattr(torch.cpu, probe, lambda: False)() and onednn_cap in ONEDNN_ISAS_WITH[name]]
    return ", ".join(found) or None


# bf16 on a CPU that computes it natively speeds up the compiled step at every shape measured and the eager step
# from 32 px x 256 up, but not `make train`'s eager 32 px x 64, where it also cost accuracy (bench/throughput.py;
# docs/performance.md). An eager step under this many pixels (batch x height x width) stays float32.
CPU_BF16_EAGER_MIN_PIXELS = 256 * 32 * 32


def precision(flag: str, device: torch.device, *, compiled: bool = True, pixels: int | None = None) -> tuple[str, str]:
    """("bfloat16" or "float32", why) for ``--amp flag`` on ``device``, for a step that is ``compiled`` or not and
    holds ``pixels`` (batch x height x width; None: large). auto: bf16 autocast on CUDA, and on CPUs that compute
    bf16 natively (``cpu_native_bf16``) unless the step is eager and small; float32 elsewhere."""
    if flag != "auto":
        return ("bfloat16", "--amp bf16") if flag == "bf16" else ("float32", "--amp off")
    if device.type == "cuda":
        return "bfloat16", "auto on CUDA"
    if device.type != "cpu":
        return "float32", f"no bf16 autocast on {device.type}"
    native = cpu_native_bf16()
    if not native:
        return "float32", "the CPU has no native bf16"
    if not compiled and pixels is not None and pixels < CPU_BF16_EAGER_MIN_PIXELS:
        return "float32", "an eager step this small gains nothing from bf16"
    return "bfloat16", f"the CPU computes bf16 natively: {native}"


def device_policy(device: torch.device, *, compile: str = "auto", channels_last: str = "auto", amp: str = "auto",
                  resolution: int = 224, batch: int = 256, images: int | None = None, distributed: bool = False,
                  eager_only: bool = False) -> Policy:
    """The policy for training on ``device``: ``images`` is the run's length (None: long), ``distributed`` a step
    spread over processes (its collectives replay in no CUDA graph), ``eager_only`` a step that cannot compile
    (synchronised BatchNorm)."""
    device = torch.device(device)
    compiled = use_compile(compile, device, resolution, images) and not eager_only
    dtype, why = precision(amp, device, compiled=compiled, pixels=batch * resolution**2)
    return Policy(device, compiled=compiled,
                  cuda_graphs=compiled and not distributed and use_cuda_graphs(compile, device, resolution, batch),
                  channels_last=use_channels_last(channels_last, device),
                  amp=torch.bfloat16 if dtype == "bfloat16" else None, precision=f"{dtype} ({why})")


# glibc's mallopt parameters (malloc.h): blocks up to this size come from the heap rather than their own mmap,
# and the heap keeps up to TRIM_BYTES free at its top rather than giving it back to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_BYTES, TRIM_BYTES = 32 << 20, 1 << 30


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep the memory a CPU training loop frees for its next step, rather than give it back to
    the kernel and fault it in again: without it, a long CPU run spends a growing share of its time in page faults
    (docs/performance.md). Measured on the training loop, not in general (a lone 8 MiB block freed and taken again
    faulted more with it than without). False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))


def inference_policy(device: torch.device) -> Policy:
    """How ``eval`` and ``predict`` run: eager, float32, channels-last where training uses it."""
    device = torch.device(device)
    return Policy(device, channels_last=use_channels_last("auto", device))


def to_device(tree, device):
    """A tree of tensors moved to ``device``."""
    return tree_map(lambda t: t.to(device), tree)


# ---------------------------------------------------------------------------------------------------------------
# The step


def trainable(params: dict, head_only: bool) -> dict:
    """The part of ``params`` that the optimizer updates: all of it, or only the classifier."""
    return {"fc": params["fc"]} if head_only else params


def initial_state(cfg: Config, optimizer, device, *, seed: int = 0, start: tuple[dict, dict] | None = None,
                  head_only: bool = False, ema_decay: float = 0.0) -> tuple[dict, dict, dict]:
    """(params, state, opt_state) on ``device`` to start training from: ``init`` drawn from ``seed``, or the
    (params, state) given as ``start``."""
    params, state = start if start is not None else init(cfg, torch.Generator().manual_seed(seed))
    params, state = to_device(params, device), to_device(state, device)
    return params, state, init_opt_state(optimizer, params, state, head_only=head_only, ema_decay=ema_decay)


def init_opt_state(optimizer, params: dict, state: dict, *, head_only: bool = False, ema_decay: float = 0.0) -> dict:
    """The step's ``opt_state`` for these trees: the optimizer's, with an "ema" entry when ``ema_decay`` is set."""
    opt_state = optimizer.init(trainable(params, head_only))
    if ema_decay:
        opt_state["ema"] = ema(ema_decay).init(params, state)
    return opt_state


def averaged(opt_state: dict) -> tuple[dict, dict] | None:
    """The EMA's (params, state) kept in ``opt_state``, or None when the step keeps none."""
    kept = opt_state.get("ema")
    return (kept["params"], kept["state"]) if kept is not None else None


def autograd_grad_and_value(fn: Callable, has_aux: bool = True) -> Callable:
    """``torch.func.grad_and_value(fn, has_aux=True)``'s contract, computed with ``torch.autograd.grad`` on
    detached copies of the first argument's leaves: the same numbers, and nothing the caller holds is touched.

    For the eager step: functorch wraps every tensor of every op, which made an eager CPU step about 20 %
    slower (25 % with ReLU6; bench/throughput.py). A compiled step traces ``torch.func`` into one graph instead.
    """
    assert has_aux

    def grad_and_value(primal, *args):
        leaves, spec = tree_flatten(primal)
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        with torch.enable_grad():
            loss, aux = fn(tree_unflatten(leaves, spec), *args)
            grads = torch.autograd.grad(loss, leaves)
        return tree_unflatten(list(grads), spec), (loss.detach(), tree_map(torch.Tensor.detach, aux))

    return grad_and_value


def make_step(
    cfg: Config,
    optimizer,
    *,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    reduce_grads: Callable | None = None,
    head_only: bool = False,
    for_compile: bool = True,
    bn_reduce: Callable | None = None,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    clip_grad: float = 0.0,
):
    """The pure training step for ``cfg`` and ``optimizer``, uncompiled.

    ``y`` of the batch is labels (N,) or class probabilities (N, classes) (mixup, cutmix); label smoothing applies to
    either. ``clip_grad`` > 0 scales the gradient tree to that global L2 norm at most (after averaging across
    processes) and reports the norm before clipping as ``grad_norm``. ``ema_decay`` > 0 updates the weight EMA in
    ``opt_state["ema"]`` after the optimizer (``optim.ema``, with timm's warmup of the decay unless
    ``ema_warmup`` is False).

    ``reduce_grads`` (distributed) averages the gradient tree across processes. ``head_only`` trains only the
    classifier on a frozen backbone, which then runs in eval mode (its running statistics are kept too).
    ``for_compile=False`` takes gradients with ``autograd_grad_and_value``, faster when the step runs eagerly.
    ``bn_reduce`` (a sum across processes) synchronises BatchNorm; it needs ``for_compile=False``, since its
    autograd function holds collectives that torch.func does not trace.
    """
    grad_and_value = torch.func.grad_and_value if for_compile else autograd_grad_and_value

    def loss_fn(learned, params, state, x, y):
        ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            logits, new_state = apply(cfg, {**params, **learned}, state, x, train=not head_only, bn_reduce=bn_reduce)
        if amp_dtype:
            logits = logits.float()  # the loss in float32
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, (new_state, logits)

    average = ema(ema_decay, ema_warmup) if ema_decay else None

    def step(params, state, opt_state, batch, lr):
        x, y = batch
        learned = trainable(params, head_only)
        grads, (loss, (new_state, logits)) = grad_and_value(loss_fn, has_aux=True)(learned, params, state, x, y)
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        metrics = {"loss": loss.detach()}
        if clip_grad:
            grads, metrics["grad_norm"] = clip_grad_norm(grads, clip_grad)
        kept = opt_state.get("ema")
        learned, opt_state = optimizer.update(grads, {k: v for k, v in opt_state.items() if k != "ema"}, learned, lr)
        params = {**params, **learned}
        if average is not None:
            opt_state = {**opt_state, "ema": average.update(kept, params, new_state)}
        labels = y if y.dim() == 1 else y.argmax(1)
        metrics["correct"] = (logits.argmax(1) == labels).sum()
        return params, new_state, opt_state, metrics

    return step


def no_cuda_runtime_notice(record: logging.LogRecord) -> bool:
    """A logging filter: drops the warning "No CUDA runtime is found, using CUDA_HOME=..." that Inductor's
    import of torch.utils.cpp_extension logs on a machine with a CUDA toolkit and no GPU (a CPU-only run of the
    default, CUDA-carrying torch wheel): it says nothing about the run."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def compile_step(step: Callable, cuda_graphs: bool = False) -> Callable:
    """``torch.compile(step, fullgraph=True)``. With CUDA graphs each call is marked as a new iteration and its
    outputs are copied out of the graphs' memory pool, which the next replay overwrites: the caller may keep them
    (a checkpoint, the best weights) and pass them back in. The copies are of parameter size, not activations."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(no_cuda_runtime_notice)
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead" if cuda_graphs else None)
    if not cuda_graphs:
        return compiled

    def replay(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(torch.clone, compiled(*args))

    return replay


def build_step(cfg: Config, optimizer, policy: Policy, **options) -> Callable:
    """The step as ``policy`` runs it: ``make_step`` with ``options``, compiled (and replayed as CUDA graphs) when
    it says so."""
    step = make_step(cfg, optimizer, amp_dtype=policy.amp, for_compile=policy.compiled, **options)
    return compile_step(step, policy.cuda_graphs) if policy.compiled else step


def largest_batch(cfg: Config, optimizer, policy: Policy, *, start: int = 32,
                  limit: int = 8192) -> tuple[int, dict[int, int]]:
    """The largest power-of-two batch whose training step fits in the GPU's memory, and the peak memory (bytes)
    of each batch size tried. Probes with the eager step (which needs at least the compiled step's memory)."""
    device = policy.device
    step = build_step(cfg, optimizer, dataclasses.replace(policy, compiled=False, cuda_graphs=False))
    params, state, opt_state = initial_state(cfg, optimizer, device)
    mem = torch.channels_last if policy.channels_last else torch.contiguous_format
    peaks: dict[int, int] = {}
    best, batch = 0, start
    while batch <= limit:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, device=device).contiguous(
                memory_format=mem)  # one copy alive, in the layout the step gets
            y = torch.randint(0, cfg.num_classes, (batch,), device=device)
            step(params, state, opt_state, (x, y), torch.tensor(0.0, device=device))
            torch.cuda.synchronize(device)
            peaks[batch] = torch.cuda.max_memory_allocated(device)
            del x, y
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
    torch.cuda.empty_cache()
    if not best:
        raise ValueError(f"a batch of {start} does not fit in the GPU's memory; pass a smaller --batch-size")
    return best, peaks
