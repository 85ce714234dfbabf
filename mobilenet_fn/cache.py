"""The decoded cache: a folder of class folders decoded once into uint8 images, read back as a ``TensorSource``.

Every image under the folder's class folders is decoded (in parallel threads; batched on the GPU when asked,
with PIL for what that cannot read) and stored as a (3, S, S) uint8 square, S the eval resize of the
preprocessing: the short side resized to S as evaluation resizes it, and the S-wide window of the long side
placed so that its centre R x R crop is exactly evaluation's centre crop. So validation and ``eval`` read from
the cache the very pixels they would decode, and training draws its random resized crops from the square
(on the device, per batch; what the in-memory sets do).

On disk, in ``cache_dir()/decoded/<slot>/`` (one slot per folder and size): ``images.u8`` (the rows, raw) and
``manifest.json`` (the files' fingerprint, the row of each file, the unreadable ones, CRC-32s of the rows in
chunks). The images are written to a temporary file, flushed and renamed, and the manifest last, so a cache is
either whole or absent; one that does not match its manifest, or whose files changed (a file added, deleted or
rewritten: the fingerprint holds each file's size and modification time), is rebuilt. One process builds a slot
while the others (torchrun's ranks, another run) wait on its lock and then read it.

``ram`` reads the cache into memory (checking every chunk as it reads), ``disk`` memory-maps it (after the same
check), ``auto`` picks RAM when the copies this machine's processes would hold take at most ``RAM_SHARE`` of its
memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import files
from .data import cache_dir, scan_folder
from .options import CACHE_MODES
from .preprocess import IMAGE_ERRORS, MAX_DECODED_PIXELS, Layout, fit, read_rgb
from .sources import DataError, Dataset, FileSource, Skipped, TensorSource, skip_reason

FORMAT = "mobilenet-fn decoded cache 1"
RAM_SHARE = 0.25  # auto holds a cache in RAM when all of this machine's copies take at most this share of it
CHUNK = 64 << 20  # bytes per CRC-32 of the images file
DEVICE_DECODE_BATCH = 64  # JPEGs per batched decode_jpeg call on the GPU


@dataclass
class Report:
    """What opening a source's cache did, for the command to show."""

    path: Path
    mode: str  # "ram" or "disk"
    built: bool  # decoded now (else read back)
    images: int  # rows in the cache
    bytes: int
    seconds: float  # to build, or to open and check
    skipped: list[Skipped] = field(default_factory=list)  # the folder's unreadable files (all, when built)
    rebuilt_because: str | None = None  # why an existing cache was not used


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def decode_file(path: str, layout: Layout) -> torch.Tensor | Skipped:
    """One file decoded with PIL (as evaluation reads it) and fitted; ``Skipped`` when it cannot be read."""
    try:
        return fit(read_rgb(path, layout.side), layout)
    except IMAGE_ERRORS as e:
        return Skipped(path, skip_reason(e))


