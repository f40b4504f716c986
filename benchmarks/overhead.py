"""Overhead of a Lens with the basic probes, as a fraction of the training step time (CPU).

Trains one model in one process in alternating blocks of steps, calling ``lens.step`` (a Lens
with the basic probes at their default schedule, every 50 steps, plus loss and learning rate
every step) in every other block, so that machine noise hits both alike, and reports
(median block time with Lens) / (median block time without) − 1. Target: at most 3%.

    python benchmarks/overhead.py [--steps 200] [--repeats 7]
    python benchmarks/overhead.py --budget-run 4000     # the time budget with every probe

``--budget-run N``: the MLP trained N steps without dynlens, then again from the same start with
``Lens(probes="default")`` at the default budget (5% of wall time), the Lens's creation (its
step-0 measurements) and ``close()`` included: the total wall time's ratio, and each probe's
measurements and share (``lens.costs()``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

import dynlens as dl


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10))


CASES = {
    "mlp 784-512-512-10, batch 128": (mlp, (128, 1, 28, 28)),
    "small cnn (2 conv + BN), 32x32, batch 64": (small_cnn, (64, 3, 32, 32)),
}


def block(model, opt, x, y, steps, lens=None) -> float:
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if lens is not None:
            lens.step(loss=loss)
    return (time.perf_counter() - start) / steps


def measure(make, shape, steps: int, repeats: int) -> dict:
    """Alternate blocks of training steps on ONE model and optimizer, with and without calling
    lens.step: two model instances differ by several percent in step time on their own
    (memory placement), more than the overhead being measured."""
    torch.manual_seed(0)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        lens = dl.Lens(model, nn.CrossEntropyLoss(), (x[:32], y[:32]), opt, run_dir=tmp)
        block(model, opt, x, y, 5)
        block(model, opt, x, y, 5, lens)
        plain, watched = [], []
        for _ in range(repeats):
            plain.append(block(model, opt, x, y, steps))
            watched.append(block(model, opt, x, y, steps, lens))
        lens.close()
    p, w = statistics.median(plain), statistics.median(watched)
    return {"step_ms": p * 1e3, "step_with_lens_ms": w * 1e3, "overhead": w / p - 1}


def budget_run(steps: int, repeats: int = 3) -> dict:
    """Total wall time of ``steps`` MLP steps with every probe at the default budget, over without
    (runs alternating, ``repeats`` pairs, medians: this VM's speed drifts by tens of percent)."""
    loss_fn = nn.CrossEntropyLoss()
    times: dict[bool, list[float]] = {False: [], True: []}
    costs = None
    for with_lens in (False, True) * repeats:
        torch.manual_seed(0)
        x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            lens = dl.Lens(model, loss_fn, (x, y), opt, run_dir=tmp, probes="default") if with_lens else None
            block(model, opt, x, y, steps, lens)
            if lens is not None:
                lens.close()
                costs = lens.costs()
            times[with_lens].append(time.perf_counter() - start)
    plain, watched = statistics.median(times[False]), statistics.median(times[True])
    return {"steps": steps, "seconds": times[False], "seconds_with_lens": times[True],
            "overhead": watched / plain - 1,
            "costs": costs[["probe", "measurements", "seconds", "share", "deferred"]].to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--budget-run", type=int, default=0, help="steps of the budget run (0: skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget_run:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "budget_run": budget_run(args.budget_run)},
                         indent=2))
        return
    results = {name: measure(make, shape, args.steps, args.repeats) for name, (make, shape) in CASES.items()}
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": results}, indent=2))
    for name, r in results.items():
        print(f"{name}: step {r['step_ms']:.2f} ms, with Lens {r['step_with_lens_ms']:.2f} ms, "
              f"overhead {100 * r['overhead']:+.2f}%")


if __name__ == "__main__":
    main()
