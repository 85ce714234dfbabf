"""Resizing a folder of class folders to the model's input size, without touching the originals.

    settings = Settings(size=224, resize_to=256, mode="crop")
    job = plan("data/raw", None, settings)        # walks SRC, names the outputs; raises ValueError on bad input
    results = list(run(job, workers=4))           # one Result per image, in order, for a progress bar
    report = finish(job, results, seconds)        # counts and failures; also written to OUT/resize-report.json

``resize_image(path, settings)`` is the whole per-image transform as a pure function (path in, RGB image out)
and ``encode`` turns its result into the bytes of a file.

"Same settings" lives in each output: its EXIF Software tag holds a stamp with the settings that made it and the
size and modification time of its source. A rerun reads only that tag (a header read, no decode) and skips the
files that are done, so there is no separate manifest that a killed run could leave out of step with the files.
A changed source gets a new output; a file at an output path that is not stamped, or stamped with other settings,
is kept unless ``overwrite`` is set. In place, a stamped file is never resized again, even with ``overwrite``:
its original is gone. Outputs are written to a hidden temp file beside them and renamed into place.

The library prints nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .files import IMAGE_SUFFIXES, JPEG_SUFFIXES, find_files, is_inside, write_bytes

MODES = ("crop", "pad", "stretch")
FORMATS = ("jpeg", "png", "keep")
KEPT_FORMATS = {**dict.fromkeys(JPEG_SUFFIXES, "JPEG"), ".png": "PNG", ".webp": "WEBP"}  # --format keep
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # JPEG includes MPO, which many cameras write
REPORT_NAME = "resize-report.json"
TEMP_SUFFIX = ".resize-tmp"
STAMP_PREFIX = "mobilenet-fn resize 1:"
SOFTWARE_TAG = 0x0131
ORIENTATION_TAG = 0x0112
# EXIF orientation → the transpose that shows the image upright.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow's box-reduce first, then resample the last factor of at most 3

# The most pixels one image is decoded at, after a JPEG's draft has brought it down towards what the preprocessing
# needs (a 1/2, 1/4 or 1/8 scale): 40 megapixels. Measured: a 39.7-megapixel RGB PNG raises predict's peak RSS
# by 0.24 GB; a mode that needs converting (grey, palette, 16-bit, alpha) holds a second copy, so about 0.5 GB at
# most. A larger PNG, WebP, GIF, BMP or TIFF is skipped as "too large": Pillow has no bounded way to decode those
# at a lower scale. A JPEG only gets there when it is over 8x the size needed on a side. Bounds resize, train, eval
# and predict alike.
MAX_DECODED_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image that would decode to more than ``MAX_DECODED_PIXELS`` pixels."""


@dataclass(frozen=True)
class Settings:
    """What an output depends on. crop: short side to ``resize_to``, centre ``size``²; pad: fit in ``size``²
    on black; stretch: ``size``² ignoring the aspect ratio. ``quality`` applies to JPEG and WebP outputs."""

    size: int = 224
    resize_to: int = 256
    mode: str = "crop"
    format: str = "jpeg"
    quality: int = 95

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if not 1 <= self.size <= 16384:
            raise ValueError(f"size must be between 1 and 16384 pixels, not {self.size}")
        if self.mode == "crop" and self.resize_to < self.size:
            raise ValueError(f"resize-to ({self.resize_to}) must be at least size ({self.size}) to crop from it")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, not {self.quality}")

    def describe(self, pil_format: str) -> str:
        """The settings an output of this format depends on, as they appear in its stamp."""
        parts = [f"mode={self.mode}", f"size={self.size}"]
        if self.mode == "crop":
            parts.append(f"resize_to={self.resize_to}")
        if pil_format in ("JPEG", "WEBP"):
            parts.append(f"quality={self.quality}")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------- one image


