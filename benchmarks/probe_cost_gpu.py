"""One measurement of each costly probe, repeated, in training steps of the job it watches.

    python benchmarks/probe_cost_gpu.py                    # both reference jobs (GPU)
    python benchmarks/probe_cost_gpu.py --only resnet --measurements 4
    python benchmarks/probe_cost_gpu.py --smoke            # tiny models (CPU or GPU)

Where ``benchmarks/overhead_gpu.py`` runs the reference jobs end to end under the time budget,
this script looks at the measurements themselves: after a few training steps it attaches a Lens
with the Hessian and coherence probes on an exact schedule (``budget=None``, every
``--every`` steps, the automatic memory budget) and reports, for each measurement, its seconds,
its seconds in training steps, the products it took, the sub-batch size the memory budget chose
and whether the sub-batch products were replayed from CUDA graphs (and why not, where they were
not). It then takes one Hessian measurement with no memory limit at the same parameters, for
the speed of unsplit products. Writes ``probe_cost_gpu.json`` to ``$OUT`` (or the current
directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from overhead_gpu import build, sync, train_step  # noqa: E402

import dynlens as dl  # noqa: E402
import dynlens.measures.hessian as hessian_measures  # noqa: E402
from dynlens.probes.base import Context  # noqa: E402


def profile(job: str, device: str, smoke: bool, measurements: int, every: int, run_dir: str,
            memory_budget: float | None = None) -> dict[str, Any]:
    model, loss_fn, optimizer, data = build(job, device, smoke)
    for i in range(10):
        train_step(model, loss_fn, optimizer, data[i % len(data)], device)
    times = []
    for i in range(20):
        sync(device)
        began = time.perf_counter()
        train_step(model, loss_fn, optimizer, data[i % len(data)], device)
        sync(device)
        times.append(time.perf_counter() - began)
    step = statistics.median(times)
    training_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None

    records: list[Any] = []

    class Logged(hessian_measures.GraphCache):
        def record(self, key, inputs, body):  # noqa: ANN001, ANN202
            began = time.perf_counter()
            result = super().record(key, inputs, body)
            records.append({"key": repr(key), "recorded": result is not None,
                            "failed": dict(self.failed), "seconds": time.perf_counter() - began})
            return result

    hessian_measures.GraphCache = Logged  # type: ignore[misc]
    lens = dl.Lens(model, loss_fn, probe_batch=data[0], optimizer=optimizer, run_dir=run_dir, overwrite=True,
                   probes=[dl.probes.Hessian(every=every), dl.probes.Coherence(every=every)], budget=None,
                   memory_budget=memory_budget)
    for i in range(measurements * every - 1):
        loss = train_step(model, loss_fn, optimizer, data[i % len(data)], device)
        lens.step(loss=loss)
    lens.close()
    run = dl.load_run(run_dir)
    seconds = run.scalars("lens")
    out: dict[str, Any] = {"step_ms": step * 1e3, "training_peak_gib": (training_peak or 0) / 2**30,
                           "memory_extra_gib": (lens.memory.extra or 0) / 2**30, "graph_records": records}
    for probe in ("hessian", "coherence"):
        rows = seconds[seconds.name == f"seconds/{probe}"]
        out[probe] = [{"step": int(s), "seconds": float(v), "training_steps": float(v) / step}
                      for s, v in zip(rows.step, rows.value, strict=True)]
    for name in ("hvps", "chunk_size", "warm_start", "eigenvector_overlap", "sharpness",
                 "preconditioned_sharpness", "lambda_min", "trace"):
        series = run.scalars("hessian", name)
        out.setdefault("hessian_values", {})[name] = [[int(s), float(v)] for s, v in
                                                      zip(series.step, series.value, strict=True)]
    out["costs"] = lens.costs().to_dict(orient="records")
    out["events"] = run.events()[["step", "level", "probe", "message"]].to_dict(orient="records")
    run.close()
    hessian_measures.GraphCache = Logged.__mro__[1]  # type: ignore[misc]

    # the same measurement with no memory limit (the whole batch in one pass per product)
    for memory in (None,) if job == "resnet" or smoke else ():  # the unsplit decoder: 33 GiB
        ctx = Context(model=model, loss_fn=loss_fn, probe_batch=data[0], optimizer=optimizer, step=1,
                      memory=memory)
        probe = dl.probes.Hessian(lambda_min=False, trace=False, warm_start=False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            in_use = torch.cuda.memory_allocated()
        sync(device)
        began = time.perf_counter()
        with dl.functional.isolated(model):
            values = probe.measure(ctx)
        sync(device)
        took = time.perf_counter() - began
        out["unsplit"] = {"seconds": took, "training_steps": took / step, "hvps": values["hvps"],
                          "extra_peak_gib": ((torch.cuda.max_memory_allocated() - in_use) / 2**30
                                             if device == "cuda" else None)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["resnet", "gpt2"])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--measurements", type=int, default=4)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the Lens's memory_budget in GiB (default: automatic)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__}
    for job in [args.only] if args.only else ["resnet", "gpt2"]:
        with tempfile.TemporaryDirectory() as run_dir:
            results[job] = profile(job, device, args.smoke, args.measurements, args.every, run_dir,
                                   None if args.memory_gib is None else int(args.memory_gib * 2**30))
        short = {k: v for k, v in results[job].items() if k not in ("graph_records", "costs")}
        print(job, json.dumps(short, indent=1, default=str), flush=True)
        print(job, "graph records:", json.dumps(results[job]["graph_records"][:4], default=str), flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None
    path = os.path.join(os.environ.get("OUT", "."), "probe_cost_gpu.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
