"""`mobilenet-fn resize`: exact geometry, every input kind, bad files, idempotence, atomic writes, in place."""

import hashlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from mobilenet_fn import resize as rz
from mobilenet_fn.cli.main import app
from test_weights import one_line_error

GREY, RED, GREEN, BLUE, WHITE, BLACK = (128, 128, 128), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0,) * 3


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def halves(size, left, right, mode="RGB") -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] - size[0] // 2, 0))
    return image


def framed(size=(512, 256), border=20) -> Image.Image:
    """Grey with a red frame ``border`` pixels wide."""
    image = Image.new("RGB", size, RED)
    image.paste(Image.new("RGB", (size[0] - 2 * border, size[1] - 2 * border), GREY), (border, border))
    return image


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A few-byte PNG whose header claims width×height pixels: a decompression bomb for Pillow's check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def noise_jpeg(size=(640, 480), seed=0) -> bytes:
    image = Image.frombytes("RGB", size, __import__("random").Random(seed).randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def near(pixel, expected, tolerance=6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name != rz.REPORT_NAME)


def resize_tree(src, out=None, workers=1, **settings) -> dict:
    job = rz.plan(src, out, rz.Settings(**{k: v for k, v in settings.items() if k not in ("overwrite", "in_place")}),
                  overwrite=settings.get("overwrite", False), in_place=settings.get("in_place", False))
    return rz.finish(job, rz.run(job, workers), 1.0)


def invoke(*args):
    return CliRunner().invoke(app, ["resize", *map(str, args)])


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode", rz.MODES)
@pytest.mark.parametrize("source", [(1024, 768), (768, 1024), (10, 7), (224, 224), (3000, 17), (1, 1)])
@pytest.mark.parametrize("size", [224, 97])
def test_every_mode_gives_exactly_size_squared(tmp_path, mode, source, size):
    path = save(tmp_path / "x.png", Image.new("RGB", source, GREEN))
    image = rz.resize_image(path, rz.Settings(size=size, resize_to=max(size, 256), mode=mode))
    assert image.size == (size, size) and image.mode == "RGB"
    # crop and stretch: all picture. pad: the picture scaled to fit (longer side = size, the other rounded, at
    # least 1 px), centred, and black bars exactly in the rest.
    w, h = source
    if mode == "pad":
        pw, ph = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    else:
        pw, ph = size, size
    left, top = (size - pw) // 2, (size - ph) // 2
    assert image.crop((left, top, left + pw, top + ph)).getcolors() == [(pw * ph, GREEN)]
    expected = {GREEN: pw * ph, BLACK: size * size - pw * ph} if (pw, ph) != (size, size) else {GREEN: size * size}
    assert {colour: n for n, colour in image.getcolors()} == expected


def test_crop_scales_the_short_side_then_keeps_the_centre(tmp_path):
    # 512×256, short side already 256: the kept square is columns 144-367, rows 16-239 of the source.
    image = rz.resize_image(save(tmp_path / "f.png", framed()), rz.Settings(mode="crop"))
    assert near(image.getpixel((112, 1)), RED)  # source rows 16-19 are the frame's last rows
    assert near(image.getpixel((112, 8)), GREY)
    assert near(image.getpixel((1, 112)), GREY) and near(image.getpixel((222, 112)), GREY)  # sides cut away


def test_pad_letterboxes_on_black(tmp_path):
    # 512×256 fits as 224×112 at rows 56-167; the frame is 20·224/512 ≈ 8.75 px wide there.
    image = rz.resize_image(save(tmp_path / "f.png", framed()), rz.Settings(mode="pad"))
    for y in (0, 30, 54, 169, 200, 223):
        assert image.getpixel((112, y)) == BLACK
    assert near(image.getpixel((112, 59)), RED) and near(image.getpixel((2, 112)), RED)
    assert near(image.getpixel((112, 112)), GREY)


def test_stretch_keeps_the_whole_frame(tmp_path):
    image = rz.resize_image(save(tmp_path / "f.png", framed()), rz.Settings(mode="stretch"))
    assert near(image.getpixel((112, 2)), RED) and near(image.getpixel((2, 112)), RED)
    assert near(image.getpixel((112, 112)), GREY)


def test_exif_orientation_turns_the_picture_upright(tmp_path):
    # Stored landscape 300×200, red above blue; orientation 6 means "turn 90° clockwise to view": the viewer
    # sees a portrait picture, blue on the left, red on the right.
    stored = Image.new("RGB", (300, 200), BLUE)
    stored.paste(Image.new("RGB", (300, 100), RED), (0, 0))
    exif = Image.Exif()
    exif[rz.ORIENTATION_TAG] = 6
    path = save(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=95)
    image = rz.resize_image(path, rz.Settings(mode="pad"))
    assert image.getpixel((5, 112)) == BLACK and image.getpixel((218, 112)) == BLACK  # bars left and right
    for y in (2, 112, 221):  # no bars above or below
        assert near(image.getpixel((70, y)), BLUE, 40) and near(image.getpixel((154, y)), RED, 40)


# ---------------------------------------------------------------------------------------------- input kinds


def _gif_two_frames(path):
    first = Image.new("P", (256, 256), 0)
    first.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    first.paste(1, (128, 0, 256, 256))
    second = Image.new("P", (256, 256), 0)
    second.putpalette([0, 255, 0] * 256)
    save(path, first, save_all=True, append_images=[second], transparency=1, optimize=False)


def _cmyk_jpeg(path):
    save(path, Image.new("CMYK", (256, 256), (0, 255, 255, 0)), quality=95)


KINDS = {  # file name → (how to make it, colour expected left of centre, colour expected right of centre)
    "rgba.png": (lambda p: save(p, halves((256, 256), (0, 255, 0, 255), (255, 0, 0, 0), "RGBA")), GREEN, WHITE),
    "palette.gif": (_gif_two_frames, BLUE, WHITE),  # first frame; index 1 transparent
    "sixteen.png": (lambda p: save(p, Image.new("I;16", (256, 256), 40000)), (156,) * 3, (156,) * 3),
    "grey.png": (lambda p: save(p, Image.new("L", (256, 256), 77)), (77,) * 3, (77,) * 3),
    "cmyk.jpg": (_cmyk_jpeg, RED, RED),
    "lossless.webp": (lambda p: save(p, halves((256, 256), BLUE, GREEN), lossless=True), BLUE, GREEN),
    "bitmap.bmp": (lambda p: save(p, halves((256, 256), RED, BLUE)), RED, BLUE),
    "scan.tif": (lambda p: save(p, halves((256, 256), GREEN, RED)), GREEN, RED),
    "la.png": (lambda p: save(p, halves((256, 256), (0, 255), (200, 0), "LA")), BLACK, WHITE),
}


@pytest.mark.parametrize("name", KINDS)
def test_every_input_kind_becomes_8_bit_rgb_with_its_colours(tmp_path, name):
    make, left, right = KINDS[name]
    path = tmp_path / name
    make(path)
    image = rz.resize_image(path, rz.Settings())
    assert image.mode == "RGB" and image.size == (224, 224)
    tolerance = 12 if name.endswith(".jpg") else 1
    assert near(image.getpixel((40, 112)), left, tolerance), image.getpixel((40, 112))
    assert near(image.getpixel((184, 112)), right, tolerance), image.getpixel((184, 112))


def test_outputs_carry_their_settings_and_decode_to_what_was_resized(tmp_path):
    image = rz.resize_image(save(tmp_path / "f.png", framed()), rz.Settings())
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = rz.encode(image, fmt, 95, "stamp here")
        decoded = Image.open(io.BytesIO(data))
        assert decoded.format == fmt and decoded.size == (224, 224)
        assert decoded.getexif()[rz.SOFTWARE_TAG] == "stamp here"
    assert Image.open(io.BytesIO(rz.encode(image, "PNG", 95, "s"))).convert("RGB").tobytes() == image.tobytes()


# ---------------------------------------------------------------------------------------------- a tree


@pytest.fixture
def raw(tmp_path) -> Path:
    """Two class folders of good images, every kind of bad file, and a README that is not an image."""
    src = tmp_path / "raw"
    for i in range(3):
        save(src / "cat" / f"{i}.jpg", halves((400 + 37 * i, 300), RED, BLUE), quality=90)
    save(src / "dog" / "a.png", framed((300, 500)))
    save(src / "dog" / "b.webp", framed((640, 480)))
    (src / "dog" / "empty.jpg").write_bytes(b"")
    (src / "dog" / "truncated.jpg").write_bytes(noise_jpeg()[:60_000])
    (src / "dog" / "text.jpg").write_text("this is not a picture\n")
    png_declaring(src / "dog" / "bomb.png", 60_000, 60_000)
    (src / "dog" / "gone.jpg").symlink_to(src / "nowhere.jpg")  # listed, but cannot be read
    (src / "README.txt").write_text("downloaded with some tool\n")
    return src


GOOD = {"cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "dog/a.jpg", "dog/b.jpg"}
BAD = {"dog/empty.jpg": "empty", "dog/truncated.jpg": "truncated", "dog/text.jpg": "not an image",
       "dog/bomb.png": "decompression bomb", "dog/gone.jpg": "cannot read"}


def test_a_run_leaves_the_originals_byte_identical_and_writes_a_mirror(raw):
    before = digest(raw)
    report = resize_tree(raw, workers=2)
    assert digest(raw) == before
    out = raw.with_name("raw-224")
    assert report["output"] == str(out) and {str(p.relative_to(out)) for p in images_in(out)} == GOOD
    for path in images_in(out):
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.size == (224, 224) and image.mode == "RGB"
            if path.parent.name == "cat":  # red left, blue right, as the source halves
                assert near(image.getpixel((40, 112)), RED, 12) and near(image.getpixel((184, 112)), BLUE, 12)
            else:  # a red frame around grey: the centre is grey
                assert near(image.getpixel((112, 112)), GREY, 12)


def test_each_bad_file_is_reported_and_skipped(raw):
    report = resize_tree(raw)
    assert (report["written"], report["failed"], report["not_images"]) == (len(GOOD), len(BAD), 1)
    reasons = {f["file"]: f["reason"] for f in report["failed_files"]}
    assert set(reasons) == set(BAD)
    for name, word in BAD.items():
        assert word in reasons[name], reasons[name]
    on_disk = json.loads((raw.with_name("raw-224") / rz.REPORT_NAME).read_text())
    assert on_disk["failed_files"] == report["failed_files"]


def test_an_image_over_the_decoded_pixel_bound_is_reported_too_large_without_being_decoded(tmp_path, monkeypatch):
    # One grey over 40 megapixels: a 53 kB PNG that would take 40 MB decoded (120 MB as RGB) in each worker.
    side = math.isqrt(rz.MAX_DECODED_PIXELS) + 1
    save(tmp_path / "raw" / "big" / "grey.png", Image.new("L", (side, side), 128))
    save(tmp_path / "raw" / "big" / "small.png", framed())

    def decoded(image):
        raise AssertionError(f"{image.size} decoded")

    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda image: decoded(image) if image.size == (side, side) else real_load(image))
    report = resize_tree(tmp_path / "raw")
    assert report["written"] == 1
    too_large = f"too large ({side}×{side}): over 40 megapixels"
    assert report["failed_files"] == [{"file": "big/grey.png", "reason": too_large}]


@pytest.mark.parametrize("size, reason", [
    (224, None),  # decoded at 1/2 scale: 600×500, under the bound
    (1000, "too large (1200×1000): over 1 megapixels"),  # no draft keeps 1000 px of detail: the whole image
])
def test_a_jpeg_whose_draft_brings_it_under_the_bound_still_resizes(tmp_path, monkeypatch, size, reason):
    monkeypatch.setattr(rz, "MAX_DECODED_PIXELS", 1_000_000)  # the 1.2-megapixel JPEG is over it
    save(tmp_path / "raw" / "cat" / "big.jpg", halves((1200, 1000), RED, BLUE), quality=90)
    report = resize_tree(tmp_path / "raw", size=size, resize_to=size, mode="pad")
    assert report["failed_files"] == ([{"file": "cat/big.jpg", "reason": reason}] if reason else [])
    if reason is None:
        with Image.open(Path(report["output"]) / "cat" / "big.jpg") as image:
            assert image.size == (size, size) and near(image.getpixel((40, 112)), RED, 12)


def test_train_eval_and_predict_read_images_under_the_same_bound(tmp_path, monkeypatch):
    from mobilenet_fn.preprocess import ImageTooLarge, read_rgb

    path = save(tmp_path / "big.png", Image.new("L", (1200, 1000), 128))
    assert read_rgb(path).shape == (3, 1000, 1200)
    monkeypatch.setattr(rz, "MAX_DECODED_PIXELS", 1_000_000)
    with pytest.raises(ImageTooLarge, match="too large"):
        read_rgb(path)


def test_a_second_run_writes_nothing(raw):
    resize_tree(raw)
    out = raw.with_name("raw-224")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in images_in(out)}
    report = resize_tree(raw, workers=2)
    assert (report["written"], report["done"], report["failed"]) == (0, len(GOOD), len(BAD))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in images_in(out)} == before


