"""`mobilenet-fn audit` on tiny synthetic folders: planted label errors, copies and leaks are found; the signals
match plain references; `train --exclude/--split` use what it writes; bad input is one line; the data is never
touched."""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from mobilenet_fn import audit as audit_lib
from mobilenet_fn import data as data_lib
from mobilenet_fn.cli.main import app
from mobilenet_fn.curation import exclude, item_names
from mobilenet_fn.model import Config, apply, init
from conftest import brightest_channel_weights
from mobilenet_fn.weights import save_weights
from test_weights import one_line_error

pytest.importorskip("cleanlab")
pytestmark = pytest.mark.kernels  # audits: .ci/run runs these again with AVX2 kernels
runner = CliRunner()
FAST = ["--alpha", "0.25", "--resolution", "32", "--compile", "off", "--device", "cpu", "--batch-size", "8"]
CLASSES = ("red", "green", "blue")
PER_CLASS = 40


def picture(kind: str, seed: int) -> Image.Image:
    """A 32 x 32 image in the colour ``kind`` whose brightness varies under smooth noise of its own: the classes
    are apart by a wide margin (which channel is brightest), and no two images of a class are near-copies (their
    grey thumbnails, the duplicate finder's view, are the noise alone)."""
    g = torch.Generator().manual_seed(seed)
    noise = F.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=32, mode="bilinear")[0]  # (1, 32, 32)
    hue = torch.full((3, 1, 1), 0.15)
    hue[CLASSES.index(kind)] = 1.0
    x = (255 * hue * (0.3 + 0.7 * noise)).round().byte()  # (3, 32, 32)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def make_folder(root, *, mislabeled=3):
    """One folder per class; ``mislabeled`` red pictures filed under green; an exact copy and a resized JPEG copy
    of two blue ones. Returns the planted files."""
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i, c in enumerate(CLASSES):
        for n in range(PER_CLASS):
            picture(c, 1000 * i + n).save(root / c / f"{n:03d}.png")
    wrong = []
    for n in range(mislabeled):
        path = root / "green" / f"wrong{n}.png"
        picture("red", 9000 + n).save(path)
        wrong.append(str(path))
    exact = root / "blue" / "copy.png"
    shutil.copyfile(root / "blue" / "000.png", exact)
    near = root / "blue" / "near.jpg"
    Image.open(root / "blue" / "001.png").resize((45, 45), Image.BICUBIC).save(near, quality=70)
    return {"wrong": wrong, "exact": (str(root / "blue" / "000.png"), str(exact)),
            "near": (str(root / "blue" / "001.png"), str(near))}


