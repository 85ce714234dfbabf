"""A training run's options and their choices: the one place a default is written.

``train``'s command line takes its defaults from ``TrainOptions``, the library's modules their lists of choices from
here. This module imports nothing (no torch), so that the command line can read it before it needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("rmsprop", "sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("crop-flip", "none")
AUTO_AUGMENTS = ("none", "trivial")
COMPILE_CHOICES = ("auto", "on", "cudagraphs", "off")
SWITCH_CHOICES = ("auto", "on", "off")
AMP_CHOICES = ("auto", "bf16", "off")
CACHE_MODES = ("auto", "ram", "disk", "off")

CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "augment": AUGMENTS, "auto_augment": AUTO_AUGMENTS,
           "compile": COMPILE_CHOICES, "channels_last": SWITCH_CHOICES, "amp": AMP_CHOICES, "cache": CACHE_MODES}

DEFAULT_ALPHA = 0.5  # train's width multiplier (the model's own default, Config.alpha, is the paper's 1.0)

# The least share of the image's area a random resized crop holds (the most is all of it); the paper used less
# augmentation than Inception's 0.08.
CROP_SCALE = 0.25


@dataclass
class TrainOptions:
    """Everything about a run except the architecture (``Config``) and the data; checked on creation."""

    data: str = "sample"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"  # with Nesterov momentum
    schedule: str = "cosine"  # with warmup
    warmup_epochs: float = 1.0
    weight_decay: float = 4e-5  # on conv, pointwise and classifier weights only (paper §4)
    momentum: float = 0.9
    label_smoothing: float = 0.1
    augment: str = "crop-flip"
    crop_scale: float = CROP_SCALE
    auto_augment: str = "none"  # or "trivial" (TrivialAugment-Wide)
    reprob: float = 0.0  # random erasing probability
    mixup: float = 0.0  # Beta alpha of mixup (0: off)
    cutmix: float = 0.0  # Beta alpha of cutmix (0: off)
    ema: float = 0.0  # decay of the weight EMA (0: off); validation and the weights then use the average
    ema_warmup: bool = True  # timm's warmup of the EMA decay
    clip_grad: float = 0.0  # global gradient norm bound (0: off)
    compile: str = "auto"
    channels_last: str = "auto"
    amp: str = "auto"  # bf16 on CUDA and on CPUs that compute it natively
    seed: int = 0
    workers: int = 2  # DataLoader workers, for image folders with cache "off"
    cache: str = "auto"  # image folders: decoded once into a uint8 cache (auto | ram | disk), or off (workers)
    val_split: float = 0.2
    device: str = "cpu"
    freeze_backbone: bool = False
    init_weights: str | None = None
    sync_bn: bool = False
    exclude: str | None = None  # a list of files to leave out (audit's issues.csv, or paths one per line)
    split: str | None = None  # a split.json (audit --fix-split) that re-splits a folder of class folders

    def __post_init__(self):
        problems = [p for p in _problems(self) if p]
        if problems:
            raise ValueError("; ".join(problems))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _problems(o: TrainOptions):
    """What is wrong with ``o``: one message per problem, a false value where there is none."""
    yield o.epochs < 1 and f"--epochs must be at least 1, got {o.epochs}"
    yield o.batch_size < 2 and f"--batch-size must be at least 2 (BatchNorm needs a batch), got {o.batch_size}"
    yield not o.lr > 0 and f"--lr must be > 0, got {o.lr}"
    for name, allowed in CHOICES.items():
        value = getattr(o, name)
        yield value not in allowed and f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}"
    yield o.weight_decay < 0 and f"--weight-decay must be >= 0, got {o.weight_decay}"
    yield not 0 <= o.label_smoothing < 1 and f"--label-smoothing must be in [0, 1), got {o.label_smoothing}"
    yield not 0 < o.crop_scale <= 1 and f"--crop-scale must be in (0, 1], got {o.crop_scale}"
    yield not 0 <= o.reprob <= 1 and f"--reprob must be in [0, 1], got {o.reprob}"
    for name in ("mixup", "cutmix", "clip_grad"):
        value = getattr(o, name)
        yield value < 0 and f"{_flag(name)} must be >= 0 (0: off), got {value}"
    yield not 0 <= o.ema < 1 and f"--ema must be a decay in [0, 1) (0: off; e.g. 0.9998), got {o.ema}"
    yield (o.compile == "cudagraphs" and not o.device.startswith("cuda")
           and "--compile cudagraphs needs a CUDA device (--device cuda)")
    yield o.workers < 0 and f"--workers must be >= 0, got {o.workers}"


DEFAULTS = TrainOptions()
