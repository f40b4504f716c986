"""The demo: a small network trained on data dynlens makes itself, with every probe attached.

``dynlens demo`` runs :func:`run_demo`: a three-class spiral problem (no download), an MLP trained
by SGD with momentum, a Lens with every built-in probe, and, at the end, the HTML report.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["make_spirals", "demo_model", "run_demo"]


def make_spirals(n: int = 600, classes: int = 3, noise: float = 0.15, label_noise: float = 0.05,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` points on ``classes`` interleaved 2-D spiral arms, with Gaussian ``noise`` on the
    coordinates and a fraction ``label_noise`` of labels replaced by random ones (so there is
    something to memorise). Deterministic in ``seed``; uses its own generator."""
    g = torch.Generator().manual_seed(seed)
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.05, 1.0, per)
        t = torch.linspace(c * 2 * math.pi / classes, c * 2 * math.pi / classes + 3.5, per)
        pts = torch.stack([r * torch.sin(t), r * torch.cos(t)], 1)
        xs.append(pts + noise * r[:, None] * torch.randn(per, 2, generator=g))
        ys.append(torch.full((per,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    flip = torch.rand(len(y), generator=g) < label_noise
    y = torch.where(flip, torch.randint(0, classes, (len(y),), generator=g), y)
    order = torch.randperm(len(y), generator=g)
    return x[order], y[order]


def demo_model(classes: int = 3, width: int = 64) -> nn.Module:
    """An MLP 2 → width → width → classes with tanh activations."""
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes))


def demo_probes() -> list:
    """Every built-in probe on schedules for a short run (their defaults are sparser, for long
    runs): the basic ones every 10 steps, the others every 25; the Hessian probe records the top
    3 eigenvalues and the density."""
    from dynlens import probes

    basic = [p.with_schedule(every=10) for p in probes.basic()]
    chosen = {"hessian": probes.Hessian(every=25, k=3, density=True, extras_every=1),
              "coherence": probes.Coherence(every=25, stiffness_every=1)}
    return basic + [chosen.get(p.name) or p.with_schedule(every=25) for p in probes.default()]


def run_demo(run_dir: str | Path = "runs/demo", steps: int = 600, batch_size: int = 64,
             lr: float = 0.3, seed: int = 0, report: bool = True, quiet: bool = False) -> Path:
    """Train the demo network with every built-in probe attached; return the run directory.

    SGD with momentum 0.9 at learning rate 0.3 on the spirals: fast enough that the run shows
    loss spikes and negative curvature, which the report's findings point out. The probe batch
    is a fixed set of 128 training points. Writes ``run_dir`` (replacing an earlier demo there)
    and, if ``report``, ``run_dir/report.html``.
    """
    import dynlens as dl

    torch.manual_seed(seed)
    x, y = make_spirals(seed=seed)
    model = demo_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed + 1)
    config = {"dataset": "spirals (3 classes, 600 points, 5% label noise)", "model": "MLP 2-64-64-3 tanh",
              "optimizer": "SGD", "lr": lr, "momentum": 0.9, "batch_size": batch_size, "steps": steps}
    bar = tqdm(total=steps, desc="training", unit="step", file=sys.stderr, disable=quiet)
    with dl.Lens(model, loss_fn, probe_batch=(x[:128], y[:128]), optimizer=optimizer,
                 run_dir=run_dir, probes=demo_probes(), name="demo: spirals MLP", config=config,
                 overwrite=True, budget=None) as lens:  # every probe on its schedule: a small, fast demo
        step = 0
        while step < steps:
            for idx in torch.randperm(len(y), generator=g).split(batch_size):
                optimizer.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                lens.step(loss=loss)
                step += 1
                bar.update(1)
                if not quiet and (step % 10 == 0 or step == steps):
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if step == steps:
                    break
        bar.close()
    path = Path(lens.run_dir)
    if report and hasattr(dl, "report"):
        out = dl.report(path, out=path / "report.html", quiet=quiet)
        if not quiet:
            print(f"report: {out}")
    return path
