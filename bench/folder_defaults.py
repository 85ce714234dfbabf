"""Settings for training from scratch on a small folder of photos, compared over seeds.

Each setting is a list of ``mobilenet-fn train`` options; each (setting, seed) pair is one run in its own folder
under ``--out``, run by the CLI as a user would (``--seed`` also draws the validation split, so the seeds are
different splits too). A run that stopped part way is resumed (``--resume``) and a finished one is read, not run
again: the script can be stopped and started across sessions. It prints, per setting, the mean and spread of the
last epoch's and the best epoch's validation top-1 and the minutes each run took.

    .venv/bin/python bench/folder_defaults.py --data ../shared/photos --out runs/folder-defaults \\
        --setting today --setting r128-e30 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "mobilenet_fn"]

# name -> train options (beside --data, --seed, --out). "today" is what train did with no options before this round.
SETTINGS = {
    "today": ["-r", "224", "--epochs", "15"],
    "r128-e30": ["-r", "128", "--epochs", "30"],
    "r96-e50": ["-r", "96", "--epochs", "50"],
    "r128-e30-f32": ["-r", "128", "--epochs", "30", "--amp", "off"],
    "r96-e50-f32": ["-r", "96", "--epochs", "50", "--amp", "off"],
    "r128-e30-wd5e-4": ["-r", "128", "--epochs", "30", "--weight-decay", "5e-4"],
    "r96-e50-trivial-wd5e-4": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "--weight-decay", "5e-4"],
    "r128-e30-trivial": ["-r", "128", "--epochs", "30", "--auto-augment", "trivial"],
    "r96-e50-trivial": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial"],
    "r112-e40-trivial": ["-r", "112", "--epochs", "40", "--auto-augment", "trivial"],
    "r96-e50-trivial-b32": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "-b", "32"],
    "r96-e50-trivial-mix": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "--mixup", "0.2",
                            "--cutmix", "1.0"],
    "r96-e50-trivial-ema": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "--ema", "0.998"],
    "r96-e50-trivial-a025": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "-a", "0.25"],
    "r96-e50-trivial-crop08": ["-r", "96", "--epochs", "50", "--auto-augment", "trivial", "--crop-scale", "0.08"],
}


def epochs_of(options: list[str]) -> int:
    return int(options[options.index("--epochs") + 1])


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_once(data: str, options: list[str], seed: int, run: Path) -> dict:
    """Train (or finish training) one run and return its summary. Its minutes are the sum of its epochs' times
    (training and validation, the first epoch's compilation included; not the decoding of the cache)."""
    if len(metrics(run)) < epochs_of(options):
        if (run / "last.ckpt").exists():
            command = CLI + ["train", "--resume", str(run)]
        else:
            command = CLI + ["train", "--data", data, "--seed", str(seed), "--out", str(run), *options]
        subprocess.run(command, check=True)
    lines = metrics(run)
    return {"final": lines[-1]["val_top1"], "best": max(m["val_top1"] for m in lines),
            "minutes": sum(m["seconds"] for m in lines) / 60, "img_per_s": statistics.median(m["img_per_s"] for m in lines)}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:5.1f} ± {100 * sd:3.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of class folders")
    p.add_argument("--out", type=Path, default=Path("runs/folder-defaults"))
    p.add_argument("--setting", action="append", choices=sorted(SETTINGS), help="repeatable; default: all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--report", action="store_true", help="only print the table of the runs that finished")
    args = p.parse_args()
    names = args.setting or list(SETTINGS)
    print(f"cpu: {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in names:
        results = []
        for seed in args.seeds:
            run = args.out / f"{name}-s{seed}"
            if args.report and len(metrics(run)) < epochs_of(SETTINGS[name]):
                continue
            results.append(run_once(args.data, SETTINGS[name], seed, run))
        if results:
            rows.append((name, len(results), spread([r["final"] for r in results]),
                         spread([r["best"] for r in results]),
                         f"{statistics.fmean(r['minutes'] for r in results):.1f}",
                         f"{statistics.fmean(r['img_per_s'] for r in results):.0f}"))
    print(f"| setting | runs | final val top-1 % | best val top-1 % | minutes | img/s (median epoch) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
