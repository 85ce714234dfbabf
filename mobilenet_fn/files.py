"""Plumbing every module that touches the disk shares: atomic writes, new output folders, and which files are
images.

Imports nothing heavy (no torch), so that ``resize`` and the command line start at once.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable

# Every suffix that training, evaluation, prediction and ``resize`` read as an image (PPM and PGM are Netpbm;
# .jpe and .jfif are JPEG). One list, so a folder that ``resize`` wrote trains on every image it holds.
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
IMAGE_SUFFIXES = JPEG_SUFFIXES + (".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_name(name: str | Path) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def find_files(root: Path) -> tuple[list[str], list[str]]:
    """The image files and the other files under ``root``, as sorted paths relative to it. Hidden files and
    folders (a leading dot) are left out of both."""
    images, others = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            (images if is_image_name(name) else others).append(rel)
    return sorted(images), sorted(others)


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, once links and ``..`` are resolved."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def free_name(path: Path) -> Path:
    """``path``, or the first of ``path``-2, ``path``-3, ... that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def new_folder(path: str | Path, taken: str) -> Path:
    """Creates the folder ``path`` and its parents; ``path`` itself must not exist (a FileExistsError saying
    ``taken``, even when it appeared a moment ago)."""
    path = Path(path)
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        raise FileExistsError(taken) from None
    return path


def atomic_write(path: str | Path, write: Callable[[str], object], *, overwrite: bool = True, suffix: str = ".tmp",
                 durable: bool = True) -> None:
    """Calls ``write(tmp)`` to fill a new hidden temporary file beside ``path``, then renames it onto ``path``: a
    crash or an exception leaves either the old file or the new one, never half of one, and no temporary file.
    ``durable`` flushes the file and its folder to disk first (weights, checkpoints); files that can be made
    again cheaply skip it. With ``overwrite=False`` an existing ``path`` is a ``FileExistsError``, left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists")
    tmp = _new_file_beside(path, suffix)
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        _publish(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        _fsync(path.parent)


def write_bytes(path: str | Path, data: bytes, **kwargs) -> None:
    """``data`` into ``path`` through ``atomic_write``."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), **kwargs)


def write_json(path: str | Path, obj, **kwargs) -> None:
    """``obj`` as indented JSON through ``atomic_write``."""
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), **kwargs)


def _new_file_beside(path: Path, suffix: str) -> str:
    """Creates an empty, hidden, uniquely named file in ``path``'s folder. Made with ``os.open(..., 0o666)`` so the
    umask applies as for any file the user writes (``mkstemp`` would leave the result readable by its owner only)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never replaces what someone else just wrote
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(f"{path}: already exists") from None
        os.replace(tmp, path)


def _fsync(path: str | Path) -> None:
    """Flushes a file or a folder to disk; a folder that cannot be opened for it (some file systems) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)
