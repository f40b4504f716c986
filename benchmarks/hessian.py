"""Benchmark of the Hessian measurements (issue #4) against PyHessian and the targets.

    python benchmarks/hessian.py --device cuda --out hessian_h100.json   # the H100 benchmark
    python benchmarks/hessian.py --device cpu --out hessian_cpu.json     # a smaller CPU version
    python benchmarks/hessian.py --smoke                                  # tiny sizes, CPU, seconds

What it measures, for a ResNet-18 (32×32, eval mode; CUDA: width 64, batch 256) and a GPT-2-sized
decoder (CUDA: 124M parameters, 8 sequences of 512 tokens):

- the time of one gradient, and of one Hessian-vector product (HVP) in gradients: by
  forward-over-reverse, by double backward from scratch, and by reusing the first-order graph
  (dynlens's default in Lanczos), plus the cost of building that graph;
- a converged reference (Lanczos, tight tolerance) of the top-5 eigenvalues;
- dynlens top-1 and top-5 (default tolerance 1e-4), a plain 40-step Lanczos, and PyHessian's
  power iteration (top-1, top-5; its defaults maxIter=100, tol=1e-3): wall time, HVPs, relative
  error against the reference; the amortised cost of an HVP in gradients;
- the trace (Hutch++ against PyHessian's Hutchinson) and PyHessian's density() error text;
- peak GPU memory of a Lanczos run against that of one gradient (CUDA only);
- GPT-2: a gradient, an HVP, 20 Lanczos steps, and λ_max to relative residual 1e-3.

TF32 is switched off (``torch.backends.cuda.matmul.allow_tf32`` and ``cudnn.allow_tf32``): with
TF32 convolutions the HVPs carry ~1e-3 relative noise and no eigensolver converges below it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402
from dynlens.functional import ModelFunction, isolated  # noqa: E402
from dynlens.linalg import lanczos_eigsh  # noqa: E402
from dynlens.measures.hessian import curvature_operator  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "cuda": {
        "resnet": {"width": 64, "batch": 256, "reference_iters": 150, "train_steps": [0, 20], "eig_reps": 3},
        "gpt2": {"vocab": 50257, "context": 1024, "width": 768, "layers": 12, "heads": 12, "batch": 8, "length": 512},
        "reps": 5,
    },
    "cpu": {
        "resnet": {"width": 8, "batch": 32, "reference_iters": 150, "train_steps": [0, 10], "eig_reps": 2},
        "gpt2": {"vocab": 2000, "context": 128, "width": 128, "layers": 2, "heads": 4, "batch": 4, "length": 64},
        "reps": 7,
    },
    "smoke": {
        "resnet": {"width": 4, "batch": 8, "reference_iters": 40, "train_steps": [0, 2], "eig_reps": 1},
        "gpt2": {"vocab": 100, "context": 32, "width": 32, "layers": 1, "heads": 2, "batch": 2, "length": 16},
        "reps": 3,
    },
}


def torch_settings(threads: int | None, tf32: bool = False) -> None:
    """CPU threads (None: torch's default) and TF32 for matmuls and cuDNN convolutions (off by
    default: with TF32 each HVP carries ~1e-3 relative noise and Lanczos cannot converge)."""
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def best_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """The fastest of ``reps`` runs after a warm-up (robust to other load on a shared machine)."""
    timed(fn, device)
    return min(timed(fn, device)[1] for _ in range(reps))


def best_of(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[Any, float]:
    """The result and time of the fastest of ``reps`` runs (no warm-up: each run is complete)."""
    runs = [timed(fn, device) for _ in range(max(reps, 1))]
    return min(runs, key=lambda r: r[1])


class PeakMemory:
    """Peak CUDA memory above what was allocated at entry (bytes); None on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def relative_errors(values: torch.Tensor, reference: torch.Tensor) -> list[float]:
    n = min(len(values), len(reference))
    return [float(abs(values[i] - reference[i]) / abs(reference[i])) for i in range(n)]


