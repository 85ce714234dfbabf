"""`mobilenet-fn audit` against known label noise and injected duplicates, on Fashion-MNIST written as folders.

    python bench/audit_noise.py [--work /tmp/audit-bench] [--epochs 10]

1. 10,000 of Fashion-MNIST's training images are written as a class-folder tree of PNGs twice, with 10 % and with
   20 % of the labels flipped to another class (seeded; the flips are recorded in flips-<p>.json), and the 10,000
   test images as another tree. Each noisy tree is audited with the default settings; the flagged label issues are
   scored against the flips (precision, recall, precision@100 and @500), next to the same budget of files ranked
   by loss alone, by the gradient norm alone and by the margin alone (from the audit's signals.csv), and to
   cleanlab on 3-fold cross-validated probabilities of a logistic regression on pixels. Then `train` on the noisy
   tree against `train --exclude` of the flagged label issues, and of the 500 most suspect, each evaluated on the
   test tree.
2. Duplicates: train/ (the 10,000 images as JPEG, quality 95) and val/ (2,000 other training images), audited
   clean and with 200 of the train images resized to 40 px and re-encoded as JPEG at quality 75 added to val/:
   the recall of the copies (leaks paired with their originals) at the default threshold, and what the clean set
   flags.

Everything goes through the command line, as a user runs it; numbers are printed as a table at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from mobilenet_fn import data as data_lib

N_TRAIN, N_DUP_VAL, N_COPIES = 10_000, 2_000, 200
TOP = 500  # the most suspect label issues, excluded in a second run
CACHE = Path("/tmp/audit-bench/cache")
RES = ["--resolution", "32", "--device", "cpu"]  # 28 px images: train's default for Fashion-MNIST, not a folder's 224


def cli(*args, env=None) -> tuple[dict | None, float]:
    """Runs `python -m mobilenet_fn ARGS`; its --json object (or None) and the seconds it took."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mobilenet_fn", *map(str, args)], capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, args))}\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else None), seconds


def write_tree(root: Path, images: torch.Tensor, labels: list[int], names: list[str], classes, fmt="png",
               quality=None) -> list[Path]:
    paths = []
    for image, label, name in zip(images, labels, names):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.{fmt}"
        Image.fromarray(image[0].numpy()).save(path, quality=quality) if quality else \
            Image.fromarray(image[0].numpy()).save(path)
        paths.append(path)
    return paths


def precision_recall(flagged: list[str], truth: set[str]) -> dict:
    hits = sum(f in truth for f in flagged)
    return {"flagged": len(flagged), "precision": hits / max(len(flagged), 1), "recall": hits / len(truth),
            "p@100": sum(f in truth for f in flagged[:100]) / 100, "p@500": sum(f in truth for f in flagged[:500]) / 500}


