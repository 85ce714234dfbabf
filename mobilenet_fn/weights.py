"""The ``.pkl`` weights format and training checkpoints: writing them atomically, reading them safely.

A weights file is ``torch.save`` of a plain dict, nothing but tensors and Python values::

    {"format": "mobilenet-fn/1", "config": {...Config fields...}, "params": tree, "state": tree,
     "classes": [str, ...], "preprocess": {...}, "data": dict | None, "metrics": dict | None}

It is read only with ``torch.load(weights_only=True)``, which never runs code from the file. Before that, the
pickle's opcodes are read (not executed) so that a file carrying Python objects is refused with a message that
names what it would have imported. Every problem is a ``WeightsError`` of one line: ``"<path>: <what is wrong>"``.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_map

from .files import atomic_write
from .model import Config, init

FORMAT = "mobilenet-fn/1"
CHECKPOINT_FORMAT = "mobilenet-fn-checkpoint/1"
PREPROCESS_KEYS = ("resolution", "resize", "crop_pct", "interpolation", "mean", "std")
CHECKPOINT_KEYS = ("config", "params", "state", "opt_state", "classes", "preprocess", "data", "metrics", "epoch",
                   "step", "batch_in_epoch", "rng", "run")


class WeightsError(ValueError):
    """A weights or checkpoint file that cannot be used; the message is one line: ``"<path>: <problem>"``."""


class Weights(NamedTuple):
    config: Config
    params: dict
    state: dict
    classes: list[str]
    preprocess: dict
    data: dict | None = None
    metrics: dict | None = None


# ---------------------------------------------------------------------------------------------------------------
# Writing


def atomic_save(obj, path: str | Path, *, overwrite: bool = True) -> None:
    """``torch.save(obj, path)`` through ``atomic_write``: the file appears whole, flushed to disk, or not at all."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite)


def _cpu(tree):
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, tree)


