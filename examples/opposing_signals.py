"""Opposing signals
================

Opposing signals (Rosenfeld & Risteski 2024, "Outliers with Opposing Signals Have an Outsized
Effect on Neural Network Optimization"): two groups of examples share one large-magnitude input
feature but carry different labels; at a large step size gradient descent balances them in a
narrow valley and their losses oscillate against each other.

The script plants such a pair in a dataset it makes (200 examples in 6 dimensions, labels from
the sign of feature 1; examples 0–19 and 20–39 get feature 0 = 8 and labels 0 and 1), trains a
tanh MLP with full-batch gradient descent at learning rate 2 under an OpposingSignals probe
(every step), and asks the stored run which groups oppose each other: the reported pair is the
planted one. It prints the pair, its correlation and its p-value, and writes the report (each
group's loss over time beside the training loss, and the data map). A few seconds on a CPU.

    python examples/opposing_signals.py [--steps 200] [--lr 2] [--out runs/opposing]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import dynlens as dl


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """200 examples; a planted pair of groups of 20 that share feature 0 = 8 with opposite labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 6, generator=g) * 0.5
    y = (x[:, 1] > 0).long()
    x[:20, 0], y[:20] = 8.0, 0
    x[20:40, 0], y[20:40] = 8.0, 1
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="opposing-"))
    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    with dl.Lens(model, nn.CrossEntropyLoss(), (x, y), optimizer, run_dir=out, overwrite=True, budget=None,
                 name=f"planted pair, lr {args.lr:g}", probes=[dl.probes.OpposingSignals(every=1)]) as lens:
        for _ in range(args.steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            lens.step(loss=loss)
    pairs = dl.opposing_signals(out)
    if not pairs:
        print("no opposing groups found")
    for pair in pairs:
        print(f"group a: {sorted(pair.group_a.tolist())}")
        print(f"group b: {sorted(pair.group_b.tolist())}")
        print(f"correlation of their loss changes {pair.correlation:.2f}, p = {pair.p_value:.2g}")
    print("planted: examples 0-19 (label 0) and 20-39 (label 1), sharing feature 0")
    print(f"report: {dl.report(out, quiet=True)}")


if __name__ == "__main__":
    main()
