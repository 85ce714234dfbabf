from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .common import JSON, err, fail, print_json, user_errors

SHOWN_FAILURES = 20


def _summary_table(report: dict):
    from rich.table import Table

    s = report["settings"]
    how = f"crop {s['size']} from {s['resize_to']}" if s["mode"] == "crop" else f"{s['mode']} {s['size']}"
    table = Table(title=f"{how}, {s['format']}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("written", f"{report['written']:,}")
    table.add_row("skipped as done", f"{report['done']:,}")
    if report["kept"]:
        table.add_row("kept (in the way; --overwrite redoes)", f"{report['kept']:,}")
    table.add_row("failed", f"{report['failed']:,}", style="red" if report["failed"] else None)
    table.add_row("not images (ignored)", f"{report['not_images']:,}")
    rate = f" ({report['written_per_second']:,.0f} img/s)" if report["written"] else ""
    table.add_row("time", f"{report['seconds']:.1f} s{rate}")
    return table


def _problems_table(report: dict):
    from rich.table import Table

    rows = [(f["file"], "failed", f["reason"]) for f in report["failed_files"]]
    rows += [(f["file"], "kept", f["reason"]) for f in report["kept_files"]]
    table = Table(title=f"Skipped files ({len(rows)})")
    for column in ("File", "", "Reason"):
        table.add_column(column, overflow="fold")
    for row in rows[:SHOWN_FAILURES]:
        table.add_row(*row)
    if len(rows) > SHOWN_FAILURES:
        table.add_row(f"… {len(rows) - SHOWN_FAILURES} more", "", "")
    return table


@user_errors
def resize(
    src: Annotated[Path, typer.Argument(metavar="SRC", show_default=False,
                                         help="Folder of images, usually one subfolder per class.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder, mirroring SRC's tree. "
                                             "Default: beside SRC, named by size (data/raw → data/raw-224).",
                                             show_default=False)] = None,
    size: Annotated[int, typer.Option("--size", help="Side of the square output in pixels.")] = 224,
    resize_to: Annotated[int, typer.Option("--resize-to", help="crop: the short side is scaled to this, then the "
                                           "centre --size square is kept (256 → 224 is the usual eval crop).")] = 256,
    mode: Annotated[str, typer.Option("--mode", help="crop (scale, centre crop), pad (fit, black letterbox) or "
                                      "stretch (ignore the aspect ratio).")] = "crop",
    image_format: Annotated[str, typer.Option("--format", help="jpeg, png, or keep (JPEG, PNG and WebP stay as "
                                              "they are; BMP, GIF and TIFF become PNG).")] = "jpeg",
    quality: Annotated[int, typer.Option("--quality", help="JPEG/WebP quality, 1-100.")] = 95,
    workers: Annotated[int | None, typer.Option("--workers", "-j", help="Processes. Default: one per core.",
                                                show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo outputs that exist already, and replace "
                                            "files in the way in --out.")] = False,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace each original in SRC by its resized copy, "
                                           "once the copy is complete. Your originals are gone afterwards.")] = False,
    json: JSON = False,
):
    """Resize a folder of class folders for training into a new folder, leaving your originals as they are.

    Every image is resized to --size × --size (crop, pad or stretch), turned upright by its EXIF orientation and
    saved as 8-bit RGB. Unreadable, truncated, empty and oversized files are skipped and listed in a table and
    in OUT/resize-report.json. Each output is written whole or not at all, and a rerun skips what is done with
    the same settings, so an interrupted run simply continues. Exit status 0 even when files were skipped.
    Only --in-place writes into SRC, replacing each original once its resized copy is complete.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from mobilenet_fn.resize import Settings, finish, plan, run

    settings = Settings(size=size, resize_to=resize_to, mode=mode, format=image_format, quality=quality)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    job = plan(src, out, settings, overwrite=overwrite, in_place=in_place)
    columns = (TextColumn("resizing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    results = []
    start = time.perf_counter()
    try:
        with Progress(*columns, console=err, disable=json) as progress:
            task = progress.add_task("resize", total=len(job.tasks), rate="–")
            for result in run(job, workers):
                results.append(result)
                rate = len(results) / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=1, rate=f"{rate:,.0f}")
        report = finish(job, results, time.perf_counter() - start)
    except OSError as e:  # writing an output failed: a full disk or a read-only folder stops every file
        fail(f"writing to {job.out} failed: {e}", code=1)
    if json:
        print_json(report)
        return
    err.print(_summary_table(report))
    if report["failed"] or report["kept"]:
        err.print(_problems_table(report))
    err.print(f"{job.src} → {job.out}; report in {job.out / 'resize-report.json'}", highlight=False)
