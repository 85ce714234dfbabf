"""int8 against float on the CPU: throughput, batch-1 latency and size on disk, all contenders in one process,
interleaved; with --weights, the top-1 of each on real data.

    .venv/bin/python bench/quantize.py [--resolution 224] [--batch 32] [--alpha 1.0] [--classes 1000]
                                       [--rounds 7] [--threads N] [--no-pt2e]
    .venv/bin/python bench/quantize.py --weights runs/x/weights.pkl --data fashion-mnist   # accuracy

Contenders (speed does not depend on the values of the weights, so the speed bench uses ``model.init``'s random
ones, BatchNorm statistics included):

  float torch   ``model.apply`` on ``model.fold_batchnorm``'s tree, channels-last, eager, under ``no_grad``: what
                ``eval`` and ``predict`` run (``step.inference_policy``).
  float ORT     ``export_onnx(fold_bn=True)`` run by onnxruntime.
  int8 ORT      ``quantize.quantize_onnx``: what ``mobilenet-fn quantize`` writes (8-bit depthwise filters,
                7-bit weights elsewhere).
  int8 PT2E     ``torch.export`` of the folded model, ``prepare_pt2e``/``convert_pt2e`` with the x86 Inductor
                quantizer (torchao's; per-channel int8 weights, uint8 activations), then ``torch.compile`` with
                inductor's freezing (which int8 needs to prepack its weights).

Every contender runs on ``--threads`` threads (torch and onnxruntime alike). In each round every contender runs
``--iters`` batches, the order rotated round by round; img/s is the median over rounds, "±" the spread
(max-min over median). Batch-1 latency is measured the same way, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mobilenet_fn.data import IMAGENET_STATS, eval_source
from mobilenet_fn.export import InferenceModule, export_onnx
from mobilenet_fn.extras import require
from mobilenet_fn.model import Config, apply, fold_batchnorm, init
from mobilenet_fn.onnx_model import OnnxModel, load_onnx
from mobilenet_fn.preprocess import preprocess_for
from mobilenet_fn.quantize import calibration_inputs, quantization_sources, quantize_onnx, random_subset, summary
from mobilenet_fn.quantize_options import CALIBRATION_IMAGES
from mobilenet_fn.sources import Source, TensorSource
from mobilenet_fn.step import inference_policy
from mobilenet_fn.weights import Weights, load_weights

# VNNI (avx512_vnni, or avx_vnni on AVX2-only cores) decides ONNX Runtime's u8s8 kernel: without it, vpmaddubsw,
# whose int16 pair sums saturate unless the weights are 7-bit, as quantize writes them outside depthwise filters
# (mobilenet_fn/quantize.py).
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    flags = set()
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    import onnxruntime

    return (f"CPU {model}, {os.cpu_count()} cores; flags: "
            + " ".join(f"{f}{'+' if f in flags else '-'}" for f in CPU_FLAGS)
            + f"\nload average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}; torch {torch.__version__}, "
              f"onnxruntime {onnxruntime.__version__}")


def random_weights(cfg: Config) -> Weights:
    g = torch.Generator().manual_seed(0)
    params, state = init(cfg, g)
    for bn in [state["stem"]["bn"]] + [b for block in state["blocks"] for b in block.values()]:
        bn["mean"] = torch.rand(bn["mean"].shape, generator=g) - 0.5
        bn["var"] = torch.rand(bn["var"].shape, generator=g) + 0.5
    classes = [f"c{i}" for i in range(cfg.num_classes)]
    return Weights(cfg, params, state, classes,
                   preprocess_for(cfg.resolution, crop_pct=0.875, stats=IMAGENET_STATS))


def random_source(cfg: Config, n: int) -> TensorSource:
    g = torch.Generator().manual_seed(1)
    r = cfg.resolution
    return TensorSource(torch.randint(0, 256, (n, 3, r, r), dtype=torch.uint8, generator=g),
                        torch.randint(0, cfg.num_classes, (n,), generator=g))


def float_torch(w: Weights) -> Callable:
    policy = inference_policy(torch.device("cpu"))
    folded = fold_batchnorm(w.config, w.params, w.state)

    layout = torch.channels_last if policy.channels_last else torch.contiguous_format

    def run(x):
        with torch.no_grad():
            return apply(w.config, folded, None, x.contiguous(memory_format=layout), train=False)[0]

    return run


def pt2e_int8(w: Weights, calibration: list[torch.Tensor], compile: bool = True) -> Callable:
    """The PT2E flow with torchao's X86InductorQuantizer, calibrated on ``calibration`` batches."""
    xiq = require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "the PT2E contender", "test",
                  "torchao")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "the PT2E contender", "test", "torchao")

    module = InferenceModule(w, fold_bn=True).eval()
    example = (calibration[0],)
    # strict: traced by dynamo, which records each call's source function; the quantizer finds the convolutions by
    # it. The default (non-strict) export leaves it out for F.conv2d, and then nothing is quantized at all.
    exported = torch.export.export(module, example, dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                   strict=True).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    converted = pt2e.convert_pt2e(prepared)
    if not compile:
        return lambda x: converted(x)
    torch._inductor.config.freezing = True  # int8 weights prepacked for oneDNN: without it, a slow reference path
    compiled = torch.compile(converted)

    def run(x):
        with torch.no_grad():
            return compiled(x)

    return run


