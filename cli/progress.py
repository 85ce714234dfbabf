"""Rich progress for training: a bar per epoch (loss, accuracy, img/s, ETA) and a table row per epoch.

When stderr is not a terminal (a log file, CI), plain lines instead of a live display.
"""

from __future__ import annotations

import contextlib
import os

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .common import err

COLUMNS = ("epoch", "train loss", "train top-1", "val loss", "val top-1", "val top-5", "lr", "img/s", "data wait",
           "time")


def _row(m: dict, best: bool) -> list[str]:
    return [f"{m['epoch']}", f"{m['train_loss']:.4f}", f"{100 * m['train_top1']:.2f}%", f"{m['val_loss']:.4f}",
            f"{100 * m['val_top1']:.2f}%" + (" *" if best else ""), f"{100 * m['val_top5']:.2f}%", f"{m['lr']:.4g}",
            f"{m['img_per_s']:.0f}", f"{100 * m['data_wait']:.0f}%", f"{m['seconds']:.1f}s"]


class TrainProgress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.live = enabled and err.is_terminal
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}  top-1 {task.fields[top1]:.1%}  {task.fields[ips]:.0f} img/s  "
                       "data {task.fields[wait]:.0%}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True, disable=not self.live,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def show(self, event) -> None:
        if not self.enabled:
            return
        # Here, not at the top: mobilenet_fn.train imports torch, and `import mobilenet_fn.cli` must not.
        from mobilenet_fn.train import EpochEvent, StartEvent, StepEvent

        if isinstance(event, StartEvent):
            err.print(f"Training on {event.device} ({event.policy}): epochs {event.epoch + 1}-{event.epochs}, "
                      f"{event.batches} steps each")
            if event.compiled:
                err.print("Compiling the step (a minute or two on a small CPU)…")
            if self.live:
                err.print("  ".join(f"{c:>11}" for c in COLUMNS))
        elif isinstance(event, StepEvent):
            if not self.live:
                return
            fields = dict(epoch=event.epoch, loss=event.loss, top1=event.top1, ips=event.img_per_s, wait=event.data_wait)
            if self.task is None or self.progress.tasks[0].fields["epoch"] != event.epoch:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task("train", total=event.batches, **fields)
            self.progress.update(self.task, completed=event.batch, **fields)
        elif isinstance(event, EpochEvent):
            cells = _row(event.metrics, event.best)
            err.print("  ".join(f"{c:>11}" for c in cells) if self.live else
                      " ".join(f"{k}={v}" for k, v in zip(COLUMNS, cells)), highlight=False, soft_wrap=True)
            if "test_top1" in event.metrics:
                err.print(f"Test top-1 of the best epoch ({event.metrics['test_of_epoch']}): "
                          f"{100 * event.metrics['test_top1']:.2f}%")


@contextlib.contextmanager
def decoding():
    """A progress bar for building a decoded cache; yields the callback (done, total) the library calls."""
    bar = Progress(TextColumn("Decoding images into the cache"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                   disable=not err.is_terminal)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("decode", total=total)
        bar.update(task, completed=done)

    with bar:
        yield update


def through_cache(dataset, mode: str, dev):
    """``dataset`` with its folders read through the decoded cache (``cache.cached_dataset``), built first with a
    progress bar if need be, and a line on what each cache did. Each of this machine's processes (torchrun's
    LOCAL_WORLD_SIZE) holds a copy in RAM; one of them builds it while the others wait."""
    from mobilenet_fn.cache import cached_dataset

    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    with decoding() as progress:
        dataset, reports = cached_dataset(dataset, mode, device=dev, copies=copies, progress=progress)
    for report in reports:
        report_cache(report)
    return dataset


def report_cache(report, shown: int = 5) -> None:
    """One line on what the cache did; at the build, the unreadable files it left out."""
    where = "in RAM" if report.mode == "ram" else "memory-mapped"
    size = f"{report.images} images, {report.bytes / 2**20:.0f} MiB {where}"
    if report.rebuilt_because:
        err.print(escape(f"Rebuilding the cache at {report.path}: {report.rebuilt_because}"), highlight=False,
                  soft_wrap=True)
    if report.built:
        line = (f"Decoded {report.images + len(report.skipped)} images in {report.seconds:.1f} s "
                f"({(report.images + len(report.skipped)) / max(report.seconds, 1e-9):.0f} img/s) into the cache "
                f"({size}): {report.path}")
    else:
        line = f"Read the decoded cache ({size}) in {report.seconds:.2f} s: {report.path}"
    err.print(escape(line), highlight=False, soft_wrap=True)
    if report.built and report.skipped:
        err.print(escape(f"Left out {len(report.skipped)} unreadable image(s):"), highlight=False)
        for s in report.skipped[:shown]:
            err.print(escape(f"  {s}"), highlight=False, soft_wrap=True)
        if len(report.skipped) > shown:
            err.print(f"  … and {len(report.skipped) - shown} more", highlight=False)
