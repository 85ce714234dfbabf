"""The `mobilenet-fn` command: one file per subcommand, composed here."""

from __future__ import annotations

from typing import Annotated

import typer

from .audit import audit
from .resize import resize
from .convert import convert
from .export import export
from .predict import predict
from .quantize import quantize
from .eval import evaluate
from .summary import summary
from .train import train

app = typer.Typer(
    help="MobileNet v1 as a pure function: train, evaluate, predict, convert, export, quantize, resize, summarise, audit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from mobilenet_fn import __version__

        typer.echo(f"mobilenet-fn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """MobileNet v1 (Howard et al. 2017) as a pure function of a parameter tree."""


app.command()(resize)
app.command()(train)
app.command("eval")(evaluate)
app.command()(summary)
app.command()(predict)
app.command()(convert)
app.command()(export)
app.command()(quantize)
app.command()(audit)


def run() -> None:
    app()
