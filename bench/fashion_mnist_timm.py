"""Fashion-MNIST with timm's MobileNet v1 trained eagerly, on the recipe ``mobilenet-fn train`` runs.

    .venv/bin/python bench/fashion_mnist_timm.py [--epochs 20] [--alpha 0.5] [--batch-size 128] [--lr 0.1]
                                                 [--out summary.json] [--ours RUN_DIR]
    .venv/bin/python bench/fashion_mnist_timm.py --config recipes/fashion-mnist-cpu.toml [--epochs 8]

(``--config`` takes a ``mobilenet-fn train`` recipe file; flags override it, as there.)

The counterpart of

    mobilenet-fn train --data fashion-mnist --alpha 0.5 --epochs 20 --batch-size 128 --lr 0.1

with everything but the model code held the same: the data and its split (``mobilenet_fn.data.load``), the batches
and their augmentation (``mobilenet_fn.batches.batches`` with the seed and epoch the Trainer passes, so the same
random resized crops (``--crop-scale``) and flips in the same order), 32 px, channels-last, the cosine schedule
with one warmup epoch (``mobilenet_fn.optim.make_schedule``, set per step), SGD with Nesterov momentum 0.9, weight
decay 4e-5 on full convolutions, pointwise and classifier weights only (not depthwise filters, BatchNorm or
biases, as ``optim.decay_mask``), label smoothing 0.1, validation after every epoch (BatchNorm in eval), and the
test set once at the end with the weights of the best validation epoch (best top-1, then lowest loss, as the
Trainer picks). timm is used the ordinary way: an ``nn.Module`` with timm's own initialisation, ``loss.backward()`` and
``torch.optim.SGD``, eager. The activation is set to plain ReLU (timm's MobileNet v1 defaults to ReLU6; ours
to ReLU).

The recipe's ingredients come from timm's own classes, applied as timm's train.py applies them: ``--ema`` with
``timm.utils.ModelEmaV3`` (warmup on; validation, the best epoch and the test use the average), ``--reprob`` with
``timm.data.RandomErasing`` (mode "pixel", on the normalised batch), ``--mixup``/``--cutmix`` with
``timm.data.Mixup`` (per element, label smoothing folded into its targets, ``SoftTargetCrossEntropy``), and
``--clip-grad`` with ``torch.nn.utils.clip_grad_norm_``. ``--auto-augment trivial`` is the one ingredient taken from
``mobilenet_fn.batches.batches`` with the crops (torchvision's op, batched). ``--amp bf16`` runs the forward under bf16
autocast, as timm's ``--amp --amp-dtype bfloat16``.

Prints one line per epoch, then the wall time, best validation top-1 and test top-1. ``--out`` writes a JSON
summary; ``--ours RUN_DIR`` also prints the same numbers from a mobilenet-fn run folder's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

from mobilenet_fn import batches as batch_lib
from mobilenet_fn import data as data_lib
from mobilenet_fn.augment import Augment
from mobilenet_fn.options import CROP_SCALE
from mobilenet_fn.optim import make_schedule


def timm_mobilenet_v1(alpha: float, num_classes: int, activation: str):
    """timm's MobileNet v1 generator at width ``alpha`` (channels rounded to multiples of 8, which equals our
    int(c·α) at α 0.25, 0.5, 0.75 and 1)."""
    from timm.models.efficientnet import _gen_mobilenet_v1

    act = torch.nn.ReLU if activation == "relu" else torch.nn.ReLU6
    return _gen_mobilenet_v1("mobilenetv1_100", alpha, num_classes=num_classes, act_layer=act)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on full convolutions (stem and pointwise: groups == 1) and the classifier's weight only;
    depthwise filters, BatchNorm and every bias get none (paper section 4, ``optim.decay_mask``)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            full_conv = isinstance(module, torch.nn.Conv2d) and module.groups == 1
            if name == "weight" and (full_conv or isinstance(module, torch.nn.Linear)):
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, source, preprocess, device, channels_last: bool, batch_size: int = 128) -> dict:
    """Top-1 and mean cross-entropy (no smoothing) over every item, in eval mode, as mobilenet_fn.evaluate."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for batch in batch_lib.batches(source, preprocess, batch_size=batch_size, train=False, device=device,
                                      channels_last=channels_last):
            logits = model(batch.x).float()
            loss_sum += F.cross_entropy(logits, batch.y, reduction="sum").item()
            correct += (logits.argmax(1) == batch.y).sum().item()
            n += len(batch.y)
    return {"top1": correct / n, "loss": loss_sum / n, "n": n}


