"""Odd images through predict, eval and train: each is read correctly or skipped with a reason, never a crash, a
traceback or a decode that eats the machine (the CLI runs under an address-space ceiling)."""

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from mobilenet_fn import Config, save_weights
from mobilenet_fn.batches import batches
from mobilenet_fn.sources import FileSource
from mobilenet_fn.preprocess import MAX_DECODED_PIXELS, ImageTooLarge, eval_image, preprocess_for, read_rgb
from test_weights import make_weights

STATS = {"mean": [0.5] * 3, "std": [0.25] * 3}
RED, BLUE = (220, 20, 20), (20, 20, 220)
READ = "read"  # the outcome of an image that must be read
# file -> READ, or a piece of the reason it is skipped for
ODD = {
    "tiny.png": READ, "grey.png": READ, "i16.png": READ, "palette_transparent.png": READ, "la.png": READ,
    "rgba.png": READ, "cmyk.jpg": READ, "exif6.jpg": READ, "anim.gif": READ, "anim.webp": READ, "anim.png": READ,
    "huge.jpg": READ, "over_pillow_warning.jpg": READ,
    "too_large.png": f"too large (9000×9000): over {MAX_DECODED_PIXELS // 1_000_000} megapixels",
    "bomb.png": "decompression bomb", "truncated.jpg": "truncated", "truncated.png": "truncated",
    "empty.jpg": "cannot identify image file", "text.jpg": "cannot identify image file",
}
MARGIN = 512 * 2**20  # the address space odd images may add to a normal predict's (a 9000² RGB decode: over 1 GB)


