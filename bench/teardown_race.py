"""A small reproducer of the teardown race of 2-process Gloo runs (tests/test_distributed.py's CLI test).

Run as ``torchrun --standalone --nproc-per-node 2 bench/teardown_race.py [--raw]``: both ranks do the
collectives of a training epoch (the step's functional all-reduce, the epoch's reduce_sum, check_in_sync, the
validation's reduce_sum); then rank 1 tears down and exits at once while rank 0 keeps working a while (as it
writes checkpoints and plots), which is the moment rank 1 used to abort in. Repeat it in a loop and count exit
codes (the abort is rare: tens of runs); ``--raw`` calls destroy_process_group() itself (no barrier, no
check) instead of distributed.teardown().
"""

import sys
import time

import torch
import torch.distributed as dist

from mobilenet_fn import distributed

ctx = distributed.setup("cpu")
torch.manual_seed(0)  # the same parameters on every rank
params = {"w": torch.randn(64, 32, dtype=torch.float64), "b": torch.randn(64, dtype=torch.float64)}
for _ in range(20):
    grads = distributed.mean_across_ranks(params)
    params = {k: v - 0.01 * grads[k] for k, v in params.items()}
distributed.reduce_sum(torch.ones(3, dtype=torch.float64))
distributed.check_in_sync(params, ctx)
for _ in range(3):
    distributed.reduce_sum(torch.ones(4, dtype=torch.float64))  # validation's counts, the last collective
if ctx.rank == 0:
    time.sleep(0.5)  # rank 0 saves checkpoints and plots before it leaves
if "--raw" in sys.argv:
    dist.destroy_process_group()
else:
    distributed.teardown()
