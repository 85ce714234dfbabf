"""`mobilenet-fn resize` against ImageMagick on the same photos: images per second and PSNR.

    .venv/bin/python bench/resize_vs_imagemagick.py [--count 300] [--rounds 3] [--photos a.jpg b.jpg ...]
    .venv/bin/python bench/resize_vs_imagemagick.py --end-to-end [--count 400] [--rounds 5] [--command "..."]

Makes --count distinct 1024×768 JPEGs (quality 90) from a few real photographs (random crops, flips and colour
jitter, upscaled), then times, alternating round by round,
  ours:        mobilenet_fn.resize (crop 224 from 256, JPEG q95 4:4:4) on a process pool of one worker per core,
  ImageMagick: /usr/bin/mogrify -path OUT -resize 256x256^ -gravity center -extent 224x224
               -quality 95 -sampling-factor 1x1 (the issue's command, writing JPEGs as ours does: quality 95,
               4:4:4 colour; ImageMagick runs its own OpenMP threads),
and the same two on one core (one process; -limit thread 1), which shows how much is per image rather than
parallelism. It then compares both outputs with a Lanczos reference made by Pillow from the full decode (no draft), each with its
own geometry: ours takes the exact centred square, ImageMagick scales to whole pixels (341×256) and crops at a
whole-pixel offset, so a half-pixel shift is not counted as a difference in quality.

--end-to-end times whole processes instead, as a user meets them: the command `mobilenet-fn resize SRC --out OUT`
(start-up, imports, planning, the process pool and the report included) against the same `mogrify` command, both
on all cores, on --count (default 400 in this mode) 1024×768 JPEGs, alternating for --rounds (default 5) rounds.
It prints the median and range of each, the ratio of the medians, and the CPU (model name, AVX2/AVX-512). No PSNR
in this mode (the outputs are the same as in the default mode). --command says how to start mobilenet-fn (default:
the `mobilenet-fn` beside this Python, else `python -m mobilenet_fn`); it inherits this environment, PYTHONPATH
included. Give --command more than once to time several (two checkouts, say) in the same alternation.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mobilenet_fn.resize import Settings, default_workers, finish, plan, run

MOGRIFY = "/usr/bin/mogrify"
SIZE, RESIZE_TO = 224, 256


def known_photos() -> list[Path]:
    """Real photographs found on this machine: matplotlib's sample (a dependency) and any from the rust docs."""
    import matplotlib

    candidates = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    candidates += sorted(Path.home().glob(".rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/*.jp*g"))[:2]
    return [p for p in candidates if p.exists() and p.stat().st_size > 30_000]


def make_inputs(photos: list[Path], count: int, folder: Path) -> list[Path]:
    """``count`` distinct 1024×768 JPEGs: a random crop of a photo (35-100 % of its area, about 4:3), maybe
    mirrored, with jittered brightness, contrast and colour, upscaled with bicubic."""
    rng = random.Random(0)
    sources = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in photos]
    files = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        area = rng.uniform(0.35, 1.0) * w * h
        aspect = 4 / 3 * rng.uniform(0.9, 1.1)
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            crop = enhance(crop).enhance(rng.uniform(0.8, 1.2))
        path = folder / f"{i:04d}.jpg"
        crop.resize((1024, 768), Image.Resampling.BICUBIC).save(path, quality=90)
        files.append(path)
    return files


