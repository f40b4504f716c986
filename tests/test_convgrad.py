"""fast_conv_second_order against the dense Hessian and PyTorch's own convolution derivatives."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import single_thread  # noqa: F401 - autouse fixture
from torch import Tensor, nn

from dynlens.convgrad import fast_conv_second_order
from dynlens.functional import ModelFunction, flatten, isolated


def conv1d_net() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)), torch.randn(4, 2, 5)


def strided_grouped_conv2d_net() -> tuple[nn.Module, Tensor]:
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), nn.Tanh(),
        nn.Conv2d(4, 2, 1, padding=(1, 0)), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 6 * 4, 3),
    )
    return net, torch.randn(3, 4, 7, 7)


def conv3d_net() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)), torch.randn(2, 1, 3, 3, 3)


def conv_batchnorm_net() -> tuple[nn.Module, Tensor]:
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net, torch.randn(4, 2, 4, 4)


NETS = [conv1d_net, strided_grouped_conv2d_net, conv3d_net, conv_batchnorm_net]


def problem(build) -> ModelFunction:
    torch.manual_seed(0)
    net, x = build()
    net = net.double()
    y = torch.randint(0, 3, (x.shape[0],))
    return ModelFunction(net, nn.CrossEntropyLoss(), (x.double(), y))


def dense_hessian(f: ModelFunction) -> Tensor:
    return torch.autograd.functional.hessian(lambda v: f.loss(f.as_params(v)), f.vector())


def reused_graph(f: ModelFunction, fast: bool) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    leaves = [t.detach().requires_grad_(True) for t in f.params.values()]
    with fast_conv_second_order() if fast else contextlib.nullcontext():
        loss = f.loss(dict(zip(f.params, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
    return leaves, grads


def reuse_products(f: ModelFunction, block: Tensor, fast: bool) -> Tensor:
    leaves, grads = reused_graph(f, fast)
    columns = [
        flatten(torch.autograd.grad(grads, leaves, list(f.as_params(v).values()), retain_graph=True))
        for v in block.T
    ]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("build", NETS)
@pytest.mark.parametrize("fast", [False, True], ids=["pytorch", "fast"])
def test_reuse_products_match_dense_hessian(build, fast):
    f = problem(build)
    with isolated(f.model):
        block = torch.randn(f.num_params, 3, dtype=torch.float64)
        torch.testing.assert_close(reuse_products(f, block, fast), dense_hessian(f) @ block, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build", NETS)
def test_model_function_reuse_products_match_dense_hessian_single_and_batched(build):
    f = problem(build)
    with isolated(f.model):
        single, matmat, _ = f.curvature_products("hessian", "reuse")
        block = torch.randn(f.num_params, 3, dtype=torch.float64)
        expected = dense_hessian(f) @ block
        torch.testing.assert_close(matmat(block), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(single(block[:, 0]), expected[:, 0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("build", NETS)
def test_first_order_gradients_are_unchanged(build):
    f = problem(build)
    with isolated(f.model):
        plain = flatten(reused_graph(f, fast=False)[1])
        fast = flatten(reused_graph(f, fast=True)[1])
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)


def test_convolutions_inside_record_the_first_order_kernels():
    f = problem(strided_grouped_conv2d_net)
    _, grads = reused_graph(f, fast=True)
    assert type(grads[0].grad_fn).__name__ == "_ConvWeightGradBackward"


def third_derivative(fast: bool) -> tuple[Tensor, ...]:
    torch.manual_seed(0)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with fast_conv_second_order() if fast else contextlib.nullcontext():
        y = F.conv2d(torch.tanh(F.conv2d(x, w, padding=1)), w, stride=2)
        (g,) = torch.autograd.grad(y.pow(3).sum(), w, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), w, create_graph=True)
    return torch.autograd.grad(h.sum(), (w, x))


def test_third_derivatives_match_pytorchs():
    for fast_part, plain_part in zip(third_derivative(fast=True), third_derivative(fast=False), strict=True):
        torch.testing.assert_close(fast_part, plain_part, rtol=1e-10, atol=1e-10)


def test_forward_over_reverse_inside_the_mode_runs_unrouted_and_matches():
    f = problem(strided_grouped_conv2d_net)
    with isolated(f.model):
        v = torch.randn(f.num_params, dtype=torch.float64)
        with fast_conv_second_order():
            hv = flatten(f.hvp(f.as_params(v)))
        torch.testing.assert_close(hv, dense_hessian(f) @ v, rtol=1e-10, atol=1e-10)


def test_the_mode_leaves_nothing_behind_also_when_the_body_raises():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    with pytest.raises(KeyError), fast_conv_second_order():
        raise KeyError("inside")
    assert torch._C._len_torch_function_stack() == 0
    assert F.conv2d is torch.conv2d
    assert type(F.conv2d(x, w).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("call", ["string_padding", "unbatched_input", "no_grad", "autocast"])
def test_calls_that_cannot_be_routed_safely_run_unchanged(call):
    x = torch.randn(2, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    run = {
        "string_padding": lambda: F.conv2d(x, w, padding="same"),
        "unbatched_input": lambda: F.conv2d(x[0], w),
        "no_grad": lambda: F.conv2d(x, w.detach()),
        "autocast": lambda: F.conv2d(x, w),
    }[call]
    context = torch.autocast("cpu", dtype=torch.bfloat16) if call == "autocast" else contextlib.nullcontext()
    with context:
        expected = run()
        with fast_conv_second_order():
            out = run()
    assert out.grad_fn is None or type(out.grad_fn).__name__ != "_ConvBackward"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
