"""The ``.pkl`` weights format: writing it atomically, reading it safely, and the checks of its fields, which
training checkpoints (``checkpoint.py``) share.

A weights file is ``torch.save`` of a plain dict, nothing but tensors and Python values::

    {"format": "mobilenet-fn/1", "config": {...Config fields...}, "params": tree, "state": tree,
     "classes": [str, ...], "preprocess": {...}, "data": dict | None, "metrics": dict | None}

It is read only with ``torch.load(weights_only=True)``, which never runs code from the file. Before that, the
pickle's opcodes are read (not executed) so that a file carrying Python objects is refused with a message that
names what it would have imported. Every problem is a ``WeightsError`` of one line: ``"<path>: <what is wrong>"``.
"""

from __future__ import annotations

import functools
import io
import math
import pickletools
import types
import typing
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_map

from .files import atomic_write
from .model import Config, init

FORMAT = "mobilenet-fn/1"
CHECKPOINT_FAMILY = "mobilenet-fn-checkpoint/"  # checkpoint.FORMAT, and its older versions
PREPROCESS_KEYS = ("resolution", "resize", "crop_pct", "interpolation", "mean", "std")
WEIGHTS_KEYS = ("format", "config", "params", "state", "classes", "preprocess", "data", "metrics")
INTERPOLATIONS = ("bilinear", "bicubic")

# Bounds on what a file may hold. A file is read whole by torch.load, so its size already bounds the memory it
# takes; these bounds are about what is *described*: a pickle can refer to one object many times (its memo), so a
# few bytes can describe a list of a billion strings or a tree a thousand levels deep, and walking or printing
# that would never end. Real files stay far below: a run's ``data`` is its split, whose largest part is the list
# of validation paths (ImageNet's 1.28 M training images with --val-split 0.9 give 1.15 M paths of ~40
# characters); metrics are a flat dict; MobileNet's parameter trees have about 300 entries.
MAX_RESOLUTION = 2048  # the paper's models take 128-224 px; preprocessing resizes to at most 4x this
MAX_DEPTH = 8  # nesting of data and metrics (a split is 2 deep)
MAX_VALUES = 2_000_000  # values and containers in data or metrics, shared ones counted each time they appear
MAX_CHARS = 128 * 2**20  # characters of all strings and keys in data or metrics together
MAX_STRING = 100_000  # characters of one string
MAX_CLASS_NAME = 1_000  # characters of one class name
MAX_TREE_ENTRIES = 10_000  # containers and tensors in a parameter, state or optimizer tree
MAX_TREE_DEPTH = 8
MAX_INT = 2**63 - 1  # what a file's integers may reach (an int64)


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
    problem = content_problem(payload)
    if problem:
        raise WeightsError(f"{path}: not written: {problem}")
    try:
        atomic_save(payload, path, overwrite=overwrite)
    except FileExistsError:
        raise WeightsError(f"{path}: already exists, not replaced") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_weights(path: str | Path) -> Weights:
    """Reads and checks a weights file: format, config, the exact structure and shapes of the parameter trees
    that the config implies, classes and preprocessing."""
    return weights_from_dict(read_torch_file(path), path)


def weights_from_dict(obj: dict, path: str | Path) -> Weights:
    """The checked ``Weights`` of a dict read from ``path`` (named in errors)."""
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith(CHECKPOINT_FAMILY):
        raise WeightsError(f"{path}: is a training checkpoint, not weights; make weights from it with "
                           f"`mobilenet-fn convert {path} -o weights.pkl`")
    if fmt != FORMAT:
        raise WeightsError(f"{path}: {format_problem(fmt, FORMAT)}")
    problem = keys_problem(obj, WEIGHTS_KEYS, ("data", "metrics")) or content_problem(obj)
    if problem:
        raise WeightsError(f"{path}: {problem}")
    return weights_from_fields(obj)


def weights_from_fields(obj: dict) -> Weights:
    """The ``Weights`` of a file's fields, already checked."""
    return Weights(Config.from_dict(obj["config"]), obj["params"], obj["state"], list(obj["classes"]),
                   dict(obj["preprocess"]), obj.get("data"), obj.get("metrics"))


