"""Second derivatives of convolutions through the fast first-order convolution kernels.

Write a convolution as y = x ⋆ w (+ b). Its backward pass gives the data gradient gx = (∂y/∂x)ᵀ gy
and the weight gradient gw = (∂y/∂w)ᵀ gy, both bilinear, with

    ⟨ggx, gx⟩ = ⟨ggx ⋆ w, gy⟩,        ⟨ggw, gw⟩ = ⟨x ⋆ ggw, gy⟩.

So the derivatives of gx along ggx are ggx ⋆ w (for gy) and the weight gradient of ggx ⋆ w at gy
(for w); those of gw along ggw are x ⋆ ggw (for gy) and the data gradient of x ⋆ ggw at gy (for
x). Each term is one call of a first-order kernel: a forward convolution, a data gradient or a
weight gradient.

PyTorch's own double backward (``_convolution_double_backward``) computes the weight term as a
forward convolution with batch and channels swapped, whose "kernel" is the output gradient (e.g.
32×32); cuDNN runs it with a slow generic implicit-GEMM kernel, about half the time of a
ResNet-18's Hessian-vector product on an H100. :func:`fast_conv_second_order` routes
``F.conv1d``/``conv2d``/``conv3d`` (what ``nn.Conv1d/2d/3d`` call) through the formulas above, so
that a graph built with ``create_graph=True`` inside it differentiates the convolutions with the
fast kernels. First derivatives are the same kernels as PyTorch's (one data-gradient and one
weight-gradient call), and the derivatives of every term are again these three operations, so
derivatives of any order are right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

__all__ = ["fast_conv_second_order", "weight_gradient"]

# (stride, padding, dilation, groups), each of the first three a list with one entry per spatial dim
Geometry = tuple[list[int], list[int], list[int], int]

_CONVOLUTIONS = ((F.conv1d, 1), (F.conv2d, 2), (F.conv3d, 3))
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _convolution(x: Tensor, w: Tensor, geometry: Geometry, bias: Tensor | None = None) -> Tensor:
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution(
        x, w, bias, stride, padding, dilation, False, [0] * len(stride), groups
    )


def _backward_term(gy: Tensor, x: Tensor, w: Tensor, geometry: Geometry, which: int) -> Tensor:
    """One output of ``convolution_backward``: 0 the data gradient, 1 the weight gradient."""
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, dilation, False, [0] * len(stride), groups,
        [which == 0, which == 1, False],
    )[which]


def _data_gradient(gy: Tensor, x: Tensor, w: Tensor, geometry: Geometry) -> Tensor:
    """(∂(x ⋆ w)/∂x)ᵀ gy; ``x`` gives only the shape."""
    return _backward_term(gy, x, w, geometry, 0)


def weight_gradient(gy: Tensor, x: Tensor, w: Tensor, geometry: Geometry) -> Tensor:
    """(∂(x ⋆ w)/∂w)ᵀ gy, the first-order weight-gradient kernel of a convolution with
    ``geometry`` = (stride, padding, dilation, groups); ``w`` gives only the shape."""
    return _backward_term(gy, x, w, geometry, 1)


class _ConvInputGrad(torch.autograd.Function):
    """gx = data gradient of x ⋆ w at gy; ``x`` gives only the shape."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, w: Tensor, x: Tensor, geometry: Geometry) -> Tensor:
        ctx.save_for_backward(gy, w)
        ctx.geometry = geometry
        return _data_gradient(gy, x, w, geometry)

    @staticmethod
    def backward(ctx: Any, ggx: Tensor) -> tuple[Tensor | None, ...]:
        gy, w = ctx.saved_tensors
        d_gy = _Conv.apply(ggx, w, None, ctx.geometry) if ctx.needs_input_grad[0] else None
        d_w = _ConvWeightGrad.apply(ggx, gy, w.detach(), ctx.geometry) if ctx.needs_input_grad[1] else None
        return d_gy, d_w, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """gw = weight gradient of x ⋆ w at gy; ``w`` gives only the shape."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gy: Tensor, w: Tensor, geometry: Geometry) -> Tensor:
        ctx.save_for_backward(x, gy)
        ctx.geometry = geometry
        return weight_gradient(gy, x, w, geometry)

    @staticmethod
    def backward(ctx: Any, ggw: Tensor) -> tuple[Tensor | None, ...]:
        x, gy = ctx.saved_tensors
        d_x = _ConvInputGrad.apply(gy, ggw, x.detach(), ctx.geometry) if ctx.needs_input_grad[0] else None
        d_gy = _Conv.apply(x, ggw, None, ctx.geometry) if ctx.needs_input_grad[1] else None
        return d_x, d_gy, None, None


class _Conv(torch.autograd.Function):
    """y = x ⋆ w + b. Its derivatives are again ``_Conv``, ``_ConvInputGrad`` and
    ``_ConvWeightGrad``, so derivatives of every order use the first-order kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, geometry: Geometry) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.geometry = geometry
        return _convolution(x, w, geometry, b)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        geometry = ctx.geometry
        gx = _ConvInputGrad.apply(gy, w, x.detach(), geometry) if ctx.needs_input_grad[0] else None
        gw = _ConvWeightGrad.apply(x, gy, w.detach(), geometry) if ctx.needs_input_grad[1] else None
        gb = gy.sum([0, *range(2, gy.dim())]) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _expand(value: Any, dims: int) -> list[int] | None:
    """An int or a sequence of ints as one int per spatial dimension; None for anything else."""
    if isinstance(value, int):
        return [value] * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        if len(value) == dims:
            return list(value)
        if len(value) == 1:
            return list(value) * dims
    return None


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one flag per device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _routed(dims: int, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None, Geometry] | None:
    """``_Conv``'s arguments for a call ``F.conv{dims}d(*args, **kwargs)``, or None where the
    call should run as it is: no gradient to record, string padding, unbatched input, tensor
    subclasses, functorch transforms, forward-mode dual tensors, autocast, or odd arguments."""
    if len(args) > len(_ARGUMENTS) or not set(kwargs) <= set(_ARGUMENTS):
        return None
    call = dict(zip(_ARGUMENTS, _DEFAULTS, strict=True))
    call.update(zip(_ARGUMENTS, args))
    call.update(kwargs)
    x, w, b = call["input"], call["weight"], call["bias"]
    tensors = [x, w] if b is None else [x, w, b]
    if not (
        all(type(t) in (Tensor, nn.Parameter) for t in tensors)
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and x.dim() == w.dim() == dims + 2
        and x.dtype.is_floating_point
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and torch._C._functorch.peek_interpreter_stack() is None
        and all(forward_ad.unpack_dual(t).tangent is None for t in tensors)
        and not _autocast_enabled(x.device.type)
        and isinstance(call["groups"], int)
    ):
        return None
    stride, padding, dilation = (_expand(call[k], dims) for k in ("stride", "padding", "dilation"))
    if stride is None or padding is None or dilation is None:
        return None
    return x, w, b, (stride, padding, dilation, call["groups"])


class _FastConvMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dims = next((d for f, d in _CONVOLUTIONS if f is func), None)
        routed = None if dims is None else _routed(dims, args, kwargs)
        if routed is not None:
            return _Conv.apply(*routed)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fast_conv_second_order() -> Iterator[None]:
    """Inside, ``F.conv1d``/``conv2d``/``conv3d`` record a backward whose own derivatives use the
    first-order convolution kernels (forward, data gradient, weight gradient) instead of PyTorch's
    double backward, which runs one term as a slow swapped-axes convolution on cuDNN.

    Build the loss and its gradient (``torch.autograd.grad(..., create_graph=True)``) inside; the
    products with that gradient's graph (Hessian-vector products) may run outside. Values are
    those of PyTorch's formulas up to floating-point rounding. Calls that cannot be routed safely
    (string padding, unbatched inputs, tensor subclasses, ``torch.func`` transforms, forward-mode
    AD, autocast) run unchanged. Nothing stays behind on exit, also when the body raises.

    Cost: each term of a derivative is one first-order kernel call; a first-order backward makes
    two calls (data and weight gradient) where PyTorch makes one that computes both.
    """
    with _FastConvMode():
        yield
