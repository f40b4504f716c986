"""Empirical NTK: each implementation, the automatic choice, and the torch.func NTK tutorial's
two methods as the baseline.

    python benchmarks/ntk.py                       # CPU: the MLP (3×2048) of the issue's table
    python benchmarks/ntk.py --device cuda --n 64 256

For each case and n (inputs): the median wall time of the trace and full kernels by
``implementation="jacobian"``, ``"ntk_vector"``, ``"structured"`` (where it covers the model) and
``"auto"``, and of the tutorial's Jacobian contraction (``vmap(jacrev)`` then ``einsum``) and
NTK-vector products (``vmap`` of ``vjp`` and ``jvp``), each checked against our kernel. A
method that runs out of memory is recorded as such. Writes ``ntk.json`` to ``$OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynlens.measures.ntk import ntk_of  # noqa: E402


def mlp(width: int = 2048) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def tutorial_jacobian(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The torch.func tutorial's first method: per-example Jacobians, then einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    if mode == "trace":
        return sum(torch.einsum("Naf,Maf->NM", j, j) for j in jac)
    return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in jac)


def tutorial_products(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The tutorial's second method: NTK-vector products (vjp then jvp over the identity)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict) -> torch.Tensor:
        return functional_call(model, p, (x,))

    _, pullback = vjp(f, params)
    outputs = f(params)

    def column(v: torch.Tensor) -> torch.Tensor:
        (cotangent,) = pullback(v)
        return jvp(f, (params,), (cotangent,))[1]

    basis = torch.eye(outputs.numel(), dtype=outputs.dtype).view(outputs.numel(), *outputs.shape)
    full = vmap(column)(basis).reshape(*outputs.shape, *outputs.shape).permute(0, 2, 1, 3)
    return full.diagonal(dim1=2, dim2=3).sum(-1) if mode == "trace" else full


def timed(fn: Any, repeat: int) -> tuple[float | str, Any]:
    results, out = [], None
    for _ in range(repeat):
        try:
            began = time.perf_counter()
            out = fn()
            results.append(time.perf_counter() - began)
        except torch.OutOfMemoryError:
            return "out of memory", None
    return statistics.median(results), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[64])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mlp(args.width).to(args.device).eval()
    results: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "model": f"MLP 32-{args.width}x3-10", "rows": []}
    for n in args.n:
        x = torch.randn(n, 32, device=args.device)
        for mode in ("trace", "full"):
            reference = None
            row: dict[str, Any] = {"n": n, "mode": mode}
            for method in ("structured", "jacobian", "ntk_vector", "auto"):
                seconds, out = timed(lambda m=method, x=x, mode=mode: ntk_of(model, x, mode=mode, implementation=m), args.repeat)
                row[method] = seconds
                if out is not None:
                    reference = out.kernel if reference is None else reference
                    row[f"{method}_error"] = float((out.kernel - reference).norm() / reference.norm())
            for name, method in (("tutorial_jacobian", tutorial_jacobian), ("tutorial_products", tutorial_products)):
                seconds, out = timed(lambda m=method, x=x, mode=mode: m(model, x, mode), args.repeat)
                row[name] = seconds
                if out is not None and reference is not None:
                    row[f"{name}_error"] = float((out - reference).norm() / reference.norm())
            ours = [row[m] for m in ("structured", "jacobian", "ntk_vector") if isinstance(row[m], float)]
            theirs = [row[m] for m in ("tutorial_jacobian", "tutorial_products") if isinstance(row[m], float)]
            if ours and isinstance(row["auto"], float):
                row["auto_over_our_fastest"] = row["auto"] / min(ours)
            if theirs and isinstance(row["auto"], float):
                row["faster_tutorial_over_auto"] = min(theirs) / row["auto"]
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "ntk.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