def test_overwrite_redoes_and_other_settings_are_kept_until_asked(raw):
    out = raw.parent / "out"
    resize_tree(raw, out, quality=95)
    first = digest(out)
    report = resize_tree(raw, out, quality=60)
    assert (report["written"], report["kept"]) == (0, len(GOOD))
    assert "quality=95" in report["kept_files"][0]["reason"]
    assert {k: v for k, v in digest(out).items() if k != rz.REPORT_NAME} == \
        {k: v for k, v in first.items() if k != rz.REPORT_NAME}
    report = resize_tree(raw, out, quality=60, overwrite=True)
    assert report["written"] == len(GOOD)
    assert all(digest(out)[k] != first[k] for k in GOOD)


def test_a_changed_source_is_redone_and_a_stranger_in_the_way_is_kept(raw):
    out = raw.parent / "out"
    resize_tree(raw, out)
    save(raw / "cat" / "1.jpg", Image.new("RGB", (300, 300), GREEN))
    stranger = save(out / "dog" / "a.jpg", Image.new("RGB", (50, 50), RED)).read_bytes()
    report = resize_tree(raw, out)
    assert (report["written"], report["done"], report["kept"]) == (1, 3, 1)
    assert near(Image.open(out / "cat" / "1.jpg").getpixel((112, 112)), GREEN)
    assert (out / "dog" / "a.jpg").read_bytes() == stranger
    assert report["kept_files"] == [{"file": "dog/a.png", "reason": "a file not made by resize is in the way"}]


