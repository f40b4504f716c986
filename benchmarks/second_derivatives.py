"""Are PyTorch's second derivatives right, layer by layer? And dynlens's Hessian-vector products?

For each common layer type, a small float64 model and a fixed smooth loss of its output: the
Hessian-vector product Hv by autograd's double backward and by forward-over-reverse
(``torch.func.jvp`` of ``grad``), as plain PyTorch computes them, against central differences of
the gradient (first derivatives, step 1e-5, error ~1e-9); then dynlens's own product
(``ModelFunction.curvature_products``, inside ``isolated``) on the same model. A relative error
far above 1e-6 is a wrong derivative. The fused weight-norm kernel is the one found wrong
(its double backward holds the saved norms constant): dynlens computes weight norm from
elementary operations inside a measurement.

    python benchmarks/second_derivatives.py                 # CPU
    python benchmarks/second_derivatives.py --device cuda   # cuDNN's kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, jvp
from torch.func import grad as func_grad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynlens.functional import ModelFunction, _weight_norm_composite, isolated  # noqa: E402

D = torch.float64


def weighted_tanh(out: torch.Tensor) -> torch.Tensor:
    """A smooth scalar of the output with no symmetry that could hide an error."""
    return (out.tanh() * torch.linspace(-1, 1, out.numel(), dtype=D, device=out.device).reshape(out.shape)).sum()


class Wrapped(nn.Module):
    """``call(inner, x)``: layers whose forward takes other arguments than one tensor."""

    def __init__(self, inner: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.inner, x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), is_causal=True)


def cases() -> dict[str, tuple[nn.Module, torch.Tensor, bool]]:
    """name: (model, input, train mode)."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    x2, x3, x4 = torch.randn(8, 6), torch.randn(4, 7, 6), torch.randn(4, 6, 5, 5)
    out = {
        "Linear": (nn.Linear(6, 5), x2, False),
        "weight_norm (parametrization)": (weight_norm(nn.Linear(6, 5)), x2, False),
        "weight_norm (hook)": (torch.nn.utils.weight_norm(nn.Linear(6, 5)), x2, False),
        "spectral_norm, eval": (spectral_norm(nn.Linear(6, 5)), x2, False),
        "LayerNorm": (nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)), x2, False),
        "BatchNorm1d, train": (nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)), x2, True),
        "BatchNorm2d, train": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)), x4, True),
        "BatchNorm2d, eval": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)), x4, False),
        "GroupNorm": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.GroupNorm(2, 4)), x4, False),
        "InstanceNorm2d, affine": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.InstanceNorm2d(4, affine=True)), x4, False),
        "Conv2d, MaxPool2d": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.Tanh(), nn.MaxPool2d(2)), x4, False),
        "Conv2d, AdaptiveAvgPool2d": (nn.Sequential(nn.Conv2d(6, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1)), x4, False),
        "ConvTranspose2d": (nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2), nn.Tanh()), x4, False),
        "GELU (tanh)": (nn.Sequential(nn.Linear(6, 6), nn.GELU(approximate="tanh")), x2, False),
        "GELU": (nn.Sequential(nn.Linear(6, 6), nn.GELU()), x2, False),
        "SiLU": (nn.Sequential(nn.Linear(6, 6), nn.SiLU()), x2, False),
        "Mish": (nn.Sequential(nn.Linear(6, 6), nn.Mish()), x2, False),
        "ELU": (nn.Sequential(nn.Linear(6, 6), nn.ELU()), x2, False),
        "Softplus": (nn.Sequential(nn.Linear(6, 6), nn.Softplus()), x2, False),
        "LogSoftmax": (nn.Sequential(nn.Linear(6, 6), nn.LogSoftmax(-1)), x2, False),
        "MultiheadAttention": (Wrapped(nn.MultiheadAttention(6, 2, batch_first=True),
                                       lambda m, x: m(x, x, x, need_weights=False)[0]), x3, False),
        "scaled_dot_product_attention, causal": (Attention(), x3, False),
        "TransformerEncoderLayer": (nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True), x3, False),
        "LSTM": (Wrapped(nn.LSTM(6, 5, batch_first=True), lambda m, x: m(x)[0]), x3, True),
        "GRU": (Wrapped(nn.GRU(6, 5, batch_first=True), lambda m, x: m(x)[0]), x3, True),
    }
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        out["RMSNorm"] = (nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6)), x2, False)
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check(model: nn.Module, x: torch.Tensor, train: bool, device: torch.device) -> dict[str, float | str]:
    model = model.to(device=device, dtype=D).train(train)
    x = x.to(device=device, dtype=D)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return weighted_tanh(functional_call(model, {**params, **{k: b.clone() for k, b in buffers.items()}}, (x,)))

    def gradient(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.detach().requires_grad_(True)
        return torch.autograd.grad(loss(flat), flat)[0]

    v = torch.randn(flat0.shape, generator=torch.Generator().manual_seed(1), dtype=D).to(device)
    eps = 1e-5
    # the reference's gradients: weight norm from elementary operations (CUDA's fused kernel
    # keeps its norms in float32, too coarse for differences of float64 gradients), and PyTorch's
    # own recurrent kernels (cuDNN's have no backward in eval mode)
    with _weight_norm_composite(), torch.backends.cudnn.flags(enabled=False):
        expected = (gradient(flat0 + eps * v) - gradient(flat0 - eps * v)) / (2 * eps)
    row: dict[str, float | str] = {}
    z = flat0.detach().requires_grad_(True)
    try:
        g = torch.autograd.grad(loss(z), z, create_graph=True)[0]
        row["double_backward"] = relative(torch.autograd.grad(g, z, v)[0], expected)
    except Exception as err:  # noqa: BLE001 - the point is to record which fail
        row["double_backward"] = type(err).__name__
    try:
        row["forward_over_reverse"] = relative(jvp(func_grad(loss), (flat0,), (v,))[1], expected)
    except Exception as err:  # noqa: BLE001
        row["forward_over_reverse"] = type(err).__name__

    class Scalar(nn.Module):  # the same loss as a (model, loss_fn, batch) triple for dynlens
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return weighted_tanh(self.model(inputs))

    for method in ("reuse", "forward_over_reverse"):
        try:
            with isolated(Scalar(), "train" if train else "eval"):
                fn = ModelFunction(Scalar(), lambda out, _: out, (x, torch.zeros(len(x), device=device)))
                matvec = fn.curvature_products("hessian", method)[0]
                row[f"dynlens_{method}"] = relative(matvec(v), expected)
        except Exception as err:  # noqa: BLE001
            row[f"dynlens_{method}"] = type(err).__name__
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = {}
    print(f"{'layer':38s} {'double bw':>10s} {'fwd-over-rev':>13s} {'dynlens reuse':>14s} {'dynlens f-o-r':>14s}")
    for name, (model, x, train) in cases().items():
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no second derivative at all
            rows[name] = row = check(model, x, train, device)
        cells = [f"{c:.1e}" if isinstance(c, float) else c[:14] for c in row.values()]
        print(f"{name:38s} {cells[0]:>10s} {cells[1]:>13s} {cells[2]:>14s} {cells[3]:>14s}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