def geometry(width: int, height: int, settings: Settings) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The region of a width×height image to resample and the size it becomes (at most size×size)."""
    s = settings.size
    if settings.mode == "stretch":
        return (0, 0, width, height), (s, s)
    if settings.mode == "pad":
        scale = s / max(width, height)
        return (0, 0, width, height), (max(1, round(width * scale)), max(1, round(height * scale)))
    side = s * min(width, height) / settings.resize_to  # the centre crop, measured in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side), (s, s)


def draft_request(width: int, height: int, settings: Settings) -> tuple[int, int]:
    """The least size the whole image may be decoded at (JPEG draft) without losing detail in the output."""
    (left, top, right, bottom), (out_w, out_h) = geometry(width, height, settings)
    return math.ceil(width * out_w / (right - left)), math.ceil(height * out_h / (bottom - top))


def check_decoded_size(image: Image.Image) -> None:
    """Raises ``ImageTooLarge`` when the opened ``image`` (its JPEG draft set, if any) would decode to more than
    ``MAX_DECODED_PIXELS``."""
    w, h = image.size
    if w * h > MAX_DECODED_PIXELS:
        raise ImageTooLarge(f"too large ({w}×{h}): over {MAX_DECODED_PIXELS // 1_000_000} megapixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit keeps its high byte, transparency goes onto white, CMYK/palette/grey are converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        alpha = image.getchannel("A")
        white = Image.new("RGB", image.size, "white")
        white.paste(image.convert("RGB"), mask=alpha)
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_image(path: str | Path, settings: Settings) -> Image.Image:
    """The file at ``path`` as an upright 8-bit RGB image of exactly size×size.

    Raises ``ImageTooLarge`` for an image over ``MAX_DECODED_PIXELS`` once a JPEG's draft has brought it down, and
    what Pillow raises for a file it cannot read (``UnidentifiedImageError``, ``OSError`` when truncated,
    ``Image.DecompressionBombError`` past Pillow's pixel limit, and others from malformed headers).
    """
    Image.init()  # registers every plugin, which Image.open(formats=...) needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_DECODED_PIXELS is the bound here
        with Image.open(path, formats=READ_FORMATS) as image:  # GIF, WebP: the first frame
            image.draft(image.mode, draft_request(*image.size, settings))  # JPEG only: decode at 1/2, 1/4, 1/8
            check_decoded_size(image)
            orientation = image.getexif().get(ORIENTATION_TAG, 1)  # after the check: a PNG's getexif() decodes it
            image.load()
            rgb = to_rgb(image)
    box, size = geometry(*rgb.size, settings)
    resized = rgb.resize(size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    if size != (settings.size, settings.size):
        canvas = Image.new("RGB", (settings.size, settings.size), "black")
        canvas.paste(resized, ((settings.size - size[0]) // 2, (settings.size - size[1]) // 2))
        resized = canvas
    # Every mode's output is a centred square, so turning it upright last gives the same picture as turning
    # the source upright first, at a fraction of the cost.
    return resized.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else resized


def output_format(path: str | Path) -> str:
    """Pillow's name for the format an output path is written in, from its suffix."""
    return KEPT_FORMATS[Path(path).suffix.lower()]


def encode(image: Image.Image, pil_format: str, quality: int, stamp: str) -> bytes:
    """The bytes of an image file, with ``stamp`` in its EXIF Software tag. JPEG keeps colour at full
    resolution (4:4:4): at 224 px, 4:2:0 costs about 3 dB of PSNR on detailed photos for 25 % fewer bytes."""
    exif = Image.Exif()
    exif[SOFTWARE_TAG] = stamp
    options = {"JPEG": {"quality": quality, "subsampling": 0}, "WEBP": {"quality": quality}}.get(pil_format, {})
    buffer = BytesIO()
    image.save(buffer, pil_format, exif=exif.tobytes(), **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- stamps


def make_stamp(settings: Settings, pil_format: str, source: Path) -> str:
    stat = source.stat()
    return f"{STAMP_PREFIX} {settings.describe(pil_format)}; source {stat.st_size} B {int(stat.st_mtime)}"


def read_stamp(path: Path) -> str | None:
    """The Software tag of the image at ``path``: None when there is no file, "" when it has none."""
    if not path.exists():
        return None
    try:
        with Image.open(path) as image:
            return str(image.getexif().get(SOFTWARE_TAG, ""))
    except Exception:  # anything at that path that Pillow cannot parse is simply not one of ours
        return ""


def settings_of(stamp: str) -> str:
    return stamp.split("; source")[0]


# ---------------------------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Task:
    rel: str  # the source, relative to SRC
    source: Path
    output: Path


@dataclass(frozen=True)
class Result:
    rel: str
    status: str  # "written", "done" (already there with these settings), "kept" (something else there), "failed"
    reason: str = ""


@dataclass
class Job:
    src: Path
    out: Path
    settings: Settings
    tasks: list[Task]
    ignored: list[str] = field(default_factory=list)  # files that are not images by their suffix
    overwrite: bool = False
    in_place: bool = False


def default_out(src: Path, settings: Settings) -> Path:
    """``data/raw`` → ``data/raw-224`` (``-224-pad``, ``-224-stretch`` for the other modes)."""
    named = src if src.name not in ("", ".", "..") else src.resolve()
    suffix = f"-{settings.size}" + ("" if settings.mode == "crop" else f"-{settings.mode}")
    return named.with_name(named.name + suffix)


def output_name(rel: str, image_format: str) -> str:
    """The output's relative path: the source's own when its suffix already names the output format."""
    path = Path(rel)
    suffix = path.suffix.lower()
    if image_format == "keep":
        return rel if suffix in KEPT_FORMATS else str(path.with_suffix(".png"))
    if suffix in (JPEG_SUFFIXES if image_format == "jpeg" else (".png",)):
        return rel
    return str(path.with_suffix(".jpg" if image_format == "jpeg" else ".png"))


def output_names(rels: list[str], image_format: str) -> dict[str, str]:
    """Output paths for all sources; where two would share one (a.png and a.jpg), the converted one keeps its
    old suffix too (a.png.jpg)."""
    plain = {rel: output_name(rel, image_format) for rel in rels}
    taken = Counter(plain.values())
    names = {rel: out if out == rel or taken[out] == 1 else rel + Path(out).suffix for rel, out in plain.items()}
    clashes = [out for out, n in Counter(names.values()).items() if n > 1]
    if clashes:
        raise ValueError(f"several sources would be written to {clashes[0]}; rename one of them")
    return names


def find_images(src: Path) -> tuple[list[str], list[str]]:
    """Image and other files under ``src`` as sorted relative paths; hidden files and folders, and the report of
    an earlier run, are left out."""
    images, others = find_files(src)
    return images, [rel for rel in others if rel != REPORT_NAME]


def check_out(src: Path, out: Path, in_place: bool) -> None:
    if in_place and out.resolve() != src.resolve():
        raise ValueError("--in-place writes over the originals in SRC itself; leave out --out")
    if is_inside(out, src) and not in_place:
        raise ValueError(f"--out {out} is the source folder or inside it, which would mix outputs with your "
                         "originals; pick another --out, or pass --in-place to replace the originals")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")


def plan(src: str | Path, out: str | Path | None, settings: Settings, *,
         overwrite: bool = False, in_place: bool = False) -> Job:
    """Everything a run will do, decided before any work: raises ValueError for bad input."""
    src = Path(src)
    if not src.exists():
        raise ValueError(f"{src} does not exist; give the folder that holds your class folders")
    if not src.is_dir():
        raise ValueError(f"{src} is a file; give the folder that holds your class folders")
    out = src if in_place and out is None else Path(out) if out is not None else default_out(src, settings)
    check_out(src, out, in_place)
    images, others = find_images(src)
    if not images:
        raise ValueError(f"no images in {src} (looked for {', '.join(IMAGE_SUFFIXES)})")
    names = output_names(images, settings.format)
    tasks = [Task(rel, src / rel, out / names[rel]) for rel in images]
    return Job(src, out, settings, tasks, others, overwrite, in_place)


# ---------------------------------------------------------------------------------------------- the run


def describe_error(error: Exception) -> str:
    if isinstance(error, ImageTooLarge):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {error}"
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(error, OSError) and "truncated" in str(error):
        return f"truncated: {error}"
    return f"unreadable ({type(error).__name__}: {error})"


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path``, never half-written (a temp file beside it, renamed over). Not flushed to disk one
    by one: a crash leaves an image to be resized again, which the next run does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data, suffix=TEMP_SUFFIX, durable=False)


def existing(task: Task, stamp: str) -> Result | None:
    """What is already at the output path, when that means there is nothing to write."""
    found = read_stamp(task.output)
    ours = found is not None and found.startswith(STAMP_PREFIX)
    same_file = task.output == task.source  # in place, same format
    if found is None or (same_file and not ours):
        return None
    if not ours:
        return Result(task.rel, "kept", "a file not made by resize is in the way")
    if settings_of(found) != settings_of(stamp):
        return Result(task.rel, "kept", f"made with other settings ({settings_of(found)[len(STAMP_PREFIX):].strip()})")
    if found == stamp or same_file:
        return Result(task.rel, "done")
    return None  # these settings, but the source has changed since


def process(task: Task, settings: Settings, overwrite: bool, in_place: bool) -> Result:
    """Resize one file unless its output is already there. Unreadable sources give a "failed" Result; errors
    writing the output (a full disk, no permission) are raised: they would fail every file."""
    try:
        if task.source.stat().st_size == 0:
            return Result(task.rel, "failed", "empty file (0 bytes)")
    except OSError as e:  # gone or unreadable since plan() listed it
        return Result(task.rel, "failed", f"cannot read ({e.strerror})")
    pil_format = output_format(task.output)
    stamp = make_stamp(settings, pil_format, task.source)
    # An image resized in place has lost its original: resizing it again is never a redo, whatever overwrite says.
    found = existing(task, stamp) if not overwrite or task.output == task.source else None
    if found is None:
        try:
            image = resize_image(task.source, settings)
        except Exception as e:  # a malformed file can raise anything from Pillow's plugins: report it, go on
            return Result(task.rel, "failed", describe_error(e))
        write_atomic(task.output, encode(image, pil_format, settings.quality, stamp))
    if in_place and task.output != task.source and (found is None or found.status == "done"):
        task.source.unlink()  # its resized copy is complete at task.output
    return found or Result(task.rel, "written")


def remove_stale_temps(out: Path) -> int:
    """Delete the temp files a killed run left behind; returns how many."""
    removed = 0
    for folder, _, files in os.walk(out):
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; workers finish their file


def run(job: Job, workers: int | None = None) -> Iterator[Result]:
    """Process every task of ``job`` on ``workers`` processes (all cores by default), yielding each Result in
    task order. Stopping early (Ctrl-C) cancels what has not started; no output is ever half-written."""
    workers = workers or default_workers()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    remove_stale_temps(job.out)
    work = partial(process, settings=job.settings, overwrite=job.overwrite, in_place=job.in_place)
    if workers == 1:
        yield from map(work, job.tasks)
        return
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        yield from pool.map(work, job.tasks, chunksize=max(1, min(16, len(job.tasks) // (8 * workers))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def finish(job: Job, results: Iterable[Result], seconds: float) -> dict:
    """The run's report, also written to ``OUT/resize-report.json``."""
    results = list(results)
    counts = Counter(r.status for r in results)
    report = {
        "source": str(job.src), "output": str(job.out), "settings": asdict(job.settings),
        "in_place": job.in_place, "overwrite": job.overwrite, "images": len(job.tasks),
        **{status: counts[status] for status in ("written", "done", "kept", "failed")},
        "not_images": len(job.ignored), "seconds": round(seconds, 3),
        "written_per_second": round(counts["written"] / seconds, 1) if seconds > 0 else None,
        "failed_files": [{"file": r.rel, "reason": r.reason} for r in results if r.status == "failed"],
        "kept_files": [{"file": r.rel, "reason": r.reason} for r in results if r.status == "kept"],
    }
    write_atomic(job.out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    return report
