"""The command line, driven through typer's CliRunner."""

import json

from typer.testing import CliRunner

from mobilenet_fn import __version__
from mobilenet_fn.cli.main import app

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


def test_summary_table_has_the_totals():
    result = invoke("summary", "--classes", "10", "--shallow")
    assert result.exit_code == 0
    assert "Conv dw" in result.stdout and "Fully connected" in result.stdout


def test_bad_config_is_one_line_exit_2():
    for args in (["--alpha", "0"], ["--resolution", "16"], ["--classes", "0"]):
        result = invoke("summary", *args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