def png(path: Path, width: int, height: int, rgb=(90, 140, 200), idat: bool = True) -> None:
    """A real 8-bit RGB PNG of one colour, written a row at a time (cheap however large); without idat, the
    header of one with no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = b""
    if idat:
        z, row = zlib.compressobj(1), b"\0" + bytes(rgb) * width
        body = chunk(b"IDAT", b"".join(z.compress(row) for _ in range(height)) + z.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + body + chunk(b"IEND", b""))


def two_halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return im


def frames(ext: str, path: Path) -> None:
    """Two frames: red, then blue."""
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)


def make_odd_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "tiny.png")
    Image.new("L", (20, 12), 77).save(folder / "grey.png")
    Image.new("I;16", (20, 12), 0x8000).save(folder / "i16.png")  # 16-bit grey, half way
    pal = Image.new("P", (20, 12), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(folder / "palette_transparent.png", transparency=1)  # all red, all transparent
    Image.new("LA", (20, 12), (0, 0)).save(folder / "la.png")
    Image.new("RGBA", (20, 12), (0, 0, 0, 0)).save(folder / "rgba.png")
    Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise
    two_halves().save(folder / "exif6.jpg", exif=exif.tobytes(), quality=95)
    for ext in ("gif", "webp", "png"):
        frames(ext, folder / f"anim.{ext}")
    Image.new("L", (9000, 9000), 128).save(folder / "huge.jpg")  # 81 megapixels in 1 MB
    Image.new("L", (10000, 9500), 128).save(folder / "over_pillow_warning.jpg")  # 95 MP: Pillow warns
    png(folder / "too_large.png", 9000, 9000)
    png(folder / "bomb.png", 20000, 20000, idat=False)  # 400 MP: over Pillow's limit, refused from the header
    buf = folder / "noise.tmp.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, quality=90)
    (folder / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf.with_suffix(".png"))
    (folder / "truncated.png").write_bytes(buf.with_suffix(".png").read_bytes()[:-200])
    buf.unlink()
    buf.with_suffix(".png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image, whatever its name says\n")


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    make_odd_images(folder)
    return folder


def colour(t: torch.Tensor) -> list[int]:
    """The mean colour of a (3, H, W) uint8 tensor, rounded."""
    return t.float().mean((1, 2)).round().int().tolist()


# ---------------------------------------------------------------------------------------------- what each is read as


def test_odd_images_are_read_as_upright_8_bit_rgb(odd):
    assert colour(read_rgb(odd / "tiny.png")) == [10, 200, 30]
    assert colour(read_rgb(odd / "grey.png")) == [77] * 3
    assert colour(read_rgb(odd / "i16.png")) == [128] * 3  # its high byte; not clipped to white
    for name in ("palette_transparent.png", "la.png", "rgba.png"):
        assert colour(read_rgb(odd / name)) == [255] * 3, name  # transparency onto white, as resize does
    r, g, b = colour(read_rgb(odd / "cmyk.jpg"))
    assert r > 200 and g < 50 and b < 50
    for ext in ("gif", "webp", "png"):
        r, g, b = colour(read_rgb(odd / f"anim.{ext}"))
        assert r > 200 and b < 50, ext  # the first frame
    upright = read_rgb(odd / "exif6.jpg")  # stored 40x20, left half red: upright it is 20 wide, red on top
    assert upright.shape == (3, 40, 20)
    top, bottom = colour(upright[:, :18]), colour(upright[:, 22:])
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_eval_and_predict_turn_exif_rotated_photos_upright(tmp_path):
    """The same picture stored upright and stored sideways with orientation 6 gives the same eval tensor."""
    upright = two_halves((30, 48))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif.tobytes())
    pre = preprocess_for(24, crop_pct=0.875, stats=STATS)
    assert torch.equal(eval_image(tmp_path / "sideways.png", pre), eval_image(tmp_path / "upright.png", pre))


def test_a_large_jpeg_is_decoded_from_its_draft_no_smaller_than_needed(odd):
    image = read_rgb(odd / "huge.jpg", short_side=256)
    assert min(image.shape[1:]) == 1125  # libjpeg's smallest scale, 1/8 (256 would take 1/35)
    assert min(read_rgb(odd / "huge.jpg", short_side=1200).shape[1:]) == 2250  # 1/4
    with pytest.raises(ImageTooLarge, match="9000×9000"):  # nothing asked: the whole image, over the bound
        read_rgb(odd / "huge.jpg")
    pre = preprocess_for(224, crop_pct=0.875, stats=STATS)
    assert colour(eval_image(odd / "huge.jpg", pre)) == [128] * 3


def test_a_small_jpeg_is_decoded_whole(tmp_path):
    """Images under twice the size needed keep every pixel: eval and predict tensors do not change for them."""
    noise = Image.effect_noise((90, 61), 60).convert("RGB")
    noise.save(tmp_path / "photo.jpg", quality=95)
    with Image.open(tmp_path / "photo.jpg") as im:
        full = torch.from_numpy(__import__("numpy").array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_rgb(tmp_path / "photo.jpg", short_side=36), full)


def test_too_large_is_decided_from_the_header_before_any_decoding(odd, monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLarge, match="too large"):
        read_rgb(odd / "too_large.png", short_side=256)


def test_training_reads_odd_files_or_skips_them_with_the_reason(odd):
    files = sorted(p for p in odd.iterdir())
    pre = preprocess_for(32, crop_pct=0.875, stats=STATS)
    seen, skipped = 0, []
    for batch in batches(FileSource([(str(p), 0) for p in files]), pre, batch_size=len(files), train=True):
        seen += len(batch.y)
        skipped += batch.skipped
    assert seen == sum(v == READ for v in ODD.values())
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons.keys() == {k for k, v in ODD.items() if v != READ}
    for name, reason in reasons.items():
        assert ODD[name] in reason, (name, reason)
        assert str(skipped[0]) == f"{skipped[0].path}: {skipped[0].reason}"


# ---------------------------------------------------------------------------------------------- the commands


def run_cli(args: list, *, limit: int | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """``mobilenet-fn ARGS`` in a subprocess, its address space capped at ``limit`` bytes; returns the process and
    its peak address space (VmPeak) in bytes. One thread and two malloc arenas keep that peak steady."""
    code = ("import atexit, runpy, sys\n"
            "def peak():\n"
            "    line = [l for l in open('/proc/self/status') if l.startswith('VmPeak')][0]\n"
            "    sys.stderr.write('VMPEAK %d\\n' % (int(line.split()[1]) * 1024))\n"
            "atexit.register(peak)\n"
            "sys.argv = ['mobilenet-fn'] + sys.argv[1:]\n"
            "runpy.run_module('mobilenet_fn', run_name='__main__')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2", COLUMNS="200", NO_COLOR="1")

    def cap():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          preexec_fn=cap, timeout=300)
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VMPEAK")]
    return proc, peaks[-1] if peaks else 0


def clean(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Error" not in out.replace("Error: no readable", ""), out[-3000:]
    assert "Warning" not in out, out[-3000:]  # no DecompressionBombWarning, no PIL or torch warning either


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, odd):
    """Weights for 32-px inputs, a good image, and a normal predict's peak address space, measured here."""
    root = tmp_path_factory.mktemp("cli")
    w = make_weights(Config(alpha=0.25, resolution=32, num_classes=2), seed=1)
    w = w._replace(preprocess=preprocess_for(32, crop_pct=0.875, stats=STATS), classes=["a", "b"])
    save_weights(root / "w.pkl", w)
    two_halves((48, 40)).save(root / "good.jpg")
    proc, normal = run_cli(["predict", root / "w.pkl", root / "good.jpg", "--json", "--device", "cpu"])
    assert proc.returncode == 0 and normal > 0, proc.stderr[-2000:]
    return root, normal


