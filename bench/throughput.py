"""Training and inference images/s of mobilenet-fn against timm's MobileNet v1, in one process, alternating.

    .venv/bin/python bench/throughput.py [--device auto|cpu|cuda] [--amp auto|off|bf16] [--alpha 1.0] [--train-224]
                                         [--case KIND:RES:BATCH ...] [--no-timm-compiled] [--no-cuda-graphs]
                                         [--warm-cache] [--rounds N] [--quick] [--json PATH]

Contenders, all with the same α, activation, resolution, batch, dtype and optimizer (SGD, momentum 0.9,
Nesterov, weight decay 0, label smoothing 0.1, a constant learning rate) on random data drawn from a fixed seed:

  mobilenet-fn eager / compiled   what ``mobilenet-fn train`` builds on the device, through the same calls as the
  (/ compiled + CUDA graphs)      Trainer: ``step.device_policy(…)``, ``step.initial_state`` and
                                  ``step.build_step`` (compiled, as CUDA graphs or not, as the policy says).
                                  Eager and compiled run on every device, the
                                  CUDA-graph variant on CUDA; the one ``--compile auto`` picks there for a long
                                  run is marked "(train default)". A contender that fails to build is reported
                                  and left out.
  mobilenet-fn BN-folded          (inference) ``model.apply`` on ``model.fold_batchnorm``'s tree, what ``eval``
                                  and ``predict`` run.
  timm eager                      ``timm`` the ordinary way: an ``nn.Module``, ``loss.backward()`` and
                                  ``torch.optim.SGD``. On CPU in both memory formats: NCHW (timm's default) and
                                  channels-last (ours); on CUDA channels-last with bf16 autocast, as ours.
  timm compiled                   ``torch.compile(model)`` in that same loop (channels-last, as ours).

Inference (eval mode): timm under ``torch.no_grad()`` and under ``torch.inference_mode()``; ours
``model.apply(…, train=False)`` under each (channels-last input, bf16 autocast on CUDA), and the
BatchNorm-folded tree (what ``mobilenet-fn eval`` and ``predict`` run).

Each case starts with ``torch._dynamo.reset()``, so it compiles for its shapes alone as a new training process
would, into a fresh inductor cache folder unless ``--warm-cache`` (so the first-call times are cold compilations).
It builds every contender (its first call, compilation included, is timed and printed but not counted), warms
it up, then runs rounds: in each round every contender runs ``--steps`` steps, the order rotated
from round to round. img/s is the median over rounds; "±" is the spread of the rounds (max-min over median).
The ratio columns divide a mobilenet-fn row's img/s by the timm row named in the header (for inference, the timm
row of the same memory format and grad mode). On CUDA the clock is read after ``torch.cuda.synchronize()``, and
"peak MiB" is the most memory the contender itself allocated while being built and warmed up (its parameters,
optimizer state and one step's activations; the peak counter is reset before each contender).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

import mobilenet_fn
from mobilenet_fn.model import Config, apply, fold_batchnorm, init
from mobilenet_fn.optim import sgd
from mobilenet_fn.step import build_step, cpu_native_bf16, device_policy, initial_state, to_device

NUM_CLASSES = 1000
LR = 0.01  # constant; small enough that random data keeps every contender finite for the whole run
MOMENTUM = 0.9
LABEL_SMOOTHING = 0.1
# The ratio columns: (column header, the timm row's tag).
BASELINES = (("÷ timm NCHW", "eager-nchw"), ("÷ timm CL", "eager-cl"), ("÷ timm comp.", "compiled"),
             ("÷ ours f32", "ours-f32"))


@dataclass(frozen=True)
class Case:
    kind: str  # "train" or "infer"
    resolution: int
    batch: int

    def __str__(self) -> str:
        return f"{self.kind} {self.resolution}px×{self.batch}"


@dataclass
class Contender:
    name: str
    run: Callable[[int], None]  # runs n steps
    ours: bool
    tag: str = ""  # a baseline: which ratio column it is ("eager-nchw", ..., "ours-f32"); others: ""
    mode: str = ""  # inference: "no_grad" or "inference_mode"; ratios pair rows of the same mode
    first_s: float = 0.0  # the first call (compilation included)
    peak_mib: float | None = None
    seconds: list[float] = field(default_factory=list)  # one per round


# ---------------------------------------------------------------------------------------------------------------
# Models


def timm_model(alpha: float, activation: str):
    """timm's MobileNet v1 at width ``alpha`` with plain ReLU or ReLU6 (timm's default is ReLU6).

    α 1.0 is the registered ``mobilenetv1_100``; other widths come from timm's own generator (channels rounded to
    multiples of 8, which equals our int(c·α) for α in {0.25, 0.5, 0.75, 1.0})."""
    import timm
    from timm.models.efficientnet import _gen_mobilenet_v1

    act = torch.nn.ReLU if activation == "relu" else torch.nn.ReLU6
    if alpha == 1.0:
        return timm.create_model("mobilenetv1_100", num_classes=NUM_CLASSES, act_layer=act)
    return _gen_mobilenet_v1("mobilenetv1_100", alpha, num_classes=NUM_CLASSES, act_layer=act)


def n_params(tree_or_module) -> int:
    if isinstance(tree_or_module, torch.nn.Module):
        return sum(p.numel() for p in tree_or_module.parameters())
    leaves, _ = torch.utils._pytree.tree_flatten(tree_or_module)
    return sum(t.numel() for t in leaves)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_batch(case: Case, dev: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, 3, case.resolution, case.resolution, generator=g)
    y = torch.randint(0, NUM_CLASSES, (case.batch,), generator=g)
    return x.to(dev), y.to(dev)


def fmt(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def autocast(dev: torch.device, dtype: torch.dtype | None):
    return torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Training contenders


def ours_train(cfg: Config, dev: torch.device, x, y, compile_flag: str, amp_flag: str):
    """The step ``mobilenet-fn train`` runs (the Trainer's policy, initial state and step), with weight decay 0;
    ``cfg.resolution`` is the input size, as in a training run. Returns (run, compiled)."""
    policy = device_policy(dev, compile=compile_flag, amp=amp_flag, resolution=cfg.resolution, batch=len(y))
    optimizer = sgd(momentum=MOMENTUM, nesterov=True)
    step = build_step(cfg, optimizer, policy, label_smoothing=LABEL_SMOOTHING)
    params, state, opt_state = initial_state(cfg, optimizer, dev, seed=0)
    holder = {"params": params, "state": state, "opt_state": opt_state}
    batch = (fmt(x, policy.channels_last), y)  # batches.batches(channels_last=...) hands the step this layout

    def run(n: int) -> None:
        for _ in range(n):
            out = step(holder["params"], holder["state"], holder["opt_state"], batch, torch.tensor(LR, device=dev))
            holder["params"], holder["state"], holder["opt_state"], holder["metrics"] = out

    run.last_loss = lambda: float(holder["metrics"]["loss"])
    return run, policy.compiled


def timm_train(alpha: float, activation: str, dev: torch.device, x, y, *, channels_last: bool,
               amp: torch.dtype | None, compiled: bool):
    """timm trained the ordinary way: model(x), loss.backward(), torch.optim.SGD; optionally torch.compile(model)."""
    torch.manual_seed(0)
    model = timm_model(alpha, activation).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=0.0)
    forward = torch.compile(model) if compiled else model
    xb = fmt(x, channels_last)
    last = {}

    def run(n: int) -> None:
        for _ in range(n):
            with autocast(dev, amp):
                logits = forward(xb)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last["loss"] = loss.detach()

    run.last_loss = lambda: float(last["loss"])
    return run


def train_contenders(cfg: Config, args, dev: torch.device, case: Case) -> list[tuple[str, Callable]]:
    """(name, builder) pairs; a builder returns a Contender (building is what the peak memory covers)."""
    x, y = random_batch(case, dev)
    cfg = cfg.replace(resolution=case.resolution)  # what `train` sets from the data; --compile auto reads it
    bf16 = args.amp == "bf16" or device_policy(dev, amp=args.amp).amp is not None  # on this device, for a long run
    amp = torch.bfloat16 if bf16 else None
    out = []
    variants = [("off", "eager"), ("on", "compiled")]
    if dev.type == "cuda" and args.cuda_graphs:
        variants.append(("cudagraphs", "compiled + CUDA graphs"))
    precisions = [("bf16", " bf16")] if bf16 else [("off", "")]
    if bf16 and dev.type == "cpu":  # bf16 on the CPU: against our own float32 step too
        precisions.append(("off", " f32"))

    def compile_flag(policy) -> str:
        return ("cudagraphs" if policy.cuda_graphs else "on") if policy.compiled else "off"

    default = device_policy(dev, resolution=cfg.resolution, batch=case.batch, amp=args.amp)  # what train runs
    for amp_flag, suffix in precisions:
        same = device_policy(dev, resolution=cfg.resolution, batch=case.batch, amp=amp_flag)
        for flag, label in variants:
            is_default = flag == compile_flag(default) and (amp_flag == "bf16") == (default.amp is not None)
            name = f"mobilenet-fn {label}{suffix}" + (" (train default)" if is_default else "")
            tag = "ours-f32" if suffix == " f32" and flag == compile_flag(same) else ""

            def build(flag=flag, amp_flag=amp_flag, name=name, tag=tag):
                run, _ = ours_train(cfg, dev, x, y, flag, amp_flag)
                return Contender(name, run, ours=True, tag=tag)

            out.append((name, build))
    formats = (False, True) if dev.type == "cpu" else (True,)
    for cl in formats:
        name = f"timm eager {'CL' if cl else 'NCHW'}" + (" bf16" if amp else "")
        out.append((name, lambda cl=cl, name=name: Contender(
            name, timm_train(args.alpha, args.activation, dev, x, y, channels_last=cl, amp=amp, compiled=False),
            ours=False, tag="eager-cl" if cl else "eager-nchw")))
    if args.timm_compiled:
        name = "timm compiled CL" + (" bf16" if amp else "")
        out.append((name, lambda name=name: Contender(
            name, timm_train(args.alpha, args.activation, dev, x, y, channels_last=True, amp=amp, compiled=True),
            ours=False, tag="compiled")))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Inference contenders


def grad_mode(mode: str):
    return torch.inference_mode() if mode == "inference_mode" else torch.no_grad()


def infer_contenders(cfg: Config, args, dev: torch.device, case: Case) -> list[tuple[str, Callable]]:
    x, _ = random_batch(case, dev)
    policy = device_policy(dev, amp=args.amp)  # what the Trainer's validation runs with
    amp, ours_cl = policy.amp, policy.channels_last
    out = []

    def ours(mode: str, folded: bool, amp=amp):
        params, state = init(cfg, torch.Generator().manual_seed(0))
        params, state = to_device(params, dev), to_device(state, dev)
        if folded:
            params, state = fold_batchnorm(cfg, params, state), None
        xb = fmt(x, ours_cl)

        def run(n: int) -> None:
            with grad_mode(mode):
                for _ in range(n):
                    with autocast(dev, amp):
                        logits, _ = apply(cfg, params, state, xb, train=False)
                    logits.float()

        return run

    def timm(cl: bool, mode: str):
        torch.manual_seed(0)
        model = timm_model(args.alpha, args.activation).to(dev).eval()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        xb = fmt(x, cl)

        def run(n: int) -> None:
            with grad_mode(mode):
                for _ in range(n):
                    with autocast(dev, amp):
                        logits = model(xb)
                    logits.float()

        return run

    for mode in ("no_grad", "inference_mode"):
        name = f"mobilenet-fn apply {mode}"
        out.append((name, lambda mode=mode, name=name: Contender(name, ours(mode, False), ours=True, mode=mode)))
    name = "mobilenet-fn BN-folded no_grad"
    out.append((name, lambda name=name: Contender(name, ours("no_grad", True), ours=True, mode="no_grad")))
    if amp and dev.type == "cpu":  # against the float32 folded tree, what eval and predict run on the CPU
        name = "mobilenet-fn BN-folded no_grad f32"
        out.append((name, lambda name=name: Contender(name, ours("no_grad", True, None), ours=True, mode="no_grad",
                                                      tag="ours-f32")))
    for cl in ((False, True) if dev.type == "cpu" else (True,)):
        for mode in ("no_grad", "inference_mode"):
            name = f"timm eval {'CL' if cl else 'NCHW'} {mode}" + (" bf16" if amp else "")
            out.append((name, lambda cl=cl, mode=mode, name=name: Contender(
                name, timm(cl, mode), ours=False, tag="eager-cl" if cl else "eager-nchw", mode=mode)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, all processes), from /proc/stat."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def measure(builders, dev: torch.device, case: Case, args: SimpleNamespace) -> tuple[list[Contender], float | None]:
    """Builds, warms up and times the contenders; also returns the share of the machine's CPU that other
    processes used during the timed rounds (a busy machine makes the numbers unreliable)."""
    contenders = []
    for name, build in builders:
        if dev.type == "cuda":
            sync(dev)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            c = build()
            sync(dev)
            t0 = time.perf_counter()
            c.run(1)
            sync(dev)
            c.first_s = time.perf_counter() - t0
            c.run(args.warmup)
            sync(dev)
        except Exception as e:  # one contender that fails (a compiler bug on this torch) leaves the others' results
            log(f"  {dev.type} {case}: {name}: FAILED, left out: {type(e).__name__}: {str(e)[:300]}")
            continue
        if dev.type == "cuda":
            c.peak_mib = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        log(f"  {dev.type} {case}: {name}: first call {c.first_s:.1f} s")
        contenders.append(c)
    if not contenders:
        return [], None
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    for r in range(args.rounds):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            sync(dev)
            t0 = time.perf_counter()
            c.run(args.steps)
            sync(dev)
            c.seconds.append(time.perf_counter() - t0)
        log(f"  {dev.type} {case}: round {r + 1}/{args.rounds} done")
    for c in contenders:
        loss = getattr(c.run, "last_loss", None)
        if loss is not None and not torch.isfinite(torch.tensor(loss(), dtype=torch.float64)):
            log(f"  warning: {c.name}: the loss became non-finite; its timing may not be representative")
    busy1, own1, wall1 = machine_busy_s(), time.process_time(), time.perf_counter()
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))
    return contenders, others


def results_of(contenders: list[Contender], others: float | None, dev: torch.device, case: Case,
               args: SimpleNamespace) -> list[dict]:
    rows = []
    rates = {}
    for c in contenders:
        per_round = [args.steps * case.batch / s for s in c.seconds]
        med = statistics.median(per_round)
        rates[c.name] = med
        rows.append({
            "device": dev.type, "case": str(case), "kind": case.kind, "resolution": case.resolution,
            "batch": case.batch, "contender": c.name, "ours": c.ours, "img_per_s": med,
            "ms_per_step": 1000 * case.batch / med, "spread": (max(per_round) - min(per_round)) / med,
            "first_call_s": c.first_s, "peak_mib": c.peak_mib, "other_cpu": others,
            "rounds_img_per_s": per_round, "ratios": {},
        })
    for row, c in zip(rows, contenders):
        if not c.ours or c.tag:
            continue
        for header, tag in BASELINES:
            match = [t for t in contenders if t.tag == tag and t.mode == c.mode]
            if match:
                row["ratios"][tag] = row["img_per_s"] / rates[match[0].name]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def machine_info(devices: list[torch.device]) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "mobilenet_fn": getattr(mobilenet_fn, "__version__", "?"),
        "devices": [torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({cpu})" for d in devices],
        "cpu_flags": cpu_flags(), "cpu_native_bf16": cpu_native_bf16(),
    }
    try:
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def cpu_flags() -> list[str]:
    """The CPU's flags that bf16 and int8 speed depend on, from /proc/cpuinfo."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def table(rows: list[dict], show_peak: bool) -> str:
    headers = ["device", "case", "contender", "img/s", "ms/step", "±", "others", "1st call s"]
    headers += ["peak MiB"] if show_peak else []
    headers += [h for h, _ in BASELINES]
    lines = []
    for r in rows:
        cells = [r["device"], r["case"], r["contender"], f"{r['img_per_s']:.1f}", f"{r['ms_per_step']:.1f}",
                 f"{100 * r['spread']:.0f}%", "?" if r["other_cpu"] is None else f"{100 * r['other_cpu']:.0f}%",
                 f"{r['first_call_s']:.1f}"]
        if show_peak:
            cells.append("—" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}")
        cells += [f"{r['ratios'][tag]:.2f}×" if tag in r["ratios"] else ("—" if r["ours"] else "")
                  for _, tag in BASELINES]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    left = {0, 1, 2}

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(headers), "  ".join("-" * w for w in widths)]
    previous = None
    for r, cells in zip(rows, lines):
        if previous is not None and (r["device"], r["case"]) != previous:
            out.append("")
        previous = (r["device"], r["case"])
        out.append(render(cells))
    return "\n".join(out)


