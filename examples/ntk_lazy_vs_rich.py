"""Lazy and rich training in the tangent kernel
============================================

Lazy and rich training: the empirical NTK of one architecture at several widths (Chizat,
Oyallon & Bach 2019, "On Lazy Training in Differentiable Programming"; Jacot et al. 2018).

A two-hidden-layer tanh MLP in the NTK parametrisation (each layer's output divided by √fan-in,
weights drawn from N(0, 1)) learns the same regression task at widths 32, 128, 512 and 2,048
with the same learning rate. As the width grows, the network trains more and more like its
linearisation around initialisation: the tangent kernel's distance from its initial value
(Fort et al. 2020: 1 − the cosine of the two kernels, second order in the kernel's relative
change, which falls as 1/√width) shrinks as about 1/width while the loss falls as far — the lazy
(kernel) regime. Narrow networks move their kernel further (feature learning). Measured
(2026-11-27, 400 steps, this project's CPU VM): widths 32, 128, 512, 2,048 ended at losses
0.070, 0.058, 0.071, 0.069 with kernel distances 4.3e-3, 3.2e-4, 5.2e-5, 4.9e-6; their
parameters moved 14%, 3.9%, 1.0% and 0.27% of their norm (‖θ − θ₀‖/‖θ₀‖, 2026-11-29), about as
1/width, and the lazy-regime finding fires from width 128 on (the parameters of the width-32
network moved too far for it).

The script makes its own data, trains the four runs with an NTK probe, prints the kernel's
final distance from initialisation, the parameters' relative change and the kernel's alignment,
and writes one comparison report. About a minute and a half on a CPU.

    python examples/ntk_lazy_vs_rich.py [--steps 400] [--out runs/ntk]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

import dynlens as dl


class NTKLinear(nn.Linear):
    """A linear layer in the NTK parametrisation: N(0, 1) weights, output scaled by 1/√fan-in."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__(fan_in, fan_out)
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)
        self.scale = 1 / math.sqrt(fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.scale, self.bias)


def make_model(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(NTKLinear(4, width), nn.Tanh(), NTKLinear(width, width), nn.Tanh(), NTKLinear(width, 1))


def make_data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:2]) + 0.5 * x[:, 2:3]
    return x, y


def train(width: int, steps: int, out: Path) -> dl.Run:
    x, y = make_data()
    model = make_model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    lens = dl.Lens(model, nn.MSELoss(), probe_batch=(x, y), optimizer=optimizer, run_dir=out / f"width{width}",
                   name=f"width {width}", overwrite=True, budget=None, config={"width": width},
                   probes=[dl.probes.NTK(every=max(steps // 10, 1), n=32)])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        lens.step(loss=loss)
    lens.close()
    return dl.load_run(out / f"width{width}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ntk-"))
    runs = [train(width, args.steps, out) for width in args.widths]
    print(f"{'width':>6s} {'final loss':>11s} {'kernel distance from init':>26s} {'parameter change':>17s} "
          f"{'alignment':>10s}")
    for width, run in zip(args.widths, runs, strict=True):
        loss = run.series("train", "loss").iloc[-1]
        distance = run.series("ntk", "distance_from_init").iloc[-1]
        change = run.series("ntk", "parameter_change").iloc[-1]
        alignment = run.series("ntk", "alignment").iloc[-1]
        print(f"{width:>6d} {loss:>11.4f} {distance:>26.2e} {change:>17.2e} {alignment:>10.3f}")
    path = dl.report(runs, out=out / "report.html", quiet=True)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
