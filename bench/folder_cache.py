"""Image folders with and without the decoded cache, side by side, in one process.

    python bench/folder_cache.py /tmp/photos            # about 20 min on 2 cores
    python bench/folder_cache.py /tmp/photos --quick    # fewer rounds, no accuracy runs

Prints, for a folder of class folders (e.g. the one bench/make_photo_folder.py makes):
1. building the cache: img/s, bytes per image in memory and on disk (and the JPEGs'), the time a second run
   takes to open it (RAM and memory-mapped);
2. the loader alone (no model), one training epoch: the worker path (DataLoader workers decoding each JPEG,
   random resized crop and flip with torchvision) against cached batches (gathered uint8, crop and flip on the
   device);
3. training (the Trainer's own loop, eager step, batch 64), epochs after the first: img/s and data wait, per α,
   and the ceiling: the same step run again and again on one batch, with no data to wait for;
4. with ``--accuracy-epochs N`` (default 6): validation top-1 after N epochs with and without the cache, per seed
   (``--seeds``, default 2), and the mean and spread of each.
Contenders alternate round by round, so drift of a shared machine hits both; read the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mobilenet_fn import cache
from mobilenet_fn.batches import batches
from mobilenet_fn.data import load
from mobilenet_fn.model import Config
from mobilenet_fn.step import keep_freed_memory
from mobilenet_fn.options import TrainOptions
from mobilenet_fn.train import EpochEvent, Trainer, augmentation


def machine() -> str:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    return (f"{model}, {len(os.sched_getaffinity(0))} cores, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def build_and_open(root: Path, preprocess: dict) -> dict:
    """Builds the cache of ``root`` into a fresh folder, then opens it as a second run would, in RAM and mapped."""
    layout = cache.Layout.of(preprocess)
    with tempfile.TemporaryDirectory() as where:
        os.environ["MOBILENET_FN_CACHE"] = where
        cache._opened.clear()
        t0 = time.perf_counter()
        built = cache.open_folder(root, layout, "ram", threads=len(os.sched_getaffinity(0)))
        seconds = time.perf_counter() - t0
        n = built.report.images + len(built.report.skipped)
        disk = sum(p.stat().st_size for p in built.report.path.iterdir())
        opens = {}
        for mode in ("ram", "disk"):
            cache._opened.clear()
            t0 = time.perf_counter()
            cache.open_folder(root, layout, mode, threads=1)
            opens[mode] = time.perf_counter() - t0
    jpeg = sum(os.path.getsize(root / m) for m in cache.folder_files(root))
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds, "row_bytes": layout.row_bytes,
            "disk_per_image": disk / built.report.images, "jpeg_per_image": jpeg / n, "open": opens,
            "side": layout.side}


def loader_epoch(source, preprocess, epoch: int, workers: int) -> float:
    """img/s of one training epoch of batches (64) from ``source``, no model."""
    t0, n = time.perf_counter(), 0
    for batch in batches(source, preprocess, batch_size=64, train=True, seed=0, epoch=epoch,
                         workers=workers, channels_last=True):
        n += len(batch.y)
    return n / (time.perf_counter() - t0)


def trainer_for(dataset, alpha: float, seed: int = 0, epochs: int = 1) -> Trainer:
    cfg = Config(alpha=alpha, resolution=dataset.preprocess["resolution"], num_classes=len(dataset.classes))
    opts = TrainOptions(data="bench", epochs=epochs, batch_size=64, lr=0.1, compile="off", seed=seed, workers=2,
                        device="cpu")
    trainer = Trainer(cfg, opts, dataset, torch.device("cpu"))
    trainer.start_fresh()
    return trainer


def one_more_epoch(trainer: Trainer) -> dict:
    trainer.opts.epochs = trainer.epoch + 1
    return next(e.metrics for e in trainer.run() if isinstance(e, EpochEvent))


def step_alone(trainer: Trainer, steps: int) -> float:
    """img/s of ``steps`` training steps of ``trainer``'s own step on one batch made once: what training would
    reach if batches cost nothing."""
    ds, opts = trainer.dataset, trainer.opts
    batch = next(batches(ds.train, ds.preprocess, batch_size=opts.batch_size, train=True,
                         augment=augmentation(opts), channels_last=trainer.policy.channels_last))
    step, trees, lr = trainer.make_step(), (trainer.params, trainer.state, trainer.opt_state), torch.tensor(0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        *trees, metrics = step(*trees, (batch.x, batch.y), lr)
    metrics["loss"].item()
    return steps * opts.batch_size / (time.perf_counter() - t0)


def first(source, n: int):
    return source.subset(torch.arange(min(n, len(source))))


def part(dataset, n_train: int, n_val: int):
    """The dataset cut to its first images: the speed runs time training on ``n_train`` and validate on few."""
    return dataclasses.replace(dataset, train=first(dataset.train, n_train), val=first(dataset.val, n_val))


def median(xs):
    return statistics.median(xs)


def spread(xs) -> str:
    return f"±{100 * (max(xs) - min(xs)) / 2 / median(xs):.0f}%" if len(xs) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--accuracy-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the accuracy runs")
    parser.add_argument("--speed-images", type=int, default=3200, help="training images per timed epoch")
    parser.add_argument("--quick", action="store_true", help="2 rounds, α 0.25 only, no accuracy runs")
    parser.add_argument("--threads", type=int, help="torch's threads in this process (default: torch's choice); "
                                                     "1 where other work holds a core: there 2 threads ran the "
                                                     "α 0.25 step at 15-150 img/s, 1 thread at 400-460")
    args = parser.parse_args()
    keep_freed_memory()  # as train does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.alphas, args.accuracy_epochs = 2, [0.25], 0
    print(machine())
    files = load(str(args.folder), resolution=args.resolution, seed=0)
    print(f"{args.folder}: {len(files.train)} training and {len(files.val)} validation images, "
          f"{len(files.classes)} classes, {args.resolution} px (eval resize {files.preprocess['resize']})\n")

    b = build_and_open(args.folder, files.preprocess)
    print("1. Cache build (PIL in threads on every core), once per folder and size")
    print(f"   {b['images']} images in {b['seconds']:.1f} s: {b['img_per_s']:.0f} img/s; stored "
          f"{b['side']}x{b['side']}x3 uint8 = {b['row_bytes'] / 1024:.1f} KiB per image in memory, "
          f"{b['disk_per_image'] / 1024:.1f} KiB on disk (the JPEGs: {b['jpeg_per_image'] / 1024:.1f} KiB)")
    print(f"   a second run opens it (checking every byte's CRC) in {b['open']['ram']:.2f} s into RAM, "
          f"{b['open']['disk']:.2f} s memory-mapped\n")

    with tempfile.TemporaryDirectory() as where:
        os.environ["MOBILENET_FN_CACHE"] = where
        cache._opened.clear()
        cached, _ = cache.cached_dataset(files, "ram")
        speed = {name: part(ds, args.speed_images, 64) for name, ds in (("files", files), ("cache", cached))}

        print("2. Loader alone, one training epoch of 64-image batches, img/s (median of rounds)")
        loader = {"files": [], "cache": []}
        for r in range(args.rounds + 1):
            for name, ds in (("files", files), ("cache", cached)):
                ips = loader_epoch(ds.train, ds.preprocess, r, workers=2)
                if r:  # round 0 warms up
                    loader[name].append(ips)
        print(f"   DataLoader, 2 workers, PIL decode + crop: {median(loader['files']):7.0f} {spread(loader['files'])}")
        print(f"   cached, gather + crop on the device:     {median(loader['cache']):7.0f} {spread(loader['cache'])}"
              f"   ({median(loader['cache']) / median(loader['files']):.1f}x)\n")

        print(f"3. Training, eager step, batch 64, {args.resolution} px, epochs of {len(speed['cache'].train)} images "
              f"after the first (img/s and data wait, median of {args.rounds} rounds)")
        for alpha in args.alphas:
            trainers = {name: trainer_for(ds, alpha) for name, ds in speed.items()}
            results = {name: [] for name in trainers}
            ceiling = []
            for r in range(args.rounds + 1):
                for name, trainer in trainers.items():
                    m = one_more_epoch(trainer)
                    if r:
                        results[name].append((m["img_per_s"], m["data_wait"]))
                alone = step_alone(trainers["cache"], trainers["cache"].batches)
                if r:
                    ceiling.append(alone)
            row = {name: (median([x for x, _ in v]), median([w for _, w in v]), spread([x for x, _ in v]))
                   for name, v in results.items()}
            print(f"   α {alpha}: files {row['files'][0]:.0f} img/s {row['files'][2]} (data wait "
                  f"{100 * row['files'][1]:.1f} %), cache {row['cache'][0]:.0f} img/s {row['cache'][2]} (data wait "
                  f"{100 * row['cache'][1]:.1f} %): {row['cache'][0] / row['files'][0]:.2f}x")
            print(f"          the step alone on one batch: {median(ceiling):.0f} img/s {spread(ceiling)} (files at "
                  f"{row['files'][0] / median(ceiling):.2f}, cache at {row['cache'][0] / median(ceiling):.2f} of it)")
        print()

        if args.accuracy_epochs:
            print(f"4. Accuracy: α 0.25, {args.resolution} px, batch 64, lr 0.1 cosine, {args.accuracy_epochs} "
                  f"epochs, validation top-1 of the last epoch ({len(files.val)} images)")
            top1 = {"files": [], "cache": []}
            for seed in range(args.seeds):
                line = []
                for name, ds in (("files", files), ("cache", cached)):
                    trainer = trainer_for(ds, 0.25, seed=seed, epochs=args.accuracy_epochs)
                    last = [e.metrics for e in trainer.run() if isinstance(e, EpochEvent)][-1]
                    top1[name].append(100 * last["val_top1"])
                    line.append(f"{name} {100 * last['val_top1']:.2f} % (loss {last['val_loss']:.3f})")
                print(f"   seed {seed}: " + ", ".join(line))
            print("   mean (lowest-highest): " + ", ".join(
                f"{name} {sum(v) / len(v):.2f} % ({min(v):.2f}-{max(v):.2f})" for name, v in top1.items()))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