def hvp_costs(model: nn.Module, loss_fn: Callable, batch: Any, device: torch.device, reps: int) -> dict[str, Any]:
    """Seconds of a gradient and of one HVP by each method, and the HVP costs in gradients.

    A method that fails (e.g. out of memory) is recorded with its error instead of stopping the run.
    """
    out: dict[str, Any] = {}
    with isolated(model, "eval"):
        fn = ModelFunction(model, loss_fn, batch)
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(fn.num_params, generator=gen).to(device=device, dtype=fn.vector().dtype)
        out["gradient_s"] = grad_s = best_time(lambda: fn.grad(), device, reps)

        def reuse_build() -> Any:
            return fn.curvature_products("hessian", "reuse")[0]

        methods = {
            "hvp_forward_over_reverse": lambda: fn.hvp(fn.as_params(v)),
            "hvp_double_backward_scratch": lambda: fn.hvp_operator("reuse")(v),
            "reuse_graph_build": reuse_build,
        }
        for name, method in methods.items():
            try:
                out[f"{name}_s"] = seconds = best_time(method, device, reps)
                out[f"{name}_in_gradients"] = seconds / grad_s
            except Exception as err:  # noqa: BLE001 - record and go on
                out[f"{name}_error"] = f"{type(err).__name__}: {err}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        matvec = reuse_build()
        out["hvp_reuse_s"] = seconds = best_time(lambda: matvec(v), device, reps)
        out["hvp_reuse_in_gradients"] = seconds / grad_s
    return out


def gradient_peak(model: nn.Module, loss_fn: Callable, batch: Any, device: torch.device) -> int | None:
    with isolated(model, "eval"), PeakMemory(device) as mem:
        ModelFunction(model, loss_fn, batch).grad()
    return mem.peak


def ours(model: nn.Module, loss_fn: Callable, batch: Any, device: torch.device, reps: int = 1,
         **kw: Any) -> dict[str, Any]:
    with PeakMemory(device) as mem:
        result, seconds = best_of(lambda: dl.hessian_eigenvalues(model, loss_fn, batch, **kw), device, reps)
    return {"values": result.values.tolist(), "relative_residuals": result.relative_residuals.tolist(),
            "hvps": result.matvecs, "seconds": seconds, "converged": result.converged,
            "peak_memory_bytes": mem.peak, "settings": {k: v for k, v in kw.items()}}


def plain_lanczos(model: nn.Module, loss_fn: Callable, batch: Any, device: torch.device, k: int,
                  steps: int, reps: int = 1) -> dict[str, Any]:
    def run() -> Any:
        with isolated(model, "eval"):
            fn = ModelFunction(model, loss_fn, batch)
            op, _ = curvature_operator(fn)
            return lanczos_eigsh(op, k=k, tol=0.0, max_iters=steps,
                                 generator=torch.Generator().manual_seed(0))

    result, seconds = best_of(run, device, reps)
    return {"values": result.values.tolist(), "hvps": result.matvecs, "seconds": seconds,
            "relative_residuals": (result.residuals / result.values.abs()).tolist(),
            "alpha": result.tridiagonal.alpha.tolist(), "beta": result.tridiagonal.beta.tolist()}