def test_sources_that_would_share_an_output_name_both_get_one(tmp_path):
    save(tmp_path / "raw" / "c" / "x.jpg", Image.new("RGB", (64, 64), RED))
    save(tmp_path / "raw" / "c" / "x.png", Image.new("RGB", (64, 64), BLUE))
    resize_tree(tmp_path / "raw")
    out = tmp_path / "raw-224" / "c"
    assert near(Image.open(out / "x.jpg").getpixel((5, 5)), RED, 12)
    assert near(Image.open(out / "x.png.jpg").getpixel((5, 5)), BLUE, 12)


def test_format_keep_and_png(tmp_path):
    for name in ("a.jpg", "b.png", "c.webp", "d.bmp", "e.gif", "f.tiff"):
        save(tmp_path / "raw" / "c" / name, Image.new("RGB", (300, 200), RED))
    resize_tree(tmp_path / "raw", tmp_path / "keep", format="keep")
    formats = {p.name: Image.open(p).format for p in images_in(tmp_path / "keep")}
    assert formats == {"a.jpg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "d.png": "PNG", "e.png": "PNG",
                       "f.png": "PNG"}
    resize_tree(tmp_path / "raw", tmp_path / "png", format="png")
    assert {Image.open(p).format for p in images_in(tmp_path / "png")} == {"PNG"}


