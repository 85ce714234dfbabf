from __future__ import annotations

from typing import Annotated

import typer

from .common import ALPHA, JSON, RHO, err, print_json, user_errors


def _fmt_filter(row: dict) -> str:
    f = row["filter"]
    if row["type"] == "depthwise":
        return f"{f[0]}×{f[1]}×{f[2]} dw"
    if row["type"] == "pool":
        return f"Pool {f[0]}×{f[1]}"
    return "×".join(str(v) for v in f)


TYPE_LABELS = {"conv": "Conv", "depthwise": "Conv dw", "pointwise": "Conv", "pool": "Avg Pool", "fc": "FC"}
TABLE2_LABELS = {"conv": "Conv 3×3 (full)", "depthwise": "Conv dw 3×3", "pointwise": "Conv 1×1", "fc": "Fully connected"}


@user_errors
def summary(
    alpha: ALPHA = 1.0,
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Input size in pixels.")] = 224,
    rho: RHO = None,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes.")] = 1000,
    full_conv: Annotated[bool, typer.Option("--full-conv", help="Table 4 ablation: full 3×3 convolutions.")] = False,
    shallow: Annotated[bool, typer.Option("--shallow", help="Table 5 ablation: no 14×14×512 blocks.")] = False,
    json: JSON = False,
):
    """Layers, parameters and mult-adds, shaped like the paper's Tables 1 and 2."""
    from rich.table import Table

    from mobilenet_fn import Config, count, resolution_for_rho

    if rho is not None:
        resolution = resolution_for_rho(rho)
    cfg = Config(alpha=alpha, resolution=resolution, num_classes=classes, full_conv=full_conv, shallow=shallow)
    result = count(cfg)
    if json:
        print_json(result)
        return
    from rich.console import Console

    out = Console()
    table = Table(title=f"MobileNet v1 α={alpha:g}, {resolution}×{resolution}, {classes} classes")
    for col in ("Layer", "Type / Stride", "Filter Shape", "Input Size", "Params", "Mult-Adds"):
        numeric = col in ("Params", "Mult-Adds")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)  # numbers stay whole
    for row in result["layers"]:
        h, w, c = row["input"]
        table.add_row(row["name"], f"{TYPE_LABELS[row['type']]} / s{row['stride']}", _fmt_filter(row),
                      f"{h}×{w}×{c}", f"{row['params']:,}", f"{row['macs']:,}")
    table.add_section()
    table.add_row("total", "", "", "", f"{result['params']:,}", f"{result['macs']:,}", style="bold")
    out.print(table)
    by_type = Table(title="By layer type (paper's Table 2)")
    for col in ("Type", "Mult-Adds", "Share", "Parameters", "Share"):
        by_type.add_column(col, justify="left" if col == "Type" else "right")
    for kind, label in TABLE2_LABELS.items():
        t = result["by_type"][kind]
        by_type.add_row(label, f"{t['macs']:,}", f"{100 * t['macs'] / result['macs']:.2f}%", f"{t['params']:,}",
                        f"{100 * t['params'] / result['params']:.2f}%")
    out.print(by_type)
    err.print(f"{result['params'] / 1e6:.2f} M parameters, {result['macs'] / 1e6:.0f} M mult-adds")
