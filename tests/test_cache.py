"""The decoded cache (mobilenet_fn/cache.py): the pixels it serves, when it is rebuilt, and what it never reads."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mobilenet_fn import cache
from mobilenet_fn.cli.main import app
from mobilenet_fn.batches import batches
from mobilenet_fn.data import cache_dir, scan_folder
from mobilenet_fn.sources import DataError, FileSource
from mobilenet_fn.preprocess import preprocess_for

PRE = preprocess_for(24, crop_pct=0.875, stats={"mean": [0.5] * 3, "std": [0.25] * 3})  # resize 27, crop 24
SIZES = [(40, 40), (50, 37), (37, 61), (27, 90), (64, 48)]  # odd and even margins, both orientations


@pytest.fixture(autouse=True)
def _fresh_process_memo():
    cache._opened.clear()  # each open below reads the disk, as a new process would
    yield
    cache._opened.clear()


def _photo(path, size, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path, quality=90) if path.suffix == ".jpg" else \
        Image.fromarray(pixels.numpy()).save(path)


def _folder(root, broken=True):
    for k, size in enumerate(SIZES):
        _photo(root / "a" / f"{k}.jpg", size, k)
        _photo(root / "b" / f"{k}.png", size[::-1], 100 + k)
    if broken:
        (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _source(root):
    _, samples = scan_folder(root)
    return FileSource(samples, str(root))


def _all(source, **kw):
    return [(b.x, b.y) for b in batches(source, PRE, batch_size=4, train=False, **kw)]


def _open(root, mode="auto", **kw):
    cache._opened.clear()
    return cache.cached(_source(root), PRE, mode, **{"threads": 2, **kw})


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_evaluation_reads_from_the_cache_the_pixels_it_decodes_from_the_files(tmp_path, mode):
    root = _folder(tmp_path / "photos")
    source, report, skipped = _open(root, mode)
    assert report.built and report.mode == mode and report.images == 2 * len(SIZES)
    assert [s.path for s in skipped] == [str(root / "b" / "broken.jpg")]  # left out, and said once, here
    assert [s.path for s in report.skipped] == [str(root / "b" / "broken.jpg")]
    from_files = _all(_source(root))
    from_cache = _all(source)
    assert len(from_files) == len(from_cache) == 3
    for (xf, yf), (xc, yc) in zip(from_files, from_cache):
        assert torch.equal(xf, xc) and torch.equal(yf, yc)  # bit-identical: the same resize, the same crop


def test_training_without_the_cache_crops_from_the_square_the_cache_stores(tmp_path):
    """--cache off and the cache train on the same pixels: a worker's crop of an image is drawn from the square the
    cache stores, with the item's own seed; a crop of the whole file would differ for every image that is not
    square."""
    from mobilenet_fn.augment import Augment, random_resized_crop_one
    from mobilenet_fn.batches import item_seed
    from mobilenet_fn.preprocess import Layout, fit, model_input, read_rgb

    root = _folder(tmp_path / "photos", broken=False)
    layout = Layout.of(PRE)
    for path, label in _source(root).samples:
        square = fit(read_rgb(path), layout)
        for epoch in range(3):
            expected = random_resized_crop_one(square, 24, torch.Generator().manual_seed(item_seed(0, epoch, 0)),
                                               scale=(0.5, 1.0))
            (batch,) = batches(FileSource([(path, label)], str(root)), PRE, batch_size=1, train=True,
                               augment=Augment(crop_scale=0.5), epoch=epoch)
            assert torch.equal(batch.x, model_input(expected[None], PRE)), (path, epoch)


def test_a_second_open_reads_the_cache_back_without_decoding(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    first, report, _ = _open(root)
    monkeypatch.setattr(cache, "decode_file", lambda *a: pytest.fail("decoded again"))
    second, report2, skipped = _open(root)
    assert report.built and not report2.built and report2.path == report.path and len(skipped) == 1
    assert torch.equal(first.images, second.images) and torch.equal(first.rows, second.rows)


@pytest.mark.parametrize("change", ["changed", "added", "deleted"])
def test_a_changed_added_or_deleted_file_rebuilds_the_cache(tmp_path, change):
    root = _folder(tmp_path / "photos", broken=False)
    before, _, _ = _open(root)
    target = root / "a" / "1.jpg"
    if change == "changed":
        _photo(target, SIZES[1], seed=999)
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    elif change == "added":
        _photo(root / "a" / "new.jpg", (33, 33), seed=5)
    else:
        target.unlink()
    after, report, _ = _open(root)
    assert report.built and report.rebuilt_because == "the folder's files changed"
    assert len(after) == len(before) + {"changed": 0, "added": 1, "deleted": -1}[change]
    for (xf, _), (xc, _) in zip(_all(_source(root)), _all(after)):
        assert torch.equal(xf, xc)


def test_a_build_interrupted_part_way_leaves_nothing_that_is_read(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    real, calls = cache.decode_file, []

    def interrupted(path, layout):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, layout)

    monkeypatch.setattr(cache, "decode_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _open(root, threads=1)
    slot = cache.slot_for(root, cache.Layout.of(PRE))
    assert not (slot / "manifest.json").exists() and not (slot / "images.u8").exists()
    assert not list(slot.glob(".images*"))  # its temporary file is gone too
    monkeypatch.setattr(cache, "decode_file", real)
    source, report, _ = _open(root)
    assert report.built and report.rebuilt_because is None
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_all(_source(root)), _all(source)))


def test_a_build_killed_part_way_is_rebuilt_and_its_temporary_file_removed(tmp_path):
    root = _folder(tmp_path / "photos")
    source, report, _ = _open(root)
    slot = report.path
    # What a SIGKILL mid-build leaves: the manifest unlinked first, a temporary file, maybe the old images.
    (slot / "manifest.json").unlink()
    (slot / ".images.u8.1234abcd.tmp").write_bytes(b"\0" * 1000)
    source, report, _ = _open(root)
    assert report.built and not list(slot.glob(".images*"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_all(_source(root)), _all(source)))


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte": lambda slot: _flip_byte(slot / "images.u8"),
    "truncated images": lambda slot: os.truncate(slot / "images.u8", (slot / "images.u8").stat().st_size - 7),
    "missing images": lambda slot: (slot / "images.u8").unlink(),
    "garbage manifest": lambda slot: (slot / "manifest.json").write_bytes(b"\x00{garbage"),
    "manifest of a list": lambda slot: (slot / "manifest.json").write_text("[1, 2]"),
    "manifest missing a field": lambda slot: (slot / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((slot / "manifest.json").read_text()).items() if k != "crc32"})),
}


@pytest.mark.parametrize("mode", ["ram", "disk"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_cache_is_rebuilt_never_served(tmp_path, corruption, mode):
    root = _folder(tmp_path / "photos")
    _, report, _ = _open(root, mode)
    CORRUPTIONS[corruption](report.path)
    source, report, _ = _open(root, mode)
    assert report.built and report.rebuilt_because
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_all(_source(root)), _all(source)))


def test_device_decoding_leaves_what_it_cannot_read_to_pil(tmp_path):
    # The batched decode_jpeg path that runs on CUDA, run on the CPU: a damaged JPEG and a PNG come back as None
    # (for PIL), the JPEGs as PIL decodes them (the same libjpeg arithmetic up to rounding).
    root = _folder(tmp_path / "photos")
    paths = [str(root / "a" / "0.jpg"), str(root / "b" / "broken.jpg"), str(root / "b" / "0.png"),
             str(root / "a" / "2.jpg"), str(tmp_path / "gone.jpg")]
    layout = cache.Layout.of(PRE)
    out = cache.decode_on_device(paths, layout, torch.device("cpu"))
    assert [o is None for o in out] == [False, True, True, False, True]
    for k in (0, 3):
        pil = cache.decode_file(paths[k], layout)
        assert out[k].shape == pil.shape == (3, 27, 27)
        assert (out[k].int() - pil.int()).abs().float().mean() < 2
    results = dict(cache.decode_all(paths, layout, threads=2, device=torch.device("cpu")))
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert torch.equal(results[2], cache.decode_file(paths[2], layout))  # the PNG: PIL's, after the fallback
    assert [isinstance(results[k], str) for k in range(5)] == [False, True, False, False, True]


def test_auto_keeps_the_cache_in_ram_only_when_its_copies_fit_the_stated_share():
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cache.pick_mode("auto", 10**6) == "ram"
    assert cache.pick_mode("auto", int(memory * cache.RAM_SHARE * 0.9), copies=2) == "disk"
    assert cache.pick_mode("disk", 10) == "disk" and cache.pick_mode("ram", memory) == "ram"


def test_the_cache_folder_follows_the_environment_and_never_sits_in_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBILENET_FN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mobilenet-fn"
    root = _folder(tmp_path / "photos")
    monkeypatch.setenv("MOBILENET_FN_CACHE", str(root / "cache"))
    with pytest.raises(DataError, match="inside the data folder"):
        _open(root)
    assert not (root / "cache").exists()


OPEN_IN_A_PROCESS = """
import sys
from pathlib import Path
from mobilenet_fn import cache
from mobilenet_fn.data import scan_folder
from mobilenet_fn.sources import FileSource
from mobilenet_fn.preprocess import preprocess_for
_, samples = scan_folder(Path(sys.argv[1]))
pre = preprocess_for(24, crop_pct=0.875, stats={"mean": [0.5] * 3, "std": [0.25] * 3})
_, report, _ = cache.cached(FileSource(samples, sys.argv[1]), pre, "disk", threads=1)
print("built" if report.built else "read")
"""


def test_processes_opening_one_cache_at_once_build_it_once(tmp_path):
    root = _folder(tmp_path / "photos")
    for k in range(40):  # enough decoding for the two processes to overlap
        _photo(root / "a" / f"more{k}.jpg", (200, 150), k)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_IN_A_PROCESS, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["built", "read"]


runner = CliRunner()


def test_eval_of_a_folder_through_the_cache_equals_eval_of_the_files(tmp_path):
    root = _folder(tmp_path / "photos")
    trained = runner.invoke(app, ["train", "--data", str(root), "--alpha", "0.25", "--resolution", "32",
                                  "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--compile", "off",
                                  "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert "Decoded 11 images" in trained.output and "Left out 1 unreadable image" in trained.output
    weights = str(tmp_path / "run" / "weights.pkl")
    results = {}
    for mode in ("off", "auto", "disk"):
        result = runner.invoke(app, ["eval", weights, "--data", str(root), "--device", "cpu", "--json",
                                     "--cache", mode, "--workers", "0"])
        assert result.exit_code == 0, result.output
        results[mode] = json.loads(result.stdout)
    assert "Read the decoded cache" in result.stderr  # the resolution and resize of the run: its cache
    assert results["off"] == results["auto"] == results["disk"]
    assert results["off"]["n"] == 10 and [s["path"] for s in results["auto"]["skipped"]] == [
        str(root / "b" / "broken.jpg")]


def test_a_bad_cache_mode_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "--data", "sample", "--cache", "sometimes", "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--cache must be one of auto, ram, disk, off" in result.output


def test_two_processes_train_from_one_cache_that_one_of_them_builds(tmp_path):
    root = _folder(tmp_path / "photos")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOBILENET_FN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "mobilenet_fn", "train", "--data", str(root), "--nproc", "2",
                             "--alpha", "0.25", "--resolution", "32", "--batch-size", "2", "--epochs", "1",
                             "--device", "cpu", "--compile", "off", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Decoded 11 images") + result.stderr.count("Read the decoded cache") == 1  # rank 0
    slots = list((tmp_path / "cache" / "decoded").iterdir())
    assert len(slots) == 1 and (slots[0] / "manifest.json").exists() and not list(slots[0].glob(".images*"))