def ours_summary(run_dir: Path) -> dict | None:
    """Wall time (sum of epoch seconds), best val top-1 and test top-1 of a mobilenet-fn run folder."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    best = max(rows, key=lambda r: (r["val_top1"], -r["val_loss"]))
    return {"epochs": len(rows), "seconds": sum(r["seconds"] for r in rows), "best_val_top1": best["val_top1"],
            "best_epoch": best["epoch"], "test_top1": rows[-1].get("test_top1")}


FIXED_BY_THIS_SCRIPT = {"data": "fashion-mnist", "optimizer": "sgd", "schedule": "cosine"}


def recipe_defaults(path: Path, parser: argparse.ArgumentParser) -> dict:
    """A ``mobilenet-fn train`` recipe file's options as this script's defaults; exits on one it cannot follow."""
    recipe = {key.replace("-", "_"): value for key, value in tomllib.loads(path.read_text()).items()}
    known = {action.dest for action in parser._actions}
    for key, value in recipe.items():
        if FIXED_BY_THIS_SCRIPT.get(key, value) != value or (key not in known and key not in FIXED_BY_THIS_SCRIPT):
            sys.exit(f"{path}: {key} = {value!r} is not something this script can run")
    return {key: value for key, value in recipe.items() if key in known}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="a mobilenet-fn train recipe (.toml)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=4e-5)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--activation", default="relu", choices=("relu", "relu6"))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--ema", type=float, default=0.0, help="ModelEmaV3 decay (0: off)")
    p.add_argument("--crop-scale", type=float, default=CROP_SCALE)
    p.add_argument("--reprob", type=float, default=0.0)
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--auto-augment", default="none", choices=("none", "trivial"))
    p.add_argument("--clip-grad", type=float, default=0.0)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--limit-batches", type=int, default=0, help="smoke test: stop each epoch after this many")
    p.add_argument("--out", type=Path, default=None, help="write a JSON summary here")
    p.add_argument("--ours", type=Path, default=None, help="a mobilenet-fn run folder to compare with")
    config = p.parse_known_args(argv)[0].config
    if config is not None:
        p.set_defaults(**recipe_defaults(config, p))
    args = p.parse_args(argv)

    import timm

    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    device = torch.device(args.device)
    dataset = data_lib.load("fashion-mnist", resolution=args.resolution, seed=args.seed)
    pre = dataset.preprocess
    torch.manual_seed(args.seed)
    model = timm_mobilenet_v1(args.alpha, len(dataset.classes), args.activation).to(device)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    groups = param_groups(model, args.weight_decay)
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    batches_per_epoch = len(dataset.train) // args.batch_size
    steps = batches_per_epoch if not args.limit_batches else min(args.limit_batches, batches_per_epoch)
    schedule = make_schedule("cosine", args.lr, batches_per_epoch * args.epochs,
                             warmup_steps=round(args.warmup_epochs * batches_per_epoch))
    ema = ModelEmaV3(model, decay=args.ema, use_warmup=True) if args.ema else None
    erase = RandomErasing(args.reprob, mode="pixel", device=str(device)) if args.reprob else None
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, mode="elem", label_smoothing=args.label_smoothing,
                  num_classes=len(dataset.classes)) if args.mixup or args.cutmix else None
    soft_loss = SoftTargetCrossEntropy()
    spec = Augment(crop_scale=args.crop_scale, auto_augment=args.auto_augment)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
                else torch.autocast(device.type, enabled=False))
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_all = sum(p.numel() for p in model.parameters())
    print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"timm {timm.__version__}  {torch.get_num_threads()} threads  device {device}", flush=True)
    print(f"timm MobileNet v1 α {args.alpha} ({args.activation}): {n_all:,} parameters, {n_decay:,} with weight "
          f"decay; {len(dataset.train)} train, {len(dataset.val)} val, {len(dataset.test)} test images, "
          f"{pre['resolution']} px; {args.epochs} epochs × {batches_per_epoch} steps of {args.batch_size}",
          flush=True)

    history, best, best_state = [], None, None
    global_step = 0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for i, batch in enumerate(batch_lib.batches(
                dataset.train, pre, batch_size=args.batch_size, train=True, augment=spec, device=device,
                seed=args.seed, epoch=epoch, channels_last=args.channels_last)):
            if i >= steps:
                break
            lr = schedule(global_step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = batch.x, batch.y
            if erase is not None:
                x = erase(x)
            if mixup is not None:
                x, targets = mixup(x, y)
            with autocast:
                logits = model(x)
            logits = logits.float()
            if mixup is not None:
                loss = soft_loss(logits, targets)
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            global_step += 1
            if ema is not None:
                ema.update(model, step=global_step)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(batch.y)
        if args.limit_batches:
            global_step = (epoch + 1) * batches_per_epoch  # keep the schedule where a full epoch leaves it
        train_seconds = time.perf_counter() - t0
        evaluated = model if ema is None else ema.module
        val = evaluate(evaluated, dataset.val, pre, device, args.channels_last)
        row = {
            "epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, seen // args.batch_size),
            "train_top1": correct.item() / max(1, seen), "val_loss": val["loss"], "val_top1": val["top1"],
            "lr": schedule(global_step - 1), "img_per_s": seen / train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if best is None or (row["val_top1"], -row["val_loss"]) > (best["val_top1"], -best["val_loss"]):
            best = row
            best_state = copy.deepcopy(evaluated.state_dict())
        print(f"epoch {row['epoch']:2d}/{args.epochs}  train loss {row['train_loss']:.4f} top-1 "
              f"{100 * row['train_top1']:.2f}%  val loss {row['val_loss']:.4f} top-1 {100 * row['val_top1']:.2f}%  "
              f"lr {row['lr']:.4f}  {row['img_per_s']:.0f} img/s  {row['seconds']:.1f} s"
              + ("  *" if best is row else ""), flush=True)
    model.load_state_dict(best_state)
    test = evaluate(model, dataset.test, pre, device, args.channels_last)
    wall = time.perf_counter() - started

    summary = {
        "model": f"timm mobilenetv1 α {args.alpha} ({args.activation}), eager",
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "parameters": n_all,
        "wall_seconds": wall, "epoch_seconds": sum(r["seconds"] for r in history),
        "best_val_top1": best["val_top1"], "best_epoch": best["epoch"], "test_top1": test["top1"],
        "test_loss": test["loss"], "history": history,
    }
    print(f"timm eager: wall {wall:.0f} s ({wall / 60:.1f} min), best val top-1 {100 * best['val_top1']:.2f}% "
          f"(epoch {best['epoch']}), test top-1 {100 * test['top1']:.2f}% (best epoch's weights)", flush=True)
    if args.ours:
        ours = ours_summary(args.ours)
        if ours is None:
            print(f"{args.ours}: no metrics.jsonl to compare with", file=sys.stderr)
        else:
            summary["ours"] = ours
            test_ours = "?" if ours["test_top1"] is None else f"{100 * ours['test_top1']:.2f}%"
            print(f"mobilenet-fn ({args.ours}): {ours['epochs']} epochs in {ours['seconds']:.0f} s "
                  f"({ours['seconds'] / 60:.1f} min, sum of epoch times), best val top-1 "
                  f"{100 * ours['best_val_top1']:.2f}% (epoch {ours['best_epoch']}), test top-1 {test_ours}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
