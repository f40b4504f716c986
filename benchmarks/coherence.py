"""Gradient coherence: time and peak memory of dl.gradient_coherence against the plain loop.

For each model (an MLP and a small CNN from benchmarks/models.py) and a batch of m examples:

* ``batch_backward``: one ordinary forward + backward pass of the mean loss over the batch
  (eval mode, like the measurement) — the unit of cost;
* ``loop``: the plain per-example loop — for each example ``loss.backward()`` alone, then the
  same statistics (Σ g_i, Σ g_i², ‖g_i‖²) accumulated from the flattened gradients;
  ``loop_gram`` also keeps the gradients and forms their m×m Gram matrix, the loop that computes
  what ``stiffness=True`` does (its "loop ÷" is against this one);
* ``coherence[chunk=c, stiffness=s]``: ``dl.gradient_coherence`` with that chunk size ("auto",
  the default, then each of ``--chunks``), with and without the stiffness (m×m Gram) matrix (linear layers in factored form, the default), and
  once with ``hooks=False`` (every parameter's per-example gradients by vmap).

Targets (issue #5, m = 256): the loop / coherence ≥ 10 (CPU and H100); coherence / one batch
backward ≤ 4 on the H100. Times are the minimum (and the median) of ``--repeats`` runs after two warm-up calls, on the CPU the methods' calls interleaved in rounds. Peak memory:
``torch.cuda.max_memory_allocated`` above the baseline on CUDA; on the CPU the growth of the
peak resident set (VmHWM, reset through /proc/self/clear_refs) of a fresh process that runs only
that method (glibc mmap threshold fixed, so freed tensors leave the resident set).

    python benchmarks/coherence.py --device cpu --out benchmarks/coherence_cpu.json
    python benchmarks/coherence.py --device cpu --threads 1 --out benchmarks/results/coherence_cpu_1thread.json
    python benchmarks/coherence.py --device cuda --out coherence_h100.json
    python benchmarks/coherence.py --device cpu --smoke        # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import classification_batch, image_batch, lenet5, mlp, small_cnn  # noqa: E402

import dynlens as dl  # noqa: E402


def cases(smoke: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]]:
    """name -> (model factory, batch factory(m)). The models are built with a fixed seed."""
    if smoke:
        return {
            "mlp 16-32-32-4": (lambda: mlp(16, 32, 4), lambda m: classification_batch(m, 16, 4)),
            "small cnn c4, 8x8": (lambda: small_cnn(3, 4, 10), lambda m: image_batch(m, size=8)),
        }
    return {
        "mlp 784-256-256-10 (270k params)": (
            lambda: mlp(784, 256, 10), lambda m: classification_batch(m, 784, 10)),
        "small cnn c32 (2 conv + BN), 32x32 (15k params)": (
            lambda: small_cnn(3, 32, 10), lambda m: image_batch(m, size=32)),
        "lenet-5, 28x28x1 (44k params)": (
            lambda: lenet5(10), lambda m: image_batch(m, size=28, channels=1)),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_backward(model: nn.Module, loss_fn, x, y) -> None:
    """One ordinary backward pass of the mean loss (the unit of cost)."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()


def plain_loop(model: nn.Module, loss_fn, x, y, gram: bool = False) -> None:
    """The plain per-example loop: one backward pass per example, then the same sums; with
    ``gram``, also the gradients kept and their m×m Gram matrix (what stiffness needs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    s1 = torch.zeros(total, dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s1)
    norms = torch.zeros(len(y), dtype=torch.float64, device=x.device)
    kept = torch.empty(len(y), total, dtype=torch.float64, device=x.device) if gram else None
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        s1 += g
        s2 += g * g
        norms[i] = g @ g
        if kept is not None:
            kept[i] = g
    if kept is not None:
        (kept @ kept.T).diagonal().sum().item()
    (s1 @ s1 / norms.sum()).item()


def methods(chunks: list[int], cuda: bool = False) -> dict[str, Callable]:
    out: dict[str, Callable] = {"batch_backward": batch_backward, "loop": plain_loop,
                                "loop_gram": lambda model, loss_fn, x, y: plain_loop(model, loss_fn, x, y, gram=True)}
    for c in ["auto", *chunks]:
        for stiffness in (False, True):
            out[f"coherence[chunk={c}, stiffness={stiffness}]"] = (
                lambda model, loss_fn, x, y, c=c, s=stiffness: dl.gradient_coherence(
                    model, loss_fn, (x, y), chunk_size=c, stiffness=s))
    # per-example gradients from layer hooks or every parameter by vmap, whatever the default on
    # this device ("auto": hooks on the CPU, vmap on GPUs); on CUDA with and without graphs
    for hooks in (True, False):
        for stiffness in (False, True):
            out[f"coherence[chunk=auto, stiffness={stiffness}, hooks={hooks}]"] = (
                lambda model, loss_fn, x, y, s=stiffness, h=hooks: dl.gradient_coherence(
                    model, loss_fn, (x, y), stiffness=s, hooks=h))
            if cuda:
                out[f"coherence[chunk=auto, stiffness={stiffness}, hooks={hooks}, graphs=False]"] = (
                    lambda model, loss_fn, x, y, s=stiffness, h=hooks: dl.gradient_coherence(
                        model, loss_fn, (x, y), stiffness=s, hooks=h, graphs=False))
    return out


def timed_rounds(fns: dict[str, Callable], args: tuple, device: torch.device,
                 repeats: dict[str, int]) -> dict[str, tuple[float, float]]:
    """{name: (minimum, median) seconds} over ``repeats[name]`` calls of each function after two
    warm-up calls. On the CPU the calls are interleaved in rounds (one call of each method per
    round, each round in a shuffled order), so that a change in the machine's state (shared with other jobs) moves every method
    alike; on CUDA each method's calls run together (CUDA graphs are cached for the last two
    option sets, so interleaving would time their recording). The minimum is the headline number:
    on a shared machine the others' load only ever adds time."""
    times: dict[str, list[float]] = {name: [] for name in fns}

    def call(name: str) -> None:
        start = time.perf_counter()
        fns[name](*args)
        sync(device)
        times[name].append(time.perf_counter() - start)

    if device.type == "cuda":
        for name, fn in fns.items():
            for _ in range(2):
                fn(*args)
            for _ in range(repeats[name]):
                call(name)
    else:
        for fn in fns.values():
            for _ in range(2):
                fn(*args)
        for round_ in range(max(repeats.values())):
            # each round in its own (seeded) order, so that no method always follows the same one
            # (the Gram loop's half-gigabyte leaves the caches cold for whoever is next)
            names = list(fns)
            random.Random(round_).shuffle(names)
            for name in names:
                if round_ < repeats[name]:
                    call(name)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def setup(case: str, m: int, device: torch.device, smoke: bool):
    make_model, make_batch = cases(smoke)[case]
    torch.manual_seed(0)
    model = make_model().to(device).eval()
    x, y = make_batch(m)
    return model, nn.CrossEntropyLoss(), x.to(device), y.to(device)


