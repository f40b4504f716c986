"""Are PyTorch's second derivatives right, layer by layer? And dynlens's Hessian-vector products?

A survey of every layer type of ``torch.nn`` that has parameters or sits between layers that
have them, and of every loss usable as ``loss_fn`` (issue #17). For each, a small float64 model
and a smooth scalar of its output (a loss case: the loss of the output against fixed targets):

* ``gradient``: autograd's directional derivative gᵀv against central differences of the loss,
  so that a wrong first derivative cannot pass as the reference of the second;
* ``double_backward`` and ``forward_over_reverse``: the Hessian-vector product Hv as plain
  PyTorch computes it (autograd's double backward; ``torch.func.jvp`` of ``grad``);
* ``dynlens_reuse`` and ``dynlens_forward_over_reverse``: dynlens's own product
  (``ModelFunction.curvature_products``) inside :func:`dynlens.functional.isolated`, on the same
  model;

each against finite differences along v: central differences of the gradient at steps 1e-5
and 5e-6, extrapolated (Richardson: (4·d(h/2) − d(h))/3, error of order h⁴), so that agreement
is ~1e-11 and a relative error above 1e-6 is a wrong derivative. A failure is recorded with its
error.

Where a layer is piecewise (ReLU and its kin, max pooling, hinge losses) a product is defined
only away from its kinks. A case is drawn again with the next seed until (1) no input of an
elementwise piecewise layer lies within 1e-3 of a kink (``kink_margin``) and (2) the central
differences at steps 1e-5 and 5e-6 agree to 1e-7 (``step_halving``, the error of the first of
them), which fails wherever a kink — a tie in a max, a hinge — lies within the step (and, rarely,
where a smooth layer curves so strongly that the differences are that uncertain).

What it found (torch 2.13, ``benchmarks/RESULTS.md``): fused weight norm's double backward holds
the saved norms constant, and Hardsigmoid and EmbeddingBag have no double backward — dynlens
computes these three from elementary operations inside a measurement (``dynlens/isolation.py``,
``dynlens/composites.py``); MultiMarginLoss, MultiLabelMarginLoss and CTCLoss have no double
backward, CrossMapLRN2d's hand-written backward is wrong already in the first derivative,
Hardsigmoid's CPU backward returns its slope 1/6 rounded to float32, and LinearCrossEntropyLoss's
chunked path computes its gradient in the forward pass and returns it without a graph (PyTorch's
double backward raises; dynlens's reused graph returns zero). Cost: five gradients, five losses
and four products a case (about 0.6 s on 2 shared CPU cores; 2 minutes in all). ``tests/test_second_derivatives_survey.py``
holds every layer type of ``torch.nn`` to be a case here or in :data:`EXCLUDED`, with a reason.

    python benchmarks/second_derivatives.py --out benchmarks/results/second_derivatives_cpu.json
    python benchmarks/second_derivatives.py --device cuda   # cuDNN's kernels
    python benchmarks/second_derivatives.py --only Hardsigmoid EmbeddingBag
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.func import grad as func_grad
from torch.nn.modules.lazy import LazyModuleMixin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynlens.functional import ModelFunction, _weight_norm_composite, isolated  # noqa: E402

D = torch.float64
STEP = 1e-5
KINK_MARGIN = 1e-3  # the nearest input of an elementwise piecewise layer to a kink, at least
STEP_HALVING = 1e-7  # central differences at STEP and STEP/2 agree to this, else a kink is near
SEEDS = 20  # draws of a case before giving up on finding one away from kinks

# torch.nn's module classes that are no case of the survey, and why
EXCLUDED = {
    "Module": "the base class",
    "Container": "a deprecated container",
    "Sequential": "a container: its layers are the cases",
    "ModuleList": "a container: its layers are the cases",
    "ModuleDict": "a container: its layers are the cases",
    "ParameterList": "a container of parameters, with no forward",
    "ParameterDict": "a container of parameters, with no forward",
    "RNNBase": "the base class of RNN, LSTM and GRU, which are cases",
    "RNNCellBase": "the base class of RNNCell, LSTMCell and GRUCell, which are cases",
    "SyncBatchNorm": "needs a process group and CUDA; on one process it is BatchNorm, a case",
    "DataParallel": "a wrapper (on the CPU it calls its module); torch.func refuses it (\"The stateless API "
                    "can't be used with nn.DataParallel\"), dynlens measures the module inside (unwrap_model)",
}


def weighted_tanh(out: Tensor) -> Tensor:
    """A smooth scalar of the output with no symmetry that could hide an error."""
    return (out.tanh() * torch.linspace(-1, 1, out.numel(), dtype=D, device=out.device).reshape(out.shape)).sum()


def the_loss(out: Tensor) -> Tensor:
    """A loss case's model returns the loss itself."""
    return out


@dataclass
class Case:
    """A model, its inputs (targets too, for a loss) and the scalar of its output differentiated."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    train: bool = False
    objective: Callable[[Tensor], Tensor] = field(default=weighted_tanh)


class Wrapped(nn.Module):
    """``call(inner, *inputs)``: layers whose forward takes other arguments than one tensor."""

    def __init__(self, inner: nn.Module, call: Callable[..., Tensor]) -> None:
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.call(self.inner, *inputs)


class Loss(nn.Module):
    """A loss of a small network's output against fixed targets: ``call(criterion, net(x), *targets)``."""

    def __init__(self, net: nn.Module, criterion: nn.Module, call: Callable[..., Tensor] | None = None) -> None:
        super().__init__()
        self.net, self.criterion, self.call = net, criterion, call

    def forward(self, x: Tensor, *targets: Tensor) -> Tensor:
        out = self.net(x)
        return self.criterion(out, *targets) if self.call is None else self.call(self.criterion, out, *targets)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)


