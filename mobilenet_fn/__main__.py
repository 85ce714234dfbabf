"""`python -m mobilenet_fn` (and `torchrun -m mobilenet_fn`): the command line."""

from mobilenet_fn.cli.main import run

if __name__ == "__main__":
    run()