def listing(root):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A folder audited once by K-fold training (shared by the tests that read the report). Two short epochs: the
    tests of this report check what does not depend on how well the fold models learned."""
    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "data"
    planted = make_folder(root)
    before = listing(root)
    out = tmp / "report"
    result = runner.invoke(app, ["audit", str(root), *FAST, "--folds", "2", "--epochs", "2", "--augment", "none",
                                 "--out", str(out), "--fix-split", "--grad", "full", "--json"])
    return root, planted, before, out, result


def hand_built_judge(path, root) -> None:
    """Writes the weights of ``brightest_channel_weights`` for the colour folder ``root`` to ``path``."""
    from mobilenet_fn.weights import Weights

    dataset = data_lib.load(str(root), resolution=32)
    assert list(dataset.classes) == sorted(CLASSES)  # blue, green, red: channel 2, 1, 0
    cfg = Config(alpha=0.25, resolution=32, num_classes=3)
    params, state = brightest_channel_weights(cfg)
    order = [2, 1, 0]  # class i of the folder is channel order[i]
    params["fc"] = {"weight": params["fc"]["weight"][order], "bias": params["fc"]["bias"][order]}
    save_weights(path, Weights(cfg, params, state, dataset.classes, dataset.preprocess))


def test_audit_writes_its_report_and_finds_copies_and_leaks(audited):
    root, planted, before, out, result = audited
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] == 3 * PER_CLASS + 3 + 2
    assert len(report["fold_top1"]) == 2 and all(0 <= t <= 1 for t in report["fold_top1"])
    rows = rows_of(out / "issues.csv")
    assert list(rows[0]) == ["file", "given_label", "suggested_label", "kind", "score", "other"]
    # The exact copy and the resized JPEG copy are found, paired with their originals.
    pairs = {frozenset((r["file"], r["other"])): r for r in rows if r["kind"] in ("duplicate", "leak", "conflict")}
    exact = pairs[frozenset(planted["exact"])]
    assert float(exact["score"]) == 1.0
    assert frozenset(planted["near"]) in pairs
    # No distinct pictures were paired: only the planted copies.
    assert set(pairs) == {frozenset(planted["exact"]), frozenset(planted["near"])}
    assert report["exact_duplicate_pairs"] == 1
    for name in ("report.json", "issues.csv", "signals.csv"):
        assert (out / name).is_file()
    signals = rows_of(out / "signals.csv")
    assert len(signals) == report["images"]
    assert {"loss", "margin", "grad_norm", "quality", "outlier"} <= set(signals[0])
    assert listing(root) == before  # nothing in the data folder was written, moved or touched


def test_each_fold_model_judges_only_images_it_did_not_train_on(tmp_path, monkeypatch):
    from mobilenet_fn import options as options_lib
    from mobilenet_fn import train as train_lib

    root = tmp_path / "data"
    make_folder(root)
    pool, _ = audit_lib.load_pool(str(root), resolution=32)
    seen = []

    class Recording(train_lib.Trainer):
        def __post_init__(self):
            seen.append((set(self.dataset.train.rows.tolist()), set(self.dataset.val.rows.tolist())))
            super().__post_init__()

    monkeypatch.setattr(train_lib, "Trainer", Recording)
    opts = options_lib.TrainOptions(data=str(root), epochs=1, batch_size=8, compile="off", workers=0)
    cfg = Config(alpha=0.25, resolution=32, num_classes=3)
    outputs = [e for e in audit_lib.out_of_sample(pool, cfg, opts, folds=3, grad="off")][-1]
    assert len(seen) == 3
    for f, (trained, judged) in enumerate(seen):
        assert not trained & judged and trained | judged == set(range(len(pool)))
        assert judged == set((outputs.fold == f).nonzero().flatten().tolist())
    assert set().union(*(judged for _, judged in seen)) == set(range(len(pool)))


def test_audit_ranks_the_planted_label_errors_first(tmp_path):
    # Judged by a model built by hand (it reads an image's brightest channel): its probabilities are what a good
    # trained model's would be, on every CPU. The planted red pictures filed under green are the label issues,
    # red suggested, and no correctly filed picture is flagged.
    root = tmp_path / "data"
    planted = make_folder(root)
    hand_built_judge(tmp_path / "judge.pkl", root)
    out = tmp_path / "report"
    result = runner.invoke(app, ["audit", str(root), "--weights", str(tmp_path / "judge.pkl"), "--device", "cpu",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["out_of_sample_top1"] == pytest.approx((3 * PER_CLASS + 2) / report["images"])
    labels = [r for r in rows_of(out / "issues.csv") if r["kind"] == "label"]
    assert {r["file"] for r in labels} == set(planted["wrong"])
    assert all((r["given_label"], r["suggested_label"]) == ("green", "red") for r in labels)
    assert Image.open(out / "suspects-label.png").size[0] > 100
    assert report["labels_flagged"] and report["judge_kappa"] >= audit_lib.JUDGE_MIN_KAPPA


def test_a_judge_near_chance_ranks_the_labels_but_flags_none(tmp_path):
    # The hand-built judge with its classes shuffled: right on almost none (chance: 43 of 125). Confident
    # learning would flag most of the folder; the audit says why it flags none and still finds the copies.
    root = tmp_path / "data"
    planted = make_folder(root)
    hand_built_judge(tmp_path / "judge.pkl", root)
    from mobilenet_fn.weights import load_weights

    judge = load_weights(tmp_path / "judge.pkl")
    fc = judge.params["fc"]
    judge.params["fc"] = {"weight": fc["weight"][[1, 2, 0]], "bias": fc["bias"][[1, 2, 0]]}
    save_weights(tmp_path / "weak.pkl", judge)
    out = tmp_path / "report"
    result = runner.invoke(app, ["audit", str(root), "--weights", str(tmp_path / "weak.pkl"), "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["out_of_sample_top1"] < 0.1 and not report["labels_flagged"]
    assert report["chance_top1"] == pytest.approx(43 / 125)  # green: 40 pictures and the 3 red ones filed there
    rows = rows_of(out / "issues.csv")
    assert not [r for r in rows if r["kind"] == "label"]
    assert {frozenset((r["file"], r["other"])) for r in rows} == {frozenset(planted["exact"]),
                                                                    frozenset(planted["near"])}
    assert "no label is flagged" in " ".join(result.output.split())
    quality = [float(r["quality"]) for r in rows_of(out / "signals.csv")]
    assert len(quality) == report["images"] and len(set(quality)) > 1  # still ranked


def test_judge_kappa_is_its_top1_above_the_commonest_class():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 2)
    logits = F.one_hot(torch.tensor([0] * 6 + [2] * 2 + [1, 2]), 3).float()  # 7 of 10 right; chance 6 of 10
    judge = audit_lib.judge_of(logits, labels, 3)
    assert judge.top1 == pytest.approx(0.7) and judge.chance == pytest.approx(0.6)
    assert judge.kappa == pytest.approx(0.25) and not judge.flags_labels
    assert audit_lib.judge_of(F.one_hot(labels, 3).float(), labels, 3).kappa == pytest.approx(1.0)


def test_fold_epochs_follow_the_data_size():
    assert audit_lib.fold_epochs(46_667, 32) == 6  # Fashion-MNIST's 70,000 in 3 folds: the budget's own figure
    assert audit_lib.fold_epochs(1_467, 96) == 21  # 2,200 photos in 3 folds
    assert audit_lib.fold_epochs(60_000, 224) == audit_lib.FOLD_EPOCHS[0]
    assert audit_lib.fold_epochs(80, 32) == audit_lib.FOLD_EPOCHS[1]


def test_a_fold_stops_once_its_held_out_part_stops_improving_and_judges_with_its_best_epoch(tmp_path, monkeypatch):
    from mobilenet_fn import options as options_lib
    from mobilenet_fn import train as train_lib

    root = tmp_path / "data"
    make_folder(root)
    pool, _ = audit_lib.load_pool(str(root), resolution=32)
    validated, kept = [], {}

    class Declining(train_lib.Trainer):
        """Held-out accuracy falls after epoch 2 (as if overfitting); epoch 2's parameters are remembered."""

        def validate(self, source, params=None, state=None):
            result = super().validate(source, params, state)
            validated.append(self.epoch)
            if self.epoch == 2:
                kept[len(kept)] = params["fc"]["weight"].clone()
            return {**result, "top1": 1.0 - abs(self.epoch - 2) / 10}

    monkeypatch.setattr(train_lib, "Trainer", Declining)
    judged = []
    monkeypatch.setattr(audit_lib, "model_outputs", lambda cfg, params, *a, **k: (
        judged.append(params["fc"]["weight"].clone()),
        {"logits": torch.zeros(len(a[1]), 3), "embeddings": torch.zeros(len(a[1]), 8)})[1])
    opts = options_lib.TrainOptions(data=str(root), epochs=10, batch_size=8, compile="off", workers=0)
    cfg = Config(alpha=0.25, resolution=32, num_classes=3)
    outputs = list(audit_lib.out_of_sample(pool, cfg, opts, folds=2, grad="off", patience=2))[-1]
    assert outputs.fold_epochs == [2, 2]
    assert validated == [1, 2, 3, 4] * 2  # two epochs without a gain, then the next fold
    # Fold 1: its embeddings and its held-out logits; fold 2: its held-out logits. Each from its epoch 2.
    assert torch.equal(judged[0], kept[0]) and torch.equal(judged[1], kept[0]) and torch.equal(judged[2], kept[1])


