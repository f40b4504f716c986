"""The edge of stability
=====================

The edge of stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", ICLR).

Full-batch gradient descent with step size η on a small tanh network and a squared loss: the
sharpness λ_max (the top Hessian eigenvalue) first rises ("progressive sharpening") until it
reaches 2/η, the largest value at which gradient descent on a quadratic is stable. It then stops
rising and hovers at 2/η while the loss keeps falling, non-monotonically: the edge of stability.

The script makes its own data (random inputs, random one-hot targets), trains for ``steps``
steps with a Hessian probe every ``every`` steps, prints the sharpness against 2/η and writes a
report. Runs in well under a minute on a CPU.

    python examples/edge_of_stability.py [--steps 1000] [--out runs/edge_of_stability]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import dynlens as dl


def make_data(n: int = 200, dim: int = 20, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n Gaussian inputs and random one-hot targets (to be fitted by squared loss)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = nn.functional.one_hot(torch.randint(0, classes, (n,), generator=g), classes).float()
    return x, y


def main(steps: int = 1000, lr: float = 0.5, every: int = 10, run_dir: str | None = None,
         report: bool = True, seed: int = 0) -> Path:
    """Train with full-batch gradient descent under a Lens; return the run directory."""
    torch.manual_seed(seed)
    x, y = make_data(seed=seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run_dir = run_dir or tempfile.mkdtemp(prefix="edge_of_stability_")
    probe = dl.probes.Hessian(every=every, k=1, lambda_min=False, trace=False, tol=1e-3)
    with dl.Lens(model, loss_fn, probe_batch=(x, y), optimizer=optimizer, run_dir=run_dir,
                 name=f"edge-of-stability-lr{lr}", config={"lr": lr, "steps": steps, "full_batch": len(x)},
                 probes=[probe], budget=None) as lens:  # sharpness at every scheduled step
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            lens.step(loss=loss)
    run = dl.load_run(run_dir)
    sharpness = run.series("hessian", "sharpness")
    print(f"2/η = {2 / lr:.3f}")
    for step in sharpness.index[:: max(1, len(sharpness) // 20)]:
        print(f"step {step:5d}  λ_max = {sharpness[step]:7.3f}  ({sharpness[step] * lr / 2:5.2f} × 2/η)")
    for finding in dl.diagnose(run):
        print(f"[{finding.severity}] {finding.title}")
    if report and hasattr(dl, "report"):
        print("report:", dl.report(run_dir, out=str(Path(run_dir) / "report.html")))
    return Path(run_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    main(steps=args.steps, lr=args.lr, run_dir=args.out)
