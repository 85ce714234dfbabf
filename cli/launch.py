"""How `train` runs: in several processes through torchrun's launcher, and with SIGTERM taken as an interruption."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import typer

from .common import fail


def launch(nproc: int) -> None:
    """Runs this same command in ``nproc`` processes through torch.distributed.run (what torchrun does)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    argv = sys.argv[1:]
    args = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
            and (i == 0 or argv[i - 1] != "--nproc")]
    launcher = parse_args(["--standalone", "--nproc-per-node", str(nproc), "--monitor-interval", "1",
                           "-m", "mobilenet_fn", *args])
    try:
        run(launcher)
    except SignalException as e:  # SIGTERM or SIGINT: the processes were sent it too, and rank 0 saved last.ckpt
        raise typer.Exit(128 + int(e.sigval))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code == 2:
            raise typer.Exit(2)  # a usage error, already reported by the processes
        fail(f"training process {rank} of {nproc} stopped (exit code {code}); the others were stopped too. "
             f"The last checkpoint is intact: continue with --resume", code=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, from a scheduler or `kill`: an interruption like Ctrl-C, exit code 143."""


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises ``Terminated``, as Ctrl-C raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    # A scheduler signals the whole job: the DataLoader workers die of the same SIGTERM, which must not turn the
    # interruption into the loader's crash, raised next by its SIGCHLD handler. Python runs pending handlers in
    # signal order, SIGTERM (15) before SIGCHLD (17). (Workers that ignored SIGTERM could outlive the trainer and
    # block its exit, waiting for work from it.)
    # A handler that does nothing, not SIG_DFL or SIG_IGN: CPython raises "OSError: Signal 17 ignored due to race
    # condition" wherever the program is when a signal already pending finds its handler reset to those.
    signal.signal(signal.SIGCHLD, _ignore)
    signal.signal(signal.SIGTERM, _ignore)  # a second SIGTERM must not cut the checkpoint short
    raise Terminated


def _ignore(signum, frame) -> None:
    """A signal handler that does nothing."""
