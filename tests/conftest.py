import pytest
import torch
from torch.utils._pytree import tree_flatten

from mobilenet_fn import Config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_batchnorm(module: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Gives every BatchNorm of an nn.Module non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


@pytest.fixture
def small_cfg() -> Config:
    return Config(alpha=0.25, resolution=32, num_classes=10)


def assert_trees_close(a, b, **kw):
    """Same tree structure, and every pair of leaves close (exactly equal with atol=rtol=0)."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, **kw)
