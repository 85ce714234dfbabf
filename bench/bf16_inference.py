"""Inference in bf16 autocast against float32 on the CPU: speed, accuracy and top-1 agreement on real images.

    .venv/bin/python bench/bf16_inference.py WEIGHTS [--data fashion-mnist] [--rounds 3] [--batch-size 256]

Runs what ``mobilenet-fn eval`` runs (``evaluate.evaluate``'s BatchNorm-folded ``apply``, channels-last) over the
whole evaluation set once per precision per round, alternating, and prints the CPU's bf16 capability, img/s of
each (median of the rounds), the ratio, top-1 of each, and the share of images whose top-1 class agrees.
``eval`` and ``predict`` would run bf16 on such CPUs only if it is faster and agrees on at least 99.5 %.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mobilenet_fn import batches as batch_lib
from mobilenet_fn.data import eval_source
from mobilenet_fn.model import apply, fold_batchnorm
from mobilenet_fn.step import cpu_native_bf16, inference_policy
from mobilenet_fn.weights import load_weights


def predictions(cfg, folded, batches: list, amp: torch.dtype | None) -> tuple[torch.Tensor, float]:
    """Top-1 classes of every image, and the seconds the forward passes took."""
    out, seconds = [], 0.0
    with torch.no_grad():
        for x in batches:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                logits, _ = apply(cfg, folded, None, x, train=False)
            out.append(logits.float().argmax(1))
            seconds += time.perf_counter() - t0
    return torch.cat(out), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--data", default=None, help="as `eval --data` (default: the file's recorded data kind)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    w = load_weights(args.weights)
    data = args.data or w.data.get("kind", "sample")
    source = eval_source(data, w.classes)
    policy = inference_policy(torch.device("cpu"))
    batches, labels = [], []
    for b in batch_lib.batches(source, w.preprocess, batch_size=args.batch_size, train=False,
                               channels_last=policy.channels_last):  # decoded once, outside the timing
        batches.append(b.x)
        labels.append(b.y)
    labels = torch.cat(labels)
    folded = fold_batchnorm(w.config, w.params, w.state)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    print(f"cpu {cpu}; native bf16: {cpu_native_bf16() or 'none'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"{args.weights} on {data}: {len(labels)} images, {w.config.resolution} px, α {w.config.alpha}, "
          f"batch {args.batch_size}, BatchNorm folded, channels-last")
    rates: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    preds = {}
    predictions(w.config, folded, batches[:1], torch.bfloat16)  # warm up both
    predictions(w.config, folded, batches[:1], None)
    for r in range(args.rounds):
        for name in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            preds[name], seconds = predictions(w.config, folded, batches, torch.bfloat16 if name == "bfloat16" else None)
            rates[name].append(len(labels) / seconds)
    f32, bf16 = (statistics.median(rates[k]) for k in ("float32", "bfloat16"))
    for name in rates:
        top1 = (preds[name] == labels).float().mean().item()
        print(f"{name:9} {statistics.median(rates[name]):8.1f} img/s (rounds: "
              f"{', '.join(f'{v:.0f}' for v in rates[name])})  top-1 {100 * top1:.2f}%")
    agree = (preds["float32"] == preds["bfloat16"]).float().mean().item()
    print(f"bf16 ÷ float32: {bf16 / f32:.2f}×; top-1 agreement {100 * agree:.2f}%")


if __name__ == "__main__":
    main()