def time_ours(src: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    job = plan(src, out, Settings(size=SIZE, resize_to=RESIZE_TO, mode="crop", format="jpeg", quality=95))
    results = list(run(job, workers))
    seconds = time.perf_counter() - start
    report = finish(job, results, seconds)
    assert report["written"] == len(job.tasks), report
    return seconds


def time_imagemagick(files: list[Path], out: Path, threads: int | None = None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    limit = ["-limit", "thread", str(threads)] if threads else []
    command = [MOGRIFY, *limit, "-path", str(out), "-resize", f"{RESIZE_TO}x{RESIZE_TO}^", "-gravity", "center",
               "-extent", f"{SIZE}x{SIZE}", "-quality", "95", "-sampling-factor", "1x1", *map(str, files)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def default_command() -> list[str]:
    script = Path(sys.executable).with_name("mobilenet-fn")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "mobilenet_fn"]


def time_command(command: list[str], src: Path, out: Path, count: int) -> float:
    """One whole `mobilenet-fn resize SRC --out OUT` process, start-up included."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    # From a folder holding no code: `python -m` would put the working directory first on sys.path.
    subprocess.run([*command, "resize", str(src), "--out", str(out)], check=True, cwd=src.parent,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    written = sum(1 for p in out.rglob("*.jpg"))
    assert written == count, f"{written} outputs, expected {count}"
    return seconds


def cpu_line() -> str:
    """The CPU's model name and whether it has AVX2 and AVX-512 (Pillow's and libjpeg-turbo's SIMD use them)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    return (f"CPU: {model}; avx2 {'yes' if 'avx2' in flags else 'no'}; "
            f"avx512 {'yes (' + ' '.join(avx512) + ')' if avx512 else 'no'}; {default_workers()} cores usable")


def end_to_end(args, photos: list[Path]) -> None:
    commands = [shlex.split(c) for c in args.command] if args.command else [default_command()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        files = make_inputs(photos, args.count, tmp / "src")
        contenders = {}  # name → a function timing one whole process
        for i, command in enumerate(commands):
            name = "mobilenet-fn resize" + (f" #{i + 1}" if len(commands) > 1 else "") + " (whole process)"
            contenders[name] = lambda command=command: time_command(command, tmp / "src", tmp / "ours", args.count)
        contenders["ImageMagick mogrify (whole process)"] = lambda: time_imagemagick(files, tmp / "magick")
        seconds = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, timed in contenders.items():
                seconds[name].append(timed())
    print(cpu_line())
    print(f"{args.count} JPEGs 1024×768 from {len(photos)} photos ({', '.join(p.name for p in photos)}); "
          f"median of {args.rounds} alternating rounds; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'':<44}{'median s':>10}{'min s':>8}{'max s':>8}{'img/s':>8}")
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    for name, times in seconds.items():
        print(f"{name:<44}{medians[name]:>10.3f}{min(times):>8.3f}{max(times):>8.3f}{args.count / medians[name]:>8.1f}")
    magick = medians.pop("ImageMagick mogrify (whole process)")
    for (name, ours), command in zip(medians.items(), commands):
        print(f"end to end: {name.removesuffix(' (whole process)')} is {magick / ours:.1f}× ImageMagick "
              f"(target ≥ 5×): {shlex.join(command)} resize SRC --out OUT")
    print(f"Both on all cores. Ours: crop 224 from 256, JPEG q95 4:4:4; ImageMagick: {MOGRIFY} -path OUT -resize "
          f"{RESIZE_TO}x{RESIZE_TO}^ -gravity center -extent {SIZE}x{SIZE} -quality 95 -sampling-factor 1x1 FILES")


def reference_ours(image: Image.Image) -> Image.Image:
    """Short side to 256, the exact centred 224 square, Lanczos on the full decode."""
    w, h = image.size
    side = SIZE * min(w, h) / RESIZE_TO
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=box)


def reference_imagemagick(image: Image.Image) -> Image.Image:
    """What ``-resize 256x256^ -gravity center -extent 224x224`` asks for: whole-pixel size, whole-pixel crop."""
    w, h = image.size
    scale = RESIZE_TO / min(w, h)
    scaled = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    left, top = (scaled.width - SIZE) // 2, (scaled.height - SIZE) // 2
    return scaled.crop((left, top, left + SIZE, top + SIZE))


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def quality(files: list[Path], ours: Path, magick: Path) -> tuple[list[float], list[float]]:
    ours_psnr, magick_psnr = [], []
    for path in files:
        full = Image.open(path).convert("RGB")
        ours_psnr.append(psnr(Image.open(ours / path.name).convert("RGB"), reference_ours(full)))
        magick_psnr.append(psnr(Image.open(magick / path.name).convert("RGB"), reference_imagemagick(full)))
    return ours_psnr, magick_psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, help="how many 1024×768 inputs (default 300; 400 with --end-to-end)")
    parser.add_argument("--rounds", type=int, help="timed rounds of each, alternating (default 3; 5 with "
                        "--end-to-end)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="our processes (default: cores)")
    parser.add_argument("--photos", type=Path, nargs="*", help="real photographs to make the inputs from")
    parser.add_argument("--end-to-end", action="store_true", help="time whole `mobilenet-fn resize` processes "
                        "(start-up included) against mogrify")
    parser.add_argument("--command", action="append", help="how to start mobilenet-fn in --end-to-end, e.g. "
                        "'python -m mobilenet_fn' (default: the mobilenet-fn beside this Python); give it again "
                        "to time several, e.g. two checkouts: 'env PYTHONPATH=../old python -m mobilenet_fn'")
    args = parser.parse_args()
    args.count = args.count or (400 if args.end_to_end else 300)
    args.rounds = args.rounds or (5 if args.end_to_end else 3)
    photos = args.photos or known_photos()
    if not photos:
        sys.exit("no photographs found; pass some with --photos")
    if not os.access(MOGRIFY, os.X_OK):
        sys.exit(f"{MOGRIFY} not found: apt-get install imagemagick")
    if args.end_to_end:
        return end_to_end(args, photos)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        files = make_inputs(photos, args.count, tmp / "src")
        contenders = {  # name → a function timing one full run
            f"mobilenet-fn resize, {args.workers} processes":
                lambda: time_ours(tmp / "src", tmp / "ours", args.workers),
            "ImageMagick mogrify, OpenMP threads": lambda: time_imagemagick(files, tmp / "magick"),
            "mobilenet-fn resize, 1 process": lambda: time_ours(tmp / "src", tmp / "ours", 1),
            "ImageMagick mogrify, 1 thread": lambda: time_imagemagick(files, tmp / "magick", threads=1),
        }
        seconds = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, timed in contenders.items():
                seconds[name].append(timed())
        ours_psnr, magick_psnr = quality(files, tmp / "ours", tmp / "magick")
    rates = {name: args.count / statistics.median(times) for name, times in seconds.items()}
    psnrs = [ours_psnr, magick_psnr] * 2
    print(cpu_line())
    print(f"{args.count} JPEGs 1024×768 from {len(photos)} photos ({', '.join(p.name for p in photos)}); "
          f"{os.cpu_count()} cores; median of {args.rounds} alternating rounds")
    print(f"{'':<40}{'img/s':>8}{'PSNR mean':>11}{'PSNR min':>10}")
    for (name, rate), psnr_values in zip(rates.items(), psnrs):
        print(f"{name:<40}{rate:>8.1f}{statistics.mean(psnr_values):>8.2f} dB{min(psnr_values):>7.2f} dB")
    all_cores, one_core = list(rates.values())[:2], list(rates.values())[2:]
    print(f"speed-up: {all_cores[0] / all_cores[1]:.1f}× on all cores, {one_core[0] / one_core[1]:.1f}× on one "
          "(target ≥ 5× at PSNR ≥ 30 dB)")
    print(f"ours: crop 224 from 256, JPEG q95 4:4:4; ImageMagick: {MOGRIFY} -resize {RESIZE_TO}x{RESIZE_TO}^ "
          f"-gravity center -extent {SIZE}x{SIZE} -quality 95 -sampling-factor 1x1 (-limit thread 1 for one thread)."
          " PSNR against Pillow Lanczos on the full decode.")

if __name__ == "__main__":
    main()