def test_predict_reads_or_lists_every_odd_image_within_a_memory_ceiling(odd, cli_setup):
    root, normal = cli_setup
    proc, peak = run_cli(["predict", root / "w.pkl", odd, root / "good.jpg", "--json", "--device", "cpu"],
                         limit=normal + MARGIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean(proc)
    out = json.loads(proc.stdout)
    read = {Path(p["path"]).name for p in out["predictions"]}
    skipped = {Path(s["path"]).name: s["error"] for s in out["skipped"]}
    assert read == {k for k, v in ODD.items() if v == READ} | {"good.jpg"}
    assert skipped.keys() == {k for k, v in ODD.items() if v != READ}
    for name, reason in skipped.items():
        assert ODD[name] in reason, (name, reason)
    assert peak <= normal + MARGIN


def test_eval_and_train_on_a_folder_of_odd_images(odd, cli_setup, tmp_path):
    root, normal = cli_setup
    data = tmp_path / "data"
    for label, colour_ in (("a", RED), ("b", BLUE)):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 36), colour_).save(data / label / f"good{i}.jpg")
    for name in ODD:  # every odd file in class a
        (data / "a" / name).symlink_to(odd / name)

    proc, _ = run_cli(["eval", root / "w.pkl", "--data", data, "--json", "--workers", "0", "--device", "cpu"],
                      limit=normal + MARGIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean(proc)
    out = json.loads(proc.stdout)
    assert out["n"] == 6 + sum(v == READ for v in ODD.values())
    skipped = {Path(s["path"]).name: s["error"] for s in out["skipped"]}
    assert skipped.keys() == {k for k, v in ODD.items() if v != READ}
    for name, reason in skipped.items():
        assert ODD[name] in reason, (name, reason)

    proc, _ = run_cli(["eval", root / "w.pkl", "--data", data, "--workers", "0", "--device", "cpu"])
    assert proc.returncode == 0 and "Skipped" in proc.stderr and "too_large.png: too large" in proc.stderr

    proc, _ = run_cli(["train", "--data", data, "--epochs", "1", "--alpha", "0.25", "--resolution", "32",
                       "--batch-size", "2", "--workers", "0", "--compile", "off", "--device", "cpu",
                       "--val-split", "0.5", "--out", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    n_skips = sum(v != READ for v in ODD.values())
    assert f"Skipped {n_skips} unreadable image(s), e.g. " in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["skipped_files"] == n_skips
