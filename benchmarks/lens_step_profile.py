"""Where ``lens.step()``'s host time goes on a GPU job: cProfile over the steps of a reference
job (``benchmarks/overhead_gpu.py``'s) with the default probes at the default budget.

    python benchmarks/lens_step_profile.py --job resnet --steps 1500

Prints the training step's time, the wall time of the steps with and without the Lens, and the
functions under ``lens.step()`` by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overhead_gpu import build, sync, train_step  # noqa: E402

import dynlens as dl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="resnet", choices=["resnet", "gpt2"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, loss_fn, optimizer, data = build(args.job, device, args.smoke)
    for i in range(20):
        train_step(model, loss_fn, optimizer, data[i % len(data)], device)
    sync(device)
    began = time.perf_counter()
    for i in range(args.steps):
        train_step(model, loss_fn, optimizer, data[i % len(data)], device)
    sync(device)
    plain = time.perf_counter() - began
    host = 0.0
    with tempfile.TemporaryDirectory() as run_dir:
        lens = dl.Lens(model, loss_fn, probe_batch=data[0], optimizer=optimizer, run_dir=run_dir,
                       probes="default", overwrite=True)
        profile = cProfile.Profile()
        sync(device)
        began = time.perf_counter()
        for i in range(args.steps):
            loss = train_step(model, loss_fn, optimizer, data[i % len(data)], device)
            t = time.perf_counter()
            profile.enable()
            lens.step(loss=loss)
            profile.disable()
            host += time.perf_counter() - t
        sync(device)
        probed = time.perf_counter() - began
        costs = lens.costs()
        lens.close()
    print(f"steps {args.steps}: plain {plain:.2f} s, with the Lens {probed:.2f} s (+{probed / plain - 1:.1%}); "
          f"lens.step host {host:.2f} s; probe seconds {costs.seconds.sum():.2f}")
    print(costs.to_string())
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())


if __name__ == "__main__":
    main()
