"""`mobilenet-fn audit`: the mislabeled, duplicated, leaked and outlying images of a data set, in a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import DEVICE, JSON, UserError, err, pick_device, print_json, user_errors

Opt = typer.Option
SHOWN = 5  # rows per kind in the terminal's table


@user_errors
def audit(
    data: Annotated[str, typer.Argument(help="A folder (train/ + val/, or one folder per class), sample or "
                                             "fashion-mnist.")],
    out: Annotated[Optional[Path], Opt(help="Report folder (must not exist; never inside the data). Default: "
                                            "audits/<data>.")] = None,
    weights: Annotated[Optional[Path], Opt(help="Judge with this trained model instead of K-fold training: quick, "
                                                "but biased where it was trained on these images.")] = None,
    folds: Annotated[int, Opt(help="K of the K-fold training that predicts every image out of sample.")] = 3,
    epochs: Annotated[Optional[int], Opt(help="Most epochs of each fold's training; default by the data's size "
                                              "(about as many pixels as 6 epochs of Fashion-MNIST), each fold stopping "
                                              "early once its held-out part stops improving.")] = None,
    init: Annotated[Optional[Path], Opt("--init", help="Start every fold from these weights (e.g. converted ImageNet "
                                                       "weights): a far better judge of photos.")] = None,
    freeze_backbone: Annotated[bool, Opt(help="With --init: train only the classifier (a linear model on the "
                                              "pretrained embeddings, quick); --no-freeze-backbone fine-tunes all.")
                               ] = True,
    alpha: Annotated[float, Opt("--alpha", "-a", help="Width multiplier of the fold models (with --init: the "
                                                      "file's).")] = 0.25,
    resolution: Annotated[Optional[int], Opt("--resolution", "-r", help="Input size; default 32 for sample and "
                                                                        "fashion-mnist, 96 for folders (with "
                                                                        "--weights or --init: the file's).")] = None,
    batch_size: Annotated[int, Opt("--batch-size", "-b", help="Images per training step.")] = 64,
    lr: Annotated[float, Opt(help="Peak learning rate of the fold models.")] = 0.1,
    augment: Annotated[str, Opt(help="crop-flip or none, as train.")] = "crop-flip",
    compile: Annotated[str, Opt(help="torch.compile the fold models' step: auto (train's rule), on, off.")] = "auto",
    amp: Annotated[str, Opt(help="Mixed precision of the fold models' training: auto, bf16, off.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of the folds and the training.")] = 0,
    val_split: Annotated[float, Opt(help="Validation fraction for a folder without val/ (which files leak).")] = 0.2,
    grad: Annotated[str, Opt(help="Per-sample gradient norm by vmap(grad): head (the classifier's parameters), "
                                  "full (every parameter; ~25x as slow), off.")] = "head",
    embed: Annotated[str, Opt(help="Duplicates in: pixels (standardised grey 16x16 thumbnails) or features (the pooled "
                                   "last feature map of one model).")] = "pixels",
    threshold: Annotated[Optional[float], Opt(help="Cosine similarity from which two images are near-duplicates; "
                                                   "default 0.995 for pixels, 0.95 for features.")] = None,
    fix_split: Annotated[bool, Opt(help="Also write split.json keeping each duplicate group on one side (a folder "
                                        "split by --val-split; train --split uses it), or val-leaks.txt (a fixed "
                                        "split: the validation files to --exclude).")] = False,
    top: Annotated[int, Opt(help="Images per contact sheet.")] = 24,
    device: DEVICE = "auto",
    json: JSON = False,
):
    """Find label errors (confident learning on out-of-sample predictions), duplicates, train/validation leaks and
    outliers. Writes report.json, issues.csv (file, given_label, suggested_label, kind, score, other),
    signals.csv (loss, margin, gradient norm per image) and suspects-<kind>.png; the data is never changed."""
    import dataclasses

    t0 = time.perf_counter()
    import torch

    from mobilenet_fn import audit as audit_lib
    from mobilenet_fn.audit_report import check_outside, default_out_dir, write_report
    from mobilenet_fn.data import DEFAULT_RESOLUTION
    from mobilenet_fn.extras import require
    from mobilenet_fn.model import Config
    from mobilenet_fn.step import keep_freed_memory
    from mobilenet_fn.train import TrainOptions
    from mobilenet_fn.weights import load_weights

    from .progress import TrainProgress, decoding, report_cache

    require("cleanlab", "audit", "audit")
    if grad not in audit_lib.GRAD_CHOICES:
        raise UserError(f"--grad must be one of {', '.join(audit_lib.GRAD_CHOICES)}, got {grad!r}")
    if embed not in audit_lib.EMBEDDINGS:
        raise UserError(f"--embed must be one of {', '.join(audit_lib.EMBEDDINGS)}, got {embed!r}")
    keep_freed_memory()
    dev = pick_device(device)
    if out is not None and out.exists():
        raise UserError(f"{out} already exists; pick another --out")
    if out is not None and Path(data).expanduser().is_dir():
        check_outside(out, data)
    if weights is not None and init is not None:
        raise UserError("--weights judges with one trained model, --init starts K-fold training from one: give one")
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    trained = load_weights(weights) if weights is not None else None
    start = load_weights(init) if init is not None else None
    given = trained or start
    resolution = resolution or (given.preprocess["resolution"] if given else None) or (
        None if data in DEFAULT_RESOLUTION else audit_lib.JUDGE_RESOLUTION)
    with decoding() as progress:
        pool, reports = audit_lib.load_pool(data, resolution=resolution, val_split=val_split, seed=seed, device=dev,
                                            progress=progress)
    for report in reports:
        report_cache(report)
    out = out or default_out_dir(data)
    check_outside(out, pool.root)
    err.print(escape(f"Auditing {pool.name}: {len(pool)} images ({int((~pool.is_val).sum())} train, "
                     f"{int(pool.is_val.sum())} val), {len(pool.classes)} classes"), highlight=False, soft_wrap=True)

    if trained is not None:
        with err.status("Running the model on every image…"):
            outputs = audit_lib.from_weights(pool, trained, grad=grad, device=dev)
        err.print("[yellow]Judged by one trained model (--weights): biased wherever it was trained on these images; "
                  "K-fold training (without --weights) is the unbiased audit.[/]")
        settings = {"weights": str(weights)}
    else:
        resolution = pool.preprocess["resolution"]
        base = start.config if start else Config(alpha=alpha)
        cfg = dataclasses.replace(base, resolution=resolution, num_classes=len(pool.classes), dropout=0.0)
        fold_train = len(pool) - len(pool) // folds
        opts = TrainOptions(data=data, epochs=epochs or audit_lib.fold_epochs(fold_train, resolution),
                            batch_size=batch_size, lr=lr, augment=augment, compile=compile, amp=amp, seed=seed,
                            device=str(dev), workers=0, init_weights=str(init) if init else None,
                            freeze_backbone=bool(start) and freeze_backbone)
        first, how = None, ""
        if start is not None:
            from mobilenet_fn.model import with_classifier_for

            first = (with_classifier_for(cfg, start.params, torch.Generator().manual_seed(seed)), start.state)
            how = f" from {init}, training " + ("the classifier only" if opts.freeze_backbone else "every layer")
        err.print(escape(f"{folds} folds of up to {opts.epochs} epochs{how}"), highlight=False, soft_wrap=True)
        outputs, view, shown = None, None, 0
        for event in audit_lib.out_of_sample(pool, cfg, opts, folds=folds, grad=grad, device=dev, start=first):
            if isinstance(event, audit_lib.Outputs):
                outputs = event
                continue
            if event.fold != shown:
                if view is not None:
                    view.__exit__(None, None, None)
                shown = event.fold
                err.print(f"[bold]Fold {event.fold} of {event.folds}[/]: training on the other folds")
                view = TrainProgress().__enter__()
            view.show(event.event)
        if view is not None:
            view.__exit__(None, None, None)
        settings = {"folds": folds, "train": dataclasses.asdict(opts), "model": cfg.to_dict()}
    with err.status("Ranking label issues, duplicates and outliers…"):
        result = audit_lib.audit(pool, outputs, embed=embed, threshold=threshold)
        settings = {**settings, "seconds": round(time.perf_counter() - t0, 1)}
        report = write_report(out, pool, outputs, result, settings=settings, fix_split=fix_split, top=top)
    if json:
        print_json({**report, "out": str(out)})
        return
    _summary_table(pool, result, report)
    err.print(escape(f"Report: {out} ({', '.join(report['files'])}) in {report['seconds']:.0f} s"), highlight=False,
              soft_wrap=True)
    err.print(escape(f"Train without the flagged files: mobilenet-fn train --data {data} --exclude "
                     f"{out / 'issues.csv'} (edit the CSV to keep some)"), highlight=False, soft_wrap=True)


def _summary_table(pool, result, report) -> None:
    from rich.table import Table

    from mobilenet_fn.audit import KINDS

    meaning = {"label": "given label probably wrong (confident learning)", "conflict": "same image, other label",
               "leak": "validation image copied in train", "duplicate": "copy within a class and split",
               "outlier": "far from every class"}
    table = Table(title=f"Audit of {pool.name}: out-of-sample top-1 {100 * report['out_of_sample_top1']:.1f}% "
                        f"(chance {100 * report['chance_top1']:.1f}%)")
    for column, justify in (("kind", "left"), ("images", "right"), ("meaning", "left"), ("most suspect", "left")):
        table.add_column(column, justify=justify)
    for kind in KINDS:
        found = result.of_kind(kind)
        first = ""
        if found:
            i = found[0]
            first = (f"{Path(pool.names[i.index]).name}: {pool.classes[pool.labels[i.index]]} → "
                     f"{pool.classes[i.suggested]} ({i.score:.3f})")
        table.add_row(kind, str(report["counts"][kind]), meaning[kind], escape(first))
    err.print(table)
    if not result.judge.flags_labels:
        err.print(f"[yellow]{escape(result.judge.verdict())}[/]", highlight=False, soft_wrap=True)
    if pool.skipped:
        err.print(escape(f"Skipped {len(pool.skipped)} unreadable image(s), e.g. {pool.skipped[0]}"), highlight=False,
                  soft_wrap=True)
    if pool.ignored:
        err.print(escape(f"Ignored {len(pool.ignored)} file(s) that are not images, e.g. {pool.ignored[0]}"),
                  highlight=False, soft_wrap=True)
