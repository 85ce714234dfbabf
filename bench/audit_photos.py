"""`mobilenet-fn audit` on a noisy copy of a folder of real photos: how good its judge is, what it flags.

    .venv/bin/python bench/audit_photos.py --photos ../shared/photos [--work /tmp/audit-photos] [-- AUDIT OPTIONS]

The photos (one folder per class) are split, seeded, into train/ (75 %) and val/ (25 %) as links, never copies of
the originals; 15 % of the training photos are filed under another class (drawn uniformly), and 55 training photos,
shrunk to 70 % and re-encoded as JPEG at quality 75, are put in val/ as leaks. The flips and leaks are recorded in
planted.json. Then `audit` runs with its defaults (plus any options after --), and the report is scored: the judge's
out-of-sample top-1 against chance, the flagged label issues against the flips (precision, recall), the precision
of the 100 most suspect labels by the audit's ranking (signals.csv's quality, lowest first; chance: the flip
rate), the leaks found, and the minutes it took.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

FLIP, LEAKS, VAL = 0.15, 55, 0.25


def plant(photos: Path, work: Path, seed: int = 0) -> dict:
    """The noisy tree under work/data, and what was planted in it."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in photos.iterdir() if p.is_dir())
    files = [(f, c) for c in classes for f in sorted((photos / c).iterdir()) if f.is_file()]
    rng.shuffle(files)
    n_val = round(VAL * len(files))
    val, train = files[:n_val], files[n_val:]
    flipped = set(rng.sample(range(len(train)), round(FLIP * len(train))))
    root = work / "data"
    planted = {"flips": {}, "leaks": {}}
    for i, (f, c) in enumerate(train):
        label = rng.choice([k for k in classes if k != c]) if i in flipped else c
        link = root / "train" / label / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
        if i in flipped:
            planted["flips"][str(link)] = c
    for f, c in val:
        link = root / "val" / c / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    for i in rng.sample([i for i in range(len(train)) if i not in flipped], LEAKS):
        f, c = train[i]
        copy = root / "val" / c / f"leak-{f.stem}.jpg"
        with Image.open(f) as image:
            image = image.convert("RGB")
            image.resize((round(0.7 * image.width), round(0.7 * image.height)), Image.BICUBIC).save(copy, quality=75)
        planted["leaks"][str(copy)] = str(root / "train" / c / f.name)
    (work / "planted.json").write_text(json.dumps(planted, indent=1))
    return planted


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/audit-photos"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("audit_options", nargs="*", help="after --: passed to audit")
    args = p.parse_args()
    if args.work.exists():
        sys.exit(f"{args.work} exists; give another --work")
    planted = plant(args.photos, args.work, args.seed)
    flips = set(planted["flips"])
    out = args.work / "report"
    command = [sys.executable, "-m", "mobilenet_fn", "audit", str(args.work / "data"), "--out", str(out),
               *args.audit_options]
    print(f"cpu: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {' '.join(command[2:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - t0) / 60
    report = json.loads((out / "report.json").read_text())
    issues = rows(out / "issues.csv")
    flagged = {r["file"] for r in issues if r["kind"] == "label"}
    ranked = [r["file"] for r in sorted(rows(out / "signals.csv"), key=lambda r: float(r["quality"]))
              if "/train/" in r["file"]]
    leaks = {r["file"]: r["other"] for r in issues if r["kind"] == "leak"}
    found = sum(leaks.get(copy) == original for copy, original in planted["leaks"].items())
    print(f"| judge top-1 (chance) | kappa | labels flagged | precision | recall | precision@100 (chance) | "
          f"leaks found | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    precision = len(flagged & flips) / len(flagged) if flagged else float("nan")
    print(f"| {100 * report['out_of_sample_top1']:.1f} % ({100 * report['chance_top1']:.1f} %) | "
          f"{report['judge_kappa']:.2f} | {len(flagged)} of {report['images']} | {100 * precision:.0f} % | "
          f"{100 * len(flagged & flips) / len(flips):.0f} % | "
          f"{sum(f in flips for f in ranked[:100])} % ({100 * FLIP:.0f} %) | {found} of {LEAKS} | {minutes:.1f} |")
    print(f"fold epochs {report.get('fold_epochs')}, fold top-1 {[round(t, 3) for t in report['fold_top1']]}")


if __name__ == "__main__":
    main()
