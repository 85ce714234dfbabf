"""Run by tests/test_distributed.py under torchrun: a rank's collectives, then teardown(), as training ends.

``clean``: both ranks reach teardown (rank 1 first, as in training, where rank 0 still writes files); afterwards
the process group must be gone and, on Linux, so must Gloo's worker threads. ``error``: rank 0 fails while rank
1 waits in a collective; rank 0's teardown must not wait for rank 1 (torchrun stops the job).
"""

import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from mobilenet_fn import distributed


def gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            pass
    return [n for n in names if "gloo" in n]


def gloo_threads_left(seconds: float = 2.0) -> list[str]:
    """Gloo's threads still listed after up to ``seconds``. A thread that has finished can stay listed in
    /proc/self/task a moment after pthread_join returns (the kernel wakes the joiner before it drops the task): a
    clean-clone run saw a ``gloo_tcp_loop`` there once in a few dozen. One that lasts seconds is a leak."""
    deadline = time.monotonic() + seconds
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def main(mode: str) -> None:
    ctx = distributed.setup("cpu")
    torch.manual_seed(0)
    params = {"w": torch.randn(8, 4, dtype=torch.float64), "b": torch.randn(8, dtype=torch.float64)}
    for _ in range(3):
        grads = distributed.mean_across_ranks(params)  # the functional collective, as in the step
        params = {k: v - 0.1 * grads[k] for k, v in params.items()}
    distributed.check_in_sync(params, ctx)
    distributed.reduce_sum(torch.ones(3, dtype=torch.float64))  # as validation ends the epoch
    group = weakref.ref(dist.group.WORLD)
    if mode == "error":
        if ctx.rank == 0:
            try:
                raise ValueError("rank 0 fails")
            finally:
                distributed.teardown()
        distributed.reduce_sum(torch.ones(3, dtype=torch.float64))  # rank 0 never joins
        return
    if ctx.rank == 0:
        time.sleep(0.5)  # rank 0 still writes checkpoints and plots
    distributed.teardown()
    assert not dist.is_initialized()
    assert group() is None, "the process group outlived teardown()"
    left = gloo_threads_left()
    assert left == [], left
    print(f"rank {ctx.rank}: torn down", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
