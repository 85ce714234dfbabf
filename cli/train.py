from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mobilenet_fn.options import DEFAULT_ALPHA, DEFAULTS

from .common import DEVICE, RHO, UserError, err, fail, pick_device, user_errors
from .launch import Terminated, launch, sigterm_interrupts

Opt = typer.Option


def _read_config(ctx: typer.Context, param, path: Optional[Path]) -> Optional[Path]:
    """--config recipe.toml: its keys (train's option names, with - or _) become the defaults of this call, so that
    flags given on the command line override them. Read before the other options (the option is eager)."""
    if path is None or ctx.resilient_parsing:
        return path
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        fail(f"--config {path}: no such file")
    except IsADirectoryError:
        fail(f"--config {path}: is a folder; give a .toml file")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        fail(f"--config {path}: not valid TOML ({e})")
    names = {p.name for p in ctx.command.params} - {"config", "resume"}
    options = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        fail(f"--config {path}: unknown option(s) {', '.join(k.replace('_', '-') for k in unknown)}; the keys are "
             f"train's option names (see mobilenet-fn train --help)")
    nested = [k for k, v in options.items() if isinstance(v, (dict, list))]
    if nested:
        fail(f"--config {path}: {nested[0].replace('_', '-')} must be a single value, not a table or list")
    ctx.default_map = {**(ctx.default_map or {}), **options}
    return path


