"""What dynlens costs a GPU training job with every built-in probe on at the default budget.

    python benchmarks/overhead_gpu.py                      # both reference jobs, one H100/H200
    python benchmarks/overhead_gpu.py --only resnet        # one of them
    python benchmarks/overhead_gpu.py --only resnet --bracket   # plain, with dynlens, plain again
    python benchmarks/overhead_gpu.py --smoke              # tiny models and steps (CPU or GPU)

The two reference jobs (``benchmarks/models.py``), bf16 autocast, the probe batch = one
training batch:

- ResNet-18, 32×32 images, batch 256, SGD with momentum 0.9, 10,000 steps;
- a GPT-2-sized decoder (124M), 8 sequences of 512 tokens, AdamW, 5,000 steps.

For each, in one process: the training loop alone, then the same loop (same model state
re-initialised from the same seed) with ``Lens(probes="default")`` at the default time and
memory budgets, each timed end to end with the device synchronised (the Lens's creation, with
its step-0 measurements, and ``close()`` included), and the peak device memory of each
(``torch.cuda.reset_peak_memory_stats`` between them: this script is the user). Then:

- the overhead: wall time with the Lens / without − 1 (target ≤ 5%);
- each probe's measurements, seconds, deferrals, products and peak extra memory (``lens.costs()``);
- the cost model: one measurement of each probe in training steps (its mean seconds over the
  step time of the plain run), and the first one (step 0) on its own;
- the last tracked λ_max against an exact float32 measurement (Lanczos to ``tol=1e-6``) at the
  same parameters (a copy taken right after that measurement; the copy's time is left out);
- ``lens.step()`` with the basic probes only: the host time of the call (median and mean over
  the run, the basic measurements included) as a share of a training step (target ≤ 1%);
- peak memory with the Lens over peak without (target ≤ 1.5).

Writes ``overhead_gpu.json`` to ``$OUT`` (or the current directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402

JOBS = {
    "resnet": {"steps": 10_000, "batches": 8},
    "gpt2": {"steps": 5_000, "batches": 8},
}


def build(job: str, device: str, smoke: bool, seed: int = 0):
    torch.manual_seed(seed)
    if job == "resnet":
        model = models.resnet18(width=8 if smoke else 64).to(device)
        data = [models.image_batch(32 if smoke else 256, seed=i) for i in range(JOBS[job]["batches"])]
        loss_fn: Any = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        if smoke:
            model = models.gpt2(vocab=500, context=64, width=64, layers=2, heads=2).to(device)
            data = [models.token_batch(4, 32, 500, seed=i) for i in range(JOBS[job]["batches"])]
        else:
            model = models.gpt2().to(device)
            data = [models.token_batch(8, 512, 50257, seed=i) for i in range(JOBS[job]["batches"])]
        loss_fn = models.language_model_loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    data = [(x.to(device), y.to(device)) for x, y in data]
    return model, loss_fn, optimizer, data


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, loss_fn, optimizer, batch, device: str):
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def run(job: str, device: str, steps: int, smoke: bool, with_lens: bool, run_dir: str,
        budget: float | None = 0.05, probes: str = "default", precision_check: bool = True,
        window: int = 0) -> dict[str, Any]:
    model, loss_fn, optimizer, data = build(job, device, smoke)
    for i in range(3):  # warm-up (cuDNN, allocator) on a throwaway copy of the state
        train_step(model, loss_fn, optimizer, data[i], device)
    model, loss_fn, optimizer, data = build(job, device, smoke)  # the same start for both runs
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {}
    excluded = 0.0
    snapshot: dict[str, Any] | None = None
    hessian_seen = 0
    step_times: list[float] = []
    start = time.perf_counter()
    lens = None
    if with_lens:
        lens = dl.Lens(model, loss_fn, probe_batch=data[0], optimizer=optimizer, run_dir=run_dir,
                       probes=_probes(probes), overwrite=True, budget=budget)

    def keep_if_measured() -> None:
        """A copy of the state right after a new Hessian measurement (its time left out)."""
        nonlocal hessian_seen, snapshot, excluded
        cost = lens.budget.costs.get("hessian")
        if cost is not None and cost.measurements > hessian_seen:
            hessian_seen = cost.measurements
            began = time.perf_counter()
            snapshot = {"step": lens.step_count,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            excluded += time.perf_counter() - began

    if lens is not None:
        keep_if_measured()
    windows, mark = [], time.perf_counter()
    for step in range(steps):
        loss = train_step(model, loss_fn, optimizer, data[step % len(data)], device)
        if lens is not None:
            before = time.perf_counter()
            lens.step(loss=loss)
            step_times.append(time.perf_counter() - before)
            keep_if_measured()
        if window and (step + 1) % window == 0:  # where in the run the time went
            sync(device)
            windows.append(time.perf_counter() - mark)
            mark = time.perf_counter()
    result["window_seconds"] = windows
    if lens is not None:
        lens.close()
    sync(device)
    result["seconds"] = time.perf_counter() - start - excluded
    result["excluded_snapshot_seconds"] = excluded
    if lens is not None:
        keep_if_measured()  # a measurement at close()
    result["peak_memory"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    if lens is not None:
        costs = lens.costs()
        result["costs"] = costs.to_dict(orient="records")
        result["lens_step_host_seconds"] = {
            "median": statistics.median(step_times), "mean": statistics.fmean(step_times)}
        saved = dl.load_run(run_dir)
        result["events"] = saved.events()[["step", "level", "probe", "message"]].to_dict(orient="records")
        result["measured_steps"] = {
            probe: sorted({int(s) for s in saved.scalars(probe)["step"]})
            for probe in saved.probes() if probe not in ("train", "lens")}
        result["meta_costs"] = saved.meta.get("costs")
        result["notes"] = saved.meta.get("notes")
        if "ntk" in saved.probes():
            ntk = saved.scalars("ntk")
            result["ntk"] = {name: [[int(r.step), float(r.value)] for r in ntk[ntk["name"] == name].itertuples()]
                             for name in ("tokens", "distance_from_init", "alignment", "trace")}
        sharp = saved.scalars("hessian", "sharpness")
        if len(sharp) and snapshot is not None:
            last = sharp.iloc[-1]
            chunk = saved.scalars("hessian", "chunk_size")
            result["last_tracked"] = {"step": int(last.step), "sharpness": float(last.value),
                                      "snapshot_step": snapshot["step"],
                                      "chunk_size": float(chunk.iloc[-1].value) if len(chunk) else None}
            model.load_state_dict(snapshot["state"])
            del snapshot
            chunk_size = int(result["last_tracked"]["chunk_size"] or 0) or None
            exact = dl.hessian_eigenvalues(model, loss_fn, data[0], k=1, tol=1e-6, hvp="reuse",
                                           chunk_size=chunk_size if chunk_size and chunk_size < _size(data[0]) else None)
            result["last_tracked"]["exact"] = exact.max
            result["last_tracked"]["relative_error"] = abs(float(last.value) - exact.max) / abs(exact.max)
            # the same measurement with TF32 products (Hessian(precision="tf32")): its error
            from dynlens.probes.base import Context

            for precision in ("float32", "tf32") if precision_check else ():
                ctx = Context(model=model, loss_fn=loss_fn, probe_batch=data[0], optimizer=None, step=0,
                              memory=lens.memory.allowance())
                probe = dl.probes.Hessian(precision=precision, tol=1e-6, lambda_min=False, trace=False,
                                          warm_start=False)
                sync(device)
                began = time.perf_counter()
                with dl.functional.isolated(model):
                    measured = probe.measure(ctx)
                sync(device)
                result["last_tracked"][precision] = {
                    "sharpness": measured["sharpness"], "seconds": time.perf_counter() - began,
                    "hvps": measured["hvps"],
                    "relative_error": abs(measured["sharpness"] - exact.max) / abs(exact.max)}
        timed = saved.scalars("lens")
        result["measurements"] = {
            name.removeprefix("seconds/"): [[int(st), float(v)] for st, v in zip(group.step, group.value, strict=True)]
            for name, group in timed.groupby("name")}
        hvps = saved.scalars("hessian", "hvps")
        result["hessian_hvps"] = [[int(st), float(v)] for st, v in zip(hvps.step, hvps.value, strict=True)]
        first = timed.query("step == 0")
        result["first_measurements"] = {name.removeprefix("seconds/"): float(value)
                                        for name, value in zip(first.name, first.value, strict=True)}
        saved.close()
    return result


def _probes(names: str) -> Any:
    """``"default"``, or the default probes of the given comma-separated names."""
    if names == "default":
        return "default"
    wanted = names.split(",")
    return [p for p in dl.probes.default() if p.name in wanted]


def _size(batch) -> int:
    return int(batch[0].shape[0])


def lens_step_overhead(job: str, device: str, smoke: bool, steps: int, rounds: int, run_dir: str) -> dict[str, Any]:
    """Blocks of ``steps`` training steps alternately without and with ``lens.step(loss=loss)``
    (basic probes only, at their default schedule), on one model: (median block with) / (median
    block without) − 1, and the host time of the call itself."""
    model, loss_fn, optimizer, data = build(job, device, smoke)
    lens = dl.Lens(model, loss_fn, probe_batch=data[0], optimizer=optimizer, run_dir=run_dir, overwrite=True)
    plain, watched, calls = [], [], []
    for r in range(rounds + 1):
        for with_lens in (False, True):
            sync(device)
            start = time.perf_counter()
            for step in range(steps):
                loss = train_step(model, loss_fn, optimizer, data[step % len(data)], device)
                if with_lens:
                    before = time.perf_counter()
                    lens.step(loss=loss)
                    calls.append(time.perf_counter() - before)
            sync(device)
            if r > 0:  # the first round warms up
                (watched if with_lens else plain).append((time.perf_counter() - start) / steps)
    lens.close()
    step = statistics.median(plain)
    return {"step_ms": step * 1e3, "with_lens_ms": statistics.median(watched) * 1e3,
            "overhead": statistics.median(watched) / step - 1,
            "call_median_share": statistics.median(calls) / step,
            "call_mean_share": statistics.fmean(calls) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="resnet,gpt2")
    parser.add_argument("--smoke", action="store_true", help="tiny models and 60 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="override the job's steps")
    parser.add_argument("--budget", default="0.05", help="the Lens's time budget ('none': exact schedules)")
    parser.add_argument("--probes", default="default", help="'default', or names of default probes")
    parser.add_argument("--no-precision-check", action="store_true",
                        help="skip measuring λ_max again with float32 and TF32 products at the end")
    parser.add_argument("--basic-steps", type=int, default=200, help="steps of a lens.step() overhead block")
    parser.add_argument("--basic-rounds", type=int, default=5, help="rounds of lens.step() overhead blocks")
    parser.add_argument("--bracket", action="store_true",
                        help="time the run without dynlens again after the watched one; the overhead is then "
                             "against the mean of the two (the machine's own drift shows as their difference)")
    parser.add_argument("--window", type=int, default=0,
                        help="also time each block of this many steps (one synchronisation a block)")
    parser.add_argument("--skip-basic", action="store_true", help="skip the lens.step() overhead blocks")
    parser.add_argument("--trace-imports", action="store_true",
                        help="print the stack that first imports torch._dynamo (seconds on first use)")
    args = parser.parse_args()
    budget = None if args.budget == "none" else float(args.budget)
    if args.trace_imports:
        import importlib.abc
        import traceback

        class _Trace(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
                if name == "torch._dynamo":
                    traceback.print_stack(limit=20)
                return None

        sys.meta_path.insert(0, _Trace())
    out_dir = os.environ.get("OUT", ".")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(), "argv": sys.argv, "jobs": {}}
    torch.backends.cudnn.benchmark = False
    for job in args.only.split(","):
        steps = args.steps or (60 if args.smoke else JOBS[job]["steps"])
        with tempfile.TemporaryDirectory() as tmp:
            plain = run(job, args.device, steps, args.smoke, False, os.path.join(tmp, "plain"), window=args.window)
            watched = run(job, args.device, steps, args.smoke, True, os.path.join(tmp, "lens"), budget,
                          args.probes, not args.no_precision_check, args.window)
            again = run(job, args.device, steps, args.smoke, False, os.path.join(tmp, "plain_again"),
                        window=args.window) if args.bracket else None
            basic = None if args.skip_basic else lens_step_overhead(
                job, args.device, args.smoke, 20 if args.smoke else args.basic_steps,
                2 if args.smoke else args.basic_rounds, os.path.join(tmp, "basic"))
        plain_seconds = plain["seconds"] if again is None else (plain["seconds"] + again["seconds"]) / 2
        step_seconds = plain_seconds / steps
        summary = {
            "steps": steps, "step_ms": step_seconds * 1e3,
            "overhead": watched["seconds"] / plain_seconds - 1,
            "plain_seconds": [r["seconds"] for r in (plain, again) if r is not None],
            "watched_seconds": watched["seconds"],
            "peak_memory_ratio": (watched["peak_memory"] / plain["peak_memory"]
                                  if plain["peak_memory"] else None),
            "peak_memory_gib": [None if r["peak_memory"] is None else r["peak_memory"] / 2**30
                                for r in (plain, watched)],
            "cost_model_training_steps": {
                c["probe"]: (c["seconds"] / c["measurements"]) / step_seconds
                for c in watched["costs"] if c["measurements"]},
            "first_measurement_training_steps": {
                p: s / step_seconds for p, s in watched["first_measurements"].items()},
            "lens_step_basic": basic,
        }
        report["jobs"][job] = {"summary": summary, "plain": plain, "lens": watched, "plain_again": again}
        print(job, json.dumps(summary, indent=1), flush=True)
        print(job, "costs", json.dumps(watched["costs"], indent=1), flush=True)
        print(job, "last_tracked", json.dumps(watched.get("last_tracked")), flush=True)
        print(job, "measured_steps", json.dumps(watched["measured_steps"]), flush=True)
        print(job, "events", json.dumps(watched["events"][:10]), flush=True)
        with open(os.path.join(out_dir, f"overhead_gpu_{job}.json"), "w") as f:
            json.dump(report["jobs"][job] | {"device": report["device"], "torch": report["torch"],
                                             "date": report["date"], "argv": sys.argv}, f, indent=1, default=str)
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