def on_threads(path: Path, threads: int) -> OnnxModel:
    """The ONNX file on ``threads`` threads, whose idle threads sleep at once instead of spinning (spinning, they
    take cores from torch, which runs in turn with it here)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dataclasses.replace(load_onnx(path), session=session)


def ort_float_and_int8(w: Weights, tmp: Path, calibration: Source, held_out: Source,
                       threads: int) -> tuple[Callable, Callable, Path, Path]:
    float_path, int8_path = tmp / "float.onnx", tmp / "int8.onnx"
    export_onnx(w, float_path, fold_bn=True)
    result = quantize_onnx(w, int8_path, calibration, held_out, min_agreement=0.0, max_drop=1.0)
    log(f"int8 ORT check: {summary(result)}")
    return on_threads(float_path, threads), on_threads(int8_path, threads), float_path, int8_path


def measure(contenders: dict[str, Callable], x: torch.Tensor, rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per batch of each contender in each round, contenders interleaved (order rotated each round)."""
    names = list(contenders)
    for name in names:  # warm up (compiles on the first call)
        t = time.perf_counter()
        contenders[name](x)
        contenders[name](x)
        log(f"  {name}: first calls {time.perf_counter() - t:.1f} s")
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(iters):
                contenders[name](x)
            times[name].append((time.perf_counter() - t) / iters)
    return times


def spread(ts: list[float]) -> float:
    return (max(ts) - min(ts)) / statistics.median(ts)