def stopping_table(reference: dict[str, Any], k: int, tols: list[float]) -> dict[str, Any]:
    """Where the residual test stops a run from a Gaussian start, from the reference run's
    tridiagonal matrix.

    The reference run starts from the Gaussian vector of a generator seeded with 0 (what
    ``hessian_eigenvalues(start="random")`` uses), so the first m steps of such a run are the
    reference's first m; dynlens's default for the top eigenvalues starts from the gradient
    instead (``benchmarks/lanczos_start.py`` compares the two). For each step m: the top-k
    Ritz values of the leading m×m block, their residual estimates |β_m s_{m,i}| and the bound
    on their eigenvalue errors min(r_i, r_i²/gap_i) (gap_i: distance to the nearest other Ritz
    value; Parlett, *The Symmetric Eigenvalue Problem*, §11.7), and the residual of the refined
    Ritz vector of each Ritz value (Jia 1997: the unit vector of the Krylov space minimising
    ‖(A − θ_i)u‖, the smallest singular value of the (m+1)×m matrix T̄_m − θ_i Ī; never larger
    than the Ritz vector's). For each tol: the first step at which every wanted pair has
    r_i ≤ tol·|θ_i| (after the same safeguard of w + max(w, 3) steps), and the largest relative
    error against the reference values there; ``by_tol_refined`` the same with the refined
    residuals (not what dynlens stops on: the docs, What dynlens measures § Hessian, name Ritz pairs)."""
    from scipy.linalg import eigh_tridiagonal

    alpha, beta = np.array(reference["alpha"]), np.array(reference["beta"])
    final = np.array(reference["values"][:k])
    min_steps = k + max(k, 3)
    steps = []
    for m in range(min_steps, len(alpha) + 1):
        theta, vectors = eigh_tridiagonal(alpha[:m], beta[:m - 1])
        top = np.arange(m - 1, m - 1 - k, -1)
        b = beta[m - 1] if m - 1 < len(beta) else 0.0
        residual = np.abs(b * vectors[m - 1, top])
        gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) for i in top])
        bound = np.minimum(residual, residual ** 2 / gaps)
        extended = np.zeros((m + 1, m))
        extended[:m] = np.diag(alpha[:m]) + np.diag(beta[:m - 1], 1) + np.diag(beta[:m - 1], -1)
        extended[m, m - 1] = b
        shift = np.eye(m + 1, m)
        refined = np.array([np.linalg.svd(extended - theta[i] * shift, compute_uv=False)[-1] for i in top])
        steps.append({"step": m, "relative_residual": (residual / np.abs(theta[top])).max(),
                      "relative_residual_refined": (refined / np.abs(theta[top])).max(),
                      "relative_error": (np.abs(theta[top] - final) / np.abs(final)).max(),
                      "relative_error_bound": (bound / np.abs(theta[top])).max()})
    table, refined_table = {}, {}
    for tol in tols:
        table[f"{tol:g}"] = next((row for row in steps if row["relative_residual"] <= tol), None)
        refined_table[f"{tol:g}"] = next((row for row in steps if row["relative_residual_refined"] <= tol), None)
    return {"by_tol": table, "by_tol_refined": refined_table, "by_step": steps}


def replay(path: str) -> None:
    """Print the stopping tables of a saved ``--out`` file's reference runs (no device needed)."""
    results = json.loads(Path(path).read_text())
    for key, found in results.items():
        if not (key.startswith("resnet18") and isinstance(found, dict) and "reference" in found):
            continue
        for k in (1, 5):
            table = stopping_table(found["reference"], k, [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4])
            for name in ("by_tol", "by_tol_refined"):
                cells = ", ".join(f"{tol}: step {row['step']} err {row['relative_error']:.1e}"
                                  for tol, row in table[name].items() if row)
                print(f"{key} top-{k} {name}: {cells}")