@user_errors
def train(
    config: Annotated[Optional[Path], Opt("--config", is_eager=True, callback=_read_config,
                                          help="A recipe: a TOML file of these options (e.g. epochs = 30, "
                                               "auto-augment = \"trivial\"); flags given here override it.")] = None,
    data: Annotated[str, Opt(help="sample, fashion-mnist, imagenette, or a folder (train/ + val/, or one folder "
                                  "per class).")] = DEFAULTS.data,
    alpha: Annotated[Optional[float], Opt("--alpha", "-a", help=f"Width multiplier α (default {DEFAULT_ALPHA}; with "
                                          "--init: the file's).")] = None,
    resolution: Annotated[Optional[int], Opt("--resolution", "-r", help="Input size; default per data: 32 for "
                                             "sample and fashion-mnist, 160 for imagenette, 224 for folders.")] = None,
    rho: RHO = None,
    activation: Annotated[Optional[str], Opt(help="relu (the paper's, default) or relu6.")] = None,
    dropout: Annotated[float, Opt(help="Dropout before the classifier.")] = 0.0,
    device: DEVICE = "auto",
    epochs: Annotated[Optional[int], Opt(help=f"Epochs to train, default {DEFAULTS.epochs} (with --resume: the "
                                                       "new total).")] = None,
    batch_size: Annotated[str, Opt("--batch-size", "-b", help="Images per step (per process), or auto: the "
                                                              "largest power of two that fits the GPU.")
                          ] = str(DEFAULTS.batch_size),
    lr: Annotated[float, Opt(help="Peak learning rate.")] = DEFAULTS.lr,
    optimizer: Annotated[str, Opt(help="sgd (Nesterov momentum), rmsprop (the paper's) or adamw.")
    ] = DEFAULTS.optimizer,
    schedule: Annotated[str, Opt(help="cosine (with warmup), step or constant.")] = DEFAULTS.schedule,
    warmup_epochs: Annotated[float, Opt(help="Linear warmup length in epochs.")] = DEFAULTS.warmup_epochs,
    weight_decay: Annotated[float, Opt(help="On conv, pointwise and classifier weights only (paper §4).")
    ] = DEFAULTS.weight_decay,
    label_smoothing: Annotated[float, Opt(help="Label smoothing of the cross-entropy.")] = DEFAULTS.label_smoothing,
    augment: Annotated[str, Opt(help="crop-flip (random resized crop + flip) or none.")] = DEFAULTS.augment,
    crop_scale: Annotated[float, Opt(help="The least share of the image's area a random crop holds (timm's "
                                          "--scale lower bound); small images such as Fashion-MNIST's want more.")
                          ] = DEFAULTS.crop_scale,
    auto_augment: Annotated[str, Opt(help="Automatic augmentation per image: trivial (TrivialAugment-Wide) or "
                                          "none.")] = DEFAULTS.auto_augment,
    reprob: Annotated[float, Opt(help="Random erasing: the probability that an image gets a box of noise.")
    ] = DEFAULTS.reprob,
    mixup: Annotated[float, Opt(help="Mixup's Beta alpha, e.g. 0.2 (0: off).")] = DEFAULTS.mixup,
    cutmix: Annotated[float, Opt(help="Cutmix's Beta alpha, e.g. 1.0 (0: off); with --mixup, each image gets "
                                      "one or the other.")] = DEFAULTS.cutmix,
    ema: Annotated[float, Opt(help="Decay of a weight EMA, e.g. 0.9998 (0: off); validation, best.ckpt and "
                                   "weights.pkl then use the average.")] = DEFAULTS.ema,
    ema_warmup: Annotated[bool, Opt(help="Ramp the EMA decay up early in training, as timm's ModelEmaV3.")
    ] = DEFAULTS.ema_warmup,
    clip_grad: Annotated[float, Opt(help="Clip the gradients to this global L2 norm (0: off).")] = DEFAULTS.clip_grad,
    compile: Annotated[str, Opt(help="torch.compile the step: auto (CUDA, as CUDA graphs for steps of up to "
                                                 "256 images of 128 px; CPU for runs long enough to repay "
                                                 "compiling), on, cudagraphs (one process), off.")] = DEFAULTS.compile,
    channels_last: Annotated[str, Opt(help="Memory format: auto (on), on, off.")] = DEFAULTS.channels_last,
    amp: Annotated[str, Opt(help="Mixed precision: auto (bf16 on CUDA and on CPUs that compute bf16 natively, "
                                          "AVX-512 BF16 or AMX, but for small eager steps), bf16, off.")] = DEFAULTS.amp,
    seed: Annotated[int, Opt(help="Seed of the initialisation, data order and augmentation.")] = DEFAULTS.seed,
    workers: Annotated[int, Opt(help="DataLoader workers for image folders with --cache off.")] = DEFAULTS.workers,
    cache: Annotated[str, Opt(help="Image folders: decode each image once into a uint8 cache in "
                                   "$MOBILENET_FN_CACHE (default ~/.cache/mobilenet-fn) and augment batches on the "
                                   "device: auto (in RAM when it fits, else memory-mapped), ram, disk, or off "
                                   "(decode every epoch in --workers processes).")] = DEFAULTS.cache,
    val_split: Annotated[float, Opt(help="Validation fraction for a folder without val/.")] = DEFAULTS.val_split,
    out: Annotated[Optional[Path], Opt(help="Run folder (must not exist). Default: runs/<data>-a<α>-r<res>.")] = None,
    resume: Annotated[Optional[Path], Opt(help="Continue the run in this folder (from its last.ckpt).")] = None,
    init: Annotated[Optional[Path], Opt("--init", help="Start from a weights .pkl (fine-tuning).")] = None,
    freeze_backbone: Annotated[bool, Opt(help="With --init: train only the classifier.")] = DEFAULTS.freeze_backbone,
    nproc: Annotated[int, Opt(help="Data-parallel processes on this machine (torchrun); e.g. one per GPU.")] = 1,
    sync_bn: Annotated[bool, Opt(help="Distributed: BatchNorm statistics over the global batch.")] = DEFAULTS.sync_bn,
    exclude: Annotated[Optional[Path], Opt(help="Leave out the files this list names: audit's issues.csv, or "
                                                "paths one per line.")] = None,
    split: Annotated[Optional[Path], Opt(help="Validation files from this split.json (audit --fix-split), for "
                                              "a folder of class folders.")] = None,
):
    """Train MobileNet v1 on a dataset; writes a run folder with checkpoints, metrics, curves and weights.pkl."""
    import torch

    from mobilenet_fn import distributed
    from mobilenet_fn.model import resolution_for_rho
    from mobilenet_fn.options import TrainOptions
    from mobilenet_fn.step import keep_freed_memory

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if config is not None and resume is not None:
        raise UserError("--resume continues a run with its own options; drop --config")
    if nproc > 1 and not distributed.launched():
        launch(nproc)
        return
    keep_freed_memory()
    dev = pick_device(device)
    ctx = distributed.setup(dev.type)
    if dev.type == "cuda" and ctx.active:
        dev = torch.device("cuda", ctx.local_rank)
    err.quiet = not ctx.main  # the other processes report nothing but errors
    try:
        if resume is not None:
            trainer, run = _resume(resume, epochs, dev, ctx)
        else:
            opts = TrainOptions(
                data=data, epochs=DEFAULTS.epochs if epochs is None else epochs,
                batch_size=_batch_size(batch_size, dev), lr=lr, optimizer=optimizer, schedule=schedule,
                warmup_epochs=warmup_epochs, weight_decay=weight_decay, label_smoothing=label_smoothing,
                augment=augment, crop_scale=crop_scale, auto_augment=auto_augment, reprob=reprob, mixup=mixup,
                cutmix=cutmix, ema=ema, ema_warmup=ema_warmup, clip_grad=clip_grad, compile=compile,
                channels_last=channels_last, amp=amp, seed=seed, workers=workers, cache=cache, val_split=val_split,
                device=str(dev), freeze_backbone=freeze_backbone, init_weights=str(init) if init else None,
                sync_bn=sync_bn, exclude=str(exclude) if exclude else None, split=str(split) if split else None,
            )
            if rho is not None:
                resolution = resolution_for_rho(rho)
            trainer, run = _new_run(opts, auto_batch=batch_size == "auto", alpha=alpha, resolution=resolution,
                                    activation=activation, dropout=dropout, init=init, out=out, dev=dev, ctx=ctx,
                                    recipe=config)
        _run(trainer, run)
    finally:
        distributed.teardown()


