"""Precision: `--amp auto` follows the CPU's native bf16, and the bf16 step keeps BatchNorm, loss and optimizer in
float32 while matching the float32 computation within bf16's rounding."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from conftest import randomize_batchnorm
from mobilenet_fn import Config, init
from mobilenet_fn import step as step_lib
from mobilenet_fn.importers import from_timm
from mobilenet_fn.layers import BF16_DEPTHWISE_MIN_PIXELS, depthwise_apply, depthwise_init
from mobilenet_fn.optim import Optimizer, sgd
from mobilenet_fn.step import compile_step, device_policy, make_step, precision

pytestmark = pytest.mark.kernels  # precision follows the kernels: .ci/run runs these again with AVX2 kernels

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GRADS_OUT = Optimizer(init=lambda p: {}, update=lambda g, s, p, lr: (g, s))  # a step that hands back its gradients


def cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())


CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from /proc/cpuinfo")
def test_native_bf16_is_read_from_the_cpu_as_the_kernel_reports_it():
    flags = cpuinfo_flags()
    native = step_lib.cpu_native_bf16() or ""
    assert ("AVX-512 BF16" in native) <= ("avx512_bf16" in flags) and ("AMX" in native) <= ("amx_tile" in flags)
    if not any(os.environ.get(cap) for cap in CAPS):  # kernels free to use all the CPU has
        assert ("AVX-512 BF16" in native) == ("avx512_bf16" in flags)
        assert ("AMX" in native) == ("amx_tile" in flags)


@pytest.mark.parametrize("cap", ["ATEN_CPU_CAPABILITY=avx2", "ATEN_CPU_CAPABILITY=default", "ONEDNN_MAX_CPU_ISA=AVX2",
                                 "ONEDNN_MAX_CPU_ISA=AVX512_CORE", "DNNL_MAX_CPU_ISA=AVX512_CORE_VNNI"])
def test_amp_auto_is_float32_where_the_kernels_are_capped_below_bf16(cap):
    # What a CPU without native bf16 runs, on any CPU: the rule must follow the kernels, not only the flags.
    name, value = cap.split("=")
    env = {k: v for k, v in os.environ.items() if k not in CAPS} | {name: value}
    code = ("import torch; from mobilenet_fn.step import cpu_native_bf16, precision; "
            "print(cpu_native_bf16(), *precision('auto', torch.device('cpu')), sep='|')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None|float32|the CPU has no native bf16"


@pytest.mark.parametrize("native", ["AVX-512 BF16, AMX", None])
def test_amp_auto_is_bf16_on_a_cpu_with_native_bf16_and_float32_on_one_without(monkeypatch, native):
    monkeypatch.setattr(step_lib, "cpu_native_bf16", lambda: native)
    policy = device_policy(CPU, amp="auto")
    if native:
        assert policy.amp == torch.bfloat16
        assert policy.describe().endswith("bfloat16 (the CPU computes bf16 natively: AVX-512 BF16, AMX)")
    else:  # forced off: what every CPU without it gets, the float32 policy of --amp off
        off = device_policy(CPU, amp="off")
        assert policy.amp is None and replace(policy, precision="") == replace(off, precision="")
        assert policy.describe().endswith("float32 (the CPU has no native bf16)")
    # An eager step as small as `make train`'s gained nothing from bf16: float32; a compiled or larger one: bf16.
    make_train = device_policy(CPU, compile="off", resolution=32, batch=64)
    assert make_train.amp is None
    compiled_small = device_policy(CPU, compile="on", resolution=32, batch=64)
    eager_large = device_policy(CPU, compile="off", resolution=128, batch=64)
    assert compiled_small.amp == eager_large.amp == (torch.bfloat16 if native else None)
    # The explicit flags and CUDA do not depend on the CPU.
    assert device_policy(CPU, amp="off").amp is None and device_policy(CPU, amp="bf16").amp == torch.bfloat16
    assert device_policy(CPU, compile="off", resolution=32, batch=64, amp="bf16").amp == torch.bfloat16
    assert device_policy(CUDA, amp="auto").amp == torch.bfloat16
    assert precision("auto", torch.device("mps")) == ("float32", "no bf16 autocast on mps")


def depthwise_as_ours(conv):
    """``conv.forward`` with the precision rule of ``layers.depthwise_apply`` in a CPU bf16 training step: float32
    with stride 2 or on maps under BF16_DEPTHWISE_MIN_PIXELS, autocast's bf16 otherwise."""
    forward = conv.forward

    def run(x):
        if conv.stride[0] == 1 and x.shape[-2] * x.shape[-1] >= BF16_DEPTHWISE_MIN_PIXELS:
            return forward(x)
        with torch.autocast("cpu", enabled=False):
            return forward(x.float())

    return run