def format_problem(found, expected: str) -> str:
    if found is None:
        return ("not a mobilenet-fn file (it has no format field); for a timm or Hugging Face state dict, "
                "run `mobilenet-fn convert` on it")
    if isinstance(found, str) and found.split("/")[0] == expected.split("/")[0]:
        return f"format {shown(found)} is not one this version reads ({expected!r}); upgrade mobilenet-fn"
    return f"unknown format {shown(found)} (expected {expected!r})"


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters: for naming a hostile value in a message."""
    if isinstance(value, (dict, list, tuple, set, bytes, bytearray, torch.Tensor)):
        return f"a {type(value).__name__}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


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


def content_problem(obj: dict) -> str | None:
    """What is wrong with the content shared by weights files and checkpoints (config, parameter trees, classes,
    preprocessing, data, metrics), or None."""
    problem = _config_problem(obj.get("config"))
    if problem:
        return problem
    cfg = Config.from_dict(obj["config"])
    return trees_problem(cfg, obj.get("params"), obj.get("state")) or description_problem(obj, cfg)


def description_problem(obj: dict, cfg: Config | None = None) -> str | None:
    """What is wrong with what describes a model besides its parameters (config, classes, preprocessing, data,
    metrics; the ONNX files that ``export`` and ``quantize`` write carry these), or None. ``cfg``: the file's
    config, when already checked."""
    if cfg is None:
        problem = _config_problem(obj.get("config"))
        if problem:
            return problem
        cfg = Config.from_dict(obj["config"])
    problem = _classes_problem(obj.get("classes"), cfg) or _preprocess_problem(obj.get("preprocess"), cfg)
    if problem:
        return problem
    for name in ("data", "metrics"):
        value = obj.get(name)
        if value is not None and not isinstance(value, dict):
            return f"{name} must be a dict or None, not a {type(value).__name__}"
        problem = _plain_problem(name, value)
        if problem:
            return problem
    return _split_problem(obj.get("data"), obj["classes"])


def _split_problem(split, classes: list[str]) -> str | None:
    """What ``data.validation_source`` reads of the split a run recorded (``eval`` without ``--data``): the kind
    and root as strings; the validation folder's name, or (kind "split") paths under the root whose first part is
    a class folder."""
    if not split:
        return None
    for key in ("kind", "root"):
        if key in split and not isinstance(split[key], str):
            return f"data.{key} must be a string, not {shown(split[key])}"
    kind = split.get("kind")
    if kind in ("folders", "imagenette") and not isinstance(split.get("val"), str):
        return f"data.val must be the name of the validation folder, not {shown(split.get('val'))}"
    if kind == "split":
        val, names = split.get("val"), set(classes)
        if not isinstance(val, list) or not all(isinstance(rel, str) and rel.split("/", 1)[0] in names
                                                for rel in val):
            return "data.val must list validation images by their path under the root, in a class folder"
    return None


def keys_problem(obj: dict, allowed: tuple, optional: tuple = ()) -> str | None:
    """Every key of ``allowed`` present (but the ``optional`` ones), and nothing else."""
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        return f"unknown field {shown(unknown[0])}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
    missing = [k for k in allowed if k not in obj and k not in optional]
    if missing:
        return f"{missing[0]} is missing"
    return None


TYPE_NAMES = {bool: "true or false", int: "a 64-bit integer", float: "a finite number below 2**63", str: "a string",
              type(None): "None"}


def _plain_types(annotation) -> tuple[type, ...]:
    """The plain types a field's resolved annotation allows: ``int`` -> (int,); ``str | None`` and
    ``Optional[str]`` -> (str, NoneType)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def value_fits(value, kind: type) -> bool:
    """Whether ``value`` is a plain value of type ``kind`` (bool, int, float, str or None): numbers finite and
    within an int64, strings of bounded length; a bool is not a number."""
    if isinstance(value, bool) or kind is bool:
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and abs(value) <= MAX_INT
    if kind is float:
        return isinstance(value, (int, float)) and abs(value) <= MAX_INT and math.isfinite(value)
    if kind is str:
        return isinstance(value, str) and len(value) <= MAX_STRING
    return kind is type(None) and value is None


@functools.cache
def _field_types(cls) -> dict[str, tuple[type, ...]]:
    return {name: _plain_types(hint) for name, hint in typing.get_type_hints(cls).items()}


def fields_problem(name: str, d, cls) -> str | None:
    """``d`` is a dict of fields of dataclass ``cls`` (any may be left out), each a plain value of its annotated
    type."""
    if not isinstance(d, dict):
        return f"{name} must be a dict, not a {type(d).__name__}"
    fields = _field_types(cls)
    unknown = [k for k in d if k not in fields]
    if unknown:
        return f"unknown {name} keys: " + ", ".join(shown(k) for k in unknown[:3]) + (" …" if len(unknown) > 3 else "")
    for key, kinds in fields.items():
        if key in d and not any(value_fits(d[key], kind) for kind in kinds):
            return f"{name}.{key} must be {' or '.join(TYPE_NAMES[k] for k in kinds)}, not {shown(d[key])}"
    return None