def cuda_peak(fn: Callable, args: tuple, device: torch.device) -> float:
    """MiB allocated at the peak of ``fn`` above what was allocated before it."""
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_child(case: str, method: str, m: int, chunks: list[int], smoke: bool) -> float:
    """MiB of peak resident-set growth of ``method`` in a fresh process (see the module doc)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--_peak", case, method, str(m), ",".join(map(str, chunks)),
         "--threads", str(torch.get_num_threads())] + (["--smoke"] if smoke else []),
        env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def child_peak(case: str, method: str, m: int, chunks: list[int], smoke: bool) -> None:
    device = torch.device("cpu")
    model, loss_fn, x, y = setup(case, m, device, smoke)
    fn = methods(chunks)[method]
    small = (x[:2], y[:2])
    batch_backward(model, loss_fn, *small)  # warm-up of the allocator and autograd
    dl.gradient_coherence(model, loss_fn, small, chunk_size=2)
    model.zero_grad(set_to_none=True)
    # VmHWM (this process's peak resident set) restarts from the current one; ru_maxrss would
    # not do, a child inherits its parent's peak through fork and exec
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn(model, loss_fn, x, y)
    print((_status_kb("VmHWM") - before) / 1024)


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
        except OSError:
            pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--chunks", default="64,256",
                        help="chunk sizes to time besides 'auto', comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny models and m = 16")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--_peak", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._peak:
        case, method, m, chunks = args._peak
        child_peak(case, method, int(m), [int(c) for c in chunks.split(",")], args.smoke)
        return
    device = torch.device(args.device)
    m = 16 if args.smoke else args.m
    chunks = [4, 16] if args.smoke else [int(c) for c in args.chunks.split(",")]
    repeats = 3 if args.smoke else args.repeats
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "device": str(device), "machine": machine(device), "m": m, "cases": {}}
    for case in cases(args.smoke):
        model, loss_fn, x, y = setup(case, m, device, args.smoke)
        params = sum(p.numel() for p in model.parameters())
        rows = {}
        fns = methods(chunks, device.type == "cuda")
        found = timed_rounds(fns, (model, loss_fn, x, y), device,
                             {name: max(1, args.loop_repeats if name.startswith("loop") else repeats) for name in fns})
        for name, fn in fns.items():
            seconds, median = found[name]
            if device.type == "cuda":
                peak = cuda_peak(fn, (model, loss_fn, x, y), device)
            else:
                peak = cpu_peak_child(case, name, m, chunks, args.smoke)
            rows[name] = {"seconds": seconds, "median_seconds": median, "peak_mib": peak}
            print(f"{case:50s} {name:40s} {seconds * 1e3:10.2f} ms  peak {peak:8.1f} MiB", flush=True)
        base, loop, loop_gram = (rows[k]["seconds"] for k in ("batch_backward", "loop", "loop_gram"))
        for name, row in rows.items():
            row["x_batch_backward"] = row["seconds"] / base
            # against the loop that computes the same: with stiffness, the loop keeps the gradients
            # and forms their Gram matrix too
            row["loop_speedup"] = (loop_gram if "stiffness=True" in name else loop) / row["seconds"]
        results["cases"][case] = {"parameters": params, "methods": rows}
    print(json.dumps({c: {n: {k: round(v, 4) for k, v in r.items()} for n, r in v["methods"].items()}
                      for c, v in results["cases"].items()}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
