"""Data-parallel training on ``torch.distributed``, as launched by ``torchrun``.

Each process (rank) trains on its shard of every batch; the step averages the gradients with one all-reduce of
one flat buffer (a functional collective, which ``torch.compile`` traces into the graph), so every rank applies
the same update and the parameters stay identical. NCCL on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

TIMEOUT = datetime.timedelta(minutes=5)  # a collective that waits longer than this on a dead peer fails


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or torch.distributed.run) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str) -> Context:
    """Joins the process group torchrun described in the environment; a single process needs none."""
    if not launched():
        return Context()
    if not dist.is_initialized():
        # Imported now, while there is no group: imported later (the first functional collective does), its
        # functions' ``group=group.WORLD`` defaults would hold on to the group and keep teardown() from freeing it.
        import torch.distributed.nn.functional  # noqa: F401

        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(clean: bool | None = None) -> None:
    """Leaves the process group for good: on a clean exit (default: no exception in flight) once every rank has
    got here, then destroying the group, whose backend joins its threads.

    The joining is the point. Gloo's worker threads drop their last reference to a finished collective's
    tensors after the caller has moved on; a tensor Python let go of first then needs the GIL to be freed. Left
    running into interpreter shutdown, such a thread is stopped by Python (pthread_exit) inside a C++ destructor,
    and the process aborts ("terminate called without an active exception", SIGABRT): the rank that leaves right
    after its last collective (rank 1; rank 0 still writes checkpoints) did so about once in 15-40 runs. Destroying
    the group here, with the interpreter up, lets those threads finish. A rank that fails skips the barrier: the
    others may be waiting in another collective, and torchrun stops them.
    """
    if not dist.is_initialized():
        return
    if clean is None:
        clean = sys.exc_info()[1] is None
    if clean:
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if group() is not None:
        gc.collect()
    if group() is not None:
        warnings.warn("the process group outlives destroy_process_group() (something still refers to it): its "
                      "threads may still be running as Python shuts down", RuntimeWarning, stacklevel=2)


def mean_across_ranks(tree):
    """The average over ranks of a tree of tensors: one all-reduce of one flat buffer (traceable)."""
    import torch.distributed._functional_collectives as fc

    leaves, spec = tree_flatten(tree)
    flat = torch.cat([leaf.reshape(-1) for leaf in leaves])
    flat = fc.all_reduce(flat, "sum", dist.group.WORLD) / dist.get_world_size()
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start: start + leaf.numel()].view(leaf.shape))
        start += leaf.numel()
    return tree_unflatten(out, spec)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient): of counts and metrics, and of synchronised BatchNorm's statistics."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_in_sync(params, ctx: Context) -> None:
    """Raises if the ranks' parameters have drifted apart (they must be bit-identical)."""
    if not ctx.active:
        return
    leaves, _ = tree_flatten(params)
    probe = torch.stack([torch.stack([leaf.double().sum(), leaf.double().abs().sum()]) for leaf in leaves]).cpu()
    gathered = [torch.empty_like(probe) for _ in range(ctx.world)]
    dist.all_gather_object(gathered, probe)
    if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
        raise RuntimeError("the processes' parameters differ; the gradient all-reduce is not in effect")