def _config_problem(d) -> str | None:
    problem = fields_problem("config", d, Config)
    if problem:
        return f"invalid config: {problem}"
    try:
        cfg = Config.from_dict(d)
    except (TypeError, ValueError) as e:
        return f"invalid config: {e}"
    if cfg.resolution > MAX_RESOLUTION:
        return f"invalid config: resolution {cfg.resolution} is above {MAX_RESOLUTION}"
    return None


def _classes_problem(classes, cfg: Config) -> str | None:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of names"
    if len(classes) != cfg.num_classes:
        return f"{len(classes)} class names for {cfg.num_classes} classes"
    long = next((i for i, c in enumerate(classes) if len(c) > MAX_CLASS_NAME), None)
    if long is not None:
        return f"classes[{long}] is {len(classes[long]):,} characters long (at most {MAX_CLASS_NAME:,})"
    return None


def _number(value) -> bool:
    return value_fits(value, float)


def _preprocess_problem(pre, cfg: Config) -> str | None:
    """The eval preprocessing (see ``preprocess.preprocess_for``): exactly its keys, values that describe a crop of
    the model's resolution from a resize of at most 4x, and one mean and std per channel of the normalised image
    (``preprocess.normalize`` repeats grey to RGB, so 3; or the model's ``in_channels`` where that differs)."""
    if not isinstance(pre, dict):
        return "preprocess is missing"
    missing = [k for k in PREPROCESS_KEYS if k not in pre]
    if missing:
        return f"preprocess lacks {', '.join(missing)}"
    unknown = [k for k in pre if k not in PREPROCESS_KEYS]
    if unknown:
        return f"unknown preprocess field {shown(unknown[0])}"
    res, resize, crop_pct = pre["resolution"], pre["resize"], pre["crop_pct"]
    if not value_fits(res, int) or res != cfg.resolution:
        return f"preprocess.resolution is {shown(res)}, the config's resolution is {cfg.resolution}"
    if not value_fits(resize, int) or not res <= resize <= 4 * res:
        return f"preprocess.resize is {shown(resize)}; it must be an integer from {res} to {4 * res}"
    if not _number(crop_pct) or not 0 < crop_pct <= 1:
        return f"preprocess.crop_pct is {shown(crop_pct)}; it must be a number in (0, 1]"
    if pre["interpolation"] not in INTERPOLATIONS:
        return f"preprocess.interpolation is {shown(pre['interpolation'])}; it must be one of " + ", ".join(
            INTERPOLATIONS)
    lengths = sorted({3, cfg.in_channels})
    for key in ("mean", "std"):
        value = pre[key]
        if not isinstance(value, list) or len(value) not in lengths or not all(_number(v) for v in value):
            return (f"preprocess.{key} must be a list of {' or '.join(map(str, lengths))} finite numbers, not "
                    f"{shown(value) if not isinstance(value, list) else shown(value[:4]) + ('…' if len(value) > 4 else '')}")
    if not all(v > 0 for v in pre["std"]):
        return f"preprocess.std must be positive, got {pre['std']}"
    return None


def _plain_problem(name: str, value) -> str | None:
    """``value`` is JSON-like (dicts with string keys, lists, strings, int64s, floats, booleans, None) within the
    bounds above, counted as written out: a value that appears twice counts twice. Walked without recursion and
    stopped at the first bound crossed, so a described billion values costs no more than the bound."""
    count, chars = 1, 0
    stack = [(value, None, name, 0)]  # (value, parent entry, key in the parent, depth)
    while stack:
        entry = stack.pop()
        v, _, _, depth = entry
        if v is None or isinstance(v, (bool, float)):
            continue
        if isinstance(v, int):
            if abs(v) > MAX_INT:
                return f"{_where(entry)} is an integer beyond 64 bits"
        elif isinstance(v, str):
            if len(v) > MAX_STRING:
                return f"{_where(entry)} is a string of {len(v):,} characters (at most {MAX_STRING:,})"
            chars += len(v)
        elif isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"{_where(entry)} is nested more than {MAX_DEPTH} levels deep"
            count += len(v)
            if count > MAX_VALUES:
                return f"{name} holds more than {MAX_VALUES:,} values"
            if isinstance(v, dict):
                for k, x in v.items():
                    if not isinstance(k, str) or len(k) > MAX_STRING:
                        return (f"{_where(entry)} has a key that is not a string of at most {MAX_STRING:,} "
                                f"characters: {shown(k)}")
                    chars += len(k)
                    stack.append((x, entry, k, depth + 1))
            else:
                stack.extend((x, entry, i, depth + 1) for i, x in enumerate(v))
        else:
            return (f"{_where(entry)} is a {type(v).__name__}; only dicts, lists, strings, numbers, booleans and "
                    f"None are kept")
        if chars > MAX_CHARS:
            return f"{name} holds more than {MAX_CHARS:,} characters"
    return None


