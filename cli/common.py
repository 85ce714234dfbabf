"""What the commands share: option aliases, the error boundary, the consoles."""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)  # progress, tables and messages: stdout stays free for --json

JSON = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
DEVICE = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
ALPHA = Annotated[float, typer.Option("--alpha", "-a", help="Width multiplier α: channels are int(c·α), at least 8.")]
RHO = Annotated[float | None, typer.Option("--rho", help="Resolution multiplier ρ: input round(224·ρ).")]


FORCE = Annotated[bool, typer.Option("--force", help="Replace the output file if it exists.")]


def refuse_existing(output, force: bool) -> None:
    """An -o/--output file is only replaced with --force."""
    if output.is_dir():
        fail(f"{output}: is a folder; give a file name")
    if output.exists() and not force:
        fail(f"{output}: already exists; pass --force to replace it")


class UserError(Exception):
    """A mistake of the user's: shown as one line, exit code 2."""


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # A fresh console: errors are shown even where ``err`` is quiet (the non-zero ranks of a distributed run).
    Console(stderr=True).print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(command):
    """Turns the library's ValueErrors (bad config, data or weights) into one line and exit 2, Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130)
        except (UserError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            fail(str(e))
        except ImportError as e:  # mobilenet_fn.extras.require names the extra to install
            fail(str(e) if "pip install" in str(e) else f"{e}. Install the missing package (pip install "
                 f"'mobilenet-fn[test]' brings every extra).")

    return wrapper


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu or auto")
    return device


def print_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def load_model(path, device: str = "auto"):
    """A weights file (``Weights``), or an ONNX file of ours (``OnnxModel``, run by onnxruntime on the CPU)."""
    from mobilenet_fn.onnx_model import is_onnx, load_onnx
    from mobilenet_fn.weights import load_weights

    if not is_onnx(path):
        return load_weights(path)
    if device not in ("auto", "cpu"):
        raise UserError(f"--device {device}: ONNX files run on the CPU with onnxruntime; use --device cpu or auto")
    return load_onnx(path)
