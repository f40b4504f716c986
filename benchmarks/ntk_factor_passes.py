"""An experiment for issue #12: the structured NTK's factor passes (O backward passes of the chunk,
``_output_gradients``) against one pass batched over the outputs (``is_grads_batched``, a vmap
of the backward), timed end to end in alternating calls of ``ntk_of``; the kernels compared.

    python benchmarks/ntk_factor_passes.py --device cuda --n 64 --kernel trace full

Not the library's code: the batched pass holds O times a pass's gradients at once, which the
chunk rule does not count; this measures whether that would be worth counting.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402
from ntk_profile import case_arguments  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402


def batched_output_gradients(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int) -> list[torch.Tensor]:
    """``_output_gradients`` in one backward pass batched over the O outputs."""
    basis = torch.eye(num_outputs, dtype=out.dtype, device=out.device)[:, None, :].expand(num_outputs, *out.shape)
    grads = torch.autograd.grad(out, layer_outputs, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
    return [torch.zeros((num_outputs, *z.shape), dtype=z.dtype, device=z.device) if g is None else g
            for z, g in zip(layer_outputs, grads, strict=True)]


def main() -> None:
    parser = case_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    model, inputs, what = build(args.model, args, args.device)
    print(what, flush=True)
    loop = ntk_module._output_gradients
    cuda = args.device.startswith("cuda")

    def timed(passes: object, x: torch.Tensor, mode: str) -> tuple[float, torch.Tensor]:
        ntk_module._output_gradients = passes
        try:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            kernel = ntk_module.ntk_of(model, x, mode=mode, implementation="structured").kernel
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start, kernel
        finally:
            ntk_module._output_gradients = loop

    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            timed(loop, x, mode)
            timed(batched_output_gradients, x, mode)
            times: dict[str, list[float]] = {"loop": [], "batched": []}
            for _ in range(args.pairs):
                seconds, k_loop = timed(loop, x, mode)
                times["loop"].append(seconds)
                seconds, k_batched = timed(batched_output_gradients, x, mode)
                times["batched"].append(seconds)
            difference = float((k_loop - k_batched).norm() / k_loop.norm())
            loop_s, batched_s = statistics.median(times["loop"]), statistics.median(times["batched"])
            print(json.dumps({"n": n, "kernel": mode, "loop_s": round(loop_s, 4), "batched_s": round(batched_s, 4),
                              "batched_over_loop": round(batched_s / loop_s, 3),
                              "relative_difference": difference}), flush=True)


if __name__ == "__main__":
    main()