def _where(entry) -> str:
    """``name['key'][3]`` of an entry of ``_plain_problem``'s walk."""
    keys = []
    while entry[1] is not None:
        keys.append(f"[{shown(entry[2], 40)}]")
        entry = entry[1]
    return entry[2] + "".join(reversed(keys))


def overlaps(t: torch.Tensor) -> bool:
    """Whether ``t`` shows more elements than its storage holds (an expanded, stride-0 view): such a tensor costs
    nothing in the file but its full size in memory once anything copies it."""
    return t.numel() > t.untyped_storage().nbytes() // max(1, t.element_size())


def _describe(cfg: Config) -> str:
    flags = [name for name in ("full_conv", "shallow") if getattr(cfg, name)]
    return ", ".join([f"alpha={cfg.alpha:g}", f"{cfg.num_classes} classes", *flags])


def trees_problem(cfg: Config, params, state) -> str | None:
    """How ``params`` and ``state`` differ from the trees ``init(cfg)`` makes, or None. The reference is made on
    the meta device: shapes without data, at no cost."""
    try:
        expected = expected_trees(cfg)
    except (RuntimeError, ValueError, OverflowError, MemoryError):  # a width beyond what a tensor can have
        return f"the config implies tensors too large to exist (config: {_describe(cfg)})"
    for name, tree, want in (("params", params, expected[0]), ("state", state, expected[1])):
        problem = tree_problem(name, tree, want)
        if problem:
            return f"{problem} (config: {_describe(cfg)})"
    return None


@functools.lru_cache(maxsize=8)
def expected_trees(cfg: Config) -> tuple[dict, dict]:
    """``init(cfg)`` on the meta device (kept: drawing even meta tensors takes ~25 ms)."""
    with torch.device("meta"):
        return init(cfg)


def _tree_shape_problem(name: str, tree) -> str | None:
    """``tree`` is dicts (string keys) and lists of tensors, of bounded size and depth: checked before pytree
    walks it (recursively, every shared subtree again)."""
    count, stack = 1, [(tree, name, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, torch.Tensor):
            continue
        if not isinstance(v, (dict, list, tuple)):
            return f"{where} is a {type(v).__name__}, not a tensor"
        if depth >= MAX_TREE_DEPTH:
            return f"{where} is nested more than {MAX_TREE_DEPTH} levels deep"
        count += len(v)
        if count > MAX_TREE_ENTRIES:
            return f"{name} has more than {MAX_TREE_ENTRIES:,} entries"
        if isinstance(v, dict):
            bad = next((k for k in v if not isinstance(k, str) or len(k) > 100), None)
            if bad is not None:
                return f"{where} has a key that is not a short string: {shown(bad)}"
        items = v.items() if isinstance(v, dict) else enumerate(v)
        stack.extend((x, f"{where}[{shown(k, 40)}]", depth + 1) for k, x in items)
    return None


def tree_problem(name: str, tree, expected) -> str | None:
    """How ``tree`` differs from ``expected`` in structure, shapes or being finite floating-point tensors, or
    None."""
    problem = _tree_shape_problem(name, tree)
    if problem:
        return problem
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
        if t.dtype != w.dtype:  # one dtype for the whole model: apply mixes no dtypes
            return f"{name}{key} is {str(t.dtype).removeprefix('torch.')}, not {str(w.dtype).removeprefix('torch.')}"
        if t.shape != w.shape:
            return f"{name}{key} has shape {tuple(t.shape)}, the config implies {tuple(w.shape)}"
        if t.device.type == "meta":
            continue
        if t.layout != torch.strided or overlaps(t):
            return f"{name}{key} is an expanded or sparse view, not a tensor of its own"
        if not bool(torch.isfinite(t).all()):
            return f"{name}{key} holds NaN or infinite values"
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
                # torch.save stores every entry as it is: a compressed one (which could inflate to any size, in
                # this read or in torch.load's) is no file of ours.
                packed = next((i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED
                               or i.file_size != i.compress_size), None)
                if packed is not None:
                    raise WeightsError(f"{path}: refused: its archive holds a compressed entry "
                                       f"({shown(packed.filename)}), which torch.save never writes")
                # An entry marked as a folder (MS-DOS attribute 0x10) made torch.load read garbage, differently
                # from one load to the next (found by tests/test_fuzz_files.py); torch.save marks none.
                if any(i.is_dir() or i.external_attr & 0x10 for i in z.infolist()):
                    raise ValueError("a folder entry")
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        except WeightsError:
            raise
        except Exception:  # noqa: BLE001 - damage of any kind (a name that is not UTF-8, a bad CRC...): refused
            raise WeightsError(f"{path}: is damaged or truncated (its zip archive cannot be read)") from None
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
