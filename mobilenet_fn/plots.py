"""Figures with matplotlib (Agg, no display needed): training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

from .files import atomic_write


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), durable=False)


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Loss and top-1 per epoch, train and validation, side by side."""
    plt, (fig, (ax_loss, ax_acc)) = _figure(1, 2, figsize=(10, 4))
    epochs = [m["epoch"] for m in metrics]
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in metrics], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [100 * m["train_top1"] for m in metrics], "o-", label="train top-1")
    ax_acc.plot(epochs, [100 * m["val_top1"] for m in metrics], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * m["val_top5"] for m in metrics], "--", label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(confusion, classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    counts = confusion.double()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(classes)
    size = min(4 + 0.45 * k, 40)
    plt, (fig, ax) = _figure(figsize=(size, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 50:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)
    plt.close(fig)
