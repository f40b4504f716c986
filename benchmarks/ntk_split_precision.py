"""Would the structured NTK's products gain from three TF32 products in place of one float32
product (issue #12)? Each float32 factor is split into a TF32 head and a float32 tail, x = h + t,
and x·y is computed as h·h' + h·t' + t·h' on the tensor cores (the tail's own product, 2⁻²² of
the whole, dropped): the "3xTF32" of CUTLASS, near float32's accuracy at the tensor cores' rate.

    python benchmarks/ntk_split_precision.py --device cuda --n 64 256 --kernel trace full --pairs 5

Arms, in rotation in one process: ``ntk_of`` as it is (float32, TF32 off), ``ntk_of`` with every
two-operand ``torch.einsum`` of its module split so (a patch, for this experiment), and the
torch.func tutorial's Jacobian contraction. Errors: each kernel against the same kernel in
float64 (``ntk_of`` on a float64 copy of the model and inputs). Also the products alone, for a
square product of ``--gemm`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build, tutorial_jacobian  # noqa: E402

from dynlens.isolation import _tf32, isolated  # noqa: E402
from dynlens.measures import ntk as ntk_module  # noqa: E402

_plain_einsum = torch.einsum


def _head(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest TF32 number (10 bits of mantissa; ties away from zero): its 13
    low bits cleared after adding half of the last kept bit. The tensor cores truncate a float32
    input to TF32, so each operand is rounded here first, the tail too."""
    return ((x.view(torch.int32) + 4096) & -8192).view(torch.float32)


def split_einsum(equation: str, *operands: Any) -> torch.Tensor:
    if len(operands) != 2 or any(not isinstance(o, torch.Tensor) or o.dtype != torch.float32 for o in operands):
        return _plain_einsum(equation, *operands)
    x, y = operands
    hx, hy = _head(x), _head(y)
    tx, ty = _head(x - hx), _head(y - hy)
    with _tf32(True):
        out = _plain_einsum(equation, hx, hy)
        out += _plain_einsum(equation, hx, ty)
        out += _plain_einsum(equation, tx, hy)
    return out


def _timed(fn: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def gemm(rows: int, repeat: int) -> dict[str, float]:
    a = torch.randn(rows, rows, device="cuda")
    b = torch.randn(rows, rows, device="cuda")
    exact = (a.double() @ b.double())
    out: dict[str, float] = {}
    for name, fn in (("fp32", lambda: a @ b), ("split", lambda: split_einsum("ij,jk->ik", a, b))):
        fn()
        times = sorted(_timed(fn) for _ in range(repeat))
        out[f"{name}_s"] = times[len(times) // 2]
        out[f"{name}_tflops"] = 2 * rows**3 / out[f"{name}_s"] / 1e12
        out[f"{name}_error"] = float((fn().double() - exact).norm() / exact.norm())
    with _tf32(True):
        out["tf32_s"] = sorted(_timed(lambda: a @ b) for _ in range(repeat))[repeat // 2]
        out["tf32_error"] = float(((a @ b).double() - exact).norm() / exact.norm())
    return out


def run_case(model: torch.nn.Module, double: torch.nn.Module, x: torch.Tensor, mode: str,
             pairs: int) -> dict[str, Any]:
    """One case: each arm's error against float64, then ``pairs`` rounds of the arms in rotation."""
    reference = ntk_module.ntk_of(double, x.double() if x.is_floating_point() else x, mode=mode).kernel

    def ours() -> torch.Tensor:
        return ntk_module.ntk_of(model, x, mode=mode).kernel

    def split() -> torch.Tensor:
        torch.einsum = split_einsum
        try:
            return ntk_module.ntk_of(model, x, mode=mode).kernel
        finally:
            torch.einsum = _plain_einsum

    def tutorial() -> torch.Tensor:
        with isolated(model, "eval"):
            return tutorial_jacobian(model, x, mode)

    arms = {"auto": ours, "split": split, "tutorial": tutorial}
    errors = {}
    for name, fn in arms.items():
        k = fn()
        errors[name] = float((k.double() - reference).norm() / reference.norm())
        del k
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(pairs):
        for name, fn in arms.items():
            times[name].append(_timed(fn))
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"n": len(x), "mode": mode, "medians": medians, "errors": errors, "times": times,
            "tutorial_over_auto": medians["tutorial"] / medians["auto"],
            "tutorial_over_split": medians["tutorial"] / medians["split"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kernel", nargs="+", default=["trace", "full"])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--gemm", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--positions", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {"gemm": {}, "cases": []}
    for rows in args.gemm:
        results["gemm"][rows] = gemm(rows, 5)
        print("gemm", rows, json.dumps(results["gemm"][rows]), flush=True)
    model, inputs, what = build(args.model, args, args.device)
    print(what, flush=True)
    double = build(args.model, args, args.device)[0].double()
    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            row = run_case(model, double, x, mode, args.pairs)
            results["cases"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
