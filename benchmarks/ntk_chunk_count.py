"""Experiment (issue #12): the structured NTK's chunk count, a chunk's factors counted with the
other chunk's kept factors once (W + A + K, ``_chunk_terms`` now) against twice (W + A + 2·K,
before), alternating in one process.

Where a kernel's factors do not all fit memory, ``ntk_of`` assembles it from blocks of two
chunks and computes, of one set in C chunks, 1 + C(C−1)/2 chunks' factors; each computation is
O backward passes, which on a large model cost nearly as much for one example as for ten (they
read every weight). The chunk count held W (the chunk's factors while computed) + A (their
passes' activations) + 2·K (two chunks' kept factors), but the chunk being computed is W: K
was counted twice. Arms ``one`` (now) and ``two`` (before); each arm's chunk, the factor
computations and examples (counted at ``_factors``), their seconds and the whole kernel's.

    python benchmarks/ntk_chunk_count.py --model decoder --n 64 --pairs 1            # CPU, ~10 min
    python benchmarks/ntk_chunk_count.py --model decoder --tiny --n 32 --memory-gib 0.03   # check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402

from dynlens.batches import batch_size  # noqa: E402
from dynlens.measures import ntk as ntk_module  # noqa: E402
from dynlens.measures.ntk import ntk_of  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _twice(layers: Any, routes: Any, num_outputs: int, mode: str, itemsize: int, activation: int) -> tuple[int, int, int]:
    """The chunk count's terms before: W + A + 2·K."""
    working, kept, quadratic = ntk_module._structured_numbers(layers, routes, num_outputs, mode)
    return working + -(-activation // itemsize) + 2 * kept, kept, quadratic


CHUNK_TERMS = ntk_module._chunk_terms


def run_arm(arm: str, model: torch.nn.Module, x: Any, mode: str, memory: int | None,
            device: str) -> tuple[dict[str, Any], torch.Tensor]:
    """One kernel by one arm: its seconds, plan and factor computations."""
    seen: dict[str, Any] = {"factored": 0, "factor_calls": 0, "factor_seconds": 0.0}
    factors, by_structure = ntk_module._factors, ntk_module._by_structure

    def counted(function: Any, layers: Any, inputs: Any, *a: Any, **k: Any) -> Any:
        seen["factored"] += batch_size(inputs)
        seen["factor_calls"] += 1
        _sync(device)
        start = time.perf_counter()
        found = factors(function, layers, inputs, *a, **k)
        _sync(device)
        seen["factor_seconds"] += time.perf_counter() - start
        return found

    def planned(*a: Any) -> Any:
        seen.update(chunk=a[7], keep=a[9], group=a[11])
        return by_structure(*a)

    ntk_module._factors, ntk_module._by_structure = counted, planned
    ntk_module._chunk_terms = _twice if arm == "two" else CHUNK_TERMS
    try:
        _sync(device)
        start = time.perf_counter()
        result = ntk_of(model, x, mode=mode, memory=memory, implementation="structured")
        _sync(device)
        seen["seconds"] = time.perf_counter() - start
    finally:
        ntk_module._factors, ntk_module._by_structure = factors, by_structure
        ntk_module._chunk_terms = CHUNK_TERMS
    seen["implementation"] = result.implementation
    return seen, result.kernel.detach().to("cpu", torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="decoder", choices=["decoder", "resnet18", "mlp"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--kernel", default="trace", choices=["trace", "full"])
    parser.add_argument("--memory-gib", type=float, default=None, help="default: ntk_of's own allowance")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--arms", nargs="+", default=["two", "one"], choices=["two", "one"])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ntk_chunk_count.json"))
    args = parser.parse_args()
    built = types.SimpleNamespace(tiny=args.tiny, width=2048, seq_len=args.seq_len, positions=1)
    model, inputs, what = build(args.model, built, args.device)
    x = inputs(args.n).to(args.device)
    memory = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    print(what, f"n={args.n}", args.kernel, f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    runs: list[dict[str, Any]] = []
    kernels: dict[str, torch.Tensor] = {}
    for pair in range(args.pairs):
        for arm in (args.arms if pair % 2 == 0 else args.arms[::-1]):
            seen, kernel = run_arm(arm, model, x, args.kernel, memory, args.device)
            runs.append({"arm": arm, "pair": pair, **seen})
            print(json.dumps(runs[-1]), flush=True)
            kernels.setdefault(arm, kernel)
            with open(args.out, "w") as f:
                json.dump({"what": what, "n": args.n, "kernel": args.kernel, "memory_gib": args.memory_gib,
                           "device": args.device, "torch": str(torch.__version__), "runs": runs}, f, indent=1)
    if len(kernels) == 2:
        one, two = kernels["one"], kernels["two"]
        difference = float((one - two).norm() / two.norm())
        print(f"relative difference between the arms' kernels: {difference:.2e}")
        with open(args.out) as f:
            saved = json.load(f)
        saved["relative_difference"] = difference
        with open(args.out, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
