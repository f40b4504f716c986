"""An experiment for issue #12: what the NTK probe's first measurement costs beyond its later
ones, on the GPU cost issue's reference jobs (``overhead_gpu.py``'s models and probe batch).

    python benchmarks/ntk_probe_first.py --job gpt2 --memory-gib 0.7 --rows 30
    python benchmarks/ntk_probe_first.py --job resnet --memory-gib 0.5

On the decoder job the probe's first measurement took 3.86 s and its next two 0.67 s each
(``overhead_gpu.py --probes ntk --budget none``), and under the Lens's 5% budget the first one,
stopped at its 1-s deadline, was not tried again in 3,000 steps. Here, one process:

1. a probe measures three times (the first in the process: the device's kernels, libraries
   and allocator meet these shapes for the first time);
2. a second probe measures twice (its first measurement in a warm process: what the probe
   itself learns the first time: the token length that fits, the layers' check);
3. a third probe's first measurement under ``cProfile`` (the ``--rows`` functions with the most
   time, callees included);
4. ``--pairs`` alternating measurements of the second probe with the structured layers kept in
   one set and split into groups that keep their factors (``_LAYER_GROUPS_ON``), medians.

Each measurement is timed with the device synchronised, through :meth:`NTK.measure` on a
:class:`Context` whose ``memory`` is the Lens's allowance (``--memory-gib``) and with no
deadline.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from overhead_gpu import build, sync  # noqa: E402

import dynlens as dl  # noqa: E402
from dynlens.measures import ntk as ntk_module  # noqa: E402
from dynlens.probes import Context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="gpt2", choices=["gpt2", "resnet"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-gib", type=float, default=0.7)
    parser.add_argument("--smoke", action="store_true", help="tiny models (CPU check)")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    model, loss_fn, _, data = build(args.job, args.device, args.smoke)
    memory = int(args.memory_gib * 2**30)

    def measure(probe: dl.probes.NTK, step: int) -> float:
        ctx = Context(model=model, loss_fn=loss_fn, probe_batch=data[0], optimizer=None, step=step, memory=memory)
        sync(args.device)
        start = time.perf_counter()
        probe.measure(ctx)
        sync(args.device)
        return time.perf_counter() - start

    first = dl.probes.NTK()
    times = {"first_probe": [round(measure(first, step), 4) for step in (0, 200, 400)]}
    second = dl.probes.NTK()
    times["second_probe"] = [round(measure(second, step), 4) for step in (0, 200)]
    print(json.dumps({"job": args.job, "memory_gib": args.memory_gib, **times, "notes": first.notes}), flush=True)
    third = dl.probes.NTK()
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = measure(third, 0)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.rows)
    print(f"third probe's first measurement under cProfile: {seconds:.4f} s\n{text.getvalue()}", flush=True)
    groups = ntk_module._LAYER_GROUPS_ON
    arms: dict[str, list[float]] = {"one_set": [], "groups": []}
    try:
        for step in range(args.pairs):
            for name in arms:
                ntk_module._LAYER_GROUPS_ON = groups if name == "groups" else ()
                arms[name].append(measure(second, 600 + 200 * step))
    finally:
        ntk_module._LAYER_GROUPS_ON = groups
    median = {name: statistics.median(t) for name, t in arms.items()}
    print(json.dumps({"alternating": {k: round(v, 4) for k, v in median.items()},
                      "groups_over_one_set": round(median["groups"] / median["one_set"], 3)}), flush=True)


if __name__ == "__main__":
    main()