def test_init_starts_every_fold_from_the_given_weights(tmp_path):
    # At a learning rate too small to move anything, K-fold training from the hand-built judge judges as it does;
    # from scratch it could not (test_a_judge_near_chance_ranks_the_labels_but_flags_none shows chance).
    root = tmp_path / "data"
    planted = make_folder(root)
    hand_built_judge(tmp_path / "judge.pkl", root)
    out = tmp_path / "report"
    result = runner.invoke(app, ["audit", str(root), "--init", str(tmp_path / "judge.pkl"), "--folds", "2",
                                 "--epochs", "1", "--lr", "1e-9", "--augment", "none", "--compile", "off",
                                 "--batch-size", "8", "--grad", "off", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["out_of_sample_top1"] == pytest.approx((3 * PER_CLASS + 2) / report["images"])
    assert report["train"]["freeze_backbone"] and report["train"]["init_weights"] == str(tmp_path / "judge.pkl")
    assert {r["file"] for r in rows_of(out / "issues.csv") if r["kind"] == "label"} == set(planted["wrong"])
    one_line_error(runner.invoke(app, ["audit", str(root), "--init", str(tmp_path / "judge.pkl"), "--weights",
                                       str(tmp_path / "judge.pkl"), "--out", str(tmp_path / "both")]), "give one")


def test_contact_sheet_captions_fit_their_tiles(tmp_path):
    from PIL import ImageDraw

    from mobilenet_fn.audit_report import contact_sheet, fitted

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert fitted(draw, "ball", 200) == "ball"
    cut = fitted(draw, "professional_tennis_racket_and_more", 96)
    assert cut.endswith("…") and draw.textlength(cut) <= 96 and "professional_tennis_racket_and_more".startswith(
        cut[:-1])
    root = tmp_path / "data"
    make_folder(root, mislabeled=0)
    pool, _ = audit_lib.load_pool(str(root), resolution=32)
    issues = [audit_lib.Issue(i, "label", 0.5, (pool.labels[i].item() + 1) % 3) for i in range(12)]
    short = Image.open(io.BytesIO(contact_sheet(pool, issues, "t", columns=6)))
    pool.classes = ["professional_tennis_player", "beer_barrel", "stemma"]
    long = Image.open(io.BytesIO(contact_sheet(pool, issues, "t", columns=6)))
    widest = max(draw.textlength(f"-> {c}") for c in pool.classes)
    assert long.width >= 6 * widest > short.width  # each tile as wide as its longest caption


def test_fix_split_keeps_each_duplicate_group_on_one_side(audited):
    root, planted, _, out, result = audited
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    val = set(split["val"])
    for group in (planted["exact"], planted["near"]):
        sides = {os.path.relpath(p, root) in val for p in group}
        assert len(sides) == 1, (group, split)
    # train --split trains with it; train --exclude leaves out exactly the listed files.
    run = root.parent / "run"
    trained = runner.invoke(app, ["train", "--data", str(root), *FAST, "--epochs", "1", "--split",
                                  str(out / "split.json"), "--exclude", str(out / "issues.csv"), "--out", str(run),
                                  "--cache", "off", "--workers", "0"])
    assert trained.exit_code == 0, trained.output
    flagged = {r["file"] for r in rows_of(out / "issues.csv")}
    recorded = json.loads((run / "split.json").read_text())
    assert recorded["excluded"]["train"] + recorded["excluded"]["val"] == len(flagged)
    assert f"Excluded {recorded['excluded']['train']} training and {recorded['excluded']['val']} validation" in \
        trained.output
    assert set(recorded["val"]) == val
    # --weights: the trained model judges every image at once, and the report says that this is biased.
    quick = runner.invoke(app, ["audit", str(root), "--weights", str(run / "weights.pkl"), "--device", "cpu",
                                "--out", str(root.parent / "quick"), "--json"])
    assert quick.exit_code == 0, quick.output
    assert "biased" in json.loads(quick.stdout.strip().splitlines()[-1])["probabilities"]


def test_exclude_counts_and_refuses_a_list_of_strangers(tmp_path):
    root = tmp_path / "data"
    make_folder(root, mislabeled=0)
    dataset = data_lib.load(str(root), resolution=32)
    names = [p for p, _ in dataset.train.samples][:4] + [p for p, _ in dataset.val.samples][:1]
    (tmp_path / "list.txt").write_text("# dropped by hand\n" + "\n".join(names) + "\n/elsewhere/x.png\n")
    kept, dropped = exclude(dataset, tmp_path / "list.txt")
    assert dropped == {"train": 4, "val": 1, "unknown": 1}
    assert len(kept.train) == len(dataset.train) - 4 and len(kept.val) == len(dataset.val) - 1
    assert not set(names) & {p for p, _ in kept.train.samples + kept.val.samples}
    (tmp_path / "strangers.txt").write_text("/elsewhere/x.png\n")
    one_line_error(runner.invoke(app, ["train", "--data", str(root), *FAST, "--epochs", "1", "--exclude",
                                       str(tmp_path / "strangers.txt"), "--out", str(tmp_path / "run")]),
                   "names none of")
    assert not (tmp_path / "run").exists()


def test_fashion_mnist_names_exclude_by_index():
    if not data_lib._fashion_mnist_files(Path(data_lib.FASHION_MNIST_DIRS[0])):
        pytest.skip("Fashion-MNIST is not installed")
    dataset = data_lib.load("fashion-mnist")
    train_names, val_names = item_names(dataset)
    assert len(train_names) == 55_000 and len(val_names) == 5_000
    i = int(train_names[7].rsplit("/", 1)[1])
    full = data_lib.fashion_mnist_arrays()[0]["train_images"]
    assert torch.equal(dataset.train.images[7, 0], full[i])  # the name points at the very image


def test_grad_norm_matches_a_plain_autograd_loop():
    cfg = Config(alpha=0.25, resolution=32, num_classes=5)
    params, state = init(cfg, torch.Generator().manual_seed(0))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 1, 4])
    leaves = torch.utils._pytree.tree_leaves(params)
    expected_full, expected_head = [], []
    for i in range(len(y)):
        p = torch.utils._pytree.tree_map(lambda t: t.detach().clone().requires_grad_(True), params)
        loss = F.cross_entropy(apply(cfg, p, state, x[i:i + 1], train=False)[0], y[i:i + 1])
        grads = torch.autograd.grad(loss, torch.utils._pytree.tree_leaves(p))
        expected_full.append(torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt())
        fc = [g for g, leaf in zip(grads, leaves) if leaf is params["fc"]["weight"] or leaf is params["fc"]["bias"]]
        expected_head.append(torch.stack([g.pow(2).sum() for g in fc]).sum().sqrt())
    full = audit_lib.per_sample_grad_norms(cfg, params, state, x, y, "full")
    head = audit_lib.per_sample_grad_norms(cfg, params, state, x, y, "head")
    torch.testing.assert_close(full, torch.stack(expected_full), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head, torch.stack(expected_head), rtol=1e-4, atol=1e-6)