def pyhessian_runs(model: nn.Module, loss_fn: Callable, batch: Any, device: torch.device,
                   reps: int = 1, seed: int = 0, spectra_only: bool = False) -> dict[str, Any]:
    """PyHessian top-1, top-5 (power iteration with deflation), trace, and its density() error.

    PyHessian draws its start vectors from torch's global generator, seeded with ``seed`` before
    each call; ``spectra_only`` skips the trace and density()."""
    try:
        import pyhessian
    except ImportError as err:
        return {"available": False, "error": str(err)}
    ph = sys.modules["pyhessian.hessian"]  # the package's name ``hessian`` is the class
    counter = {"hvps": 0}
    original = ph.hessian_vector_product

    def counting(*args: Any, **kwargs: Any) -> Any:
        counter["hvps"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counting
    out: dict[str, Any] = {"available": True, "version": getattr(pyhessian, "__version__", "0.1")}
    cuda = device.type == "cuda"
    try:
        for top_n in (1, 5):
            def run(top_n: int = top_n) -> Any:
                probe = copy.deepcopy(model)  # PyHessian calls backward() on the model it gets
                torch.manual_seed(seed)
                counter["hvps"] = 0
                sync(device)
                start = time.perf_counter()
                computer = pyhessian.hessian(probe, loss_fn, data=batch, cuda=cuda)
                values = computer.eigenvalues(top_n=top_n)[0]
                sync(device)
                return values, time.perf_counter() - start

            values, seconds = min((run() for _ in range(max(reps, 1))), key=lambda r: r[1])
            out[f"top{top_n}"] = {"values": sorted(values, reverse=True), "hvps": counter["hvps"], "seconds": seconds,
                                  "settings": {"maxIter": 100, "tol": 1e-3, "seed": seed}}
        if spectra_only:
            return out
        probe = copy.deepcopy(model)
        torch.manual_seed(seed)
        counter["hvps"] = 0

        def trace(probe: nn.Module = probe) -> Any:
            return pyhessian.hessian(probe, loss_fn, data=batch, cuda=cuda).trace()

        samples, seconds = timed(trace, device)
        out["trace"] = {"value": float(sum(samples) / len(samples)), "hvps": counter["hvps"], "seconds": seconds,
                        "stderr": float(statistics.stdev(samples) / len(samples) ** 0.5) if len(samples) > 1 else None}
        try:
            probe = copy.deepcopy(model)
            pyhessian.hessian(probe, loss_fn, data=batch, cuda=cuda).density(iter=3, n_v=1)
            out["density_error"] = None
        except Exception as err:  # noqa: BLE001 - the point is to record what it raises
            out["density_error"] = f"{type(err).__name__}: {err}"
    finally:
        ph.hessian_vector_product = original
    return out


def resnet_case(device: torch.device, width: int, batch_size: int,
                train_steps: int, model_seed: int = 0) -> tuple[nn.Module, Callable, tuple]:
    """ResNet-18 of ``width`` on a fixed batch, after ``train_steps`` SGD steps on that batch, in
    eval mode: (model, loss_fn, batch). At random initialisation (train_steps=0, the issue's
    setting) the spectrum has large negative eigenvalues; after a few training steps on the batch
    it has the positive outliers of a network in training, with wide gaps at the top (the easy case
    for power iteration). ``model_seed`` seeds the initialisation; the batch is always seed 0's."""
    torch.manual_seed(model_seed)
    model = models.resnet18(width=width).to(device)
    x, y = models.image_batch(batch_size, seed=0)
    batch = (x.to(device), y.to(device))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(train_steps):
        optimizer.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval(), loss_fn, batch


def bench_resnet(device: torch.device, config: dict[str, Any], reps: int, with_pyhessian: bool,
                 train_steps: int) -> dict[str, Any]:
    model, loss_fn, batch = resnet_case(device, config["width"], config["batch"], train_steps)
    reps = config["eig_reps"]
    out: dict[str, Any] = {"model": f"ResNet-18 width {config['width']}", "batch": config["batch"],
                           "train_steps_before": train_steps,
                           "parameters": sum(p.numel() for p in model.parameters()), "mode": "eval"}
    out["costs"] = hvp_costs(model, loss_fn, batch, device, reps)
    out["gradient_peak_memory_bytes"] = gradient_peak(model, loss_fn, batch, device)
    reference = plain_lanczos(model, loss_fn, batch, device, k=5, steps=config["reference_iters"])
    out["reference"] = reference
    with isolated(model, "eval"):  # the reference's operator already made (and timed) the choice
        out["hvp_auto_choice"] = ModelFunction(model, loss_fn, batch).fastest_hvp_method()
    ref = torch.tensor(reference["values"], dtype=torch.float64)
    for name, kw in {"top1": {"k": 1}, "top5": {"k": 5}}.items():
        result = ours(model, loss_fn, batch, device, reps=reps, **kw)
        result["relative_errors"] = relative_errors(torch.tensor(result["values"]), ref)
        result["amortised_hvp_in_gradients"] = result["seconds"] / result["hvps"] / out["costs"]["gradient_s"]
        out[name] = result
    out["stopping_top5"] = stopping_table(reference, 5, [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4])
    out["stopping_top1"] = stopping_table(reference, 1, [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4])
    for k, tol in ((1, 1e-2), (5, 1e-2), (5, 1e-3)):
        result = ours(model, loss_fn, batch, device, reps=reps, k=k, tol=tol)
        result["relative_errors"] = relative_errors(torch.tensor(result["values"]), ref)
        out[f"top{k}_tol{tol:g}"] = result
    plain = plain_lanczos(model, loss_fn, batch, device, k=5, steps=40, reps=reps)
    plain["relative_errors"] = relative_errors(torch.tensor(plain["values"]), ref)
    out["plain_lanczos_40"] = plain
    trace, seconds = timed(lambda: dl.hessian_trace(model, loss_fn, batch, samples=64), device)
    out["trace"] = {"value": trace.value, "stderr": trace.stderr, "hvps": trace.matvecs, "seconds": seconds}
    trace_loop, seconds = timed(lambda: dl.hessian_trace(model, loss_fn, batch, samples=64, max_columns=1), device)
    out["trace_unbatched"] = {"value": trace_loop.value, "hvps": trace_loop.matvecs, "seconds": seconds}
    if with_pyhessian:
        py = pyhessian_runs(model, loss_fn, batch, device, reps)
        for name in ("top1", "top5"):
            if name in py:
                py[name]["relative_errors"] = relative_errors(torch.tensor(py[name]["values"]), ref)
        out["pyhessian"] = py
        if "top5" in py:
            out["comparison"] = {
                "top1_time_ratio": out["top1"]["seconds"] / py["top1"]["seconds"],
                "top1_hvp_ratio": out["top1"]["hvps"] / py["top1"]["hvps"],
                "top1_error_ratio": max(py["top1"]["relative_errors"]) / max(max(out["top1"]["relative_errors"]), 1e-300),
                "top5_time_ratio": out["top5"]["seconds"] / py["top5"]["seconds"],
                "top5_hvp_ratio": out["top5"]["hvps"] / py["top5"]["hvps"],
                "top5_error_ratio": max(py["top5"]["relative_errors"]) / max(max(out["top5"]["relative_errors"]), 1e-300),
            }
            for k in (1, 5):  # the same comparison at tol=1e-2
                mine, theirs = out[f"top{k}_tol0.01"], py[f"top{k}"]
                out["comparison"].update({
                    f"top{k}_tol0.01_time_ratio": mine["seconds"] / theirs["seconds"],
                    f"top{k}_tol0.01_hvp_ratio": mine["hvps"] / theirs["hvps"],
                    f"top{k}_tol0.01_error_ratio": max(theirs["relative_errors"]) / max(max(mine["relative_errors"]), 1e-300),
                })
    return out


def bench_gpt2(device: torch.device, config: dict[str, Any], reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = models.gpt2(config["vocab"], config["context"], config["width"], config["layers"], config["heads"])
    model = model.to(device).eval()
    tokens, targets = models.token_batch(config["batch"], config["length"], config["vocab"], seed=0)
    batch = (tokens.to(device), targets.to(device))
    loss_fn = models.language_model_loss
    out: dict[str, Any] = {"model": "GPT-2-sized decoder", "config": config,
                           "parameters": sum(p.numel() for p in model.parameters())}
    out["costs"] = hvp_costs(model, loss_fn, batch, device, reps)
    out["gradient_peak_memory_bytes"] = gradient_peak(model, loss_fn, batch, device)
    try:
        with PeakMemory(device) as mem:
            out["lanczos_20_steps"] = plain_lanczos(model, loss_fn, batch, device, k=1, steps=20)
        out["lanczos_20_steps"]["peak_memory_bytes"] = mem.peak
        if mem.peak and out["gradient_peak_memory_bytes"]:
            out["lanczos_peak_over_gradient_peak"] = mem.peak / out["gradient_peak_memory_bytes"]
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: record it, try the rest
        out["lanczos_20_steps"] = {"error": f"{type(err).__name__}: {err}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for hvp in ("reuse", "forward_over_reverse"):
        try:
            out["lambda_max"] = ours(model, loss_fn, batch, device, k=1, tol=1e-3, hvp=hvp)
            break
        except Exception as err:  # noqa: BLE001 - fall back to the method that stores no graph
            out[f"lambda_max_{hvp}_error"] = f"{type(err).__name__}: {err}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform(), "threads": torch.get_num_threads(),
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:12]
    except (OSError, subprocess.SubprocessError):
        info["lscpu"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the code path)")
    parser.add_argument("--only", choices=["resnet", "gpt2"], default=None)
    parser.add_argument("--no-pyhessian", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (default: off)")
    parser.add_argument("--replay", default=None, metavar="FILE",
                        help="only print the stopping tables of a saved --out file's reference runs")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay)
        return
    torch_settings(args.threads, args.tf32)
    device = torch.device("cpu" if args.smoke else args.device)
    config = CONFIGS["smoke" if args.smoke else args.device]
    results: dict[str, Any] = {"machine": machine(), "device": str(device), "smoke": args.smoke,
                               "tf32": args.tf32, "threads": torch.get_num_threads(), "command": " ".join([sys.executable, *sys.argv])}
    benches: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (f"resnet18_after_{steps}_steps" if steps else "resnet18",
         lambda steps=steps: bench_resnet(device, config["resnet"], config["reps"], not args.no_pyhessian, steps))
        for steps in config["resnet"]["train_steps"]
    ]
    benches.append(("gpt2", lambda: bench_gpt2(device, config["gpt2"], config["reps"])))
    for name, bench in benches:
        if args.only and not name.startswith(args.only):
            continue
        start = time.perf_counter()
        try:
            results[name] = bench()
        except Exception as err:  # noqa: BLE001 - keep the other benchmark's results
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        results[name]["benchmark_seconds"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print(summary(results))


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def summary(results: dict[str, Any]) -> str:
    lines = [f"device {results['device']} (torch {results['machine']['torch']})"]
    for key in [k for k in results if k.startswith("resnet18")]:
        r = results[key]
        if "costs" not in r:
            continue
        c = r["costs"]
        lines += [
            f"{key} ({r['model']}, batch {r['batch']}, {r['parameters']} params): gradient {c['gradient_s'] * 1e3:.1f} ms; "
            f"HVP forward-over-reverse {_fmt(c.get('hvp_forward_over_reverse_in_gradients'))} grads, double backward "
            f"from scratch {_fmt(c.get('hvp_double_backward_scratch_in_gradients'))}, reused graph "
            f"{_fmt(c['hvp_reuse_in_gradients'])} (build {_fmt(c.get('reuse_graph_build_in_gradients'))})",
        ]
        for name in ("top1", "top5", "top1_tol0.01", "top5_tol0.01", "top5_tol0.001", "plain_lanczos_40"):
            x = r[name]
            lines.append(f"  dynlens {name}: {x['seconds']:.3f} s, {x['hvps']} HVPs, max rel err "
                         f"{_fmt(max(x['relative_errors']))}"
                         + (f", amortised HVP {x['amortised_hvp_in_gradients']:.2f} grads" if "amortised_hvp_in_gradients" in x else ""))
        py = r.get("pyhessian", {})
        for name in ("top1", "top5"):
            if name in py:
                x = py[name]
                lines.append(f"  PyHessian {name}: {x['seconds']:.3f} s, {x['hvps']} HVPs, max rel err {_fmt(max(x['relative_errors']))}")
        if "density_error" in py:
            lines.append(f"  PyHessian density(): {py['density_error']}")
        if "comparison" in r:
            lines.append("  ratios dynlens/PyHessian: " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["comparison"].items()))
    g = results.get("gpt2", {})
    if "costs" in g:
        c = g["costs"]
        lines += [
            f"GPT-2 ({g['parameters']} params): gradient {c['gradient_s'] * 1e3:.1f} ms; HVP reuse "
            f"{_fmt(c['hvp_reuse_in_gradients'])} grads, forward-over-reverse "
            f"{_fmt(c.get('hvp_forward_over_reverse_in_gradients'))}; "
            f"20 Lanczos steps {_fmt(g['lanczos_20_steps'].get('seconds'))} s; λ_max to rel. residual 1e-3: "
            f"{_fmt(g.get('lambda_max', {}).get('seconds'))} s, {g.get('lambda_max', {}).get('hvps')} HVPs; "
            f"peak memory Lanczos/gradient "
            f"{_fmt(g.get('lanczos_peak_over_gradient_peak'))}",
        ]
    for name in [k for k in results if k.startswith(("resnet18", "gpt2"))]:
        if "error" in results.get(name, {}):
            lines.append(f"{name} failed: {results[name]['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