# ---------------------------------------------------------------------------------------------- atomic writes


def test_a_failed_write_leaves_neither_output_nor_temp(tmp_path, monkeypatch):
    target = tmp_path / "out" / "x.jpg"

    def half_then_die(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        rz.write_atomic(target, b"x" * 1000)
    assert list(target.parent.iterdir()) == []


def test_stale_temps_from_a_killed_run_are_removed(raw):
    out = raw.with_name("raw-224")
    stale = out / "cat" / f".0.jpg.4242{rz.TEMP_SUFFIX}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a jpeg")
    resize_tree(raw)
    assert not stale.exists() and (out / "cat" / "0.jpg").exists()


def test_a_run_killed_midway_finishes_on_restart_with_every_file_valid(tmp_path):
    src, out, count = tmp_path / "raw", tmp_path / "out", 300
    (src / "a").mkdir(parents=True)
    data = noise_jpeg()
    for i in range(count):
        (src / "a" / f"{i:03d}.jpg").write_bytes(data)
    command = [sys.executable, "-m", "mobilenet_fn", "resize", str(src), "--out", str(out), "--workers", "2"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None:
        if (out / "a").is_dir() and sum(not name.startswith(".") for name in os.listdir(out / "a")) >= 30:
            break
        time.sleep(0.002)
    os.killpg(run.pid, signal.SIGKILL)  # the whole group: the CLI and its workers, wherever they are
    run.wait()
    finished = sorted((out / "a").iterdir())
    complete = [p for p in finished if not p.name.endswith(rz.TEMP_SUFFIX)]
    assert 30 <= len(complete) < count, "the run was not killed midway"
    assert not (out / rz.REPORT_NAME).exists()
    for path in complete:
        with Image.open(path) as image:
            image.load()
            assert image.size == (224, 224)

    result = invoke(src, "--out", out, "--workers", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["done"] >= len(complete) and report["done"] + report["written"] == count
    assert not [p for p in (out / "a").iterdir() if p.name.startswith(".")]
    for path in sorted((out / "a").iterdir()):
        with Image.open(path) as image:
            image.load()
            assert image.size == (224, 224) and image.getexif()[rz.SOFTWARE_TAG].startswith(rz.STAMP_PREFIX)


# ---------------------------------------------------------------------------------------------- in place


def test_in_place_replaces_each_original_once(tmp_path):
    src = tmp_path / "raw"
    save(src / "c" / "a.jpg", framed((640, 480)), quality=90)
    save(src / "c" / "b.png", framed((300, 500)))
    report = resize_tree(src, in_place=True)
    assert report["written"] == 2 and report["output"] == str(src)
    assert sorted(p.name for p in images_in(src)) == ["a.jpg", "b.jpg"]  # b.png is gone once b.jpg is complete
    assert all(Image.open(p).size == (224, 224) for p in images_in(src))
    assert all(near(Image.open(p).getpixel((112, 112)), GREY, 12) for p in images_in(src))  # the frame's centre
    after = digest(src)
    again = resize_tree(src, in_place=True, overwrite=True)  # never resizes a resized original again
    assert (again["written"], again["done"]) == (0, 2)
    assert {k: v for k, v in digest(src).items() if k != rz.REPORT_NAME} == \
        {k: v for k, v in after.items() if k != rz.REPORT_NAME}


# ---------------------------------------------------------------------------------------------- the command


def test_cli_resizes_and_prints_a_summary(raw):
    result = invoke(raw, "--size", "96", "--resize-to", "110", "--workers", "2")
    assert result.exit_code == 0, result.output
    for words in ("written", "skipped as done", "failed", "dog/bomb.png", "decompression bomb", "img/s"):
        assert words in result.output, words
    assert {Image.open(p).size for p in images_in(raw.with_name("raw-96"))} == {(96, 96)}
    cat = Image.open(raw.with_name("raw-96") / "cat" / "0.jpg")
    assert near(cat.getpixel((10, 48)), RED, 12) and near(cat.getpixel((86, 48)), BLUE, 12)
    assert near(Image.open(raw.with_name("raw-96") / "dog" / "a.jpg").getpixel((48, 48)), GREY, 12)


@pytest.mark.parametrize("args", [
    ["{src}", "--out", "{src}"],
    ["{src}", "--out", "{src}/cat/resized"],
    ["{src}", "--in-place", "--out", "{tmp}/elsewhere"],
    ["{tmp}/missing"],
    ["{src}/cat/0.jpg"],
    ["{src}", "--size", "0"],
    ["{src}", "--size", "300"],  # larger than --resize-to 256 with crop
    ["{src}", "--mode", "squash"],
    ["{src}", "--format", "gif"],
    ["{src}", "--quality", "101"],
    ["{src}", "--workers", "0"],
])
def test_bad_usage_is_one_line_exit_2_and_writes_nothing(raw, args):
    before = digest(raw.parent)
    one_line_error(invoke(*(a.format(src=raw, tmp=raw.parent) for a in args)))
    assert digest(raw.parent) == before


# ---------------------------------------------------------------------------------------------- resize, then train


def test_a_folder_resize_wrote_trains_on_every_image_it_holds(tmp_path):
    from mobilenet_fn.batches import batches
    from mobilenet_fn.data import load

    names = ("a.jpg", "b.jpeg", "c.jpe", "d.jfif", "e.png", "f.ppm", "g.pgm", "h.webp", "i.bmp", "j.tiff")
    for cls, colour in (("red", RED), ("blue", BLUE)):
        for name in names:
            save(tmp_path / "raw" / cls / name, Image.new("L" if name.endswith(".pgm") else "RGB", (40, 30),
                                                          80 if name.endswith(".pgm") else colour))
        (tmp_path / "raw" / cls / "notes.txt").write_text("not an image")
    report = resize_tree(tmp_path / "raw", tmp_path / "out", size=32, resize_to=32)
    assert report["written"] == 2 * len(names) and report["failed"] == 0 and report["not_images"] == 2
    for folder in ("raw", "out"):
        ds = load(str(tmp_path / folder), resolution=32, val_split=0.2)
        assert len(ds.train) + len(ds.val) == 2 * len(names), folder
        assert sorted(Path(p).name for p in ds.ignored) == (["notes.txt"] * 2 if folder == "raw" else [])
        for source, train in ((ds.train, True), (ds.val, False)):  # every file decodes into the one batch
            got = list(batches(source, ds.preprocess, batch_size=len(source), train=train))
            assert sum(len(b.y) for b in got) == len(source) and not any(b.skipped for b in got)
