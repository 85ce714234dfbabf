"""The command line, driven through typer's CliRunner."""

import json

from typer.testing import CliRunner

from mobilenet_fn import __version__
from mobilenet_fn.cli.main import app
from test_weights import one_line_error

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_summary_json_is_one_object_with_exact_counts():
    result = invoke("summary", "--alpha", "0.5", "--rho", "0.714", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params"] == 1_331_592 and data["macs"] == 76_524_800
    assert set(data["by_type"]) >= {"conv", "depthwise", "pointwise", "fc"}
    assert len(data["layers"]) == 1 + 26 + 2


# Table 2 at alpha 1, 224 px, 1000 classes: mult-adds and parameters by layer type, with their shares (parameters
# include BatchNorm's scale and shift, so their shares differ from the paper's 0.02/1.06/74.59/24.33 %).
BY_TYPE = {"conv": (10_838_016, "1.91%", 928, "0.02%"), "depthwise": (17_385_984, "3.06%", 54_560, "1.29%"),
           "pointwise": (539_492_352, "94.86%", 3_151_488, "74.47%"), "fc": (1_024_000, "0.18%", 1_025_000, "24.22%")}
LABELS = {"conv": "Conv 3×3 (full)", "depthwise": "Conv dw 3×3", "pointwise": "Conv 1×1", "fc": "Fully connected"}


def _cells(output: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in output.splitlines() if "│" in line]
    (row,) = [r for r in rows if r[0] == first]
    return row


def test_summary_table_and_json_give_the_papers_totals_and_shares():
    result = runner.invoke(app, ["summary"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert _cells(result.stdout, "total")[-2:] == ["4,231,976", "568,740,352"]
    for kind, (macs, macs_share, params, params_share) in BY_TYPE.items():
        assert _cells(result.stdout, LABELS[kind]) == [LABELS[kind], f"{macs:,}", macs_share, f"{params:,}",
                                                      params_share]
    assert "4.23 M parameters, 569 M mult-adds" in result.output

    data = json.loads(invoke("summary", "--json").stdout)
    assert (data["params"], data["macs"]) == (4_231_976, 568_740_352)
    assert {k: (v["macs"], v["params"]) for k, v in data["by_type"].items()} == \
        {k: (macs, params) for k, (macs, _, params, _) in BY_TYPE.items()}
    assert sum(r["macs"] for r in data["layers"]) == data["macs"] and sum(r["params"] for r in data["layers"]) == \
        data["params"]


def test_summary_table_shows_the_whole_total_in_an_80_column_terminal():
    result = runner.invoke(app, ["summary"], env={"COLUMNS": "80"})
    assert _cells(result.stdout, "total")[-1] == "568,740,352"


def test_summary_table_of_an_ablation_has_its_totals():
    result = runner.invoke(app, ["summary", "--classes", "10", "--shallow"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "Conv dw" in result.stdout and "Fully connected" in result.stdout
    # shallow (Table 5) is 2,887,976 and 307,323,392 with 1000 classes; 10 classes take 990 × 1025 and 990 × 1024
    assert _cells(result.stdout, "total")[-2:] == ["1,873,226", "306,309,632"]


def test_bad_config_is_one_line_exit_2():
    for args in (["--alpha", "0"], ["--resolution", "16"], ["--classes", "0"]):
        one_line_error(invoke("summary", *args))
