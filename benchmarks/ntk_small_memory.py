"""Experiment (issue #12): the NTK probe's kernel in the small memory allowance the Lens leaves it
on a training job, by the routes ``ntk_of`` now chooses against the trace kernel's own routes
(the rule before: the full kernel's routes only when those keep every factor).

The probe's call: ``mode="trace"``, ``per_layer=True``, ``vector_products=False``, at the given
``memory``. Under a small allowance the trace's routes (most convolutions' Jacobians kept per
example) leave chunks of one to three examples and, not keeping their factors, compute them
1 + C(C−1)/2 times; the full kernel's routes hold less an example.

    python benchmarks/ntk_small_memory.py --n 32 --memory-gib 0.5 1 --repeat 1
    python benchmarks/ntk_small_memory.py --tiny --n 8 --memory-gib 0.01    # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--memory-gib", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    model, inputs, what = build("resnet18", types.SimpleNamespace(tiny=args.tiny, width=2048), args.device)
    print(what, flush=True)
    x = inputs(args.n).to(args.device)
    computes_twice = ntk_module._computes_twice
    seen: dict[str, object] = {}
    by_structure = ntk_module._by_structure

    def spy(*a: object, **k: object) -> object:
        seen.update(chunk=a[7], keep=a[9], jacobian_layers=sum(r == "jacobians" for r in a[6].values()))
        return by_structure(*a, **k)

    ntk_module._by_structure = spy
    for gib in args.memory_gib:
        memory = int(gib * 2**30)
        result: dict[str, object] = {"n": args.n, "memory_gib": gib}
        kernels = {}
        for name in ("chosen", "own_routes"):
            ntk_module._computes_twice = computes_twice if name == "chosen" else (lambda *a: False)
            times = []
            for _ in range(args.repeat):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                kernels[name] = ntk_module.ntk_of(model, x, mode="trace", per_layer=True, memory=memory,
                                                  vector_products=False).kernel
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            result[name] = {"seconds": round(min(times), 3), **seen}
        ntk_module._computes_twice = computes_twice
        result["relative_difference"] = float((kernels["chosen"] - kernels["own_routes"]).norm()
                                              / kernels["own_routes"].norm())
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
