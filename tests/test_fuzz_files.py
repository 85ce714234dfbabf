"""Fuzzing the file formats: valid weights files and checkpoints, mutated field by field and byte by byte.

Every mutated file must be either accepted (and then usable: ``predict`` runs on it, ``convert`` makes weights of
it) or refused cleanly: a one-line ``WeightsError`` from the API, and through the command line exit code 2, one
line on stderr starting with "Error:", no traceback, within a few seconds and under a fixed memory ceiling.

The cases run in one subprocess (importing torch costs seconds per process): this file is also the driver,
``python tests/test_fuzz_files.py DIR MODE``, which builds the valid files, mutates them, tries each case through
the API and the CLI (in-process, with typer's CliRunner) under ``RLIMIT_AS`` and writes a JSON report that the
tests assert on. ``MOBILENET_FN_FUZZ=long`` runs many more cases (random combinations of mutations, every byte of
the archive's pickle and zip directory flipped); the default run keeps ``make test`` fast.

The int8 issue will add ONNX metadata; there is nothing to fuzz there yet.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

LONG = os.environ.get("MOBILENET_FN_FUZZ") == "long"
CASE_SECONDS = 5  # the most one case may take, refused or accepted (a normal predict takes ~20 ms here)
MEMORY_MARGIN = 1 << 30  # RLIMIT_AS: the address space after a normal predict, plus this
RSS_MARGIN = 512 << 20  # the peak resident memory may grow this much above a normal predict's


# ---------------------------------------------------------------------------------------------------------------
# The valid files


def valid_weights() -> dict:
    """What ``save_weights`` writes for a tiny model (alpha 0.25, resolution 32), as the dict torch.load gives."""
    import torch

    from mobilenet_fn import Config, Weights, init, save_weights
    from mobilenet_fn.data import IMAGENET_STATS
    from mobilenet_fn.preprocess import preprocess_for

    cfg = Config(alpha=0.25, resolution=32, num_classes=3)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    w = Weights(cfg, params, state, ["cat", "dog", "bird"],
                preprocess_for(32, crop_pct=0.875, stats=IMAGENET_STATS), {"kind": "sample", "train": "train",
                                                                          "val": ["a/1.png", "b/2.png"]},
                {"val_top1": 0.5, "epoch": 3})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_weights(Path(tmp) / "w.pkl", w)
        return torch.load(Path(tmp) / "w.pkl", weights_only=True)


@functools.cache
def sample_at_32():
    """The embedded sample at 32 px, decoded once per process."""
    from mobilenet_fn import data as data_lib

    return data_lib.load("sample", resolution=32)


def valid_checkpoint(optimizer: str = "adamw", freeze_backbone: bool = False, ema: float = 0.0) -> dict:
    """A real ``Trainer.checkpoint()`` of a tiny model on the sample data, as ``save_checkpoint`` writes it."""
    import torch

    from mobilenet_fn.model import Config
    from mobilenet_fn.options import TrainOptions
    from mobilenet_fn.train import Trainer
    from mobilenet_fn.checkpoint import FORMAT as CHECKPOINT_FORMAT

    ds = sample_at_32()
    opts = TrainOptions(data="sample", epochs=2, batch_size=8, compile="off", channels_last="off", amp="off",
                        workers=0, optimizer=optimizer, freeze_backbone=freeze_backbone, ema=ema)
    trainer = Trainer(Config(alpha=0.25, resolution=32, num_classes=len(ds.classes)), opts, ds, torch.device("cpu"))
    trainer.start_fresh()
    trainer.epoch, trainer.global_step, trainer.batch_in_epoch = 1, 600, 100
    return {**trainer.checkpoint(), "format": CHECKPOINT_FORMAT}


# ---------------------------------------------------------------------------------------------------------------
# Mutations


def bad_values() -> dict:
    """Values of every wrong kind, fresh on each call (cases must not share mutable values)."""
    import torch

    nested: list = []
    inner = nested
    for _ in range(300):
        inner.append([])
        inner = inner[0]
    cycle: list = []
    cycle.append(cycle)
    row = ["p" * 100] * 1000
    amplified = [[row] * 1000] * 1000  # a hundred billion characters described by a few kilobytes of pickle
    wide = {f"k{i}": i for i in range(3000)}
    return {
        "None": None, "True": True, "-1": -1, "0": 0, "1e9": 10**9, "2**63": 2**63, "10**5000": 10**5000,
        "-1e30": -(10**30), "1e308": 1e308, "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "0.5": 0.5,
        "''": "", "long str": "y" * 200_000, "newline": "a\nb\rc\u2028d", "[]": [], "{}": {}, "list": [1, "a", None],
        "dict": {"k": [1, 2.5]}, "deep": nested, "cycle": cycle, "amplified": amplified, "wide": wide,
        "bytes": b"\x00abc", "tuple": (1, 2), "nan tensor": torch.tensor(math.nan),
        "int tensor": torch.zeros(3, dtype=torch.long), "expanded": torch.zeros(1).expand(10**6),
        "big tensor": torch.zeros(1_000_000),
    }


# Values refused wherever they stand, even in metrics and data.
ALWAYS_BAD = {"10**5000", "long str", "deep", "cycle", "amplified", "bytes", "nan tensor", "int tensor", "expanded",
              "big tensor", "tuple"}
FREE = ("metrics", "data")  # JSON-like values: most plain values are fine here


def tensor_mutations(t) -> dict:
    """Tensors of the right shape but wrong in one way, and of the wrong shape."""
    import torch

    return {
        "nan same shape": torch.full(t.shape, math.nan),
        "inf same shape": torch.full(t.shape, math.inf),
        "int same shape": torch.zeros(t.shape, dtype=torch.int32),
        "expanded same shape": torch.zeros((), dtype=t.dtype).expand(t.shape),
        "wrong shape": torch.zeros(t.numel() + 1),
        "scalar": torch.zeros(()),
        "float64 same shape": t.double(),  # fine: any floating dtype
        "bool same shape": torch.zeros(t.shape, dtype=torch.bool),
    }


def get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def with_change(obj, path, op, value=None):
    """A copy of ``obj`` (containers along ``path`` copied, the rest shared) with ``op`` applied at ``path``:
    "set" a value, "del" the key, or "add" the key ``value`` (a name) with an int to the dict at ``path``."""
    obj = copy.copy(obj)
    node = obj
    for k in path[:-1] if op != "add" else path:
        node[k] = copy.copy(node[k])
        node = node[k]
    if op == "set":
        node[path[-1]] = value
    elif op == "del":
        del node[path[-1]]
    else:
        node[value] = 1
    return obj


def field_paths(obj, prefix=()):
    """Every key path into the plain parts of the file (not into the tensor trees), list items included."""
    for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        path = prefix + (k,)
        yield path
        if isinstance(v, (dict, list)) and path[0] not in ("params", "state", "opt_state") and len(path) < 4:
            yield from field_paths(v, path)


def tensor_paths(obj) -> list[tuple]:
    paths = [("params", "stem", "conv"), ("params", "fc", "weight"), ("params", "blocks", 3, "dw"),
             ("state", "stem", "bn", "var"), ("state", "blocks", 12, "pw", "mean")]
    if "opt_state" in obj:
        first = next(iter(obj["opt_state"]))
        paths += [("opt_state", first)] + [("opt_state", k, "fc", "weight") for k in obj["opt_state"]
                                          if isinstance(obj["opt_state"][k], dict)]
    return [p for p in paths if _exists(obj, p)]


def _exists(obj, path) -> bool:
    """Whether ``path`` leads through dicts and lists to something."""
    for k in path:
        if not isinstance(obj, (dict, list)) or (k not in obj if isinstance(obj, dict) else
                                                 not isinstance(k, int) or k >= len(obj)):
            return False
        obj = obj[k]
    return True


def structure_cases(base: dict, label: str, long: bool):
    """(name, object, expectation) for every field replaced by every bad value, deleted, or given a sibling;
    tensors replaced by wrong ones. Expectation "refuse", or "any" (accepted or refused, cleanly either way)."""
    import torch

    paths = list(field_paths(base))
    names = list(bad_values())
    pick = random.Random(label)
    for i, path in enumerate(paths):
        free = path[0] in FREE and len(path) > 1
        # The default run tries 3 values per field: a seeded draw, turning through every value across the fields.
        chosen = set(names) if long else {names[i % len(names)], *pick.sample(names, 2)}
        for name, value in bad_values().items():
            if name not in chosen:
                continue
            expect = "refuse" if name in ALWAYS_BAD or (not free and path[0] not in FREE and name in (
                "None", "[]", "{}", "dict", "list", "nan", "inf", "-inf", "2**63")) else "any"
            if path == ("run", "init_weights") and name == "None":
                expect = "any"
            yield f"{label}: {_name(path)} = {name}", with_change(base, path, "set", value), expect
        optional = path[0] in FREE or path[0] == "config"  # a config's missing fields take Config's defaults
        yield f"{label}: del {_name(path)}", with_change(base, path, "del"), "any" if optional else "refuse"
    for path in [()] + [p for p in paths if isinstance(get(base, p), dict) and p[0] not in FREE]:
        yield f"{label}: extra key in {_name(path) or 'the file'}", with_change(base, path, "add", "surplus"), "refuse"
    for path in tensor_paths(base):
        target = get(base, path)
        if isinstance(target, torch.Tensor):
            for name, value in tensor_mutations(target).items():
                fine = name == "float64 same shape" or (target.dim() == 0 and name in ("expanded same shape", "scalar"))
                yield (f"{label}: {_name(path)} = {name}", with_change(base, path, "set", value),
                       "any" if fine else "refuse")
        else:
            for name in ("None", "[]", "deep", "cycle", "amplified", "wide"):
                yield f"{label}: {_name(path)} = {name}", with_change(base, path, "set", bad_values()[name]), "refuse"


def issue_cases(base: dict, label: str):
    """The two files of issue 17, and one per check (each must be refused)."""
    pre = base["preprocess"]
    yield f"{label}: preprocess.resize = 100000", with_change(base, ("preprocess", "resize"), "set", 100000), "refuse"
    yield (f"{label}: preprocess.resolution = 10**9", with_change(base, ("preprocess", "resolution"), "set", 10**9),
           "refuse")
    both = with_change(base, ("preprocess", "resolution"), "set", 10**9)
    both = with_change(both, ("config", "resolution"), "set", 10**9)
    yield f"{label}: resolution 10**9 in config and preprocess", both, "refuse"
    both = with_change(base, ("preprocess", "resize"), "set", 10**6)
    yield f"{label}: preprocess.resize = 10**6", both, "refuse"
    yield f"{label}: preprocess.mean of 4", with_change(base, ("preprocess", "mean"), "set", pre["mean"] + [0.5]), \
        "refuse"
    yield f"{label}: config.alpha = inf", with_change(base, ("config", "alpha"), "set", math.inf), "refuse"
    yield f"{label}: config.alpha = 1e300", with_change(base, ("config", "alpha"), "set", 1e300), "refuse"
    yield f"{label}: config.num_classes = 10**30", with_change(base, ("config", "num_classes"), "set", 10**30), \
        "refuse"
    no_format = {k: v for k, v in base.items() if k != "format"}
    yield f"{label}: no format, a long first key", {"z" * 100_000: 1, **no_format}, "refuse"
    yield f"{label}: format a long string", with_change(base, ("format",), "set", "mobilenet-fn/" + "9" * 100_000), \
        "refuse"


def random_cases(base: dict, label: str, rng: random.Random, n: int):
    """``n`` files with two or three random changes each (the long run)."""
    paths = list(field_paths(base))
    values = list(bad_values())
    for i in range(n):
        obj, names = base, []
        for _ in range(rng.randint(2, 3)):
            path = rng.choice([p for p in paths if _exists(obj, p)] or [("format",)])
            if rng.random() < 0.15:
                obj, change = with_change(obj, path, "del"), f"del {_name(path)}"
            else:
                name = rng.choice(values)
                obj, change = with_change(obj, path, "set", bad_values()[name]), f"{_name(path)} = {name}"
            names.append(change)
        yield f"{label}: random {i}: " + "; ".join(names), obj, "any"


def byte_cases(data: bytes, label: str, long: bool, rng: random.Random):
    """The archive's bytes flipped at many offsets and cut at many lengths. Offsets are drawn from the pickle
    (data.pkl) and the zip's headers and directory, where a flip changes structure, and a few from tensor data."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
    structural: set[int] = set()
    for info in infos:
        start = info.header_offset
        header = 30 + len(info.filename.encode()) + len(info.extra) + 64  # a local header and its padding
        structural.update(range(start, min(len(data), start + header)))
        if info.filename.endswith((".pkl", "version", "byteorder")):
            structural.update(range(start, min(len(data), start + header + info.file_size)))
    structural.update(range(infos[-1].header_offset + 30 + infos[-1].file_size, len(data)))  # the directory
    structural_list = sorted(structural)
    other = [i for i in range(0, len(data), 997) if i not in structural]
    if long:
        offsets = sorted(rng.sample(structural_list, min(800, len(structural_list))) + other)
    else:
        offsets = sorted(rng.sample(structural_list, min(80, len(structural_list))) + rng.sample(other, 10))
    patterns = (0xFF, 0x01, 0x80) if long else (0xFF,)
    for offset in offsets:
        for x in patterns:
            flipped = bytearray(data)
            flipped[offset] ^= x
            yield f"{label}: byte {offset} ^ {x:#x}", bytes(flipped), "any"
    cuts = sorted({0, 1, 2, 4, 100, len(data) - 1, len(data) // 2} | set(
        rng.sample(range(len(data)), 400 if long else 15)))
    for n in cuts:
        yield f"{label}: cut to {n} bytes", data[:n], "refuse"


