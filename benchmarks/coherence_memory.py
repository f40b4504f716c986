"""Peak memory of gradient coherence: fixed part and part per example of a chunk.

On the CPU the peak is read from PyTorch's profiler (:func:`peak_bytes`: every allocation and
free of the call, with its size, in order; the running sum's maximum is the most the call held
beyond what was allocated before it), so it needs no GPU and no process of its own. On CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.

For each model and chunk size, the peak in parameter vectors (P entries in the parameters' dtype)
and the straight line fixed + chunk × per-example fitted through the chunk sizes that split the
batch, next to the
memory model of :func:`dynlens.measures.coherence.memory_model` (its prediction must lie above
the measured peak) and the largest chunk it allows for a few memory limits, each then measured.

    python benchmarks/coherence_memory.py                     # small ResNet-18 and GPT-2 on the CPU
    python benchmarks/coherence_memory.py --device cuda --big # the two reference jobs on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

from dynlens.budget import MemoryBudgetTooSmall  # noqa: E402
from dynlens.functional import ModelFunction, isolated  # noqa: E402
from dynlens.measures import coherence  # noqa: E402

MiB = 2**20


def peak_bytes(call: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """``(call(), peak)``: the most bytes ``call`` held allocated at once beyond what was
    allocated when it started. On the CPU from the profiler's memory events (each allocation
    and free with its size and time; their running sum), on CUDA from the caching allocator's
    peak statistics."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = call()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
    # the kineto events, not prof.events(): the latter folds allocations into the ops that made them
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return out, peak


def job(name: str, big: bool, device: str) -> tuple[torch.nn.Module, Any, tuple, list[int]]:
    """(model, loss, batch, chunk sizes) of a job, its batch on ``device``."""
    torch.manual_seed(0)
    if name == "resnet":
        model = models.resnet18() if big else models.resnet18(width=16)
        x, y = models.image_batch(256 if big else 64)
        loss = torch.nn.CrossEntropyLoss()
        chunks = [16, 64, 256] if big else [1, 4, 16, 64]
    else:
        if big:
            model = models.gpt2()
            x, y = models.token_batch(8, 512, 50257)
        else:
            model = models.gpt2(vocab=2000, context=128, width=128, layers=2, heads=4)
            x, y = models.token_batch(16, 128, 2000)
        loss = models.language_model_loss
        chunks = [1, 2, 8] if big else [1, 4, 16]
    return model.to(device), loss, (x.to(device), y.to(device)), chunks


def measure(model, loss, batch, device, **options) -> tuple[int, str]:
    """Peak bytes and method of one coherence call (stiffness off, no CUDA graph)."""
    with isolated(model):
        fn = ModelFunction(model, loss, batch)
        options = {"stiffness": False, "graphs": False, **options}
        result, peak = peak_bytes(lambda: coherence.coherence_of(fn, **options), device)
    return peak, result.method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--big", action="store_true", help="the reference jobs (ResNet-18, GPT-2 124M)")
    parser.add_argument("--only", default="resnet,gpt2")
    parser.add_argument("--memory", default="", help="more limits in GiB by job, e.g. resnet=0.95,gpt2=5.47")
    parser.add_argument("--limits-only", action="store_true", help="skip the sweep over chunk sizes")
    parser.add_argument("--stiffness", action="store_true", help="the memory limits with stiffness too")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    extra = {job: float(gib) * 2**30 for job, gib in (item.split("=") for item in args.memory.split(",") if item)}
    for name in args.only.split(","):
        model, loss, batch, chunks = job(name, args.big, args.device)
        vector = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        with isolated(model):
            fn = ModelFunction(model, loss, batch)
            activation = coherence._footprint(fn)[0]
        print(f"{name}: P = {vector // 4:,} ({vector / MiB:.2f} MiB a vector), m = {fn.size}, "
              f"activations {activation / MiB:.2f} MiB an example", flush=True)
        for hooks in () if args.limits_only else (True, False):
            peaks = []
            for chunk in chunks:
                start = time.perf_counter()
                peak, method = measure(model, loss, batch, args.device, chunk_size=chunk, hooks=hooks)
                seconds = time.perf_counter() - start
                with isolated(model):
                    predicted = coherence.memory_model(ModelFunction(model, loss, batch), hooks=hooks,
                                                       stiffness=False).peak(chunk, fn.size)
                peaks.append(peak)
                rows.append({"job": name, "hooks": hooks, "chunk": chunk, "peak": peak, "vectors": peak / vector,
                             "predicted": predicted, "method": method, "seconds": seconds})
                print(f"  {method:12s} chunk {chunk:4d}: peak {peak / MiB:9.2f} MiB = {peak / vector:6.2f} vectors;"
                      f" model {predicted / MiB:9.2f} MiB ({peak / predicted:5.2f} of it)  {seconds:6.2f} s",
                      flush=True)
            # the line through the chunks that split the batch (one chunk of all has no carried class)
            split = [(chunk, peak) for chunk, peak in zip(chunks, peaks, strict=True) if chunk < fn.size]
            slope, intercept = np.polyfit(*zip(*split, strict=True), 1)
            with isolated(model):
                plan = coherence.memory_model(ModelFunction(model, loss, batch), hooks=hooks, stiffness=False)
            print(f"  fit: {intercept / vector:.2f} vectors + {slope / vector:.3f} vectors "
                  f"({slope / MiB:.2f} MiB) an example; model: {plan.fixed / vector:.2f} + "
                  f"{plan.per_example / vector:.3f} ({plan.per_example / MiB:.2f} MiB)", flush=True)
        for stiffness in (False, True) if args.stiffness else (False,):
            with isolated(model):
                plan = coherence.memory_model(ModelFunction(model, loss, batch), stiffness=stiffness)
            # limits that the chunks 1, m/8 and m/2 just fit, one that not even a chunk of 1 fits
            limits = [plan.peak(c, fn.size) for c in (1, fn.size // 8, fn.size // 2)] + [plan.peak(1, fn.size) - 1]
            for limit in limits + ([int(extra[name])] if name in extra else []):
                fits = plan.largest_chunk(limit, fn.size)
                start = time.perf_counter()
                try:
                    peak, method = measure(model, loss, batch, args.device, memory=limit, stiffness=stiffness)
                except MemoryBudgetTooSmall as err:
                    print(f"  memory {limit / MiB:9.2f} MiB: MemoryBudgetTooSmall: {err}", flush=True)
                    continue
                seconds = time.perf_counter() - start
                rows.append({"job": name, "memory": limit, "stiffness": stiffness, "fits": fits, "peak": peak,
                             "method": method, "seconds": seconds})
                print(f"  memory {limit / MiB:9.2f} MiB, stiffness={stiffness}, chunk auto (at most {fits}): "
                      f"peak {peak / MiB:9.2f} MiB ({peak / limit:.2f} of the limit"
                      f"{'; EXCEEDED' if peak > limit else ''})  {seconds:6.2f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