def _batch_size(text: str, dev) -> int:
    if text == "auto":
        if dev.type != "cuda":
            raise UserError(f"--batch-size auto measures GPU memory; on the CPU give a number ({DEFAULTS.batch_size} "
                            f"is the default)")
        return DEFAULTS.batch_size  # replaced by the measurement once the model is known
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--batch-size must be a whole number or auto, got {text!r}") from None


def _new_run(opts, *, auto_batch, alpha, resolution, activation, dropout, init, out, dev, ctx, recipe=None):
    """The Trainer of a new run and its RunDir (made by rank 0; None on the other ranks)."""
    import dataclasses

    import torch

    from mobilenet_fn import distributed
    from mobilenet_fn.data import DEFAULT_RESOLUTION
    from mobilenet_fn.model import Config, with_classifier_for
    from mobilenet_fn.rundir import RunDir, default_run_dir, taken
    from mobilenet_fn.train import Trainer

    if opts.freeze_backbone and init is None:
        raise UserError("--freeze-backbone needs --init weights.pkl (a backbone worth keeping)")
    if out is not None and out.exists():  # said before the data is loaded; RunDir.create checks again
        raise UserError(taken(out))
    start = _load_init(init, alpha=alpha, activation=activation) if init else None
    if start is not None and resolution is None and opts.data not in DEFAULT_RESOLUTION:
        resolution = start.preprocess["resolution"]
    dataset = _prepared_data(opts, resolution, dev)
    base = start.config if start else Config(alpha=DEFAULT_ALPHA if alpha is None else alpha,
                                             activation=activation or "relu")
    cfg = dataclasses.replace(base, resolution=dataset.preprocess["resolution"], num_classes=len(dataset.classes),
                              dropout=dropout)
    if auto_batch:
        opts = dataclasses.replace(opts, batch_size=distributed.broadcast_object(_largest_batch(cfg, opts, dev), ctx))
    trainer = Trainer(cfg, opts, dataset, dev, dist=ctx)
    if start is None:
        trainer.start_fresh()
    else:
        params = with_classifier_for(cfg, start.params, torch.Generator().manual_seed(opts.seed))
        trainer.start_fresh((params, start.state))
    # Rank 0 picks and makes the run folder; the others learn whether that worked.
    run, problem = None, None
    if ctx.main:
        try:
            run = RunDir.create(out or default_run_dir(opts.data, cfg), split={"data": opts.data, **dataset.split},
                                config={"model": cfg.to_dict(), "train": dataclasses.asdict(opts),
                                        "classes": dataset.classes, "preprocess": dataset.preprocess,
                                        "recipe": str(recipe) if recipe else None})
        except FileExistsError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem, ctx)
    if problem:
        raise UserError(problem)
    return trainer, run


def _resume(run_dir: Path, epochs: int | None, dev, ctx):
    """The Trainer restored from the run's last checkpoint, and its RunDir (on rank 0; None on the others)."""
    import dataclasses

    from mobilenet_fn.checkpoint import run_options
    from mobilenet_fn.model import Config
    from mobilenet_fn.rundir import RunDir
    from mobilenet_fn.train import Trainer

    run = RunDir.open(run_dir)
    ckpt = run.load_last()
    opts = run_options(ckpt, str(dev))
    if epochs is not None:
        if epochs < ckpt["epoch"]:
            raise UserError(f"{run_dir} has already trained {ckpt['epoch']} epochs; --epochs must be at least that")
        opts = dataclasses.replace(opts, epochs=epochs)
    cfg = Config.from_dict(ckpt["config"])
    dataset = _prepared_data(opts, cfg.resolution, dev, classes=ckpt["classes"])
    trainer = Trainer(cfg, opts, dataset, dev, dist=ctx)
    trainer.restore(ckpt, best=run.load_best())
    if trainer.epoch >= opts.epochs and not trainer.progress.trained:  # trained: the last epoch's end is owed
        raise UserError(f"{run_dir} has finished its {trainer.epoch} epochs; raise --epochs to train more")
    return trainer, run if ctx.main else None


