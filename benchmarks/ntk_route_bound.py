"""The fewest multiply-adds the structured NTK's layer routes can take (issue #12): for each
structured layer, the cheaper of its two routes by the planner's own count
(``_route_costs``: products over pairs of positions, or per-example Jacobians formed and
contracted), summed, and the seconds that sum takes at a given rate of float32 multiply-adds.
Beside the forward and backward passes every exact method runs (``ntk_floor.py``), this bounds
from below what a kernel by these routes can cost, however well its products are issued.

    python benchmarks/ntk_route_bound.py --model resnet18 --n 64 256 --kernel trace full --tflops 49

Runs on the CPU (only the planner's counts; the layers are found by ``ntk_of``'s own check on
4 examples). ``--tflops``: the device's float32 rate, 2 flops a multiply-add (an H200 reached
48.6-49.5 TFLOP/s on square products of 4,096 and 8,192 rows with TF32 off,
``ntk_split_precision.py``). The "tutorial" column is the multiply-adds of the torch.func
tutorial's contraction alone (n²·O·P for "trace", n²·O²·P for "full"), before its Jacobians.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402

from dynlens.functional import ModelFunction  # noqa: E402
from dynlens.isolation import isolated  # noqa: E402
from dynlens.measures import ntk as ntk_module  # noqa: E402


def layer_costs(layer: ntk_module._Layer, outputs: int, mode: str, n: int) -> tuple[int, int]:
    """(positions, jacobians) multiply-adds of one layer for a symmetric kernel of ``n`` examples
    (the n(n+1)/2 pairs a mirrored kernel computes), ``mode`` "trace" or "full". A normalisation
    has the Jacobian route only: its Jacobians formed (n·O·T·out) and contracted (pairs·O'·size)."""
    pairs = n * (n + 1) // 2
    if layer.kind == "norm":
        o = outputs * outputs if mode == "full" else outputs
        jac = n * outputs * layer.positions * layer.outputs + pairs * o * layer.size
        return jac, jac
    return ntk_module._route_costs(layer, outputs, mode, n, pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=["mlp", "resnet18"])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kernel", nargs="+", default=["trace", "full"], choices=["trace", "full"])
    parser.add_argument("--tflops", type=float, default=49.0)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", action="store_true", help="print each layer's two counts")
    args = parser.parse_args()
    model, inputs, what = build(args.model, args, "cpu")
    x = inputs(4)
    with isolated(model, "eval"):
        function = ModelFunction(model, None, (x, None))
        outputs = int(model(x[:1]).numel())
        layers = ntk_module._structured_layers(function, x, outputs)
    parameters = sum(p.numel() for p in model.parameters())
    covered = sum(layer.size for layer in layers.values())
    print(f"{what}; O = {outputs}; {len(layers)} structured layers cover {covered:,} of {parameters:,} parameters")
    print("| n | kernel | fewest multiply-adds | at the rate | tutorial's contraction | at the rate |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.n:
        for mode in args.kernel:
            fewest = 0
            rows = []
            for name, layer in layers.items():
                by_positions, by_jacobians = layer_costs(layer, outputs, mode, n)
                fewest += min(by_positions, by_jacobians)
                rows.append(f"    {name:24s} {layer.kind:6s} T={layer.positions:5d} k={layer.inputs:5d} "
                            f"out={layer.outputs:4d}  positions {by_positions / 1e9:9.1f} G  "
                            f"jacobians {by_jacobians / 1e9:9.1f} G")
            tutorial = n * n * parameters * (outputs * outputs if mode == "full" else outputs)
            seconds = 2 * fewest / (args.tflops * 1e12)
            print(f"| {n} | {mode} | {fewest / 1e9:,.0f} G | {seconds:.3f} s | {tutorial / 1e9:,.0f} G | "
                  f"{2 * tutorial / (args.tflops * 1e12):.3f} s |")
            if args.layers:
                print("\n".join(rows))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
