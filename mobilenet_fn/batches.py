"""Making batches: ``batches(source, preprocess, ...)`` turns a ``Source`` into the batches of one epoch, normalised
(N, 3, R, R) float on the device, augmented per image from (seed, epoch, item) so that a resumed run draws the same.

In-memory sources (and decoded caches) are gathered and augmented on the device, a batch ahead on the CPU
(``made_ahead``) and through pinned memory on CUDA when they are too large for the GPU; file sources are decoded
per image in DataLoader workers.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import Augment, augment_batch, random_resized_crop_one
from .preprocess import (
    IMAGE_ERRORS, Layout, eval_image, fit, interpolation_mode, model_input, read_rgb, resize_center_crop,
)
from .sources import Skipped, Source, TensorSource, skip_reason


def _auto_augment(spec: Augment):
    """The worker's automatic policy for ``spec``, torchvision's own; None when there is none."""
    from torchvision.transforms import v2

    return v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR) if spec.auto_augment == "trivial" \
        else None


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's augmentation in one epoch: a function of the item, not of the worker, process or
    position that happens to load it, so a resumed or re-sharded run draws the same crops."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2**63  # what a torch.Generator takes


class _Files(torch.utils.data.Dataset):
    """Image files as uint8 (3, R, R) tensors, each item a (source index, path, label); an unreadable file gives
    (None, Skipped), which the collate drops. Training crops are drawn from the square the decoded cache would
    store (``preprocess.Layout``), so ``--cache off`` trains on the same pixels as the cache. ``augment`` = (seed,
    epoch, spec) does the per-image part of the ``Augment`` spec (crop, flip, auto-augment), drawn from the item's
    own seed; None gives the eval preprocessing."""

    def __init__(self, items, preprocess: dict, augment: tuple[int, int, Augment] | None):
        self.items, self.preprocess, self.augment = items, preprocess, augment
        self.window, self.interpolation = Layout.of(preprocess), interpolation_mode(preprocess)
        self.auto_augment = _auto_augment(augment[2]) if augment else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        index, path, label = self.items[i]
        spec = self.augment[2] if self.augment else None
        try:
            if spec is None or not spec.crop_flip:
                image = eval_image(path, self.preprocess)
            else:
                image = fit(read_rgb(path, self.window.side), self.window)
        except IMAGE_ERRORS as e:
            return None, Skipped(path, skip_reason(e))
        if spec is None:
            return image, label
        seed = item_seed(*self.augment[:2], index)
        if spec.crop_flip:
            image = random_resized_crop_one(image, self.preprocess["resolution"], torch.Generator().manual_seed(seed),
                                            scale=(spec.crop_scale, 1.0), interpolation=self.interpolation)
        if self.auto_augment is None:
            return image, label
        # torchvision draws from the global CPU RNG: seed it for this item, and give the caller's state back.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.auto_augment(image), label


def _collate(items):
    good = [(x, y) for x, y in items if x is not None]
    bad = [p for x, p in items if x is None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


@dataclass
class Batch:
    x: torch.Tensor  # (N, 3, R, R) normalised float on the device
    y: torch.Tensor  # (N,) int64 on the device
    skipped: list[str]  # unreadable files met while making this batch, as Skipped ("path: reason")


def order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of an epoch: a permutation drawn from (seed, epoch), so a resumed run repeats it."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# A TensorSource larger than this (a big decoded cache) stays in host memory on CUDA: each batch is gathered into
# pinned memory and copied while the previous step runs. Smaller ones (Fashion-MNIST: 47 MB) move to the GPU whole.
DEVICE_RESIDENT_BYTES = 2 << 30


def _pinned_gathers(source: TensorSource, items: list[torch.Tensor], device: torch.device):
    """Yields (images, labels) on ``device`` for each index tensor of ``items``: gathered on the CPU into one of two
    pinned buffers and copied on a side stream, one batch ahead, so the copy overlaps the step the caller runs
    on the batch before. A buffer is refilled only once its previous copy has finished."""
    copy_stream = torch.cuda.Stream(device)
    buffers, copied = [], [None, None]  # copied[k]: the event that marks the end of buffer k's last copy
    ready = None
    for n, j in enumerate(items + [None]):
        if j is not None:
            k = n % 2
            if len(buffers) <= k:
                buffers.append(torch.empty((len(j), *source.images.shape[1:]), dtype=torch.uint8,
                                           pin_memory=True))
            if copied[k] is not None:
                copied[k].synchronize()
            rows = j if source.rows is None else source.rows[j]
            host = torch.index_select(source.images, 0, rows, out=buffers[k][:len(j)])
            labels = source.labels[j].pin_memory()
            with torch.cuda.stream(copy_stream):
                x, y = host.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                copied[k] = torch.cuda.Event()
                copied[k].record(copy_stream)
            following = (x, y, copied[k])
        else:
            following = None
        if ready is not None:
            x, y, done = ready
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            x.record_stream(current)  # allocated on the copy stream, used on this one
            y.record_stream(current)
            yield x, y
        ready = following


OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")  # GNU (pip wheels), Intel (conda), LLVM


def threads_in_this_thread(count: int) -> bool:
    """Runs the calling thread's torch ops on ``count`` cores, leaving the other threads as they are. OpenMP keeps
    the thread count per thread, but ``torch.set_num_threads`` also changes the default every later thread starts
    with (and clears oneDNN's cache while the step may be using it), so this sets OpenMP's own per-thread value
    in the runtimes loaded (GNU's, Intel's or LLVM's, found in /proc/self/maps; each keeps its own). False where
    that does not reach torch's (no /proc on macOS and Windows): nothing changes."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if any(f"/{lib}" in line for lib in OPENMP_LIBRARIES)}
    except OSError:
        return False
    torch.get_num_threads()  # torch sets a thread's count from its default on the thread's first op: do that first
    for path in runtimes:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).omp_set_num_threads(count)
    return torch.get_num_threads() == count


def made_ahead(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches``, each made in a background thread while the caller uses the one before: on the CPU the
    augmentation of batch i + 1 runs during the step on batch i (torch's ops release the GIL). The thread runs on a
    quarter of the step's cores (at least one) rather than on all of them: on 2 cores a cached folder trained faster
    with one than with two (``bench/folder_cache.py``; more cores are not measured). Each batch draws from its own
    generator, so the batches are the same as made in line."""
    cores = max(1, torch.get_num_threads() // 4)
    with ThreadPoolExecutor(1, "mobilenet-fn-batches", threads_in_this_thread, (cores,)) as pool:
        following = pool.submit(next, batches, None)
        while (batch := following.result()) is not None:
            following = pool.submit(next, batches, None)
            yield batch


def batches(
    source: Source, preprocess: dict, *, batch_size: int, train: bool, augment: Augment | None = Augment(),
    num_classes: int | None = None, device="cpu", seed: int = 0, epoch: int = 0, start: int = 0,
    workers: int = 0, shard: tuple[int, int] = (0, 1), channels_last: bool = False,
) -> Iterator[Batch]:
    """Yields the batches of one epoch from batch index ``start`` on.

    Training shuffles with (seed, epoch) and drops the last partial batch (so a compiled step sees one shape);
    evaluation keeps every item in order. ``shard=(rank, world)`` takes every world-th item for rank. Training
    batches are augmented as ``augment`` says (None: not at all): in-memory sources wholly on the device, file
    sources per image in the workers (crop, flip, auto-augment) and then on the device (erasing, mixing). With
    mixup or cutmix, ``y`` holds probabilities over ``num_classes``.
    """
    device = torch.device(device)
    idx = order(len(source), shuffle=train, seed=seed, epoch=epoch)
    rank, world = shard
    if world > 1:
        usable = len(idx) - len(idx) % world if train else len(idx)
        idx = idx[:usable][rank::world]
    n_batches = len(idx) // batch_size if train else math.ceil(len(idx) / batch_size)

    augment = augment if train else None
    in_memory = isinstance(source, TensorSource)

    def finish(x: torch.Tensor, y: torch.Tensor, i: int, skipped: list) -> Batch:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 10_007 + i)
            if in_memory and not augment.crop_flip:
                x = resize_center_crop(x, preprocess)
            x, y = augment_batch(x, y, preprocess, augment, num_classes=num_classes, generator=g,
                                 on_device=in_memory, channels_last=channels_last)
            return Batch(x, y, skipped)
        if in_memory:
            x = resize_center_crop(x, preprocess)
        return Batch(model_input(x, preprocess, channels_last=channels_last), y, skipped)

    if isinstance(source, TensorSource):
        streamed = device.type == "cuda" and source.images.nbytes > DEVICE_RESIDENT_BYTES
        if device.type == "cuda" and not streamed:  # small enough to hold on the GPU: gathered there
            source = TensorSource(*(t if t is None else t.to(device) for t in (
                source.images, source.labels, source.rows)))
            idx = idx.to(device)
        items = [idx[i * batch_size: (i + 1) * batch_size] for i in range(start, n_batches)]
        gathered = _pinned_gathers(source, items, device) if streamed else map(source.gather, items)
        made = (finish(x, y, i, []) for i, (x, y) in enumerate(gathered, start=start))
        yield from made_ahead(made) if device.type == "cpu" and augment is not None else made
        return

    items = [(k, *source.samples[k]) for k in idx[start * batch_size: n_batches * batch_size].tolist()]
    files = _Files(items, preprocess, None if augment is None else (seed, epoch, augment))
    # The loader's own generator: without one it draws its base seed from the global RNG, which a checkpoint
    # restores; the draw would then shift the dropout masks of a resumed run.
    loader = torch.utils.data.DataLoader(
        files, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
    for i, (x, y, bad) in enumerate(loader, start=start):
        if x is None:
            continue
        yield finish(x, y, i, bad)