def _prepared_data(opts, resolution: int | None, dev, classes: list[str] | None = None):
    """The run's data set: loaded, re-split by --split, without what --exclude lists, its folders read through
    the decoded cache; each step said in a line. ``classes``: those a resumed run was trained on."""
    from mobilenet_fn import curation
    from mobilenet_fn import data as data_lib

    from .progress import through_cache

    with err.status("Loading data…"):
        dataset = data_lib.load(opts.data, resolution=resolution, val_split=opts.val_split, seed=opts.seed)
    if classes is not None and list(dataset.classes) != list(classes):
        raise UserError(f"the data's classes no longer match the run's ({opts.data})")
    _report_ignored(dataset.ignored)
    if opts.split:
        dataset = curation.with_split(dataset, opts.split)
        err.print(f"Split from {opts.split}: {len(dataset.train)} train, {len(dataset.val)} validation images")
    if opts.exclude:
        dataset, dropped = curation.exclude(dataset, opts.exclude)
        unknown = f"; {dropped['unknown']} listed file(s) are not in the data" if dropped["unknown"] else ""
        err.print(f"Excluded {dropped['train']} training and {dropped['val']} validation image(s) listed in "
                  f"{opts.exclude}{unknown}", highlight=False, soft_wrap=True)
    return through_cache(dataset, opts.cache, dev)


def _largest_batch(cfg, opts, dev) -> int:
    from mobilenet_fn.optim import make_optimizer
    from mobilenet_fn.step import device_policy, largest_batch

    optimizer = make_optimizer(opts.optimizer, weight_decay=opts.weight_decay, momentum=opts.momentum)
    policy = device_policy(dev, compile=opts.compile, channels_last=opts.channels_last, amp=opts.amp)
    with err.status("Finding the largest batch that fits…"):
        batch, peaks = largest_batch(cfg, optimizer, policy)
    for b, peak in peaks.items():
        err.print(f"  batch {b}: peak memory {peak / 2**30:.2f} GiB")
    err.print(f"--batch-size auto: {batch}")
    return batch


def _report_ignored(ignored: list[str]) -> None:
    """Files in the class folders that are not images are left out of training: say so, as resize does."""
    if ignored:
        from rich.markup import escape

        err.print(escape(f"Ignored {len(ignored)} file(s) that are not images, e.g. {ignored[0]}"), highlight=False,
                  soft_wrap=True)


def _load_init(path: Path, *, alpha: float, activation: str):
    """The weights to fine-tune from; architecture flags that contradict the file are an error."""
    from mobilenet_fn.weights import load_weights

    start = load_weights(path)
    given = {"alpha": alpha, "activation": activation}
    clashes = [f"--{k} {v} (the file has {getattr(start.config, k)})" for k, v in given.items()
               if v is not None and v != getattr(start.config, k)]
    if clashes:
        raise UserError(f"{path}: the architecture comes from the weights; drop {', '.join(clashes)}")
    return start


def _run(trainer, run) -> None:
    """Trains, with ``run`` (the RunDir, None on ranks other than 0) writing what each epoch hands over."""
    from rich.markup import escape

    from mobilenet_fn.train import CheckpointEvent, EpochEvent, NonFiniteLoss

    from .progress import TrainProgress

    view = TrainProgress(enabled=run is not None)
    with sigterm_interrupts():  # until the checkpoint of an interruption is written
        try:
            with view:
                for event in trainer.run():
                    if run is not None and isinstance(event, CheckpointEvent):
                        run.save_epoch(event.checkpoint, event.weights)
                    elif run is not None and isinstance(event, EpochEvent):
                        run.append_metrics(event.metrics)
                    view.show(event)
        except KeyboardInterrupt as e:
            if run is not None:
                path = run.save_last(trainer.checkpoint())
                err.print(escape(f"Interrupted. Saved {path}; continue with: mobilenet-fn train --resume {run.path}"),
                          highlight=False, soft_wrap=True)
            raise typer.Exit(143 if isinstance(e, Terminated) else 130)
        except NonFiniteLoss as e:
            fail(str(e), code=1)
    if run is None:
        return
    run.plot_curves()
    best, last = trainer.best, run.metrics[-1]
    line = f"Best val top-1 {100 * best['val_top1']:.2f}% (epoch {best['epoch']})"
    if "test_top1" in last:
        line += f", test top-1 {100 * last['test_top1']:.2f}%"
    err.print(f"{line}. Weights: {run.weights_path}")
    if trainer.skipped:
        err.print(f"Skipped {len(trainer.skipped)} unreadable image(s), e.g. {sorted(trainer.skipped)[0]}")
    err.print(f"Evaluate with: mobilenet-fn eval {run.weights_path}")
