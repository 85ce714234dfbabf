"""Each depthwise layer of MobileNet v1, forward and backward on the CPU: float32 (the input cast up, as
``layers.depthwise_apply`` does inside a bf16 training step) against bf16 autocast, channels-last.

    .venv/bin/python bench/depthwise_bf16.py [RESOLUTION] [BATCH] [ALPHA]     # default 128 64 1.0

Prints ms per layer in each precision and their ratio (bf16 / float32), then the totals and the CPU's flags: the
numbers behind ``layers.BF16_DEPTHWISE_MIN_PIXELS`` and the stride rule.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

# (channels at α 1, stride, map side as a fraction of the input) of the 13 depthwise layers
LAYERS = [(32, 1, 2), (64, 2, 2), (128, 1, 4), (128, 2, 4), (256, 1, 8), (256, 2, 8)] + [(512, 1, 16)] * 5 + [
    (512, 2, 16), (1024, 1, 32)]


def milliseconds(channels: int, stride: int, side: int, batch: int, precision: str, repeats: int = 5) -> float:
    x = torch.randn(batch, channels, side, side).to(memory_format=torch.channels_last).bfloat16().requires_grad_()
    w = torch.randn(channels, 1, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()

    def once():
        if precision == "float32":
            with torch.autocast("cpu", enabled=False):
                y = F.conv2d(x.float(), w, None, stride=stride, padding=1, groups=channels)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = F.conv2d(x, w, None, stride=stride, padding=1, groups=channels)
        y.float().sum().backward()

    for _ in range(2):
        once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv: list[str]) -> None:
    resolution, batch = (int(a) for a in (argv + ["128", "64"])[:2])
    alpha = float(argv[2]) if len(argv) > 2 else 1.0
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    print(f"{resolution} px x {batch}, α {alpha}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"cpu flags: {' '.join(f for f in flags if f.startswith(('avx512_bf16', 'amx', 'avx512f', 'avx2')))}")
    total = {"float32": 0.0, "bf16": 0.0}
    for channels, stride, fraction in LAYERS:
        channels, side = int(channels * alpha), max(1, resolution // fraction)
        ms = {p: milliseconds(channels, stride, side, batch, p) for p in total}
        for p in total:
            total[p] += ms[p]
        print(f"{channels:5d} channels, stride {stride}, {side:3d} x {side:<3d}: float32 {ms['float32']:7.2f} ms, "
              f"bf16 {ms['bf16']:7.2f} ms, bf16/float32 {ms['bf16'] / ms['float32']:.2f}")
    print(f"all 13: float32 {total['float32']:.1f} ms, bf16 {total['bf16']:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