def _name(path) -> str:
    return ".".join(str(k) for k in path)


def all_cases(long: bool):
    """Every case: (name, kind ("weights" or "checkpoint"), object or bytes, expectation)."""
    import io

    import torch

    rng = random.Random(17)
    weights = valid_weights()
    checkpoints = {"checkpoint": valid_checkpoint(ema=0.999), "checkpoint sgd frozen": valid_checkpoint("sgd", True)}
    yield "weights: valid", "weights", weights, "accept"
    for label, ckpt in checkpoints.items():
        yield f"{label}: valid", "checkpoint", ckpt, "accept"
    for name, obj, expect in issue_cases(weights, "weights"):
        yield name, "weights", obj, expect
    for name, obj, expect in issue_cases(checkpoints["checkpoint"], "checkpoint"):
        yield name, "checkpoint", obj, expect
    for name, obj, expect in structure_cases(weights, "weights", long):
        yield name, "weights", obj, expect
    # The default run mutates the smaller checkpoint (SGD on the classifier alone); the long run both.
    for label, ckpt in checkpoints.items() if long else list(checkpoints.items())[1:]:
        for name, obj, expect in structure_cases(ckpt, label, long):
            yield name, "checkpoint", obj, expect
    if not long:
        adamw = checkpoints["checkpoint"]
        for path in tensor_paths(adamw):
            yield f"checkpoint: {_name(path)} = None", "checkpoint", with_change(adamw, path, "set", None), "refuse"
    if long:
        for name, obj, expect in random_cases(weights, "weights", rng, 800):
            yield name, "weights", obj, expect
        for name, obj, expect in random_cases(checkpoints["checkpoint"], "checkpoint", rng, 800):
            yield name, "checkpoint", obj, expect
    for label, kind, obj in (("weights bytes", "weights", weights),
                             ("checkpoint bytes", "checkpoint", checkpoints["checkpoint sgd frozen"])):
        buf = io.BytesIO()
        torch.save(obj, buf)
        for name, data, expect in byte_cases(buf.getvalue(), label, long, rng):
            yield name, kind, data, expect


