"""Runs a recipe with each ingredient removed in turn, and plots validation top-1 against wall time.

    python bench/recipes.py ablate recipes/fashion-mnist-cpu.toml --epochs 6 --out /tmp/ablation [--parallel 2]
                                   [--timm]
    python bench/recipes.py plot RUN_DIR [RUN_DIR ...] -o docs/recipes.png
    python bench/recipes.py table RUN_DIR [RUN_DIR ...]

``ablate`` trains the recipe as given, once without each ingredient it uses (EMA, random erasing, mixup/cutmix,
auto-augment; its crop scale and resolution replaced by the defaults) and once with each of mixup/cutmix and
auto-augment it does not use (timm's usual settings), each with ``mobilenet-fn train --config RECIPE`` plus the
flags that change one ingredient, and prints a table: wall time (compilation included), best validation top-1,
and test top-1 of the best validation epoch's weights. ``--timm`` adds the recipe trained by timm's MobileNet v1
(``bench/fashion_mnist_timm.py --config RECIPE --amp bf16``, the precision our auto picks on a CPU with bf16).
With ``--parallel 2`` two runs share the machine, each with one thread (``OMP_NUM_THREADS=1``): the two cores are
used without the two processes' thread pools fighting, which on a 2-core machine slows both many times over.
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

INGREDIENTS = {  # name: (the recipe key that turns it on, the flags that turn it off, the flags that turn it on)
    "EMA": ("ema", ["--ema", "0"], None),
    "random erasing": ("reprob", ["--reprob", "0"], ["--reprob", "0.25"]),
    "mixup/cutmix": ("mixup", ["--mixup", "0", "--cutmix", "0"], ["--mixup", "0.2", "--cutmix", "1.0"]),
    "auto-augment": ("auto_augment", ["--auto-augment", "none"], ["--auto-augment", "trivial"]),
    "crop scale": ("crop_scale", None, None),  # back to the default
    "resolution": ("resolution", None, None),  # back to the data's default
}


def variants(recipe: dict) -> dict[str, list[str]]:
    """The runs: the whole recipe, one without each ingredient it uses and one with each it does not."""
    from mobilenet_fn.data import DEFAULT_RESOLUTION
    from mobilenet_fn.options import TrainOptions

    defaults = {"crop_scale": TrainOptions.crop_scale,
                "resolution": DEFAULT_RESOLUTION.get(recipe.get("data", ""), 224)}
    runs = {"whole recipe": []}
    for name, (key, off, on) in INGREDIENTS.items():
        value = recipe.get(key, recipe.get("cutmix") if key == "mixup" else None)
        if key in defaults:
            if value is not None and value != defaults[key]:
                runs[f"{name} {defaults[key]} (default)"] = [f"--{key.replace('_', '-')}", str(defaults[key])]
        elif value and value != "none":
            runs[f"without {name}"] = off
        elif on:
            runs[f"with {name}"] = on
    return runs


def summary(run: Path) -> dict | None:
    """Epochs, seconds (sum of epoch times), best validation top-1 and epoch, test top-1 and the rows of a
    mobilenet-fn run folder or of bench/fashion_mnist_timm.py's summary.json there; None if it has neither."""
    if (run / "summary.json").exists():
        timm = json.loads((run / "summary.json").read_text())
        rows = timm["history"]
        rows[-1]["test_top1"] = timm["test_top1"]
    elif (run / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    else:
        return None
    best = max(rows, key=lambda r: (r["val_top1"], -r["val_loss"]))
    return {"epochs": len(rows), "seconds": sum(r["seconds"] for r in rows), "best_val_top1": best["val_top1"],
            "best_epoch": best["epoch"], "test_top1": rows[-1].get("test_top1"), "rows": rows}


def ablate(args) -> None:
    recipe = {k.replace("-", "_"): v for k, v in tomllib.loads(Path(args.recipe).read_text()).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {}  # name: (command, folder)
    for name, flags in variants(recipe).items():
        folder = args.out / name.replace(" ", "-").replace("/", "-").replace("(", "").replace(")", "")
        jobs[name] = ([sys.executable, "-m", "mobilenet_fn", "train", "--config", args.recipe, "--epochs",
                       str(args.epochs), "--seed", str(args.seed), "--out", str(folder), *flags, *args.extra], folder)
    if args.timm:
        folder = args.out / "timm"
        jobs["timm MobileNet v1, eager, bf16 autocast"] = (
            [sys.executable, str(Path(__file__).with_name("fashion_mnist_timm.py")), "--config", args.recipe,
             "--epochs", str(args.epochs), "--seed", str(args.seed), "--amp", "bf16",
             "--out", str(folder / "summary.json")], folder)
    # timm's eager epochs are the slowest: started first, so that the other runs share the machine with it
    walls = run_jobs(dict(sorted(jobs.items(), key=lambda job: not job[0].startswith("timm"))), args.out,
                     args.parallel)
    print(f"\n{args.recipe}, {args.epochs} epochs, seed {args.seed}"
          + (f", {args.parallel} runs at a time, one thread each" if args.parallel > 1 else ""))
    print("| run | wall time | best val top-1 (epoch) | test top-1 |")
    print("| --- | --- | --- | --- |")
    for name, (_, folder) in jobs.items():
        s = summary(folder)
        if s is None:
            print(f"| {name} | failed: see {folder.name}.log | | |")
            continue
        test = "?" if s["test_top1"] is None else f"{100 * s['test_top1']:.2f} %"
        print(f"| {name} | {walls[name] / 60:.1f} min | {100 * s['best_val_top1']:.2f} % ({s['best_epoch']}) | "
              f"{test} |")


def run_jobs(jobs: dict, out: Path, parallel: int) -> dict[str, float]:
    """Runs each (command, folder) of ``jobs``, ``parallel`` at a time (then with one thread each), logging to
    ``out/<folder>.log``; returns each one's wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if parallel > 1 else dict(os.environ)
    pending = list(jobs.items())
    active: list[tuple[str, subprocess.Popen, float]] = []
    walls: dict[str, float] = {}
    while pending or active:
        while pending and len(active) < parallel:
            name, (command, folder) = pending.pop(0)
            print("$", " ".join(command[1:]), flush=True)
            log = open(out / f"{folder.name}.log", "w")
            active.append((name, subprocess.Popen(command, env=env, stdout=log, stderr=log), time.perf_counter()))
        time.sleep(2)
        for item in list(active):
            name, process, started = item
            if process.poll() is not None:
                walls[name] = time.perf_counter() - started
                active.remove(item)
                print(f"{name}: exit {process.returncode}, {walls[name]:.0f} s", flush=True)
    return walls


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
    a.add_argument("--timm", action="store_true", help="also train the recipe with timm's MobileNet v1")
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