@pytest.mark.parametrize("stride, side, dtype", [(2, 16, torch.float32), (1, 8, torch.bfloat16),
                                                 (1, 4, torch.float32), (1, 1, torch.bfloat16)])
def test_a_bf16_training_step_runs_strided_and_small_depthwise_layers_in_float32(stride, side, dtype):
    params = depthwise_init(16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 16, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise_apply(params, x, stride=stride).dtype == dtype  # 1 x 1: the centre tap, in x's dtype
        with torch.no_grad():  # no backward follows: bf16 everywhere
            assert depthwise_apply(params, x, stride=stride).dtype == torch.bfloat16


def test_the_bf16_step_matches_timm_under_the_same_precision_and_keeps_batchnorm_loss_and_optimizer_in_float32():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv1_100", act_layer=torch.nn.ReLU, num_classes=10).train()
    randomize_batchnorm(model)
    cfg = Config(num_classes=10)
    params, state = from_timm(model.state_dict())
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    opt = sgd(momentum=0.9, nesterov=True)
    new_params, new_state, opt_state, metrics = make_step(cfg, opt, amp_dtype=torch.bfloat16, for_compile=False)(
        params, state, opt.init(params), (x, y), torch.tensor(0.1))
    for tree in (new_params, new_state, opt_state, metrics["loss"]):
        assert {t.dtype for t in tree_leaves(tree) if t.is_floating_point()} == {torch.float32}

    for conv in model.modules():  # the reference: timm the ordinary way, same autocast and depthwise precisions
        if isinstance(conv, torch.nn.Conv2d) and conv.groups > 1:
            conv.forward = depthwise_as_ours(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    assert metrics["loss"].item() == pytest.approx(loss.item(), rel=1e-4)
    ref_params, ref_state = from_timm(model.state_dict())
    grads, _ = from_timm({k: p.grad for k, p in model.named_parameters()} | dict(model.named_buffers()))
    # The first SGD step with Nesterov momentum 0.9 moves each tensor by lr * 1.9 * grad: each tensor's update
    # against timm's gradient, within what bf16's rounding (in another order) leaves.
    for got, before, g in zip(tree_leaves(new_params), tree_leaves(params), tree_leaves(grads)):
        update, want = before - got, 0.1 * 1.9 * g
        assert (update - want).norm() <= 0.05 * want.norm() + 1e-7
    for got, want in zip(tree_leaves(new_state), tree_leaves(ref_state)):  # BatchNorm's running statistics
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_the_compiled_bf16_step_computes_the_float32_loss_and_learns():
    # At initialisation in training mode, BatchNorm's backward leaves the early layers' gradients as small
    # differences of large terms, which bf16's rounding swamps (timm's too, under the same autocast); so the
    # compiled bf16 step is checked by its forward against float32's and by what its updates do: fit a batch.
    # shallow (Table 5): the same layers, eight separable blocks rather than thirteen, compiled in about half the time
    torch._dynamo.reset()
    cfg = Config(num_classes=10, resolution=64, shallow=True)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch, lr = (x.contiguous(memory_format=torch.channels_last), torch.arange(8) % 10), torch.tensor(0.05)
    opt = sgd(momentum=0.9, nesterov=True)
    compiled = compile_step(make_step(cfg, opt, amp_dtype=torch.bfloat16))
    ref = make_step(cfg, opt, for_compile=False)(params, state, opt.init(params), batch, lr)
    carry, losses = (params, state, opt.init(params)), []
    for _ in range(8):
        *carry, metrics = compiled(*carry, batch, lr)
        losses.append(metrics["loss"].item())
        if len(losses) == 1:
            assert losses[0] == pytest.approx(ref[3]["loss"].item(), rel=2e-2)
            for got, want in zip(tree_leaves(carry[1]), tree_leaves(ref[1])):  # BatchNorm's running statistics
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert {t.dtype for t in tree_leaves(carry) if t.is_floating_point()} == {torch.float32}
    assert losses[-1] < 0.5 * losses[0], losses  # 8 steps on one batch: its loss falls