def logistic_cleanlab(images: torch.Tensor, labels: list[int], names: list[str]) -> list[str]:
    """cleanlab on 3-fold cross-validated logistic-regression probabilities of the raw pixels."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x = images.flatten(1).float().numpy() / 255
    probs = cross_val_predict(LogisticRegression(max_iter=300), x, labels, cv=3, method="predict_proba")
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return [names[i] for i in ranked]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit-bench"))
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the train / train --exclude comparison")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    global CACHE
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    CACHE = work / "cache"  # the decoded caches of the bench's folders, not the user's
    os.environ["MOBILENET_FN_CACHE"] = str(CACHE)
    arrays, _ = data_lib.fashion_mnist_arrays(download=False)
    classes = [c.replace("/", "-") for c in data_lib.FASHION_MNIST_CLASSES]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(60_000, generator=g)
    picked, others = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_DUP_VAL]
    images = arrays["train_images"][picked].unsqueeze(1)  # (N, 1, 28, 28)
    truth = arrays["train_labels"][picked].tolist()
    names = [f"{int(i):05d}" for i in picked]
    test = work / "test"
    if not test.exists():
        write_tree(test, arrays["test_images"].unsqueeze(1), arrays["test_labels"].tolist(),
                   [f"{i:05d}" for i in range(10_000)], classes)
    results, timings = {}, {}
    load = os.getloadavg()

    for p in args.noise:
        tag = f"{round(100 * p)}"
        root = work / f"noisy{tag}"
        n_flip = round(p * N_TRAIN)
        flip_idx = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(int(tag)))[:n_flip]
        given = list(truth)
        shift = torch.randint(1, 10, (n_flip,), generator=torch.Generator().manual_seed(100 + int(tag)))
        for i, s in zip(flip_idx.tolist(), shift.tolist()):
            given[i] = (truth[i] + s) % 10  # always another class
        if not root.exists():
            paths = write_tree(root, images, given, names, classes)
            (work / f"flips-{tag}.json").write_text(json.dumps(
                {str(paths[i]): {"true": classes[truth[i]], "given": classes[given[i]]} for i in flip_idx.tolist()},
                indent=1))
        flips = set(json.loads((work / f"flips-{tag}.json").read_text()))
        out = work / f"audit{tag}"
        if not out.exists():
            report, timings[f"audit {tag} %"] = cli("audit", root, "--out", out, "--json", *RES)
        report = json.loads((out / "report.json").read_text())
        issues = rows(out / "issues.csv")
        ours = [r["file"] for r in issues if r["kind"] == "label"]
        signals = rows(out / "signals.csv")
        budget = len(ours)
        table = {"ours (cleanlab on K-fold MobileNet)": precision_recall(ours, flips)}
        for signal, sign in (("loss", -1), ("grad_norm", -1), ("margin", 1)):
            if signal in signals[0]:
                ranked = sorted(signals, key=lambda r: sign * float(r[signal]))
                table[f"{signal} alone (same budget)"] = precision_recall([r["file"] for r in ranked[:budget]], flips)
        t0 = time.perf_counter()
        paths = [str(root / classes[given[i]] / f"{names[i]}.png") for i in range(N_TRAIN)]
        table["cleanlab on logistic regression (pixels)"] = precision_recall(
            logistic_cleanlab(images, given, paths), flips)
        timings[f"logistic regression {tag} %"] = time.perf_counter() - t0
        results[f"{tag} % flipped"] = {"table": table, "flips": len(flips), "audit_seconds": report.get("seconds"),
                                       "out_of_sample_top1": report["out_of_sample_top1"], "fold_top1": report["fold_top1"]}
        if not args.skip_train:
            only_labels = work / f"label-issues-{tag}.csv"
            only_labels.write_text("file\n" + "".join(f"{f}\n" for f in ours))
            top = work / f"label-top{TOP}-{tag}.csv"
            top.write_text("file\n" + "".join(f"{f}\n" for f in ours[:TOP]))
            accuracy = {}
            for name, key, extra in (("noisy labels", "noisy", []),
                                     (f"--exclude flagged ({len(ours)})", "excl", ["--exclude", only_labels]),
                                     (f"--exclude the {TOP} most suspect", f"top{TOP}", ["--exclude", top])):
                run = work / f"run{tag}-{key}"
                if not run.exists():
                    _, timings[f"train {tag} % {name}"] = cli("train", "--data", root, "--epochs", args.epochs,
                                                              "--out", run, *RES, *extra)
                ev, _ = cli("eval", run / "weights.pkl", "--data", test, "--json", "--device", "cpu")
                accuracy[name] = ev["top1"]
            results[f"{tag} % flipped"]["test_top1"] = accuracy

    # Duplicates
    dups = work / "dups"
    if not dups.exists():
        write_tree(dups / "train", images, truth, names, classes, fmt="jpg", quality=95)
        write_tree(dups / "val", arrays["train_images"][others].unsqueeze(1), arrays["train_labels"][others].tolist(),
                   [f"{int(i):05d}" for i in others], classes)
        clean = work / "dups-clean"
        clean.mkdir()
        os.symlink(dups / "train", clean / "train")  # the same files; val/ written again, without the copies
        write_tree(clean / "val", arrays["train_images"][others].unsqueeze(1), arrays["train_labels"][others].tolist(),
                   [f"{int(i):05d}" for i in others], classes)
        copies = {}
        for i in range(N_COPIES):
            original = dups / "train" / classes[truth[i]] / f"{names[i]}.jpg"
            image = Image.open(original).resize((40, 40), Image.BICUBIC)
            copy = dups / "val" / classes[truth[i]] / f"copy-{names[i]}.jpg"
            image.save(copy, quality=75)
            copies[str(copy)] = str(original)
        (work / "copies.json").write_text(json.dumps(copies, indent=1))
    copies = json.loads((work / "copies.json").read_text())
    duplicate = {}
    for name, root in (("clean", work / "dups-clean"), ("with 200 copies", dups)):
        out = work / f"audit-{name.replace(' ', '-')}"
        if not out.exists():
            # Duplicates are found in the pixels: the model's training budget does not change them.
            _, timings[f"audit duplicates {name}"] = cli("audit", root, "--out", out, "--epochs", "2", "--folds", "2",
                                                         "--grad", "off", "--json", *RES)
        report = json.loads((out / "report.json").read_text())
        pairs = [r for r in rows(out / "issues.csv") if r["kind"] in ("leak", "duplicate", "conflict")]
        found = {(r["file"], r["other"]) for r in pairs}
        entry = {"flagged rows": len(pairs), "exact pairs": report["exact_duplicate_pairs"],
                 "threshold": report["duplicate_threshold"],
                 "by kind": {k: sum(r["kind"] == k for r in pairs) for k in ("leak", "duplicate", "conflict")}}
        if name != "clean":
            def rel(p):  # the clean tree's paths run through its links
                return os.path.realpath(p)
            hit = sum((rel(c), rel(o)) in {(rel(a), rel(b)) for a, b in found} for c, o in copies.items())
            entry["copies found"] = hit
            entry["recall"] = hit / len(copies)
            entry["flagged rows that are not an injected copy"] = len(pairs) - hit
        duplicate[name] = entry
    results["duplicates"] = duplicate

    # The similarity of each copy to its original, and of each clean image to its nearest other, in the embedding
    from mobilenet_fn import audit as audit_lib

    pool, _ = audit_lib.load_pool(str(dups), resolution=32)
    e = audit_lib.thumbnails(pool)
    index = {os.path.realpath(n): i for i, n in enumerate(pool.names)}
    pair_sims = torch.tensor([float(e[index[os.path.realpath(c)]] @ e[index[os.path.realpath(o)]])
                              for c, o in copies.items()])
    is_copy = torch.zeros(len(pool), dtype=torch.bool)
    is_copy[[index[os.path.realpath(c)] for c in copies]] = True
    clean_e = e[~is_copy]
    thresholds = (0.97, 0.98, 0.985, 0.99, 0.995)
    counts = {t: len(audit_lib.similar_pairs(clean_e, t)) for t in thresholds}
    results["similarity"] = {
        "copy-original quantiles (min, 1 %, 5 %, median)": [round(float(x), 4) for x in (
            pair_sims.min(), pair_sims.quantile(0.01), pair_sims.quantile(0.05), pair_sims.median())],
        "recall by threshold": {t: float((pair_sims >= t).float().mean()) for t in thresholds},
        "clean pairs by threshold": counts,
    }
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["load_average_at_start"] = load
    results["threads"] = torch.get_num_threads()
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    for key, r in results.items():
        if not key.endswith("flipped"):
            continue
        print(f"\n{key} ({r['flips']} flips; out-of-sample top-1 {100 * r['out_of_sample_top1']:.1f} %, "
              f"audit {r['audit_seconds']} s)")
        print(f"{'method':45s} {'flagged':>8s} {'precision':>9s} {'recall':>7s} {'p@100':>6s} {'p@500':>6s}")
        for method, m in r["table"].items():
            print(f"{method:45s} {m['flagged']:8d} {m['precision']:9.3f} {m['recall']:7.3f} {m['p@100']:6.2f} "
                  f"{m['p@500']:6.2f}")
        if "test_top1" in r:
            print("test top-1: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in r["test_top1"].items()))
    print("\nduplicates:", json.dumps(results["duplicates"], indent=1))
    print("similarity:", json.dumps(results["similarity"], indent=1))
    print("timings (s):", results["timings_s"], "load average at start:", results["load_average_at_start"])


if __name__ == "__main__":
    main()
