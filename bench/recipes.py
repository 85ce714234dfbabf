"""Runs a recipe with each ingredient removed in turn, and plots validation top-1 against wall time.

    python bench/recipes.py ablate recipes/fashion-mnist-cpu.toml --epochs 15 --out /tmp/ablation [--parallel 2]
    python bench/recipes.py plot RUN_DIR [RUN_DIR ...] -o docs/recipes.png
    python bench/recipes.py table RUN_DIR [RUN_DIR ...]

``ablate`` trains the recipe as given and once without each ingredient (EMA, random erasing, mixup/cutmix,
auto-augment, and the recipe's resolution replaced by the data's default), each with ``mobilenet-fn train
--config RECIPE`` plus the flags that switch one ingredient off, and prints a table: wall time (compilation
included), best validation top-1, and test top-1 of the best validation epoch's weights. With ``--parallel 2`` two
runs share the machine, each with one thread (``OMP_NUM_THREADS=1``): the two cores are used without the two
processes' thread pools fighting, which on a 2-core machine slows both many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

INGREDIENTS = {  # name: (the recipe key that turns it on, the flags that turn it off)
    "EMA": ("ema", ["--ema", "0"]),
    "random erasing": ("reprob", ["--reprob", "0"]),
    "mixup/cutmix": ("mixup", ["--mixup", "0", "--cutmix", "0"]),
    "auto-augment": ("auto_augment", ["--auto-augment", "none"]),
    "resolution": ("resolution", None),  # back to the data's default
}


def variants(recipe: dict) -> dict[str, list[str]]:
    """The runs: the whole recipe, and one without each ingredient it uses."""
    from mobilenet_fn.data import DEFAULT_RESOLUTION

    runs = {"whole recipe": []}
    for name, (key, off) in INGREDIENTS.items():
        value = recipe.get(key, recipe.get("cutmix") if key == "mixup" else None)
        if not value or value == "none":
            continue
        if key == "resolution":
            default = DEFAULT_RESOLUTION.get(recipe.get("data", ""), 224)
            if value == default:
                continue
            off = ["--resolution", str(default)]
        runs[f"without {name}"] = off
    return runs


def summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = max(rows, key=lambda r: (r["val_top1"], -r["val_loss"]))
    return {"epochs": len(rows), "seconds": sum(r["seconds"] for r in rows), "best_val_top1": best["val_top1"],
            "best_epoch": best["epoch"], "test_top1": rows[-1].get("test_top1"), "rows": rows}


def ablate(args) -> None:
    recipe = {k.replace("-", "_"): v for k, v in tomllib.loads(Path(args.recipe).read_text()).items()}
    runs = variants(recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.parallel > 1 else dict(os.environ)
    pending = list(runs.items())
    active: list[tuple[str, subprocess.Popen, float]] = []
    walls: dict[str, float] = {}
    while pending or active:
        while pending and len(active) < args.parallel:
            name, flags = pending.pop(0)
            folder = args.out / name.replace(" ", "-").replace("/", "-")
            command = [sys.executable, "-m", "mobilenet_fn", "train", "--config", args.recipe, "--epochs",
                       str(args.epochs), "--seed", str(args.seed), "--out", str(folder), *flags, *args.extra]
            print("$", " ".join(command[2:]), flush=True)
            log = open(args.out / f"{folder.name}.log", "w")
            active.append((name, subprocess.Popen(command, env=env, stdout=log, stderr=log), time.perf_counter()))
        time.sleep(2)
        for item in list(active):
            name, process, started = item
            if process.poll() is not None:
                walls[name] = time.perf_counter() - started
                active.remove(item)
                print(f"{name}: exit {process.returncode}, {walls[name]:.0f} s", flush=True)
    print(f"\n{args.recipe}, {args.epochs} epochs, seed {args.seed}"
          + (f", {args.parallel} runs at a time, one thread each" if args.parallel > 1 else ""))
    print("| run | wall time | best val top-1 (epoch) | test top-1 |")
    print("| --- | --- | --- | --- |")
    for name in runs:
        folder = args.out / name.replace(" ", "-").replace("/", "-")
        if not (folder / "metrics.jsonl").exists():
            print(f"| {name} | failed: see {folder.name}.log | | |")
            continue
        s = summary(folder)
        test = "?" if s["test_top1"] is None else f"{100 * s['test_top1']:.2f} %"
        print(f"| {name} | {walls[name] / 60:.1f} min | {100 * s['best_val_top1']:.2f} % ({s['best_epoch']}) | "
              f"{test} |")


def table(args) -> None:
    print("| run | epochs | time (sum of epochs) | best val top-1 (epoch) | test top-1 |")
    print("| --- | --- | --- | --- | --- |")
    for run in args.runs:
        s = summary(run)
        test = "?" if s["test_top1"] is None else f"{100 * s['test_top1']:.2f} %"
        print(f"| {run} | {s['epochs']} | {s['seconds'] / 60:.1f} min | {100 * s['best_val_top1']:.2f} % "
              f"({s['best_epoch']}) | {test} |")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for run in args.runs:
        s = summary(run)
        minutes, total = [], 0.0
        for r in s["rows"]:
            total += r["seconds"]
            minutes.append(total / 60)
        label = args.labels[args.runs.index(run)] if args.labels else run.name
        line, = ax.plot(minutes, [100 * r["val_top1"] for r in s["rows"]], label=f"{label}: validation")
        if s["test_top1"] is not None:
            ax.plot([minutes[-1]], [100 * s["test_top1"]], "o", color=line.get_color(),
                    label=f"{label}: test, best epoch ({100 * s['test_top1']:.2f} %)")
    ax.set_xlabel("wall time, minutes (compilation included)")
    ax.set_ylabel("top-1, %")
    ax.set_ylim(args.ymin, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ablate")
    a.add_argument("recipe")
    a.add_argument("--epochs", type=int, required=True)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--parallel", type=int, default=1)
    a.add_argument("extra", nargs="*", help="more train flags, after --")
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+", type=Path)
    g = sub.add_parser("plot")
    g.add_argument("runs", nargs="+", type=Path)
    g.add_argument("-o", "--output", type=Path, required=True)
    g.add_argument("--labels", nargs="*")
    g.add_argument("--ymin", type=float, default=80)
    args = p.parse_args(argv)
    {"ablate": ablate, "table": table, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