def save_weights(path: str | Path, weights: Weights, *, overwrite: bool = True) -> None:
    """Writes ``weights`` (tensors moved to the CPU) atomically. The content is checked first, so a file that
    ``load_weights`` would refuse is never written."""
    payload = {
        "format": FORMAT,
        "config": weights.config.to_dict(),
        "params": _cpu(weights.params),
        "state": _cpu(weights.state),
        "classes": list(weights.classes),
        "preprocess": dict(weights.preprocess),
        "data": weights.data,
        "metrics": weights.metrics,
    }
    problem = _problem(payload)
    if problem:
        raise WeightsError(f"{path}: not written: {problem}")
    try:
        atomic_save(payload, path, overwrite=overwrite)
    except FileExistsError:
        raise WeightsError(f"{path}: already exists, not replaced") from None


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """Writes a training checkpoint atomically (``format`` is set here)."""
    atomic_save({**ckpt, "format": CHECKPOINT_FORMAT}, path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_weights(path: str | Path) -> Weights:
    """Reads and checks a weights file: format, config, the exact structure and shapes of the parameter trees
    that the config implies, classes and preprocessing."""
    return weights_from_dict(read_torch_file(path), path)


def load_checkpoint(path: str | Path) -> dict:
    """Reads a training checkpoint and checks its format, keys, config and parameter trees."""
    return checkpoint_from_dict(read_torch_file(path), path)


def weights_from_dict(obj: dict, path: str | Path) -> Weights:
    """The checked ``Weights`` of a dict read from ``path`` (named in errors)."""
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        raise WeightsError(f"{path}: is a training checkpoint, not weights; make weights from it with "
                           f"`mobilenet-fn convert {path} -o weights.pkl`")
    if fmt != FORMAT:
        raise WeightsError(f"{path}: {_format_problem(fmt, FORMAT)}")
    problem = _problem(obj)
    if problem:
        raise WeightsError(f"{path}: {problem}")
    return _weights(obj)


def checkpoint_from_dict(obj: dict, path: str | Path) -> dict:
    """``obj`` itself once checked as a training checkpoint read from ``path`` (named in errors)."""
    fmt = obj.get("format")
    if fmt == FORMAT:
        raise WeightsError(f"{path}: is a weights file, not a training checkpoint")
    if fmt != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path}: {_format_problem(fmt, CHECKPOINT_FORMAT)}")
    missing = [k for k in CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise WeightsError(f"{path}: checkpoint lacks {', '.join(missing)}")
    problem = _problem(obj)
    if problem:
        raise WeightsError(f"{path}: {problem}")
    return obj


def weights_from_checkpoint(ckpt: dict) -> Weights:
    """The inference part of a checkpoint (the optimizer state, step counters and RNG states are dropped)."""
    return _weights(ckpt)


def _weights(obj: dict) -> Weights:
    return Weights(Config.from_dict(obj["config"]), obj["params"], obj["state"], list(obj["classes"]),
                   dict(obj["preprocess"]), obj.get("data"), obj.get("metrics"))


def _format_problem(found, expected: str) -> str:
    if found is None:
        return ("not a mobilenet-fn file (it has no format field); for a timm or Hugging Face state dict, "
                "run `mobilenet-fn convert` on it")
    if isinstance(found, str) and found.split("/")[0] == expected.split("/")[0]:
        return f"format {found!r} is not one this version reads ({expected!r}); upgrade mobilenet-fn"
    return f"unknown format {found!r} (expected {expected!r})"


def read_torch_file(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` of a file that must hold a dict, after ``refuse_code``; every failure is
    a one-line WeightsError."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    refuse_code(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch says about a bad file, the user gets one line
        raise WeightsError(f"{path}: {_torch_load_problem(path, e)}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _torch_load_problem(path: Path, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    if zipfile.is_zipfile(path) or "zip" in str(error).lower():
        return "is damaged or truncated (its zip archive cannot be read)"
    return "is not a file written by torch.save (or it is truncated)"


def _problem(obj: dict) -> str | None:
    """What is wrong with the content of a weights dict or checkpoint, or None."""
    try:
        cfg = Config.from_dict(obj.get("config"))
    except (TypeError, ValueError, AttributeError) as e:
        return f"invalid config: {e}"
    problem = trees_problem(cfg, obj.get("params"), obj.get("state"))
    if problem:
        return problem
    classes = obj.get("classes")
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of names"
    if len(classes) != cfg.num_classes:
        return f"{len(classes)} class names for {cfg.num_classes} classes"
    preprocess = obj.get("preprocess")
    if not isinstance(preprocess, dict):
        return "preprocess is missing"
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        return f"preprocess lacks {', '.join(missing)}"
    return None


def _describe(cfg: Config) -> str:
    flags = [name for name in ("full_conv", "shallow") if getattr(cfg, name)]
    return ", ".join([f"alpha={cfg.alpha:g}", f"{cfg.num_classes} classes", *flags])


def trees_problem(cfg: Config, params, state) -> str | None:
    """How ``params`` and ``state`` differ from the trees ``init(cfg)`` makes, or None. The reference is made on
    the meta device: shapes without data, at no cost."""
    with torch.device("meta"):
        expected = init(cfg)
    for name, tree, want in (("params", params, expected[0]), ("state", state, expected[1])):
        problem = _tree_problem(name, tree, want)
        if problem:
            return f"{problem} (config: {_describe(cfg)})"
    return None


def _tree_problem(name: str, tree, expected) -> str | None:
    """How ``tree`` differs from ``expected`` in structure, shapes or being floating-point tensors, or None."""
    try:
        leaves, _ = tree_flatten_with_path(tree)
    except Exception:  # an unflattenable value is just "not a tree"
        return f"{name} is not a tree of tensors"
    got = {keystr(k): v for k, v in leaves}
    want = {keystr(k): v for k, v in tree_flatten_with_path(expected)[0]}
    missing = [k for k in want if k not in got]
    if missing:
        return f"{name}{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = [k for k in got if k not in want]
    if extra:
        return f"{name}{extra[0]} is not part of the model" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for key, w in want.items():
        t = got[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return f"{name}{key} is not a floating-point tensor"
        if t.shape != w.shape:
            return f"{name}{key} has shape {tuple(t.shape)}, the config implies {tuple(w.shape)}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Refusing pickled code without running it


def refuse_code(path: str | Path) -> None:
    """Raises a WeightsError if the file's pickle imports anything beyond tensors and plain containers (a whole
    ``nn.Module``, or a payload that would run a command): found by reading the opcodes, never executing them."""
    unsafe = [g for g in pickle_globals(path) if not _allowed(g)]
    if unsafe:
        raise WeightsError(
            f"{path}: refused: it is a pickled Python object that imports {unsafe[0]}, and unpickling it would run "
            f"code; where you trust its code, load it there and save `model.state_dict()` (or safetensors), then "
            f"convert that"
        )


def pickle_globals(path: str | Path) -> list[str]:
    """The ``module.name`` of every global a pickle (plain, or the data.pkl of a torch zip archive) would import.
    A global whose name cannot be read statically is listed as ``"?"``."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, OSError, EOFError):
            return []  # torch.load reports the damage
    else:
        blobs = [path.read_bytes()]
    return [g for blob in blobs for g in _globals_in(blob)]


_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}


def _globals_in(blob: bytes) -> list[str]:
    """Walks the pickles in ``blob`` one after another (torch's legacy format is several), collecting the globals.
    Only pushes of strings and the memo are followed, enough to name the argument of STACK_GLOBAL."""
    found: list[str] = []
    stream = io.BytesIO(blob)
    while stream.tell() < len(blob):
        pushed: list = []  # what the last opcodes pushed: a string, or None for anything else
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(".".join(arg.split(" ", 1)))
                elif name == "STACK_GLOBAL":
                    module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
                    found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
                elif name.startswith("EXT"):
                    found.append("?")
                elif name in _STRING_OPS:
                    pushed.append(arg)
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(None)
        except Exception:  # past the last pickle (raw tensor bytes) or garbage: stop reading
            break
    return found


_TORCH_NAMES = {"Size", "device"}


def _allowed(name: str) -> bool:
    """The globals a torch.save of tensors and plain containers needs: tensor and storage rebuilding, dtypes."""
    module, _, attr = name.rpartition(".")
    if name in ("collections.OrderedDict", "_codecs.encode", "torch._utils._rebuild_tensor_v2",
                "torch._utils._rebuild_parameter", "torch._utils._rebuild_tensor"):
        return True
    if module == "torch":
        return attr.endswith("Storage") or attr in _TORCH_NAMES or isinstance(getattr(torch, attr, None), torch.dtype)
    return False