def speed(args) -> None:
    cfg = Config(alpha=args.alpha, resolution=args.resolution, num_classes=args.classes)
    w = random_weights(cfg)
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"model: α {cfg.alpha}, {cfg.resolution} px, {cfg.num_classes} classes, random weights (speed does not "
          f"depend on their values); {args.threads} threads for torch and onnxruntime\n")
    source = random_source(cfg, max(args.batch, 64) * 2)
    with tempfile.TemporaryDirectory() as tmp:
        f_ort, q_ort, f_path, q_path = ort_float_and_int8(w, Path(tmp), source, source, args.threads)
        sizes = {"float ONNX": f_path.stat().st_size, "int8 ONNX": q_path.stat().st_size}
        contenders = {"float torch": float_torch(w), "float ORT": f_ort, "int8 ORT": q_ort}
        if args.pt2e:
            calibration = [torch.from_numpy(a) for a in calibration_inputs(random_subset(source, 100), w.preprocess)]
            log("int8 PT2E: export, prepare, calibrate, convert, compile (minutes on 2 cores)")
            contenders["int8 PT2E"] = pt2e_int8(w, calibration)
        g = torch.Generator().manual_seed(2)
        rows = []
        for batch, label in ((args.batch, f"batch {args.batch}"), (1, "batch 1")):
            x = torch.randn(batch, 3, cfg.resolution, cfg.resolution, generator=g)
            log(f"{label}:")
            iters = args.iters if batch > 1 else args.iters * 8
            times = measure(contenders, x, args.rounds, iters)
            rows.append((batch, label, times))
        with tempfile.TemporaryDirectory() as t2:
            from mobilenet_fn.weights import save_weights

            save_weights(Path(t2) / "w.pkl", w)
            sizes["weights.pkl (float, BatchNorm unfolded)"] = (Path(t2) / "w.pkl").stat().st_size
    for batch, label, times in rows:
        print(f"{label} ({cfg.resolution} px): img/s (median of {args.rounds} rounds), ms per batch, spread, ratios")
        base = {n: statistics.median(times[n]) for n in ("float torch", "float ORT")}
        print(f"  {'contender':<12} {'img/s':>8} {'ms':>8} {'±':>6} {'/ float torch':>14} {'/ float ORT':>12}")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"  {name:<12} {batch / t:8.1f} {1000 * t:8.2f} {100 * spread(ts):5.0f}% "
                  f"{base['float torch'] / t:13.2f}x {base['float ORT'] / t:11.2f}x")
    print("size on disk: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
          + f"; int8/float ONNX {sizes['int8 ONNX'] / sizes['float ONNX']:.2f}")
    print(f"load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


def accuracy(args) -> None:
    """Top-1 of float torch, float ORT, int8 ORT and int8 PT2E (eager, not compiled) on ``--data``'s eval set
    (Fashion-MNIST: its test set), the int8 models calibrated on the same images of its training part."""
    from mobilenet_fn.evaluate import evaluate_forward

    torch.set_num_threads(args.threads)
    w = load_weights(args.weights)
    print(machine())
    calibration, held_out = quantization_sources(args.data, w.classes)
    test = eval_source(args.data, w.classes)
    with tempfile.TemporaryDirectory() as tmp:
        f_ort, q_ort, f_path, q_path = ort_float_and_int8(w, Path(tmp), calibration, held_out, args.threads)
        contenders = {"float torch": float_torch(w), "float ORT": f_ort, "int8 ORT": q_ort}
        if args.pt2e:
            batches = calibration_inputs(random_subset(calibration, CALIBRATION_IMAGES), w.preprocess)
            contenders["int8 PT2E (eager)"] = pt2e_int8(w, [torch.from_numpy(a) for a in batches], compile=False)
        preds = {}
        for name, forward in contenders.items():
            logits = []

            def recorded(x, forward=forward):
                logits.append(forward(x).float())
                return logits[-1]

            result = evaluate_forward(recorded, w.config.num_classes, test, w.preprocess, batch_size=250)
            preds[name] = torch.cat(logits).argmax(1)
            print(f"{name:<18} top-1 {100 * result['top1']:.2f}%  ({result['n']} images of {args.data})",
                  flush=True)
        print(f"size on disk: float ONNX {f_path.stat().st_size / 1e6:.2f} MB, int8 ONNX "
              f"{q_path.stat().st_size / 1e6:.2f} MB")
    for name in preds:
        if name.startswith("int8"):
            print(f"{name} agrees with float torch on {100 * (preds[name] == preds['float torch']).float().mean():.2f}%"
                  " of the images")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=3, help="batches per contender per round (x8 at batch 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-pt2e", dest="pt2e", action="store_false", help="leave out the PT2E contender")
    p.add_argument("--weights", type=Path, help="measure top-1 of a trained model instead of speed")
    p.add_argument("--data", default="sample", help="with --weights: sample, fashion-mnist or a folder")
    args = p.parse_args(argv)
    accuracy(args) if args.weights else speed(args)


if __name__ == "__main__":
    main()