# ---------------------------------------------------------------------------------------------------------------
# The driver: one process, every case through the API and the CLI


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def drive(folder: Path, long: bool, part: int = 0, parts: int = 1) -> dict:
    """Runs every ``parts``-th case, from the ``part``-th, in this process; returns their records."""
    import resource
    import signal

    import torch
    from PIL import Image
    from typer.testing import CliRunner

    from mobilenet_fn.cli.main import app
    from mobilenet_fn.checkpoint import load_checkpoint
    from mobilenet_fn.weights import WeightsError, load_weights

    from conftest import build_the_command_line_once

    build_the_command_line_once()
    torch.set_num_threads(1)
    runner = CliRunner()
    image, path, out = folder / "img.png", folder / "case.pkl", folder / "out.pkl"
    Image.new("RGB", (40, 30), (200, 30, 10)).save(image)
    commands = {"weights": lambda: ["predict", str(path), str(image), "--device", "cpu", "--json"],
                "checkpoint": lambda: ["convert", str(path), "-o", str(out), "--force"]}
    loaders = {"weights": load_weights, "checkpoint": load_checkpoint}

    # A normal predict and convert first: their address space and resident memory are the baseline.
    torch.save(valid_weights(), path)
    assert runner.invoke(app, commands["weights"]()).exit_code == 0
    torch.save(valid_checkpoint(), path)
    assert runner.invoke(app, commands["checkpoint"]()).exit_code == 0
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ceiling = _vm_size() + MEMORY_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))

    class Timeout(Exception):
        pass

    def on_alarm(*_):
        raise Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    records = []
    for i, (name, kind, obj, expect) in enumerate(all_cases(long)):
        if i % parts != part:
            continue
        record = {"case": name, "kind": kind, "expect": expect, "path": str(path)}
        t0 = time.perf_counter()
        signal.alarm(CASE_SECONDS * 4)
        try:
            if isinstance(obj, bytes):
                path.write_bytes(obj)
            else:
                torch.save(obj, path)
            del obj
            t1 = time.perf_counter()
            try:
                loaders[kind](path)
                record["api"] = "accepted"
            except WeightsError as e:
                record["api"], record["api_message"] = "refused", str(e)
            except Exception as e:  # noqa: BLE001 - what the fuzzing is looking for
                record["api"], record["api_message"] = f"crash: {type(e).__name__}", str(e)[:500]
            result = runner.invoke(app, commands[kind]())
            record.update(
                exit_code=result.exit_code, stdout_lines=len(result.stdout.splitlines()),
                stderr=result.stderr[:2000], stderr_lines=len(result.stderr.splitlines()),
                traceback="Traceback" in result.stdout + result.stderr or (
                    result.exception is not None and not isinstance(result.exception, SystemExit)),
                exception=None if result.exception is None or isinstance(result.exception, SystemExit)
                else f"{type(result.exception).__name__}: {str(result.exception)[:300]}")
            record["seconds"] = time.perf_counter() - t1
        except Timeout:
            record["timeout"] = True
        finally:
            signal.alarm(0)
        record["total_seconds"] = time.perf_counter() - t0
        record["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.unlink(missing_ok=True)
        records.append(record)
    return {"ceiling": ceiling, "baseline_rss": baseline_rss, "records": records}


def run_driver(tmp_path: Path, long: bool, parts: int = 2) -> dict:
    """The cases shared out among ``parts`` driver processes of one thread each, run at once; their reports
    merged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folders = [tmp_path / f"part{i}" for i in range(parts)]
    drivers = []
    for i, folder in enumerate(folders):
        folder.mkdir()
        drivers.append(subprocess.Popen([sys.executable, __file__, str(folder), "long" if long else "default",
                                         str(folder / "report.json"), str(i), str(parts)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for driver in drivers:
        _, stderr = driver.communicate(timeout=3000 if long else 600)
        assert driver.returncode == 0, stderr[-5000:]
    reports = [json.loads((folder / "report.json").read_text()) for folder in folders]
    return {"ceiling": max(r["ceiling"] for r in reports), "baseline_rss": max(r["baseline_rss"] for r in reports),
            "seconds": max(r["seconds"] for r in reports), "records": [c for r in reports for c in r["records"]]}


if __name__ == "__main__":
    folder, mode, report_path, part, parts = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), *map(int, sys.argv[4:6])
    t = time.perf_counter()
    result = drive(folder, mode == "long", part, parts)
    result["seconds"] = time.perf_counter() - t
    report_path.write_text(json.dumps(result))
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_driver(tmp_path_factory.mktemp("fuzz"), LONG)


def _show(record: dict) -> str:
    return json.dumps(record, indent=1)[:3000]


def test_the_fuzzer_ran_its_cases(report):
    records = report["records"]
    counts = {}
    for r in records:
        counts[r["expect"], r.get("api")] = counts.get((r["expect"], r.get("api")), 0) + 1
    print(f"\n{len(records)} cases in {report['seconds']:.1f} s; (expectation, API outcome): {counts}; "
          f"RLIMIT_AS {report['ceiling'] / 2**30:.2f} GiB; peak RSS {max(r['maxrss'] for r in records) / 2**20:.0f} "
          f"MiB (a normal predict and convert: {report['baseline_rss'] / 2**20:.0f} MiB)")
    assert len(records) >= (5000 if LONG else 600)
    assert sum(r.get("api") == "refused" for r in records) > len(records) / 2


def test_every_case_finishes_in_time(report):
    for r in report["records"]:
        assert not r.get("timeout") and r["seconds"] < CASE_SECONDS, _show(r)


def test_the_api_accepts_or_refuses_with_one_line(report):
    for r in report["records"]:
        assert r["api"] in ("accepted", "refused"), _show(r)
        if r["api"] == "refused":
            message = r["api_message"]
            assert "\n" not in message and "\r" not in message and message.startswith(r["path"] + ": "), _show(r)
            assert len(message) < 500, _show(r)


def test_the_expectations_hold(report):
    for r in report["records"]:
        if r["expect"] == "refuse":
            assert r["api"] == "refused", _show(r)
        if r["expect"] == "accept":
            assert r["api"] == "accepted" and r["exit_code"] == 0, _show(r)


def test_the_command_line_exits_0_or_2_with_one_error_line(report):
    for r in report["records"]:
        assert not r["traceback"] and r["exception"] is None, _show(r)
        if r["api"] == "refused":
            assert r["exit_code"] == 2, _show(r)
            assert r["stderr_lines"] == 1 and r["stderr"].startswith("Error: "), _show(r)
            assert len(r["stderr"]) < 1000, _show(r)
            if r["kind"] == "weights":  # predict says what load_weights says (convert also reads other formats)
                assert r["stderr"].rstrip("\n") == "Error: " + r["api_message"], _show(r)
        else:  # what the API accepts, the command uses
            assert r["exit_code"] == 0, _show(r)


def test_memory_stays_under_the_ceiling(report):
    peak = max(r["maxrss"] for r in report["records"])
    assert peak < report["baseline_rss"] + RSS_MARGIN, (peak, report["baseline_rss"])
    assert report["ceiling"] < 8 << 30  # a fixed ceiling, not whatever the machine has


# ---------------------------------------------------------------------------------------------------------------
# One case per check, in-process: each fails if its check is removed (the fuzzing above would see most of them
# accepted or refused for another reason, which it allows for many cases)


@pytest.fixture(scope="module")
def files() -> dict:
    return {"weights": valid_weights(), "checkpoint": valid_checkpoint(),
            "frozen": valid_checkpoint("sgd", freeze_backbone=True)}


def _set(path, value):
    return lambda obj: with_change(obj, path, "set", value)


def _many(*changes):
    def apply(obj):
        for change in changes:
            obj = change(obj)
        return obj
    return apply


def _cycle():
    a: list = []
    a.append(a)
    return a


def _deep(n):
    out = inner = []
    for _ in range(n):
        inner.append([])
        inner = inner[0]
    return out


CHECKS = {  # name: (file, change, words of the message)
    "unknown top-level key": ("weights", lambda o: {**o, "surplus": 1}, "unknown field 'surplus'"),
    "unknown checkpoint key": ("checkpoint", lambda o: {**o, "surplus": 1}, "unknown field 'surplus'"),
    "top-level key missing": ("weights", lambda o: {k: v for k, v in o.items() if k != "classes"},
                              "classes is missing"),
    "config value of a wrong type": ("weights", _set(("config", "alpha"), "0.25"), "config.alpha must be a finite number"),
    "config bool as int": ("weights", _set(("config", "num_classes"), True), "config.num_classes must be a 64-bit integer"),
    "config infinite": ("weights", _set(("config", "alpha"), math.inf), "config.alpha must be a finite number"),
    "config resolution too large": ("weights", _many(_set(("config", "resolution"), 4096),
                                                     _set(("preprocess", "resolution"), 4096),
                                                     _set(("preprocess", "resize"), 4096)), "is above 2048"),
    "config implies impossible shapes": ("weights", _set(("config", "alpha"), 1e12), "too large to exist"),
    "config number beyond 2**63": ("weights", _set(("config", "alpha"), 1e300), "config.alpha must be a finite number"),
    "tree amplified": ("weights", _set(("params", "blocks"), [[[{}] * 100] * 100] * 100), "more than 10,000 entries"),
    "tree deep": ("weights", _set(("params", "blocks"), _deep(50)), "nested more than 8 levels"),
    "tree cycle": ("weights", _set(("state", "blocks"), _cycle()), "nested more than 8 levels"),
    "tree key not a string": ("weights", _set(("params", "stem", 7), 1), "not a short string"),
    "tree leaf not a tensor": ("weights", _set(("params", "stem", "conv"), "w"), "is a str, not a tensor"),
    "tensor dtype": ("weights", lambda o: _set(("params", "fc", "weight"), o["params"]["fc"]["weight"].double())(o),
                     "is float64, not float32"),
    "tensor expanded": ("weights", lambda o: _set(("params", "fc", "weight"), __import__("torch").zeros(()).expand(
        o["params"]["fc"]["weight"].shape))(o), "expanded"),
    "tensor not finite": ("weights", lambda o: _set(("state", "stem", "bn", "var"), o["state"]["stem"]["bn"]["var"]
                                                    * math.nan)(o), "NaN or infinite"),
    "class name too long": ("weights", _set(("classes", 0), "c" * 1001), "classes[0] is 1,001 characters long"),
    "classes a tuple": ("weights", lambda o: _set(("classes",), tuple(o["classes"]))(o), "list of names"),
    "preprocess unknown key": ("weights", lambda o: with_change(o, ("preprocess",), "add", "sharpen"),
                               "unknown preprocess field 'sharpen'"),
    "preprocess resolution (issue 17)": ("weights", _set(("preprocess", "resolution"), 10**9),
                                         "the config's resolution is 32"),
    "preprocess resize (issue 17)": ("weights", _set(("preprocess", "resize"), 100000), "from 32 to 128"),
    "preprocess resize below resolution": ("weights", _set(("preprocess", "resize"), 31), "from 32 to 128"),
    "preprocess resize a float": ("weights", _set(("preprocess", "resize"), 36.5), "from 32 to 128"),
    "preprocess crop_pct 0": ("weights", _set(("preprocess", "crop_pct"), 0.0), "crop_pct"),
    "preprocess crop_pct above 1": ("weights", _set(("preprocess", "crop_pct"), 1.5), "crop_pct"),
    "preprocess crop_pct nan": ("weights", _set(("preprocess", "crop_pct"), math.nan), "crop_pct"),
    "preprocess interpolation": ("weights", _set(("preprocess", "interpolation"), "nearest"), "interpolation"),
    "preprocess mean of 4": ("weights", _set(("preprocess", "mean"), [0.5] * 4), "mean must be a list of 3"),
    "preprocess mean nan": ("weights", _set(("preprocess", "mean"), [0.5, math.nan, 0.5]), "finite numbers"),
    "preprocess mean a huge int": ("weights", _set(("preprocess", "mean"), [0.5, 10**400, 0.5]), "finite numbers"),
    "preprocess std 0": ("weights", _set(("preprocess", "std"), [0.5, 0.0, 0.5]), "std must be positive"),
    "data a list": ("weights", _set(("data",), [1]), "data must be a dict or None"),
    "data deep": ("weights", _set(("data", "val"), _deep(20)), "nested more than 8 levels"),
    "data amplified": ("weights", _set(("data", "val"), [["p"] * 2000] * 2000), "more than 2,000,000 values"),
    "data too many characters": ("weights", _set(("data", "val"), ["q" * 100_000] * 1400), "characters"),
    "data long string": ("weights", _set(("data", "root"), "r" * 100_001), "string of 100,001 characters"),
    "data huge int": ("weights", _set(("data", "seed"), 2**64), "beyond 64 bits"),
    "data key not a string": ("weights", _set(("data", "val"), {1: "a"}), "key that is not a string"),
    "data bytes": ("weights", _set(("data", "val"), b"a"), "is a bytes"),
    "data.kind not a string": ("weights", _set(("data", "kind"), 3), "data.kind must be a string"),
    "data.root not a string": ("weights", _set(("data", "root"), ["/"]), "data.root must be a string"),
    "data.val of folders not a name": ("weights", _many(_set(("data", "kind"), "folders"), _set(("data", "val"), 1)),
                                       "data.val must be the name of the validation folder"),
    "data.val of a split not paths": ("weights", _many(_set(("data", "kind"), "split"), _set(("data", "val"), "v")),
                                      "data.val must list validation images"),
    "data.val of a split outside the classes": ("weights", _many(_set(("data", "kind"), "split"), _set(
        ("data", "val"), ["cat/1.png", "wolf/2.png"])), "data.val must list validation images"),
    "data.val of a split, an empty path": ("weights", _many(_set(("data", "kind"), "split"), _set(
        ("data", "val"), [""])), "data.val must list validation images"),
    "metrics a tensor": ("weights", lambda o: _set(("metrics", "val_top1"), __import__("torch").ones(1))(o),
                         "is a Tensor"),
    "run missing a field": ("checkpoint", lambda o: _set(("run",), {k: v for k, v in o["run"].items()
                                                                    if k != "compile"})(o), "run lacks compile"),
    "run unknown field": ("checkpoint", lambda o: with_change(o, ("run",), "add", "turbo"), "unknown run keys"),
    "run value of a wrong type": ("checkpoint", _set(("run", "lr"), "fast"), "run.lr must be a finite number"),
    "run value not finite": ("checkpoint", _set(("run", "weight_decay"), math.nan), "run.weight_decay must be"),
    "run options refused": ("checkpoint", _set(("run", "epochs"), 0), "run: --epochs must be at least 1"),
    "epoch negative": ("checkpoint", _set(("epoch",), -1), "epoch must be an integer of at least 0"),
    "step a float": ("checkpoint", _set(("step",), 2.0), "step must be an integer of at least 0"),
    "world 0": ("checkpoint", _set(("world",), 0), "world must be an integer of at least 1"),
    "epoch beyond the run": ("checkpoint", _set(("epoch",), 3), "beyond the run's 2 epochs"),
    "batch_in_epoch beyond step": ("checkpoint", _set(("batch_in_epoch",), 601), "beyond step 600"),
    "rng without torch": ("checkpoint", _set(("rng",), {}), "rng must be a dict"),
    "rng unknown field": ("checkpoint", lambda o: with_change(o, ("rng",), "add", "numpy"), "unknown rng field"),
    "rng of a wrong size": ("checkpoint", lambda o: _set(("rng", "torch"), o["rng"]["torch"][:-1])(o),
                            "not a generator state"),
    "rng of a wrong dtype": ("checkpoint", lambda o: _set(("rng", "torch"), o["rng"]["torch"].float())(o),
                             "not a generator state"),
    "rng expanded": ("checkpoint", lambda o: _set(("rng", "torch"), __import__("torch").zeros(
        (), dtype=__import__("torch").uint8).expand(o["rng"]["torch"].shape))(o), "not a generator state"),
    "opt_state of another optimizer": ("checkpoint", _set(("run", "optimizer"), "sgd"), "opt_state"),
    "opt_state of the whole model, backbone frozen": (
        "checkpoint", _set(("run", "freeze_backbone"), True), "opt_state['m']['stem']['conv']['weight'] is not part "
                                                              "of the model"),
    "opt_state of the classifier, backbone not frozen": ("frozen", _set(("run", "freeze_backbone"), False),
                                                         "opt_state['momentum']['stem']['conv']['weight'] is missing"),
    "opt_state not finite": ("frozen", lambda o: _set(("opt_state", "momentum", "fc", "bias"), o["opt_state"][
        "momentum"]["fc"]["bias"] + math.inf)(o), "NaN or infinite"),
    "format a long string": ("weights", _set(("format",), "x" * 100_000), "unknown format 'xxxx"),
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_each_check(files, case):
    from mobilenet_fn.checkpoint import checkpoint_from_dict
    from mobilenet_fn.weights import WeightsError, weights_from_dict

    kind, change, needle = CHECKS[case]
    obj = change(files[kind])
    read = weights_from_dict if kind == "weights" else checkpoint_from_dict
    with pytest.raises(WeightsError) as info:
        read(obj, "f.pkl")
    message = str(info.value)
    assert message.startswith("f.pkl: ") and needle in message and "\n" not in message and len(message) < 400, \
        message


def test_the_valid_files_pass_the_checks(files):
    from mobilenet_fn.checkpoint import checkpoint_from_dict
    from mobilenet_fn.weights import weights_from_dict

    weights_from_dict(files["weights"], "w.pkl")
    checkpoint_from_dict(files["checkpoint"], "c.ckpt")
    checkpoint_from_dict(files["frozen"], "f.ckpt")
    weights_from_dict({k: v for k, v in files["weights"].items() if k not in ("data", "metrics")}, "w.pkl")
    for split in ({"kind": "split", "root": "/d", "val_split": 0.2, "seed": 0, "val": ["cat/1.png", "dog/a b.jpg"]},
                  {"kind": "folders", "root": "/d", "train": "train", "val": "val"},
                  {"kind": "fashion-mnist", "source": "/d", "val_indices_of_train": [3, 1], "seed": 0}):
        weights_from_dict({**files["weights"], "data": split}, "w.pkl")


def test_save_weights_refuses_what_load_refuses(tmp_path, files):
    from mobilenet_fn.weights import Weights, WeightsError, save_weights, weights_from_dict

    w = weights_from_dict(files["weights"], "w.pkl")
    for bad in (w._replace(preprocess={**w.preprocess, "resize": 100000}), w._replace(data={"val": b"x"}),
                w._replace(classes=["x" * 5000, "b", "c"]), w._replace(metrics={"top1": 10**30})):
        with pytest.raises(WeightsError, match="not written"):
            save_weights(tmp_path / "w.pkl", Weights(*bad))
        assert not (tmp_path / "w.pkl").exists()


def test_a_compressed_or_damaged_archive_is_refused(tmp_path, files):
    import io
    import zipfile

    import torch

    from mobilenet_fn.weights import WeightsError, load_weights

    buf = io.BytesIO()
    torch.save(files["weights"], buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(tmp_path / "packed.pkl", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(WeightsError, match="compressed entry"):
        load_weights(tmp_path / "packed.pkl")
    data = bytearray(buf.getvalue())
    name = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[-1].filename.encode()
    at = bytes(data).rindex(name)  # the last name in the central directory: not UTF-8 any more
    data[at + len(name) - 1] = 0xFF
    (tmp_path / "damaged.pkl").write_bytes(bytes(data) if False else _utf8_flagged(bytes(data), at))
    with pytest.raises(WeightsError, match="damaged"):
        load_weights(tmp_path / "damaged.pkl")


def test_an_archive_entry_marked_as_a_folder_is_refused(tmp_path, files, monkeypatch):
    """The long fuzz run's find: external attributes 0xFF on the last entry made torch.load fail with a different
    UnicodeDecodeError on each load, and once succeed. Refused before torch.load sees it."""
    import io

    import torch

    from mobilenet_fn.weights import WeightsError, load_weights

    buf = io.BytesIO()
    torch.save(files["weights"], buf)
    data = bytearray(buf.getvalue())
    entry = data.rindex(b"PK\x01\x02")  # the last entry of the central directory
    data[entry + 38] = 0x10  # its external attributes: MS-DOS "directory"
    (tmp_path / "w.pkl").write_bytes(bytes(data))

    calls = []
    monkeypatch.setattr("mobilenet_fn.weights.torch.load", lambda *args, **kwargs: calls.append(args) or {})
    with pytest.raises(WeightsError, match="damaged"):
        load_weights(tmp_path / "w.pkl")
    assert calls == []


def _utf8_flagged(data: bytes, name_at: int) -> bytes:
    """The central directory entry whose name starts near ``name_at`` flagged as UTF-8 (bit 11), so that a byte
    of its name that is not UTF-8 makes Python's zipfile fail."""
    entry = data.rindex(b"PK\x01\x02", 0, name_at)
    flags = int.from_bytes(data[entry + 8: entry + 10], "little") | 0x800
    return data[:entry + 8] + flags.to_bytes(2, "little") + data[entry + 10:]
