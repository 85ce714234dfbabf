"""Evaluation: top-1, top-5, loss, per-class accuracy and the confusion matrix, BatchNorm in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import batches
from .model import Config, apply, fold_batchnorm
from .step import Policy, inference_policy


def evaluate(
    cfg: Config, params: dict, state: dict, source, preprocess: dict, *, batch_size: int = 256,
    policy: Policy | None = None, workers: int = 0, shard: tuple[int, int] = (0, 1), reduce=None,
) -> dict:
    """Metrics of the model on every item of ``source`` (fractions in [0, 1]), run as ``policy`` says (its device,
    memory format and autocast; by default ``eval``'s on the CPU) with ``params`` and ``state`` on that device.

    Returns {"top1", "top5", "loss", "n", "per_class": [accuracy or None], "confusion": (K, K) long tensor
    (rows: true class, columns: predicted), "skipped": [unreadable files]}. With ``shard=(rank, world)`` each
    process sees its share and ``reduce`` (a sum across processes) combines the counts, giving the same result.
    """
    policy = policy or inference_policy(torch.device("cpu"))
    with torch.no_grad():
        folded = fold_batchnorm(cfg, params, state)  # faster than BatchNorm in eval (bench/throughput.py)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with policy.autocast():
            return apply(cfg, folded, None, x, train=False)[0]

    with torch.no_grad():
        return evaluate_forward(forward, cfg.num_classes, source, preprocess, batch_size=batch_size,
                                device=policy.device, channels_last=policy.channels_last, workers=workers,
                                shard=shard, reduce=reduce)


def evaluate_forward(
    forward, num_classes: int, source, preprocess: dict, *, batch_size: int = 256, device=torch.device("cpu"),
    channels_last: bool = False, workers: int = 0, shard: tuple[int, int] = (0, 1), reduce=None,
) -> dict:
    """``evaluate`` of any ``forward``: (N, C, R, R) normalised float on ``device`` -> (N, num_classes) logits
    (an ONNX model, for one). The same dict as ``evaluate``."""
    k = num_classes
    confusion = torch.zeros(k, k, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    skipped: list[str] = []
    for batch in batches(source, preprocess, batch_size=batch_size, train=False, device=device,
                         workers=workers, shard=shard, channels_last=channels_last):
        skipped += batch.skipped
        logits = forward(batch.x).float().to(device)
        loss_sum += F.cross_entropy(logits, batch.y, reduction="sum").double()
        top = logits.topk(min(5, k), dim=1).indices
        top5 += (top == batch.y[:, None]).any(1).sum()
        confusion += torch.bincount(batch.y * k + top[:, 0], minlength=k * k).view(k, k)
    if reduce is not None:
        confusion, top5, loss_sum = reduce(confusion), reduce(top5), reduce(loss_sum)
    return summarize(confusion.cpu(), top5.item(), loss_sum.item(), skipped)


def summarize(confusion: torch.Tensor, top5_correct: int, loss_sum: float, skipped: list[str]) -> dict:
    n = int(confusion.sum())
    per_class_n = confusion.sum(1)
    diag = confusion.diagonal()
    per_class = [(c / m) if m else None for c, m in zip(diag.tolist(), per_class_n.tolist())]
    return {
        "top1": diag.sum().item() / max(n, 1),
        "top5": top5_correct / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": n,
        "per_class": per_class,
        "confusion": confusion,
        "skipped": skipped,
    }
