"""Writing an audit's report: report.json, issues.csv, signals.csv and a contact sheet per kind of issue
(suspects-<kind>.png), into a new folder that is never inside the data's folder.

    write_report(Path("audits/flowers"), pool, outputs, result)   # what audit.load_pool, out_of_sample, audit gave
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .audit import KINDS, Audit, Issue, Outputs, Pool, fixed_split
from .data import DEFAULT_RESOLUTION
from .files import free_name, is_inside, new_folder, write_bytes, write_json
from .sources import DataError


def default_out_dir(name_or_folder: str, root: Path = Path("audits")) -> Path:
    """audits/<data> for the data set ``name_or_folder``, with -2, -3, ... when taken."""
    if name_or_folder in DEFAULT_RESOLUTION:
        return free_name(root / name_or_folder)
    return free_name(root / Path(name_or_folder).expanduser().resolve().name)


def check_outside(out: Path, root: str | Path | None) -> None:
    """The report never goes into the data's folder ``root`` (None: the data has none)."""
    if root is None:
        return
    out, root = Path(out).expanduser().resolve(), Path(root).expanduser().resolve()
    if is_inside(out, root):
        raise DataError(f"{out}: is inside the data folder {root}; audit never writes there: pick another --out")


def _row(pool: Pool, issue: Issue) -> dict:
    return {"file": pool.names[issue.index], "given_label": pool.classes[pool.labels[issue.index]],
            "suggested_label": pool.classes[issue.suggested], "kind": issue.kind, "score": round(issue.score, 6),
            "other": "" if issue.other is None else pool.names[issue.other]}


def fitted(draw, text: str, width: float) -> str:
    """``text`` as drawn by ``draw`` in at most ``width`` pixels: whole, or cut with an ellipsis."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(pool: Pool, issues: list[Issue], title: str, *, top: int = 24, columns: int = 6,
                  thumb: int = 96, widest: int = 200) -> bytes:
    """A PNG of the first ``top`` issues: each tile the image (and the one it duplicates, beside it), under it the
    given label, the suggested one and the score, one to a line. A tile is as wide as its longest class name up to
    ``widest`` pixels; a longer name is cut with an ellipsis."""
    from PIL import Image, ImageDraw

    shown = issues[:top]
    pair = any(i.other is not None for i in shown)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = {c for i in shown for c in (pool.classes[pool.labels[i.index]], pool.classes[i.suggested])}
    label_w = max((draw.textlength(f"-> {c}") for c in names), default=0)
    tile_w = max(thumb * (2 if pair else 1), min(int(label_w) + 2, widest)) + 8
    line_h = 13
    text_h = 3 * line_h + 4  # given, suggested, kind and score
    rows = max(1, math.ceil(len(shown) / columns))
    sheet = Image.new("RGB", (max(1, min(len(shown), columns)) * tile_w, 24 + rows * (thumb + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), fitted(draw, title, sheet.width - 12), fill="black")

    def thumbnail(i: int) -> Image.Image:
        x = pool.pixels(i)
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
        return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()).resize((thumb, thumb), Image.NEAREST)

    for n, issue in enumerate(shown):
        x0, y0 = (n % columns) * tile_w + 4, 24 + (n // columns) * (thumb + text_h + 8)
        sheet.paste(thumbnail(issue.index), (x0, y0))
        if issue.other is not None:
            sheet.paste(thumbnail(issue.other), (x0 + thumb, y0))
        given, suggested = pool.classes[pool.labels[issue.index]], pool.classes[issue.suggested]
        caption = [(given, "black"), (f"-> {suggested}", "black"), (f"{issue.kind} {issue.score:.3f}", (160, 0, 0))]
        for k, (text, colour) in enumerate(caption):
            draw.text((x0, y0 + thumb + 2 + k * line_h), fitted(draw, text, tile_w - 8), fill=colour)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def summary(pool: Pool, outputs: Outputs, result: Audit) -> dict:
    """What report.json holds (less the settings the command adds)."""
    counts = {kind: len({i.index for i in result.of_kind(kind)}) for kind in KINDS}
    probs_from = ("k-fold out-of-sample predictions" if outputs.method == "k-fold" else
                  "one trained model (--weights): biased wherever it was trained on these images; "
                  "k-fold is the unbiased audit")
    return {
        "data": pool.name, "images": len(pool), "classes": pool.classes,
        "train_images": int((~pool.is_val).sum()), "val_images": int(pool.is_val.sum()),
        "probabilities": probs_from, "fold_top1": outputs.fold_top1, "fold_epochs": outputs.fold_epochs,
        "out_of_sample_top1": result.judge.top1, "chance_top1": result.judge.chance, "judge_kappa": result.judge.kappa,
        "labels_flagged": result.judge.flags_labels, "judge": result.judge.verdict(),
        "gradient_norm": {"head": "per-sample gradient of the cross-entropy with respect to the classifier's "
                                  "weights and bias (vmap of grad)",
                          "full": "per-sample gradient of the cross-entropy with respect to every parameter "
                                  "(vmap of grad through model.apply of one image, eval-mode BatchNorm)",
                          "off": None}[outputs.grad],
        "duplicates_in": result.embed, "duplicate_threshold": result.threshold, "outlier_cut": result.outlier_cut,
        "counts": counts, "exact_duplicate_pairs": len(result.exact), "similar_pairs": len(result.pairs),
        "skipped": pool.skipped, "ignored": pool.ignored,
    }


def write_report(out: Path, pool: Pool, outputs: Outputs, result: Audit, *, settings: dict | None = None,
                 fix_split: bool = False, top: int = 24) -> dict:
    """Writes report.json, issues.csv, signals.csv, suspects-<kind>.png (and with ``fix_split``, split.json or
    val-leaks.txt) into ``out``, which must not exist yet. Returns the report (with the files written)."""
    out = Path(out)
    check_outside(out, pool.root)
    new_folder(out, f"{out} already exists; pick another --out")
    columns = ["file", "given_label", "suggested_label", "kind", "score", "other"]

    def table(rows: list[dict], fields: list[str]) -> bytes:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return text.getvalue().encode()

    write_bytes(out / "issues.csv", table([_row(pool, i) for i in result.issues], columns))
    s = result.signals
    signal_names = [k for k in ("loss", "margin", "grad_norm", "quality", "outlier") if k in s]
    write_bytes(out / "signals.csv", table([
        {"file": pool.names[i], "given_label": pool.classes[pool.labels[i]],
         "suggested_label": pool.classes[s["suggested"][i]], "split": "val" if pool.is_val[i] else "train",
         **{k: f"{s[k][i].item():.6g}" for k in signal_names}} for i in range(len(pool))],
        ["file", "given_label", "suggested_label", "split", *signal_names]))
    written = ["report.json", "issues.csv", "signals.csv"]
    for kind in KINDS:
        found = result.of_kind(kind)
        if found:
            name = f"suspects-{kind}.png"
            write_bytes(out / name, contact_sheet(pool, found, f"{pool.name}: {len(found)} {kind} issue(s), "
                                                               f"most suspect first", top=top))
            written.append(name)
    if fix_split:
        name, content = fixed_split(pool, result)
        if name.endswith(".json"):
            write_json(out / name, content)
        else:
            write_bytes(out / name, "".join(f"{line}\n" for line in content).encode())
        written.append(name)
    report = {**summary(pool, outputs, result), **(settings or {}), "files": written}
    write_json(out / "report.json", report)
    return report
