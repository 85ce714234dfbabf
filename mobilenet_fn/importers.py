"""Importers: a training checkpoint, timm or Hugging Face weights -> ``Weights`` (what ``convert`` writes).

Each importer maps a foreign state dict onto this project's (params, state) trees; the layouts differ only in
naming and in the 1x1 and depthwise kernels' trailing singleton axes, which einops strips. Neither importer
needs timm or transformers: a state dict and (for Hugging Face) its ``config.json`` are enough. Optional
packages (safetensors, huggingface_hub) are imported where they are used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from einops import rearrange

from . import layers
from .extras import require
from .model import Config
from .preprocess import preprocess_for
from .checkpoint import checkpoint_from_dict, weights_from_checkpoint
from .weights import (
    CHECKPOINT_FAMILY, FORMAT, Weights, WeightsError, read_torch_file, shown, trees_problem, weights_from_dict,
)

KINDS = ("auto", "checkpoint", "timm", "hf")
INCEPTION_STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # timm's and Google's (-1..1 inputs)
TIMM_CROP_PCT = {1.0: 0.875, 1.25: 0.9}  # timm's pretrained_cfg of mobilenetv1_100 and mobilenetv1_125
TF_BN_DECAY = 0.9997  # TF-slim's batch_norm_decay: the weight of the *old* running statistics
HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resampling codes in preprocessor_config.json
HF_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".pkl", ".pth", ".pt", ".bin", ".ckpt", ".safetensors")


# ---------------------------------------------------------------------------------------------------------------
# State dicts -> trees


class _Taker:
    """Hands out a state dict's tensors by name, as float32 copies, and remembers which were taken."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd, self.taken = sd, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"missing {key}")
        if not isinstance(self.sd[key], torch.Tensor):
            raise ValueError(f"{key} is not a tensor")
        self.taken.add(key)
        return self.sd[key].detach().float().clone()

    def bn(self, prefix: str) -> tuple[dict, dict]:
        params = {"weight": self(f"{prefix}.weight"), "bias": self(f"{prefix}.bias")}
        state = {"mean": self(f"{prefix}.running_mean"), "var": self(f"{prefix}.running_var")}
        return params, state

    def check_all_taken(self) -> None:
        left = [str(k) for k in self.sd if k not in self.taken and not str(k).endswith("num_batches_tracked")]
        if left:
            more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
            raise ValueError(f"holds {', '.join(left[:3])}{more}, which MobileNet v1 does not have")