def decode_on_device(paths: list[str], layout: Layout, device: torch.device) -> list[torch.Tensor | None]:
    """JPEGs decoded in one batch on ``device`` (nvJPEG on CUDA) and fitted there, returned on the CPU; None for
    what this cannot read (not a JPEG, damaged, too large, or a decoder error), for PIL to try."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = {}
    for k, path in enumerate(paths):
        if Path(path).suffix.lower() in files.JPEG_SUFFIXES:
            with contextlib.suppress(OSError):
                encoded[k] = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 announces their move to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(batch, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)

    keys = [k for k, d in encoded.items() if d.numel()]
    try:
        images = decode([encoded[k] for k in keys]) if keys else []
    except RuntimeError:  # one bad file fails the batch: each on its own
        images = []
        for k in keys:
            try:
                images += decode([encoded[k]])
            except RuntimeError:
                images.append(None)
    out: list[torch.Tensor | None] = [None] * len(paths)
    for k, image in zip(keys, images):
        if image is not None and image.shape[-2] * image.shape[-1] <= MAX_DECODED_PIXELS:
            out[k] = fit(image, layout).cpu()
    return out


def decode_all(paths: list[str], layout: Layout, *, threads: int,
               device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor | Skipped]]:
    """(index, fitted image or Skipped) for every path, in no fixed order: first in batches on ``device`` when
    given, then with PIL in ``threads`` threads (it decodes without holding the GIL) for the rest."""
    left = list(range(len(paths)))
    if device is not None:
        failed = []
        for at in range(0, len(paths), DEVICE_DECODE_BATCH):
            chunk = list(range(at, min(at + DEVICE_DECODE_BATCH, len(paths))))
            for i, image in zip(chunk, decode_on_device([paths[i] for i in chunk], layout, device)):
                if image is None:
                    failed.append(i)
                else:
                    yield i, image
        left = failed
    pool = ThreadPoolExecutor(max(1, threads))
    try:
        yield from zip(left, pool.map(lambda i: decode_file(paths[i], layout), left))
    finally:  # Ctrl-C or an error: the images not yet started are dropped, not decoded first
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# The slot on disk


def folder_files(root: Path) -> list[str]:
    """The images a cache of ``root`` holds: those of its class folders, as paths relative to it, sorted."""
    _, samples = scan_folder(root)
    return sorted(os.path.relpath(path, root) for path, _ in samples)


def fingerprint(root: Path, names: list[str], layout: Layout) -> str:
    """The cache's key: the layout and each file's name, size and modification time."""
    digest = hashlib.sha256(json.dumps([FORMAT, layout.__dict__]).encode())
    for name in names:
        st = os.stat(root / name)
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def slot_for(root: Path, layout: Layout) -> Path:
    """The cache folder of ``root`` at ``layout``: one per folder and size, rebuilt in place when files change."""
    key = json.dumps([str(root.resolve()), layout.__dict__]).encode()
    return cache_dir() / "decoded" / hashlib.sha256(key).hexdigest()[:20]


def _check_outside(root: Path, slot: Path) -> None:
    if files.is_inside(slot, root):
        raise DataError(f"the cache folder {cache_dir()} is inside the data folder {root}; set MOBILENET_FN_CACHE "
                        f"to a folder elsewhere (the data folder is never written to)")


@contextlib.contextmanager
def _locked(slot: Path):
    """Holds the slot's lock: one process builds or replaces a cache while the others wait."""
    import fcntl

    slot.mkdir(parents=True, exist_ok=True)
    with open(slot / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _crcs(path: Path, into: torch.Tensor | None = None) -> list[int]:
    """CRC-32 of each ``CHUNK`` of the file, read in order (into ``into``'s bytes when given)."""
    crcs = []
    with open(path, "rb", buffering=0) as f:
        target = into.numpy() if into is not None else None
        scratch = bytearray(CHUNK) if into is None else None
        offset = 0
        while True:
            view = memoryview(target)[offset: offset + CHUNK] if target is not None else memoryview(scratch)
            n = f.readinto(view)
            if not n:
                break
            crcs.append(zlib.crc32(view[:n]))
            offset += n
    return crcs


def _compact(images: torch.Tensor, good: torch.Tensor) -> int:
    """Moves the good rows down over the others, in order; returns how many there are."""
    kept = good.nonzero().flatten().tolist()
    for row, i in enumerate(kept):
        if row != i:
            images[row] = images[i]
    return len(kept)


def build(slot: Path, root: Path, names: list[str], key: str, layout: Layout, *, threads: int,
          device: torch.device | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Decodes ``names`` (relative to ``root``) into the slot and returns its manifest. The caller holds the lock."""
    for stale in slot.glob(".images.u8.*"):  # left by a build that was killed: the lock says none is running
        stale.unlink()
    with contextlib.suppress(FileNotFoundError):
        (slot / "manifest.json").unlink()  # first: the images file about to be replaced no longer matches it
    n, row = len(names), layout.row_bytes
    skipped: dict[int, Skipped] = {}

    def fill(tmp: str) -> None:
        os.truncate(tmp, max(1, n * row))
        images = torch.from_file(tmp, shared=True, size=max(1, n * row), dtype=torch.uint8)[: n * row]
        images = images.view(n, 3, layout.side, layout.side)
        good = torch.zeros(n, dtype=torch.bool)
        for done, (i, image) in enumerate(decode_all([str(root / m) for m in names], layout, threads=threads,
                                                     device=device), 1):
            if isinstance(image, Skipped):
                skipped[i] = Skipped(names[i], image.reason)
            else:
                images[i], good[i] = image, True
            if progress is not None:
                progress(done, n)
        kept = _compact(images, good)
        del images
        os.truncate(tmp, kept * row)

    files.atomic_write(slot / "images.u8", fill, suffix=".tmp")
    manifest = {
        "format": FORMAT, "fingerprint": key, "layout": layout.__dict__, "root": str(root.resolve()),
        "files": [m for i, m in enumerate(names) if i not in skipped],
        "skipped": [[s.path, s.reason] for _, s in sorted(skipped.items())],
        "bytes": (n - len(skipped)) * row, "chunk": CHUNK, "crc32": _crcs(slot / "images.u8"),
    }
    files.write_json(slot / "manifest.json", manifest)
    return manifest


class Invalid(Exception):
    """A cache that cannot be used as it is (the message says why); it is rebuilt."""


def read_manifest(slot: Path, key: str, layout: Layout) -> dict:
    try:
        manifest = json.loads((slot / "manifest.json").read_text())
    except FileNotFoundError:
        raise Invalid("no cache yet") from None
    except (OSError, ValueError) as e:
        raise Invalid(f"unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("layout") != layout.__dict__:
        raise Invalid("a manifest of another format")
    if manifest.get("fingerprint") != key:
        raise Invalid("the folder's files changed")
    fields = {"files": list, "skipped": list, "bytes": int, "crc32": list}
    if any(not isinstance(manifest.get(k), t) for k, t in fields.items()):
        raise Invalid("a damaged manifest")
    try:
        size = (slot / "images.u8").stat().st_size
    except FileNotFoundError:
        raise Invalid("the images file is missing") from None
    if size != manifest["bytes"] or size != len(manifest["files"]) * layout.row_bytes:
        raise Invalid(f"the images file has {size} bytes, the manifest says {manifest['bytes']}")
    return manifest


def load_images(slot: Path, manifest: dict, layout: Layout, mode: str) -> torch.Tensor:
    """The (N, 3, S, S) rows, in memory (``ram``) or memory-mapped (``disk``), after checking every chunk's CRC."""
    path, n = slot / "images.u8", len(manifest["files"])
    if mode == "ram":
        flat = torch.empty(manifest["bytes"], dtype=torch.uint8)
        crcs = _crcs(path, into=flat)
    else:
        crcs = _crcs(path)
        flat = torch.from_file(str(path), shared=False, size=manifest["bytes"], dtype=torch.uint8) if n else \
            torch.empty(0, dtype=torch.uint8)
    if crcs != manifest["crc32"]:
        raise Invalid("its checksums do not match (a damaged file)")
    return flat.view(n, 3, layout.side, layout.side)


def pick_mode(mode: str, nbytes: int, copies: int = 1) -> str:
    """``auto``: RAM when ``copies`` processes holding the cache take at most RAM_SHARE of this machine's memory."""
    if mode != "auto":
        return mode
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "ram" if nbytes * copies <= RAM_SHARE * memory else "disk"


# ---------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Opened:
    images: torch.Tensor
    row_of: dict[str, int]  # relative path -> row
    skipped: dict[str, str]  # relative path -> reason
    report: Report


_opened: dict[tuple, _Opened] = {}  # one copy per process of each cache, shared by the sources that read it


def open_folder(root: Path, layout: Layout, mode: str, *, threads: int, device: torch.device | None = None,
                copies: int = 1, progress: Callable[[int, int], None] | None = None) -> _Opened:
    """The cache of ``root`` at ``layout``: read back when its manifest matches the files, else built first."""
    root = Path(root)
    slot = slot_for(root, layout)
    _check_outside(root, slot)
    names = folder_files(root)
    key = fingerprint(root, names, layout)
    if (slot, key, mode) in _opened:
        return _opened[(slot, key, mode)]
    t0 = time.perf_counter()
    built, reason = False, None
    with _locked(slot):
        try:
            manifest = read_manifest(slot, key, layout)
            chosen = pick_mode(mode, manifest["bytes"], copies)
            images = load_images(slot, manifest, layout, chosen)
        except Invalid as e:
            reason = None if str(e) == "no cache yet" else str(e)
            manifest = build(slot, root, names, key, layout, threads=threads, device=device, progress=progress)
            chosen = pick_mode(mode, manifest["bytes"], copies)
            images, built = load_images(slot, manifest, layout, chosen), True
    skipped = dict(manifest["skipped"])
    report = Report(slot, chosen, built, len(manifest["files"]), manifest["bytes"], time.perf_counter() - t0,
                    [Skipped(root / p, r) for p, r in skipped.items()], reason)
    opened = _Opened(images, {m: i for i, m in enumerate(manifest["files"])}, skipped, report)
    _opened[(slot, key, mode)] = opened
    return opened


def cached(source, preprocess: dict, mode: str = "auto", *, threads: int | None = None,
           device: torch.device | None = None, copies: int = 1,
           progress: Callable[[int, int], None] | None = None) -> tuple[object, Report | None, list[Skipped]]:
    """``source`` read through the cache of its folder: (a TensorSource of the readable files, the Report, the
    source's unreadable files). ``off``, a source with no folder or one already in memory: (source, None, []).
    ``device`` is where the images are going: a cache is built by decoding its JPEGs there when it is a GPU."""
    if mode not in CACHE_MODES:
        raise ValueError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if mode == "off" or not isinstance(source, FileSource) or source.root is None:
        return source, None, []
    root = Path(source.root)
    threads = threads or len(os.sched_getaffinity(0))
    decoder = device if device is not None and torch.device(device).type == "cuda" else None
    opened = open_folder(root, Layout.of(preprocess), mode, threads=threads, device=decoder, copies=copies,
                         progress=progress)
    rows, labels, skipped = [], [], []
    for path, label in source.samples:
        name = os.path.relpath(path, root)
        if name in opened.row_of:
            rows.append(opened.row_of[name])
            labels.append(label)
        elif name in opened.skipped:
            skipped.append(Skipped(path, opened.skipped[name]))
        else:
            raise DataError(f"{path}: not in the cache of {root} (was it added during the run?)")
    return (TensorSource(opened.images, torch.tensor(labels, dtype=torch.long), torch.tensor(rows, dtype=torch.long)),
            opened.report, skipped)


def cached_dataset(dataset: Dataset, mode: str = "auto", **kwargs) -> tuple[Dataset, list[Report]]:
    """``dataset`` with its training and validation sources read through their folders' caches (``cached``)."""
    import dataclasses

    train, r1, s1 = cached(dataset.train, dataset.preprocess, mode, **kwargs)
    val, r2, s2 = cached(dataset.val, dataset.preprocess, mode, **kwargs)
    reports = list({id(r): r for r in (r1, r2) if r is not None}.values())  # train and val share a split folder's
    return dataclasses.replace(dataset, train=train, val=val, skipped=dataset.skipped + s1 + s2), reports