def write_json(path: Path, info: dict, settings: dict, rows: list[dict], total: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "settings": settings, "results": rows, "total_s": total},
                               indent=2) + "\n")


def parse_case(text: str) -> Case:
    try:
        kind, res, batch = text.split(":")
        if kind not in ("train", "infer"):
            raise ValueError
        return Case(kind, int(res), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected train:RES:BATCH or infer:RES:BATCH") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cpu, and cuda too when available")
    p.add_argument("--alpha", type=float, default=None, help="width multiplier (default 1.0; 0.25 with --quick)")
    p.add_argument("--activation", default="relu", choices=("relu", "relu6"),
                   help="for both models (ours trains with relu by default; timm's stock model is relu6)")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16"),
                   help="precision, as `train --amp`: auto (bf16 on CUDA and on CPUs with native bf16), off, bf16; "
                        "with bf16 on the CPU our float32 step runs too (the ÷ ours f32 column)")
    p.add_argument("--train-224", action="store_true", help="also train at 224 px, batch 32 (and 256 on CUDA)")
    p.add_argument("--case", type=parse_case, action="append", default=None, metavar="KIND:RES:BATCH",
                   help="run only these cases (repeatable), e.g. train:224:256 or infer:224:32")
    p.add_argument("--no-timm-compiled", dest="timm_compiled", action="store_false",
                   help="skip torch.compile of timm (minutes on a small CPU)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, skip the variant of our compiled step that replays CUDA graphs")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps after the first call, not timed (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per contender per round (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 6 on CPU, 5 on CUDA)")
    p.add_argument("--warm-cache", action="store_true",
                   help="let torch.compile reuse its on-disk caches (default: a fresh cache folder, so the printed "
                        "first-call times are cold compilations, as a user's first run)")
    p.add_argument("--quick", action="store_true", help="smoke test: α 0.25, 1 warmup step, 2 steps, 2 rounds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.alpha is None:
        args.alpha = 0.25 if args.quick else 1.0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    return args


def counts(args, dev: torch.device) -> SimpleNamespace:
    """warmup, steps and rounds for a device: the flags where given, else the defaults."""
    cpu = dev.type == "cpu"
    if args.quick:
        default = dict(warmup=1, steps=2, rounds=2) if cpu else dict(warmup=3, steps=5, rounds=2)
    else:
        default = dict(warmup=2, steps=3, rounds=6) if cpu else dict(warmup=10, steps=20, rounds=5)
    return SimpleNamespace(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in default.items()})


def main(argv=None) -> None:
    args = parse_args(argv)
    cache = None
    if not args.warm_cache:  # read by inductor (and Triton under it) at each compilation
        cache = tempfile.mkdtemp(prefix="throughput-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    try:
        bench(args)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def bench(args) -> None:
    """Measures every case on every device and prints the header and the table."""
    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    for name in ("cache_size_limit", "recompile_limit"):  # one compiled step per case and contender
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    info = machine_info(devices)
    cfg = Config(alpha=args.alpha, num_classes=NUM_CLASSES, activation=args.activation)
    ours_n, timm_n = n_params(init(cfg)[0]), n_params(timm_model(args.alpha, args.activation))
    settings = {"alpha": args.alpha, "activation": args.activation,
                "counts": {d.type: vars(counts(args, d)) for d in devices},
                "lr": LR, "momentum": MOMENTUM, "nesterov": True, "weight_decay": 0.0,
                "label_smoothing": LABEL_SMOOTHING, "timm_compiled": args.timm_compiled,
                "compile_cache": "warm" if args.warm_cache else "cold",
                "params": {"mobilenet-fn": ours_n, "timm": timm_n}}
    print(f"date {info['date']}   python {info['python']}   torch {info['torch']}   timm {info['timm']}")
    print(f"cpu {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
          + (f", load average {' '.join(info['loadavg'])} at start" if "loadavg" in info else ""))
    print("devices: " + "; ".join(info["devices"]))
    print(f"cpu flags: {' '.join(info['cpu_flags']) or '?'}; native bf16: {info['cpu_native_bf16'] or 'none'}; "
          f"--amp {args.amp}")
    print(f"α {args.alpha}, {args.activation}, 1000 classes; parameters: mobilenet-fn {ours_n:,}, timm {timm_n:,}; "
          f"SGD lr {LR} momentum {MOMENTUM} Nesterov, weight decay 0, label smoothing {LABEL_SMOOTHING}")
    for d in devices:
        n = counts(args, d)
        print(f"{d.type}: {n.warmup} warmup steps after the first call, then {n.rounds} rounds × {n.steps} steps "
              f"per contender")
    if ours_n != timm_n:
        print(f"note: the parameter counts differ ({ours_n:,} vs {timm_n:,}): the two models are not the same "
              f"architecture at α {args.alpha}")
    if not args.timm_compiled:
        print("note: timm compiled skipped (--no-timm-compiled); its ratio column is empty")
    sys.stdout.flush()

    rows = []
    started = time.perf_counter()
    for dev in devices:
        cases = [Case("train", 128, 64), Case("train", 32, 256)]
        if args.train_224:
            cases += [Case("train", 224, 32)] + ([Case("train", 224, 256)] if dev.type == "cuda" else [])
        cases += [Case("infer", 224, 32)]
        for case in args.case or cases:
            # Each case compiles afresh, as a new `mobilenet-fn train` process would: without the reset, a second
            # shape would make dynamo recompile with dynamic shapes (automatic_dynamic_shapes).
            torch._dynamo.reset()
            builders = (train_contenders if case.kind == "train" else infer_contenders)(cfg, args, dev, case)
            torch.manual_seed(0)
            n = counts(args, dev)
            rows += results_of(*measure(builders, dev, case, n), dev, case, n)
            if args.json:  # after every case, so a run cut short still leaves what it measured
                write_json(args.json, info, settings, rows, time.perf_counter() - started)
    total = time.perf_counter() - started

    print()
    print(table(rows, show_peak=any(d.type == "cuda" for d in devices)))
    print()
    print("img/s: median over rounds; ±: (max - min) / median of the rounds; CL: channels-last;\n"
          "others: the share of the machine's CPU used by other processes during the case's timed rounds;\n"
          "1st call: compilation included (cold unless --warm-cache), not counted in img/s;\n"
          "÷ columns: a mobilenet-fn row's img/s over that timm row's (inference: the timm row of the same "
          "grad mode).")
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    print(f"total {total:.0f} s; load average {load} at the end")
    if args.json:
        write_json(args.json, info, settings, rows, total)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
