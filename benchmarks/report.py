"""Time ``dl.report`` on a run of 10,000 steps with every basic probe.

The run is written with :class:`dynlens.store.RunWriter` as the Lens would write it (train/loss
and lr every step; grad_norm, param_norm, update_size and distance_from_init totals and
``per_layer`` arrays every step: 10 scalars and 4 arrays per step, 20 layers), with a few loss
spikes so the diagnosis and the finding markers have work to do. Run on 2 CPU cores::

    taskset -c 0,1 python benchmarks/report.py [--steps 10000] [--layers 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

import dynlens as dl  # noqa: E402
from dynlens.store import RunWriter  # noqa: E402


def write_run(run_dir: Path, steps: int, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    s = np.arange(steps + 1)
    loss = 2.3 * np.exp(-s / (steps / 3)) + 0.05 + 0.02 * rng.random(steps + 1)
    loss[rng.integers(100, steps, 5)] *= 6
    grad = 1.0 + 0.1 * rng.standard_normal(steps + 1)
    shares = rng.uniform(0.1, 1.0, layers)
    writer = RunWriter(run_dir, overwrite=True)
    writer.set_meta({"name": "benchmark", "config": {"lr": 0.1, "steps": steps},
                     "model": {"class": "ResNet", "parameters": 11_000_000, "text": "ResNet(...)"},
                     "layers": [f"layer{i}" for i in range(layers)], "status": "finished",
                     "probes": [{"name": n} for n in ("train", "grad_norm", "param_norm",
                                                        "update_size", "distance_from_init")]})
    for step in range(steps + 1):
        if step:
            writer.step_scalar(step, "train", "loss", loss[step])
            writer.step_scalar(step, "train", "lr", 0.1)
        g = grad[step]
        writer.scalar(step, "grad_norm", "total", g)
        writer.array(step, "grad_norm", "per_layer", g * shares)
        writer.scalar(step, "param_norm", "total", 50 + 1e-3 * step)
        writer.array(step, "param_norm", "per_layer", (50 + 1e-3 * step) * shares)
        writer.scalar(step, "update_size", "total", 0.1 * g)
        writer.scalar(step, "update_size", "relative", 0.1 * g / 50)
        writer.array(step, "update_size", "per_layer", 0.1 * g * shares)
        writer.scalar(step, "distance_from_init", "absolute", 1e-3 * step)
        writer.scalar(step, "distance_from_init", "relative", 2e-5 * step)
        writer.array(step, "distance_from_init", "per_layer", 2e-5 * step * shares)
        if step % 500 == 0:
            writer.commit()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        write_run(run_dir, args.steps, args.layers)
        print(f"wrote {args.steps} steps x (10 scalars + 4 arrays of {args.layers}) in "
              f"{time.perf_counter() - start:.1f} s")
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            path = dl.report(run_dir, quiet=True)
            times.append(time.perf_counter() - start)
        size = Path(path).stat().st_size
        print(f"dl.report: median {statistics.median(times):.2f} s, min {min(times):.2f} s, "
              f"max {max(times):.2f} s over {args.repeat} runs; report {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