def test_similar_pairs_in_blocks_match_brute_force():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(50, 8, generator=g, dtype=torch.float64)
    e[10] = e[3] + 0.01 * torch.randn(8, generator=g, dtype=torch.float64)  # a near copy
    e[40] = e[3]
    e = F.normalize(e, dim=1)
    sims = e @ e.T
    brute = {(i, j) for i in range(50) for j in range(i + 1, 50) if sims[i, j] >= 0.6}
    for block_floats in (50, 7 * 50, 1 << 24):  # one row at a time, uneven blocks, all at once
        found = audit_lib.similar_pairs(e, 0.6, block_floats=block_floats)
        assert {tuple(p) for p in found.tolist()} == brute
    assert (3, 10) in brute and (3, 40) in brute
    groups = audit_lib.groups_of(50, audit_lib.similar_pairs(e, 0.99))
    assert groups[3] == groups[10] == groups[40] and len(set(groups.tolist())) == 48


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path):
    root = tmp_path / "data"
    make_folder(root, mislabeled=0)
    (root / "empty").mkdir()
    before = listing(root)
    one_line_error(runner.invoke(app, ["audit", str(root), *FAST, "--out", str(tmp_path / "a")]), "no images", "empty")
    shutil.rmtree(root / "empty")
    one_line_error(runner.invoke(app, ["audit", str(tmp_path / "missing"), *FAST, "--out", str(tmp_path / "b")]),
                   "no such folder")
    one_line_error(runner.invoke(app, ["audit", str(root), *FAST, "--out", str(root / "report")]),
                   "inside the data folder")
    one = tmp_path / "one"
    (one / "red").mkdir(parents=True)
    picture("red", 1).save(one / "red" / "a.png")
    one_line_error(runner.invoke(app, ["audit", str(one), *FAST, "--out", str(tmp_path / "c")]), "need at least 2")
    one_line_error(runner.invoke(app, ["audit", str(root), *FAST, "--folds", "1", "--out", str(tmp_path / "d")]),
                   "--folds")
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert listing(root) == [entry for entry in before if "empty" not in entry[0]]


def test_unreadable_files_are_listed_and_skipped(tmp_path):
    root = tmp_path / "data"
    make_folder(root, mislabeled=0)
    (root / "red" / "broken.png").write_bytes(b"not a png")
    (root / "red" / "notes.txt").write_text("not an image")
    before = listing(root)
    out = tmp_path / "report"
    result = runner.invoke(app, ["audit", str(root), *FAST, "--folds", "2", "--epochs", "1", "--grad", "off",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s.split(":")[0] for s in report["skipped"]] == [str(root / "red" / "broken.png")]
    assert report["ignored"] == [str(root / "red" / "notes.txt")]
    assert "broken.png" in result.output
    assert listing(root) == before
    assert runner.invoke(app, ["audit", str(root), *FAST, "--out", str(out)]).exit_code == 2  # never replaced
