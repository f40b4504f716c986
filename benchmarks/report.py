"""Time ``dl.report`` on a synthetic run with every basic probe and, optionally, a Hessian probe.

The run is written with :class:`dynlens.store.RunWriter` as the Lens would write it: train/loss
and lr at every step (to the step log); at every ``--every``-th step grad_norm, param_norm,
update_size and distance_from_init totals and ``per_layer`` arrays (6 scalars and 4 arrays,
``--layers`` layers); with ``--hessian-every N``, the Hessian probe's records at every N-th step
as its defaults write them (sharpness, threshold, ratio, residual, products and the Lens's timing
at each measurement; λ_min and the trace at every 10th). A few loss spikes and a rising sharpness
give the diagnosis and the finding markers work to do.

The report of 10,000 steps with the basic probes at every step (issue #3), on 2 CPU cores::

    taskset -c 0,1 python benchmarks/report.py [--steps 10000] [--layers 20] [--repeat 3]

A long run as the Lens's default schedules write it (issue #18), on one core::

    taskset -c 0 python benchmarks/report.py --steps 1000000 --every 50 --hessian-every 100 --repeat 3
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

BASIC_PROBES = ("grad_norm", "param_norm", "update_size", "distance_from_init")


def _write_basic(writer: RunWriter, step: int, g: float, shares: np.ndarray) -> None:
    """One measurement of each basic probe (6 scalars, 4 per-layer arrays)."""
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


def _write_hessian(writer: RunWriter, step: int, measurement: int, sharpness: float) -> None:
    """One measurement of the Hessian probe at its defaults (SGD at lr 0.1: threshold 2/lr)."""
    writer.scalar(step, "hessian", "chunk_size", 128.0)
    writer.scalar(step, "hessian", "threshold", 20.0)
    writer.scalar(step, "hessian", "sharpness", sharpness)
    writer.scalar(step, "hessian", "residual_max", 5e-3)
    writer.scalar(step, "hessian", "sharpness_ratio", sharpness / 20.0)
    writer.scalar(step, "hessian", "warm_start", float(measurement > 0))
    if measurement % 10 == 0:  # the optional parts, at every extras_every-th measurement
        writer.scalar(step, "hessian", "lambda_min", -0.05 * sharpness)
        writer.scalar(step, "hessian", "trace", 30.0 * sharpness)
        writer.scalar(step, "hessian", "trace_stderr", 0.5)
        writer.scalar(step, "hessian", "sgd_trace_ratio", 1.5 * sharpness)
    writer.scalar(step, "hessian", "hvps", 12.0 if measurement % 10 else 90.0)
    writer.scalar(step, "lens", "seconds/hessian", 0.05)


def write_run(run_dir: Path, steps: int, layers: int, every: int = 1, hessian_every: int = 0,
              seed: int = 0) -> None:
    """Write the benchmark's run to ``run_dir`` (replacing one there)."""
    rng = np.random.default_rng(seed)
    s = np.arange(steps + 1)
    loss = 2.3 * np.exp(-s / (steps / 3)) + 0.05 + 0.02 * rng.random(steps + 1)
    loss[rng.integers(100, steps, 5)] *= 6
    grad = 1.0 + 0.1 * rng.standard_normal(steps + 1)
    sharpness = 20.0 * np.minimum(1.0, 0.1 + 2 * s / steps) * (1 + 0.02 * rng.standard_normal(steps + 1))
    shares = rng.uniform(0.1, 1.0, layers)
    probes = ["train", *BASIC_PROBES] + (["hessian"] if hessian_every else [])
    writer = RunWriter(run_dir, overwrite=True)
    writer.set_meta({"name": "benchmark", "config": {"lr": 0.1, "steps": steps},
                     "model": {"class": "ResNet", "parameters": 11_000_000, "text": "ResNet(...)"},
                     "optimizer": {"class": "SGD", "defaults": {"lr": 0.1}},
                     "layers": [f"layer{i}" for i in range(layers)], "status": "finished",
                     "probes": [{"name": n} for n in probes]})
    for step in range(steps + 1):
        if step:
            writer.step_scalar(step, "train", "loss", loss[step])
            writer.step_scalar(step, "train", "lr", 0.1)
        if step % every == 0:
            _write_basic(writer, step, grad[step], shares)
        if hessian_every and step % hessian_every == 0:
            _write_hessian(writer, step, step // hessian_every, sharpness[step])
        if step % 500 == 0:
            writer.commit()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--every", type=int, default=1, help="the basic probes' schedule (the Lens's default: 50)")
    parser.add_argument("--hessian-every", type=int, default=0,
                        help="the Hessian probe's schedule; 0: no Hessian probe (the Lens's default: 100)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        write_run(run_dir, args.steps, args.layers, args.every, args.hessian_every)
        hessian = f", hessian every {args.hessian_every}" if args.hessian_every else ""
        print(f"wrote {args.steps} steps, basic probes (6 scalars + 4 arrays of {args.layers}) every "
              f"{args.every}{hessian}, in {time.perf_counter() - start:.1f} s")
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