def _numeric_key(prefix: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", prefix))


def _block(take: _Taker, dw: str, dw_bn: str, pw: str, pw_bn: str) -> tuple[dict, dict]:
    """One separable block from the names of its depthwise conv, its BN, its pointwise conv and its BN."""
    dw_bn_p, dw_bn_s = take.bn(dw_bn)
    pw_bn_p, pw_bn_s = take.bn(pw_bn)
    params = {
        "dw": {"weight": rearrange(take(dw), "c 1 kh kw -> c kh kw")},
        "dw_bn": dw_bn_p,
        "pw": {"weight": rearrange(take(pw), "o i 1 1 -> o i")},
        "pw_bn": pw_bn_p,
    }
    return params, {"dw_bn": dw_bn_s, "pw_bn": pw_bn_s}


def _trees(take: _Taker, stem_conv: str, stem_bn: str, blocks: list[tuple[str, str, str, str]], fc: str):
    stem_bn_p, stem_bn_s = take.bn(stem_bn)
    params = {"stem": {"conv": {"weight": take(stem_conv)}, "bn": stem_bn_p}, "blocks": []}
    state = {"stem": {"bn": stem_bn_s}, "blocks": []}
    for names in blocks:
        p, s = _block(take, *names)
        params["blocks"].append(p)
        state["blocks"].append(s)
    params["fc"] = {"weight": take(f"{fc}.weight"), "bias": take(f"{fc}.bias")}
    take.check_all_taken()
    return params, state


def from_timm(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """timm ``mobilenetv1_*`` state dict -> (params, state). Keys: conv_stem, bn1, blocks.S.B.{conv_dw, bn1,
    conv_pw, bn2}, classifier. A missing or unexpected key is a ValueError."""
    prefixes = sorted((k[: -len(".conv_dw.weight")] for k in sd if k.endswith(".conv_dw.weight")), key=_numeric_key)
    blocks = [(f"{p}.conv_dw.weight", f"{p}.bn1", f"{p}.conv_pw.weight", f"{p}.bn2") for p in prefixes]
    return _trees(_Taker(sd), "conv_stem.weight", "bn1", blocks, "classifier")


def timm_config(sd: dict[str, torch.Tensor]) -> Config:
    """The Config of a timm ``mobilenetv1_*`` state dict: ReLU6, symmetric padding, PyTorch BatchNorm; the width
    from the classifier's input (1024·α), the classes from its output."""
    if "classifier.weight" not in sd:
        raise ValueError("missing classifier.weight (a timm model made with num_classes=0 has no classifier)")
    n_classes, features = sd["classifier.weight"].shape
    return Config(alpha=features / 1024, num_classes=n_classes, activation="relu6", padding="torch")


def _hf_field(hf_config, name: str, default=None):
    return hf_config.get(name, default) if isinstance(hf_config, dict) else getattr(hf_config, name, default)


def hf_dropout(prob: float) -> float:
    """Hugging Face's port copied TF-slim's ``dropout_keep_prob=0.999`` into ``classifier_dropout_prob``, so a value
    above one half is read as a keep probability: 0.999 -> p = 0.001."""
    return round(1.0 - prob, 6) if prob > 0.5 else float(prob)


def from_hf(state_dict: dict[str, torch.Tensor], hf_config) -> tuple[Config, dict, dict]:
    """transformers' ``MobileNetV1ForImageClassification`` (its state dict and its config, as the ``config.json``
    dict or a ``MobileNetV1Config``) -> (Config, params, state). Keys: mobilenet_v1.conv_stem.{convolution,
    normalization}, mobilenet_v1.layer.N.{convolution, normalization} (even N depthwise, odd N pointwise),
    classifier. BatchNorm momentum is TF's decay turned into PyTorch's convention (1 - 0.9997)."""
    act = _hf_field(hf_config, "hidden_act", "relu6")
    if act not in layers.ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported (only {', '.join(layers.ACTIVATIONS)})")
    size = _hf_field(hf_config, "image_size", 224)
    base = "mobilenet_v1"
    n_layers = len([k for k in state_dict if re.fullmatch(rf"{base}\.layer\.\d+\.convolution\.weight", k)])
    blocks = [(f"{base}.layer.{i}.convolution.weight", f"{base}.layer.{i}.normalization",
               f"{base}.layer.{i + 1}.convolution.weight", f"{base}.layer.{i + 1}.normalization")
              for i in range(0, n_layers, 2)]
    params, state = _trees(_Taker(state_dict), f"{base}.conv_stem.convolution.weight",
                           f"{base}.conv_stem.normalization", blocks, "classifier")
    cfg = Config(
        alpha=float(_hf_field(hf_config, "depth_multiplier", 1.0)),
        resolution=int(size if isinstance(size, int) else size[0]),
        num_classes=params["fc"]["weight"].shape[0],
        in_channels=int(_hf_field(hf_config, "num_channels", 3)),
        activation=act,
        padding="tf" if _hf_field(hf_config, "tf_padding", True) else "torch",
        bn_eps=float(_hf_field(hf_config, "layer_norm_eps", 1e-3)),
        bn_momentum=round(1.0 - TF_BN_DECAY, 6),
        dropout=hf_dropout(float(_hf_field(hf_config, "classifier_dropout_prob", 0.0))),
    )
    return cfg, params, state


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's bundled weight metadata (no download)."""
    from torchvision.models import MobileNet_V3_Small_Weights

    return list(MobileNet_V3_Small_Weights.IMAGENET1K_V1.meta["categories"])


# ---------------------------------------------------------------------------------------------------------------
# Files -> Weights


def read_classes_file(path: str | Path) -> list[str]:
    """One class name per line, in label order; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file of class names") from None
    return [line.strip() for line in lines if line.strip()]


def convert_file(src: str | Path, kind: str = "auto", classes: list[str] | None = None,
                 drop_background: bool = False) -> Weights:
    """Weights from a training checkpoint, a mobilenet-fn weights file, a timm state dict (.pth, .bin,
    .safetensors), a Hugging Face folder written by ``save_pretrained`` or a hub id. ``kind`` "auto" tells them
    apart by their content. ``classes`` replaces the class names; ``drop_background`` turns Google's 1001 classes
    into ImageNet's 1000. Every problem is a one-line ValueError naming ``src``."""
    if kind not in KINDS:
        raise ValueError(f"--from must be one of {', '.join(KINDS)}, got {kind!r}")
    path = _local(src, kind)
    if path.is_dir():
        if kind not in ("auto", "hf"):
            raise WeightsError(f"{path}: is a folder; only a Hugging Face model (--from hf) is read from a folder")
        weights = _from_hf_folder(path)
    else:
        weights = _from_file(path, kind)
    if drop_background:
        weights = _drop_background(weights, path)
    if classes is not None:
        if len(classes) != weights.config.num_classes:
            raise ValueError(f"{len(classes)} class names given for a model with {weights.config.num_classes} classes")
        weights = weights._replace(classes=list(classes))
    return weights


def _local(src: str | Path, kind: str) -> Path:
    """``src`` as a local path; a Hugging Face hub id is fetched first."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if kind in ("auto", "hf") and HUB_ID.fullmatch(str(src)) and not str(src).endswith(WEIGHT_SUFFIXES):
        return _hub_download(str(src))
    raise FileNotFoundError(f"{src}: no such file or folder")


def _hub_download(repo_id: str) -> Path:
    hub = require("huggingface_hub", "fetching a model from the Hugging Face hub", "convert")
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=list(HF_FILES)))
    except Exception as e:  # offline, no such repository, no access: one line either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(f"{repo_id}: no such file or folder, and not fetched from the Hugging Face hub "
                                f"({reason})") from None


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        st = require("safetensors.torch", "reading .safetensors files", "convert")
        try:
            return st.load_file(str(path))
        except Exception as e:  # a damaged or foreign file
            raise WeightsError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    return read_torch_file(path)


def _unwrap(obj: dict) -> dict:
    """A state dict inside a training script's checkpoint ({"state_dict": ...} or {"model": ...}), without the
    "module." prefix that DistributedDataParallel adds."""
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in obj.items()}


def _sniff(obj: dict) -> str:
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith(CHECKPOINT_FAMILY):
        return "checkpoint"
    if fmt == FORMAT:
        return "weights"
    if "conv_stem.weight" in obj:
        return "timm"
    if "mobilenet_v1.conv_stem.convolution.weight" in obj:
        return "hf"
    return "unknown"


def _from_file(path: Path, kind: str) -> Weights:
    obj = _read_state_dict(path)
    if "format" not in obj:
        obj = _unwrap(obj)
    found = _sniff(obj)
    if found == "unknown":
        first = next(iter(obj), "nothing")
        raise WeightsError(f"{path}: not a MobileNet v1 state dict (timm or Hugging Face) nor a mobilenet-fn "
                           f"checkpoint or weights file (its first key is {shown(first)})")
    if kind != "auto" and kind != found and not (kind == "checkpoint" and found == "weights"):
        raise WeightsError(f"{path}: --from {kind} given, but this is a {found} file")
    try:
        if found == "checkpoint":
            return weights_from_checkpoint(checkpoint_from_dict(obj, path))
        if found == "weights":
            return weights_from_dict(obj, path)
        if found == "timm":
            return _from_timm_state(obj)
        return _from_hf_state(obj, _hf_config_beside(path))
    except WeightsError:
        raise
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def _checked(cfg: Config, params: dict, state: dict) -> None:
    """The importer's trees have exactly the shapes the config implies (else a ValueError naming the first
    difference), so a state dict of another width or depth is caught here, not in the first forward pass."""
    problem = trees_problem(cfg, params, state)
    if problem:
        raise ValueError(f"does not fit MobileNet v1: {problem}")


def _from_timm_state(sd: dict) -> Weights:
    cfg = timm_config(sd)
    params, state = from_timm(sd)
    _checked(cfg, params, state)
    crop_pct = TIMM_CROP_PCT.get(cfg.alpha, 0.875)
    preprocess = preprocess_for(cfg.resolution, crop_pct=crop_pct, stats=INCEPTION_STATS, interpolation="bicubic")
    return Weights(cfg, params, state, _default_classes(cfg.num_classes), preprocess)


def _hf_config_beside(path: Path) -> dict:
    config = path.parent / "config.json"
    if not config.is_file():
        raise ValueError("a Hugging Face state dict needs its config.json: give the folder written by "
                         "save_pretrained (config.json beside the weights)")
    return json.loads(config.read_text())


def _from_hf_state(sd: dict, hf_config: dict, preprocessor: dict | None = None) -> Weights:
    cfg, params, state = from_hf(sd, hf_config)
    _checked(cfg, params, state)
    names = _hf_names(hf_config, cfg.num_classes)
    return Weights(cfg, params, state, names or _default_classes(cfg.num_classes),
                   _hf_preprocess(cfg.resolution, preprocessor or {}))


def _from_hf_folder(folder: Path) -> Weights:
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError(f"{folder}: no config.json; give a folder written by save_pretrained")
    try:
        hf_config = json.loads(config.read_text())
        pre_file = folder / "preprocessor_config.json"
        preprocessor = json.loads(pre_file.read_text()) if pre_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{folder}: unreadable JSON ({e})") from None
    if hf_config.get("model_type", "mobilenet_v1") != "mobilenet_v1":
        raise WeightsError(f"{folder}: model_type is {hf_config['model_type']!r}, not mobilenet_v1")
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not files:
        raise WeightsError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
    sd = _read_state_dict(files[0])
    try:
        return _from_hf_state(sd, hf_config, preprocessor)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: {e}") from None


def _hf_preprocess(resolution: int, pre: dict) -> dict:
    """Hugging Face's image processor for MobileNetV1: short side 256, centre crop 224, bilinear, mean/std 0.5;
    the folder's preprocessor_config.json, when there is one, says otherwise."""
    crop = pre.get("crop_size", {})
    resolution = int(crop.get("height", resolution)) if isinstance(crop, dict) else int(crop or resolution)
    out = preprocess_for(resolution, crop_pct=0.875, stats={"mean": pre.get("image_mean", INCEPTION_STATS["mean"]),
                                                           "std": pre.get("image_std", INCEPTION_STATS["std"])},
                         interpolation=HF_RESAMPLE.get(pre.get("resample"), "bilinear"))
    resize = pre.get("size", {}).get("shortest_edge") if isinstance(pre.get("size"), dict) else None
    if resize:
        out.update(resize=int(resize), crop_pct=resolution / int(resize))
    return out


def _default_classes(n: int) -> list[str]:
    if n == 1000:
        return imagenet_classes()
    if n == 1001:
        return ["background", *imagenet_classes()]
    return [f"class {i}" for i in range(n)]


def _hf_names(hf_config: dict, n: int) -> list[str] | None:
    """The config's id2label when it names every class with something better than LABEL_i, for other than the
    ImageNet class counts (whose names come from torchvision)."""
    labels = hf_config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(n)]
    if n in (1000, 1001) or None in names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return [str(name) for name in names]


def _drop_background(weights: Weights, path: Path) -> Weights:
    """Google's 1001 classes (0 = background) -> ImageNet's 1000: the classifier's first row goes."""
    if weights.config.num_classes != 1001:
        raise WeightsError(f"{path}: --drop-background needs a 1001-class model (background at index 0), "
                           f"this one has {weights.config.num_classes} classes")
    fc = {"weight": weights.params["fc"]["weight"][1:].clone(), "bias": weights.params["fc"]["bias"][1:].clone()}
    return weights._replace(config=weights.config.replace(num_classes=1000), params={**weights.params, "fc": fc},
                            classes=weights.classes[1:])
