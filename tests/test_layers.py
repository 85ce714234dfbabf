"""Each layer against the torch.nn layer it stands for."""

import pytest
import torch
from torch import nn

from mobilenet_fn import layers


def test_depthwise_matches_grouped_conv2d():
    ref = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
    params = {"weight": ref.weight.detach()[:, 0].clone()}
    x = torch.randn(2, 16, 15, 15)
    torch.testing.assert_close(layers.depthwise_apply(params, x, stride=2), ref(x), atol=1e-6, rtol=1e-5)


def test_pointwise_matches_1x1_conv2d():
    ref = nn.Conv2d(16, 24, 1, bias=False)
    params = {"weight": ref.weight.detach()[:, :, 0, 0].clone()}
    x = torch.randn(2, 16, 7, 9)
    torch.testing.assert_close(layers.pointwise_apply(params, x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 3, 8])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride,padding", [(1, "torch"), (2, "torch"), (1, "tf"), (2, "tf")])
def test_separable_layers_match_conv2d_with_bias_in_value_gradient_and_layout(size, channels_last, stride, padding):
    # Small maps take other paths (the centre tap on 1x1, a matrix product on <= 2x2): each must equal nn.Conv2d.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
    dw_ref = nn.Conv2d(8, 8, 3, stride=stride, groups=8).double()
    pw_ref = nn.Conv2d(8, 5, 1).double()
    dw = {"weight": dw_ref.weight.detach()[:, 0].clone().requires_grad_(), "bias": dw_ref.bias.detach().clone()}
    pw = {"weight": pw_ref.weight.detach()[:, :, 0, 0].clone().requires_grad_(), "bias": pw_ref.bias.detach().clone()}
    xr = x.detach().requires_grad_()
    xo = x.detach().requires_grad_()
    left, right = layers.same_padding(size, 3, stride) if padding == "tf" else (1, 1)
    ref = pw_ref(dw_ref(nn.functional.pad(xr, (left, right, left, right))))
    out = layers.pointwise_apply(pw, layers.depthwise_apply(dw, xo, stride=stride, padding=padding))
    torch.testing.assert_close(out, ref)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(dw["weight"].grad, dw_ref.weight.grad[:, 0])
    torch.testing.assert_close(pw["weight"].grad, pw_ref.weight.grad[:, :, 0, 0])


def test_conv_matches_conv2d():
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    params = {"weight": ref.weight.detach().clone()}
    x = torch.randn(2, 3, 17, 16)
    torch.testing.assert_close(layers.conv_apply(params, x, stride=2), ref(x), atol=1e-6, rtol=1e-5)


def test_linear_matches_linear():
    ref = nn.Linear(12, 5)
    params = {"weight": ref.weight.detach().clone(), "bias": ref.bias.detach().clone()}
    x = torch.randn(3, 12)
    torch.testing.assert_close(layers.linear_apply(params, x), ref(x))


@pytest.mark.parametrize("size,stride,expected", [(224, 2, (0, 1)), (25, 2, (1, 1)), (7, 1, (1, 1)), (200, 2, (0, 1))])
def test_same_padding_is_tensorflows(size, stride, expected):
    assert layers.same_padding(size, 3, stride) == expected


def test_tf_padding_matches_explicit_asymmetric_pad():
    w = torch.randn(4, 3, 3)
    x = torch.randn(1, 4, 10, 10)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w[:, None], stride=2, groups=4)
    out = layers.depthwise_apply({"weight": w}, x, stride=2, padding="tf")
    torch.testing.assert_close(out, ref)


def test_batchnorm_matches_batchnorm2d_over_several_steps_and_in_eval():
    ref = nn.BatchNorm2d(6, eps=1e-3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    params = {"weight": ref.weight.detach().clone(), "bias": ref.bias.detach().clone()}
    _, state = layers.batchnorm_init(6)
    for _ in range(4):
        x = torch.randn(5, 6, 4, 3) * 3 + 1
        y, state = layers.batchnorm_apply(params, state, x, train=True, momentum=0.2, eps=1e-3)
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state["mean"], ref.running_mean)
    torch.testing.assert_close(state["var"], ref.running_var)
    ref.eval()
    x = torch.randn(5, 6, 4, 3)
    y, same = layers.batchnorm_apply(params, state, x, train=False, momentum=0.2, eps=1e-3)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    assert same is state


def test_batchnorm_does_not_mutate_state():
    params, state = layers.batchnorm_init(3)
    before = {k: v.clone() for k, v in state.items()}
    _, new = layers.batchnorm_apply(params, state, torch.randn(4, 3, 2, 2) + 5, train=True, momentum=0.1, eps=1e-5)
    for k in state:
        torch.testing.assert_close(state[k], before[k], rtol=0, atol=0)
        assert not torch.equal(new[k], before[k])


def test_synchronised_batchnorm_in_one_process_equals_batchnorm2d():
    # With one process the sum across processes is the identity: forward, backward and statistics must match.
    ref = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    params = {"weight": ref.weight.detach().clone().requires_grad_(), "bias": ref.bias.detach().clone().requires_grad_()}
    _, state = layers.batchnorm_init(5)
    x = (torch.randn(6, 5, 7, 7) * 2 + 1).requires_grad_()
    upstream = torch.randn(6, 5, 7, 7)
    y, new_state = layers.batchnorm_apply(params, state, x, train=True, momentum=0.3, eps=1e-5, reduce=lambda t: t)
    ours = torch.autograd.grad((y * upstream).sum(), [x, params["weight"], params["bias"]])
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    theirs = torch.autograd.grad((y_ref * upstream).sum(), [x_ref, ref.weight, ref.bias])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_state["mean"], ref.running_mean)
    torch.testing.assert_close(new_state["var"], ref.running_var)