# ----------------------------------------------------------------------------- the cases


def after_linear(*layers: nn.Module, width: int = 6, scale: float = 1.0) -> Case:
    """``layers`` after a Linear(6, width), on 8 examples of N(0, scale²) inputs."""
    return Case(nn.Sequential(nn.Linear(6, width), *layers), (scale * torch.randn(8, 6),))


def after_conv(dims: int, *layers: nn.Module, size: int = 6, train: bool = False) -> Case:
    """``layers`` after a 1×1 convolution from 3 to 4 channels over ``dims`` spatial dimensions."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 4, 1)
    return Case(nn.Sequential(conv, *layers), (torch.randn(2, 3, *(size,) * dims),), train)


def alone(layer: nn.Module, *inputs: Tensor, train: bool = False) -> Case:
    return Case(layer, inputs, train)


def net(width: int, *tail: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), *tail)


def loss_case(criterion: nn.Module, network: nn.Module, *targets: Tensor,
              call: Callable[..., Tensor] | None = None, x: Tensor | None = None) -> Case:
    """The loss ``criterion`` of ``network``'s output on 8 examples against ``targets``."""
    x = torch.randn(8, 6) if x is None else x
    return Case(Loss(network, criterion, call), (x, *targets), objective=the_loss)


def signs(*shape: int) -> Tensor:
    return torch.randint(0, 2, shape).double() * 2 - 1


def sequence(*dims: int) -> Tensor:
    """A batch-first sequence: 4 examples of 7 steps of 6 features (or ``dims``)."""
    return torch.randn(*(dims or (4, 7, 6)))


def bags(mode: str, **options: object) -> Callable[[], Case]:
    """An EmbeddingBag of 10 rows of 5 on 1-D indices with offsets (``offsets=False``: 2-D
    indices, 4 bags of 3), optionally with per-sample weights and ``include_last_offset``."""
    use_offsets = options.pop("offsets", True)
    weighted = options.pop("per_sample_weights", False)

    def build() -> Case:
        layer = nn.EmbeddingBag(10, 5, mode=mode, **options)  # type: ignore[arg-type]
        indices = torch.randint(0, 10, (11,) if use_offsets else (4, 3))
        inputs: list[Tensor] = [indices]
        if use_offsets:
            inputs.append(torch.tensor([0, 2, 2, 6, 11] if options.get("include_last_offset") else [0, 2, 2, 6]))
        if weighted:
            inputs.append(torch.rand(indices.shape) + 0.5)
        if use_offsets:
            return Case(layer, tuple(inputs))
        return Case(Wrapped(layer, lambda m, i, *w: m(i, per_sample_weights=w[0] if w else None)), tuple(inputs))

    return build


def cases() -> dict[str, Callable[[], Case]]:
    """name: a function that builds the case (call it after seeding torch's generator)."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    def pooled(pool: nn.Module) -> nn.Module:  # MaxUnpool takes a max pool's indices
        return nn.ModuleList([nn.Conv2d(3, 4, 1), pool])

    def unpool(dims: int) -> Case:
        pools = ((nn.MaxPool1d, nn.MaxUnpool1d), (nn.MaxPool2d, nn.MaxUnpool2d), (nn.MaxPool3d, nn.MaxUnpool3d))
        pool, unpool = pools[dims - 1]
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 4, 1)
        model = Wrapped(nn.ModuleList([conv, pool(2, return_indices=True), unpool(2)]),
                        lambda m, x: m[2](*m[1](m[0](x).tanh())))
        return Case(model, (torch.randn(2, 3, *(4,) * dims),))

    table: dict[str, Callable[[], Case]] = {
        # the first survey's 26 cases, under their names (benchmarks/results/second_derivatives_h100.json)
        "Linear": lambda: alone(nn.Linear(6, 5), torch.randn(8, 6)),
        "weight_norm (parametrization)": lambda: alone(weight_norm(nn.Linear(6, 5)), torch.randn(8, 6)),
        "weight_norm (hook)": lambda: alone(torch.nn.utils.weight_norm(nn.Linear(6, 5)), torch.randn(8, 6)),
        "spectral_norm, eval": lambda: alone(spectral_norm(nn.Linear(6, 5)), torch.randn(8, 6)),
        "LayerNorm": lambda: after_linear(nn.LayerNorm(6)),
        "BatchNorm1d, train": lambda: Case(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)), (torch.randn(8, 6),), True),
        "BatchNorm2d, train": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)), (torch.randn(4, 6, 5, 5),), True),
        "BatchNorm2d, eval": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)), (torch.randn(4, 6, 5, 5),)),
        "GroupNorm": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.GroupNorm(2, 4)), (torch.randn(4, 6, 5, 5),)),
        "InstanceNorm2d, affine": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.InstanceNorm2d(4, affine=True)), (torch.randn(4, 6, 5, 5),)),
        "Conv2d, MaxPool2d": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.Tanh(), nn.MaxPool2d(2)), (torch.randn(4, 6, 5, 5),)),
        "Conv2d, AdaptiveAvgPool2d": lambda: Case(nn.Sequential(nn.Conv2d(6, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1)), (torch.randn(4, 6, 5, 5),)),
        "ConvTranspose2d": lambda: Case(nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2), nn.Tanh()), (torch.randn(4, 6, 5, 5),)),
        "GELU (tanh)": lambda: after_linear(nn.GELU(approximate="tanh")),
        "GELU": lambda: after_linear(nn.GELU()),
        "SiLU": lambda: after_linear(nn.SiLU()),
        "Mish": lambda: after_linear(nn.Mish()),
        "ELU": lambda: after_linear(nn.ELU()),
        "Softplus": lambda: after_linear(nn.Softplus()),
        "LogSoftmax": lambda: after_linear(nn.LogSoftmax(-1)),
        "MultiheadAttention": lambda: alone(Wrapped(nn.MultiheadAttention(6, 2, batch_first=True),
                                                    lambda m, x: m(x, x, x, need_weights=False)[0]), sequence()),
        "scaled_dot_product_attention, causal": lambda: alone(Attention(), sequence()),
        "TransformerEncoderLayer": lambda: alone(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True), sequence()),
        "LSTM": lambda: alone(Wrapped(nn.LSTM(6, 5, batch_first=True), lambda m, x: m(x)[0]), sequence(), train=True),
        "GRU": lambda: alone(Wrapped(nn.GRU(6, 5, batch_first=True), lambda m, x: m(x)[0]), sequence(), train=True),
        # activations (inputs scaled where the kinks lie far out: ±1, ±3, 6)
        "ReLU": lambda: after_linear(nn.ReLU()),
        "ReLU6": lambda: after_linear(nn.ReLU6(), scale=8.0),
        "LeakyReLU": lambda: after_linear(nn.LeakyReLU(0.1)),
        "PReLU": lambda: after_linear(nn.PReLU(6, init=0.2)),
        "RReLU, eval": lambda: after_linear(nn.RReLU()),
        "RReLU, train (fixed seed)": lambda: Case(nn.Sequential(nn.Linear(6, 6), nn.RReLU()), (torch.randn(8, 6),), True),
        "SELU": lambda: after_linear(nn.SELU()),
        "CELU": lambda: after_linear(nn.CELU(0.7)),
        "Hardtanh": lambda: after_linear(nn.Hardtanh(), scale=3.0),
        "Hardsigmoid": lambda: after_linear(nn.Hardsigmoid(), scale=6.0),
        "Hardswish": lambda: after_linear(nn.Hardswish(), scale=6.0),
        "Hardshrink": lambda: after_linear(nn.Hardshrink(0.3), scale=2.0),
        "Softshrink": lambda: after_linear(nn.Softshrink(0.3), scale=2.0),
        "Tanhshrink": lambda: after_linear(nn.Tanhshrink()),
        "Softsign": lambda: after_linear(nn.Softsign()),
        "Softplus, beta 2, threshold 1": lambda: after_linear(nn.Softplus(beta=2.0, threshold=1.0), scale=3.0),
        "Sigmoid": lambda: after_linear(nn.Sigmoid()),
        "LogSigmoid": lambda: after_linear(nn.LogSigmoid()),
        "Tanh": lambda: after_linear(nn.Tanh()),
        "Threshold": lambda: after_linear(nn.Threshold(0.1, -0.5)),
        "GLU": lambda: after_linear(nn.GLU(-1)),
        "Softmax": lambda: after_linear(nn.Softmax(-1)),
        "Softmin": lambda: after_linear(nn.Softmin(-1)),
        "Softmax2d": lambda: after_conv(2, nn.Softmax2d()),
        # normalisation
        "BatchNorm1d, eval": lambda: after_linear(nn.BatchNorm1d(6)),
        "BatchNorm1d, 3-D input, train": lambda: after_conv(1, nn.BatchNorm1d(4), train=True),
        "BatchNorm3d, train": lambda: after_conv(3, nn.BatchNorm3d(4), size=3, train=True),
        "BatchNorm3d, eval": lambda: after_conv(3, nn.BatchNorm3d(4), size=3),
        "LazyBatchNorm1d, train": lambda: Case(nn.Sequential(nn.Linear(6, 6), nn.LazyBatchNorm1d()), (torch.randn(8, 6),), True),
        "LazyBatchNorm2d, train": lambda: after_conv(2, nn.LazyBatchNorm2d(), train=True),
        "LazyBatchNorm3d, train": lambda: after_conv(3, nn.LazyBatchNorm3d(), size=3, train=True),
        "GroupNorm, no affine": lambda: after_conv(2, nn.GroupNorm(2, 4, affine=False)),
        "LayerNorm, no bias, 2 dims": lambda: after_conv(1, nn.LayerNorm((4, 6), bias=False)),
        "InstanceNorm1d": lambda: after_conv(1, nn.InstanceNorm1d(4)),
        "InstanceNorm2d, running stats, train": lambda: after_conv(2, nn.InstanceNorm2d(4, track_running_stats=True), train=True),
        "InstanceNorm3d, affine": lambda: after_conv(3, nn.InstanceNorm3d(4, affine=True), size=3),
        "LazyInstanceNorm1d, affine": lambda: after_conv(1, nn.LazyInstanceNorm1d(affine=True)),
        "LazyInstanceNorm2d": lambda: after_conv(2, nn.LazyInstanceNorm2d()),
        "LazyInstanceNorm3d": lambda: after_conv(3, nn.LazyInstanceNorm3d(), size=3),
        "LocalResponseNorm": lambda: after_conv(2, nn.LocalResponseNorm(3, alpha=0.5)),
        "CrossMapLRN2d": lambda: after_conv(2, nn.CrossMapLRN2d(3, alpha=0.5)),
        # pooling
        "MaxPool1d": lambda: after_conv(1, nn.MaxPool1d(3, stride=2, padding=1)),
        "MaxPool2d, dilation, ceil_mode": lambda: after_conv(2, nn.MaxPool2d(2, dilation=2, ceil_mode=True), size=7),
        "MaxPool3d": lambda: after_conv(3, nn.MaxPool3d(2), size=4),
        "AvgPool1d": lambda: after_conv(1, nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)),
        "AvgPool2d": lambda: after_conv(2, nn.AvgPool2d(2, ceil_mode=True), size=7),
        "AvgPool3d": lambda: after_conv(3, nn.AvgPool3d(2, divisor_override=3), size=4),
        "LPPool1d": lambda: after_conv(1, nn.LPPool1d(2, 3)),
        "LPPool2d, p=3": lambda: after_conv(2, nn.Sigmoid(), nn.LPPool2d(3, 2)),
        "LPPool3d": lambda: after_conv(3, nn.LPPool3d(2, 2), size=4),
        "AdaptiveMaxPool1d": lambda: after_conv(1, nn.AdaptiveMaxPool1d(4), size=7),
        "AdaptiveMaxPool2d": lambda: after_conv(2, nn.AdaptiveMaxPool2d((3, 2)), size=7),
        "AdaptiveMaxPool3d": lambda: after_conv(3, nn.AdaptiveMaxPool3d(2), size=5),
        "AdaptiveAvgPool1d": lambda: after_conv(1, nn.AdaptiveAvgPool1d(4), size=7),
        "AdaptiveAvgPool3d": lambda: after_conv(3, nn.AdaptiveAvgPool3d(2), size=5),
        "FractionalMaxPool2d, fixed samples": lambda: after_conv(2, nn.FractionalMaxPool2d(2, output_size=4, _random_samples=torch.rand(2, 4, 2)), size=7),
        "FractionalMaxPool3d, fixed samples": lambda: after_conv(3, nn.FractionalMaxPool3d(2, output_ratio=0.5, _random_samples=torch.rand(2, 4, 3)), size=6),
        "MaxUnpool1d": lambda: unpool(1),
        "MaxUnpool2d": lambda: unpool(2),
        "MaxUnpool3d": lambda: unpool(3),
        # padding
        "ReflectionPad1d": lambda: after_conv(1, nn.ReflectionPad1d((2, 1))),
        "ReflectionPad2d": lambda: after_conv(2, nn.ReflectionPad2d((1, 2, 2, 1))),
        "ReflectionPad3d": lambda: after_conv(3, nn.ReflectionPad3d(1), size=3),
        "ReplicationPad1d": lambda: after_conv(1, nn.ReplicationPad1d((2, 1))),
        "ReplicationPad2d": lambda: after_conv(2, nn.ReplicationPad2d((1, 2, 2, 1))),
        "ReplicationPad3d": lambda: after_conv(3, nn.ReplicationPad3d(1), size=3),
        "ZeroPad1d": lambda: after_conv(1, nn.ZeroPad1d((2, 1))),
        "ZeroPad2d": lambda: after_conv(2, nn.ZeroPad2d((1, 2, 2, 1))),
        "ZeroPad3d": lambda: after_conv(3, nn.ZeroPad3d(1), size=3),
        "ConstantPad1d": lambda: after_conv(1, nn.ConstantPad1d((2, 1), 0.5)),
        "ConstantPad2d": lambda: after_conv(2, nn.ConstantPad2d((1, 2, 2, 1), 0.5)),
        "ConstantPad3d": lambda: after_conv(3, nn.ConstantPad3d(1, 0.5), size=3),
        "CircularPad1d": lambda: after_conv(1, nn.CircularPad1d((2, 1))),
        "CircularPad2d": lambda: after_conv(2, nn.CircularPad2d((1, 2, 2, 1))),
        "CircularPad3d": lambda: after_conv(3, nn.CircularPad3d(1), size=3),
        # upsampling and reshuffling
        "Upsample, nearest": lambda: after_conv(2, nn.Upsample(scale_factor=2, mode="nearest"), size=3),
        "Upsample, nearest-exact, 1-D": lambda: after_conv(1, nn.Upsample(size=7, mode="nearest-exact")),
        "Upsample, linear": lambda: after_conv(1, nn.Upsample(scale_factor=1.5, mode="linear")),
        "Upsample, bilinear": lambda: after_conv(2, nn.Upsample(scale_factor=2, mode="bilinear"), size=3),
        "Upsample, bilinear, align_corners": lambda: after_conv(2, nn.Upsample(size=(5, 4), mode="bilinear", align_corners=True), size=3),
        "Upsample, bicubic": lambda: after_conv(2, nn.Upsample(scale_factor=2, mode="bicubic"), size=3),
        "Upsample, trilinear": lambda: after_conv(3, nn.Upsample(scale_factor=2, mode="trilinear"), size=2),
        "Upsample, area": lambda: after_conv(2, nn.Upsample(size=4, mode="area")),
        "UpsamplingNearest2d": lambda: after_conv(2, nn.UpsamplingNearest2d(scale_factor=2), size=3),
        "UpsamplingBilinear2d": lambda: after_conv(2, nn.UpsamplingBilinear2d(scale_factor=2), size=3),
        "PixelShuffle": lambda: after_conv(2, nn.PixelShuffle(2), size=3),
        "PixelUnshuffle": lambda: after_conv(2, nn.PixelUnshuffle(2), size=4),
        "ChannelShuffle": lambda: after_conv(2, nn.ChannelShuffle(2), size=3),
        # convolutions
        "Conv1d": lambda: alone(nn.Conv1d(3, 4, 3, padding=1), torch.randn(2, 3, 7)),
        "Conv2d, stride, dilation, groups": lambda: alone(nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2), torch.randn(2, 4, 9, 9)),
        "Conv2d, padding same, reflect": lambda: alone(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), torch.randn(2, 3, 5, 5)),
        "Conv2d, circular padding": lambda: alone(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), torch.randn(2, 3, 5, 5)),
        "Conv3d": lambda: alone(nn.Conv3d(3, 4, 2, padding=1), torch.randn(2, 3, 3, 3, 3)),
        "ConvTranspose1d": lambda: alone(nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), torch.randn(2, 3, 5)),
        "ConvTranspose2d, groups": lambda: alone(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), torch.randn(2, 4, 3, 3)),
        "ConvTranspose3d": lambda: alone(nn.ConvTranspose3d(3, 4, 2, stride=2), torch.randn(2, 3, 2, 2, 2)),
        "LazyConv1d": lambda: alone(nn.LazyConv1d(4, 3), torch.randn(2, 3, 7)),
        "LazyConv2d": lambda: alone(nn.LazyConv2d(4, 3), torch.randn(2, 3, 5, 5)),
        "LazyConv3d": lambda: alone(nn.LazyConv3d(4, 2), torch.randn(2, 3, 3, 3, 3)),
        "LazyConvTranspose1d": lambda: alone(nn.LazyConvTranspose1d(4, 3), torch.randn(2, 3, 5)),
        "LazyConvTranspose2d": lambda: alone(nn.LazyConvTranspose2d(4, 3), torch.randn(2, 3, 3, 3)),
        "LazyConvTranspose3d": lambda: alone(nn.LazyConvTranspose3d(4, 2), torch.randn(2, 3, 2, 2, 2)),
        "Unfold": lambda: after_conv(2, nn.Unfold(2, dilation=1, padding=1, stride=2), size=5),
        "Fold": lambda: Case(nn.Sequential(nn.Conv1d(3, 16, 1), nn.Fold((4, 4), 2)), (torch.randn(2, 3, 9),)),
        # linear and shape layers
        "LazyLinear": lambda: alone(nn.LazyLinear(5), torch.randn(8, 6)),
        "Bilinear": lambda: alone(nn.Bilinear(6, 4, 5), torch.randn(8, 6), torch.randn(8, 4)),
        "Identity": lambda: after_linear(nn.Identity()),
        "Flatten": lambda: after_conv(2, nn.Flatten(), size=3),
        "Unflatten": lambda: after_linear(nn.Unflatten(1, (2, 3))),
        # embeddings
        "Embedding": lambda: alone(nn.Embedding(10, 5), torch.randint(0, 10, (4, 3))),
        "Embedding, padding_idx": lambda: alone(nn.Embedding(10, 5, padding_idx=0), torch.randint(0, 10, (4, 3))),
        "EmbeddingBag, sum, offsets": bags("sum"),
        "EmbeddingBag, mean, offsets": bags("mean"),
        "EmbeddingBag, max, offsets": bags("max"),
        "EmbeddingBag, sum, offsets, per-sample weights": bags("sum", per_sample_weights=True),
        "EmbeddingBag, mean, include_last_offset": bags("mean", include_last_offset=True),
        "EmbeddingBag, max, include_last_offset": bags("max", include_last_offset=True),
        "EmbeddingBag, sum, padding_idx": bags("sum", padding_idx=3),
        "EmbeddingBag, sum, 2-D": bags("sum", offsets=False),
        "EmbeddingBag, mean, 2-D": bags("mean", offsets=False),
        "EmbeddingBag, max, 2-D": bags("max", offsets=False),
        "EmbeddingBag, sum, 2-D, per-sample weights": bags("sum", offsets=False, per_sample_weights=True),
        # dropout, in eval mode (train mode: a fixed seed, as dynlens draws its masks)
        "Dropout, eval": lambda: after_linear(nn.Dropout(0.3)),
        "Dropout, train (fixed seed)": lambda: Case(nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.3)), (torch.randn(8, 6),), True),
        "Dropout1d, eval": lambda: after_conv(1, nn.Dropout1d(0.3)),
        "Dropout2d, eval": lambda: after_conv(2, nn.Dropout2d(0.3)),
        "Dropout3d, eval": lambda: after_conv(3, nn.Dropout3d(0.3), size=3),
        "AlphaDropout, eval": lambda: after_linear(nn.AlphaDropout(0.3)),
        "FeatureAlphaDropout, eval": lambda: after_conv(2, nn.FeatureAlphaDropout(0.3)),
        # recurrent
        "RNN": lambda: alone(Wrapped(nn.RNN(6, 5, batch_first=True), lambda m, x: m(x)[0]), sequence()),
        "RNN, relu, 2 layers": lambda: alone(Wrapped(nn.RNN(6, 5, 2, nonlinearity="relu", batch_first=True), lambda m, x: m(x)[0]), sequence()),
        "LSTM, eval, bidirectional, proj_size": lambda: alone(Wrapped(nn.LSTM(6, 5, 2, batch_first=True, bidirectional=True, proj_size=3),
                                                                     lambda m, x: m(x)[0]), sequence()),
        "GRU, eval, initial state": lambda: alone(Wrapped(nn.GRU(6, 5, batch_first=False), lambda m, x, h: m(x, h)[0]),
                                                  sequence(7, 4, 6), torch.randn(1, 4, 5)),
        "RNNCell": lambda: alone(nn.RNNCell(6, 5), torch.randn(8, 6), torch.randn(8, 5)),
        "LSTMCell": lambda: alone(Wrapped(nn.LSTMCell(6, 5), lambda m, x, h, c: m(x, (h, c))[0]),
                                  torch.randn(8, 6), torch.randn(8, 5), torch.randn(8, 5)),
        "GRUCell": lambda: alone(nn.GRUCell(6, 5), torch.randn(8, 6), torch.randn(8, 5)),
        # attention and transformers
        "MultiheadAttention, kdim/vdim, key padding mask, weights": lambda: alone(
            Wrapped(nn.MultiheadAttention(6, 2, kdim=4, vdim=5, batch_first=True),
                    lambda m, q, k, v, mask: torch.cat([t.reshape(-1) for t in m(q, k, v, key_padding_mask=mask, average_attn_weights=False)])),
            sequence(4, 3, 6), sequence(4, 7, 4), sequence(4, 7, 5), torch.arange(7).expand(4, 7) >= torch.tensor([[7], [5], [6], [4]])),
        "TransformerEncoderLayer, norm_first, gelu, causal": lambda: alone(
            Wrapped(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, activation="gelu", norm_first=True, batch_first=True),
                    lambda m, x: m(x, src_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, x.dtype), is_causal=True)),
            sequence()),
        "TransformerDecoderLayer": lambda: alone(Wrapped(nn.TransformerDecoderLayer(6, 2, 12, dropout=0.0, batch_first=True),
                                                         lambda m, tgt, memory: m(tgt, memory)), sequence(4, 5, 6), sequence()),
        "TransformerEncoder, 2 layers, final norm": lambda: alone(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True), 2, nn.LayerNorm(6),
                                  enable_nested_tensor=False), sequence()),
        "TransformerDecoder, 2 layers": lambda: alone(Wrapped(nn.TransformerDecoder(nn.TransformerDecoderLayer(6, 2, 12, dropout=0.0, batch_first=True), 2),
                                                              lambda m, tgt, memory: m(tgt, memory)), sequence(4, 5, 6), sequence()),
        "Transformer, causal target mask": lambda: alone(
            Wrapped(nn.Transformer(6, 2, 1, 1, 12, dropout=0.0, batch_first=True),
                    lambda m, src, tgt: m(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], tgt.device, tgt.dtype))),
            sequence(), sequence(4, 5, 6)),
        # distances
        "CosineSimilarity": lambda: alone(Wrapped(nn.ModuleList([nn.Linear(6, 10), nn.CosineSimilarity()]),
                                                  lambda m, x: m[1](*m[0](x).chunk(2, dim=1))), torch.randn(8, 6)),
        "PairwiseDistance": lambda: alone(Wrapped(nn.ModuleList([nn.Linear(6, 10), nn.PairwiseDistance()]),
                                                  lambda m, x: m[1](*m[0](x).chunk(2, dim=1))), torch.randn(8, 6)),
        # losses: the loss of a small network's output against fixed targets
        "L1Loss": lambda: loss_case(nn.L1Loss(), net(5, nn.Tanh()), torch.randn(8, 5)),
        "MSELoss": lambda: loss_case(nn.MSELoss(), net(5, nn.Tanh()), torch.randn(8, 5)),
        "CrossEntropyLoss": lambda: loss_case(nn.CrossEntropyLoss(), net(5), torch.randint(0, 5, (8,))),
        "CrossEntropyLoss, label smoothing, class weights": lambda: loss_case(
            nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=0.1), net(5), torch.randint(0, 5, (8,))),
        "CrossEntropyLoss, probabilities": lambda: loss_case(nn.CrossEntropyLoss(label_smoothing=0.1), net(5), torch.randn(8, 5).softmax(-1)),
        "CrossEntropyLoss, 2-D targets": lambda: loss_case(nn.CrossEntropyLoss(), nn.Conv2d(3, 5, 1), torch.randint(0, 5, (2, 4, 4)),
                                                           x=torch.randn(2, 3, 4, 4)),
        "NLLLoss": lambda: loss_case(nn.NLLLoss(), net(5, nn.LogSoftmax(-1)), torch.randint(0, 5, (8,))),
        "NLLLoss2d": lambda: loss_case(nn.NLLLoss2d(), nn.Sequential(nn.Conv2d(3, 5, 1), nn.LogSoftmax(1)),
                                       torch.randint(0, 5, (2, 4, 4)), x=torch.randn(2, 3, 4, 4)),
        "BCELoss": lambda: loss_case(nn.BCELoss(), net(5, nn.Sigmoid()), torch.rand(8, 5)),
        "BCEWithLogitsLoss, pos_weight": lambda: loss_case(nn.BCEWithLogitsLoss(pos_weight=torch.rand(5) + 0.5), net(5), torch.rand(8, 5)),
        "KLDivLoss": lambda: loss_case(nn.KLDivLoss(reduction="batchmean"), net(5, nn.LogSoftmax(-1)), torch.randn(8, 5).softmax(-1)),
        "KLDivLoss, log_target": lambda: loss_case(nn.KLDivLoss(reduction="batchmean", log_target=True), net(5, nn.LogSoftmax(-1)),
                                                   torch.randn(8, 5).log_softmax(-1)),
        "HuberLoss": lambda: loss_case(nn.HuberLoss(delta=0.5), net(5, nn.Tanh()), torch.randn(8, 5)),
        "SmoothL1Loss": lambda: loss_case(nn.SmoothL1Loss(beta=0.5), net(5, nn.Tanh()), torch.randn(8, 5)),
        "SoftMarginLoss": lambda: loss_case(nn.SoftMarginLoss(), net(5), signs(8, 5)),
        "MultiLabelSoftMarginLoss": lambda: loss_case(nn.MultiLabelSoftMarginLoss(), net(5), torch.randint(0, 2, (8, 5)).double()),
        "PoissonNLLLoss": lambda: loss_case(nn.PoissonNLLLoss(), net(5), torch.poisson(torch.full((8, 5), 2.0))),
        "PoissonNLLLoss, rates, full": lambda: loss_case(nn.PoissonNLLLoss(log_input=False, full=True), net(5, nn.Softplus()),
                                                         torch.poisson(torch.full((8, 5), 2.0))),
        "GaussianNLLLoss": lambda: loss_case(nn.GaussianNLLLoss(), net(10), torch.randn(8, 5),
                                             call=lambda c, out, t: c(out[:, :5], t, F.softplus(out[:, 5:]))),
        "CosineEmbeddingLoss": lambda: loss_case(nn.CosineEmbeddingLoss(margin=0.1), net(10, nn.Tanh()), signs(8),
                                                 call=lambda c, out, y: c(*out.chunk(2, dim=1), y)),
        "MarginRankingLoss": lambda: loss_case(nn.MarginRankingLoss(margin=0.1), net(2, nn.Tanh()), signs(8),
                                               call=lambda c, out, y: c(out[:, 0], out[:, 1], y)),
        "HingeEmbeddingLoss": lambda: loss_case(nn.HingeEmbeddingLoss(margin=0.5), net(5, nn.Tanh()), signs(8, 5)),
        "MultiMarginLoss": lambda: loss_case(nn.MultiMarginLoss(), net(5, nn.Tanh()), torch.randint(0, 5, (8,))),
        "MultiMarginLoss, p=2, weights": lambda: loss_case(nn.MultiMarginLoss(p=2, margin=0.5, weight=torch.rand(5) + 0.5),
                                                           net(5, nn.Tanh()), torch.randint(0, 5, (8,))),
        "MultiLabelMarginLoss": lambda: loss_case(nn.MultiLabelMarginLoss(), net(5, nn.Tanh()),
                                                  torch.tensor([[3, 0, -1, 1, 2]] * 4 + [[1, -1, 0, 0, 0]] * 4)),
        "TripletMarginLoss": lambda: loss_case(nn.TripletMarginLoss(margin=1.0), net(15, nn.Tanh()),
                                               call=lambda c, out: c(*out.chunk(3, dim=1))),
        "TripletMarginLoss, swap, p=1": lambda: loss_case(nn.TripletMarginLoss(margin=1.0, p=1, swap=True), net(15, nn.Tanh()),
                                                          call=lambda c, out: c(*out.chunk(3, dim=1))),
        "TripletMarginWithDistanceLoss, cosine": lambda: loss_case(
            nn.TripletMarginWithDistanceLoss(distance_function=lambda a, b: 1 - F.cosine_similarity(a, b), margin=0.5),
            net(15, nn.Tanh()), call=lambda c, out: c(*out.chunk(3, dim=1))),
        "CTCLoss": lambda: loss_case(nn.CTCLoss(), net(5, nn.LogSoftmax(-1)), torch.randint(1, 5, (2, 3)),
                                     torch.tensor([10, 8]), torch.tensor([3, 2]), x=torch.randn(10, 2, 6)),
        "AdaptiveLogSoftmaxWithLoss": lambda: Case(Wrapped(nn.AdaptiveLogSoftmaxWithLoss(6, 10, [4, 8], div_value=2.0),
                                                           lambda m, x, t: m(x, t).loss),
                                                   (torch.randn(8, 6), torch.randint(0, 10, (8,))), objective=the_loss),
    }
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        table["RMSNorm"] = lambda: after_linear(nn.RMSNorm(6))
    if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

        def linear_cross_entropy(options: LinearCrossEntropyOptions | None) -> Case:
            model = nn.LinearCrossEntropyLoss(6, 5, bias=True, options=options)
            return Case(model, (torch.randn(8, 6), torch.randint(0, 5, (8,))), objective=the_loss)

        table["LinearCrossEntropyLoss"] = lambda: linear_cross_entropy(None)
        table["LinearCrossEntropyLoss, chunked"] = lambda: linear_cross_entropy(LinearCrossEntropyOptions(batch_chunk_size=3))
    return table


def build(name: str, factory: Callable[[], Case], attempt: int = 0) -> tuple[int, Case]:
    """The case drawn with the ``attempt``-th seed of its name (independent of the other cases)."""
    seed = zlib.crc32(name.encode()) + attempt
    torch.manual_seed(seed)
    return seed, factory()


def layer_types(case: Case) -> set[str]:
    """The names of torch.nn's layer types in the case (a lazy layer under its own name: call
    before the check, which turns it into its non-lazy twin)."""
    return {type(m).__name__ for m in case.model.modules()
            if getattr(nn, type(m).__name__, None) is type(m) and type(m).__name__ not in EXCLUDED}


# ----------------------------------------------------------------------------- the check


def kinks_of(module: nn.Module) -> tuple[float, ...]:
    """Where an elementwise layer is not twice differentiable (its derivative jumps there)."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return (module.min_val, module.max_val)
    if isinstance(module, nn.Threshold):
        return (module.threshold,)
    if isinstance(module, (nn.Hardshrink, nn.Softshrink)):
        return (-module.lambd, module.lambd)
    if isinstance(module, (nn.Hardsigmoid, nn.Hardswish)):
        return (-3.0, 3.0)
    if isinstance(module, nn.Softplus):
        return (module.threshold / module.beta,)
    if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU)):
        return (0.0,)
    return ()


class NearKink(Exception):
    """The case's inputs lie too near a kink for finite differences: draw it again."""


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def central(f: Callable[[Tensor], Tensor], x: Tensor, v: Tensor, step: float) -> Tensor:
    """The central difference (f(x + step·v) − f(x − step·v)) / (2·step)."""
    return (f(x + step * v) - f(x - step * v)) / (2 * step)


def failure(err: Exception) -> str:
    """An error as the survey records it: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:240] if lines else ''}"


def check(case: Case, device: torch.device) -> dict[str, float | str | None]:
    """The relative errors of the gradient and of four Hessian-vector products against central
    differences (or the error each raised); raises :class:`NearKink` where the differences
    cannot be trusted."""
    model, train = case.model.to(device=device, dtype=D), case.train
    inputs = tuple(t.to(device=device, dtype=D) if t.is_floating_point() else t.to(device) for t in case.inputs)
    if any(isinstance(m, LazyModuleMixin) for m in model.modules()):
        with torch.no_grad():
            model.eval()(*inputs)  # a lazy module takes its shapes from its first input
    model.train(train)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        if train:
            torch.manual_seed(0)  # the same dropout masks and RReLU slopes in every evaluation
        return case.objective(functional_call(model, {**params, **{k: b.clone() for k, b in buffers.items()}}, inputs))

    def gradient(flat: Tensor) -> Tensor:
        flat = flat.detach().requires_grad_(True)
        return torch.autograd.grad(loss(flat), flat)[0]

    distances: list[float] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: distances.extend(float((args[0] - k).abs().min()) for k in kinks_of(m)))
             for m in model.modules() if kinks_of(m)]
    with torch.no_grad():
        loss(flat0)
    for hook in hooks:
        hook.remove()
    margin = min(distances) if distances else None
    if margin is not None and margin < KINK_MARGIN:
        raise NearKink(f"an input lies {margin:.1e} from a kink")

    v = torch.randn(flat0.shape, generator=torch.Generator().manual_seed(1), dtype=D).to(device)
    row: dict[str, float | str | None] = {"kink_margin": margin}
    # the reference's gradients: weight norm from elementary operations (CUDA's fused kernel
    # keeps its norms in float32, too coarse for differences of float64 gradients), and PyTorch's
    # own recurrent kernels (cuDNN's have no backward in eval mode)
    with _weight_norm_composite(), torch.backends.cudnn.flags(enabled=False):
        full, half = (central(gradient, flat0, v, step) for step in (STEP, STEP / 2))
        if not torch.isfinite(full).all():
            raise ValueError("the central differences of the gradient are not finite")
        row["step_halving"] = relative(half, full)
        if row["step_halving"] > STEP_HALVING:
            raise NearKink(f"central differences at steps {STEP} and {STEP / 2} differ by {row['step_halving']:.1e}")
        expected = (4 * half - full) / 3
        with torch.no_grad():
            slope = (4 * central(loss, flat0, v, STEP / 2) - central(loss, flat0, v, STEP)) / 3
        row["gradient"] = float((gradient(flat0) @ v - slope).abs() / slope.abs())

    z = flat0.detach().requires_grad_(True)
    try:
        g = torch.autograd.grad(loss(z), z, create_graph=True)[0]
        row["double_backward"] = relative(torch.autograd.grad(g, z, v)[0], expected)
    except Exception as err:  # noqa: BLE001 - the point is to record which fail
        row["double_backward"] = failure(err)
    try:
        row["forward_over_reverse"] = relative(jvp(func_grad(loss), (flat0,), (v,))[1], expected)
    except Exception as err:  # noqa: BLE001
        row["forward_over_reverse"] = failure(err)

    class Scalar(nn.Module):  # the same scalar as a (model, loss_fn, batch) triple for dynlens
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *x: Tensor) -> Tensor:
            return case.objective(self.model(*x))

    scalar = Scalar()
    for method in ("reuse", "forward_over_reverse"):
        try:
            with isolated(scalar, "train" if train else "eval"):
                fn = ModelFunction(scalar, lambda out, _: out, (inputs, torch.zeros(len(inputs[0]), device=device)))
                matvec = fn.curvature_products("hessian", method)[0]
                row[f"dynlens_{method}"] = relative(matvec(v), expected)
        except Exception as err:  # noqa: BLE001
            row[f"dynlens_{method}"] = failure(err)
    return row


COLUMNS = ("double_backward", "forward_over_reverse", "dynlens_reuse", "dynlens_forward_over_reverse")


def survey(name: str, factory: Callable[[], Case], device: torch.device) -> dict[str, float | str | None]:
    """:func:`check` on the case, drawn again with the next seed while it lies near a kink."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reasons = []
    for attempt in range(SEEDS):
        seed, case = build(name, factory, attempt)
        head = {"seed": seed, "layers": sorted(layer_types(case))}
        try:
            with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no second derivative at all
                return {**head, **check(case, device)}
        except NearKink as err:
            reasons.append(str(err))
        except Exception as err:  # noqa: BLE001 - no reference: the first derivative failed
            return {**head, **dict.fromkeys(COLUMNS, f"reference: {failure(err)}")}
    return {**head, **dict.fromkeys(COLUMNS, f"NearKink: every one of {SEEDS} seeds, last: {reasons[-1]}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="cases whose name starts with one of these")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    table = {name: factory for name, factory in cases().items()
             if args.only is None or any(name.startswith(prefix) for prefix in args.only)}
    rows = {}
    print(f"{'layer':52s} {'gradient':>9s} {'double bw':>10s} {'fwd-over-rev':>13s} {'dynlens reuse':>14s} {'dynlens f-o-r':>14s}")
    for name, factory in table.items():
        rows[name] = row = survey(name, factory, device)
        cells = [row.get("gradient"), *(row[c] for c in COLUMNS)]
        shown = [f"{c:.1e}" if isinstance(c, float) else str(c).split(":")[0][:14] for c in cells]
        print(f"{name[:52]:52s} {shown[0]:>9s} {shown[1]:>10s} {shown[2]:>13s} {shown[3]:>14s} {shown[4]:>14s}", flush=True)
    wrong = {name: [c for c in COLUMNS if not (isinstance(row[c], float) and row[c] <= 1e-6)] for name, row in rows.items()}
    wrong = {name: columns for name, columns in wrong.items() if columns}
    types = sorted({layer for row in rows.values() for layer in row["layers"]})
    print(f"\n{len(rows)} cases, {len(types)} layer types of torch.nn; above 1e-6 or failing:")
    for name, columns in wrong.items():
        print(f"  {name}: {', '.join(columns)}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "layer_types": types, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
