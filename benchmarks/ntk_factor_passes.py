"""An experiment for issue #12: the structured NTK's factor passes (O backward passes of the chunk,
``_output_gradients``) against one pass batched over the outputs (``is_grads_batched``, a vmap
of the backward), timed end to end in alternating calls of ``ntk_of``; the kernels compared.

    python benchmarks/ntk_factor_passes.py --device cuda --n 64 --kernel trace full

The library now batches the passes on a GPU in the room its chunk rule leaves
(``_pass_group``); this compares its two extremes, one output a pass and all O in one (the
chunk rule's room ignored), and the library's own choice, in rotation.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk_profile import rotation_case  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402

_LIBRARY = ntk_module._output_gradients


def one_at_a_time(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int,
                  group: int = 1) -> list[torch.Tensor]:
    """``_output_gradients`` one output a pass, whatever group the library chose."""
    return _LIBRARY(out, layer_outputs, num_outputs, 1)


def batched_output_gradients(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int,
                             group: int = 1) -> list[torch.Tensor]:
    """``_output_gradients`` in one backward pass batched over all O outputs."""
    return _LIBRARY(out, layer_outputs, num_outputs, num_outputs)


def vmapped_output_gradients(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int,
                             group: int = 1) -> list[torch.Tensor]:
    """All O outputs' passes as one backward pass vectorised by ``torch.func.vmap`` (whose batching
    rules fold the outputs into the examples' dimension of a convolution's or normalisation's
    backward), rather than by ``is_grads_batched``'s vmap, which loops over the outputs where an
    operation has no rule of its own and stacks the results."""
    basis = torch.zeros((num_outputs, *out.shape), dtype=out.dtype, device=out.device)
    basis[torch.arange(num_outputs), :, torch.arange(num_outputs)] = 1

    def pull(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(out, layer_outputs, grad_outputs=v, retain_graph=True, materialize_grads=True)

    with torch.enable_grad():
        return list(torch.func.vmap(pull)(basis))


def main() -> None:
    args, model, inputs = rotation_case(__doc__.split("\n\n")[0])
    loop = one_at_a_time
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
            ntk_module._output_gradients = _LIBRARY

    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            arms = {"loop": loop, "batched": batched_output_gradients, "vmap": vmapped_output_gradients,
                    "library": _LIBRARY}
            for passes in arms.values():
                timed(passes, x, mode)
            times: dict[str, list[float]] = {name: [] for name in arms}
            kernels: dict[str, torch.Tensor] = {}
            for _ in range(args.pairs):
                for name, passes in arms.items():
                    seconds, kernels[name] = timed(passes, x, mode)
                    times[name].append(seconds)
            difference = max(float((kernels["loop"] - k).norm() / kernels["loop"].norm()) for k in kernels.values())
            median = {name: statistics.median(t) for name, t in times.items()}
            print(json.dumps({"n": n, "kernel": mode, **{f"{k}_s": round(v, 4) for k, v in median.items()},
                              "batched_over_loop": round(median["batched"] / median["loop"], 3),
                              "library_over_loop": round(median["library"] / median["loop"], 3),
                              "vmap_over_library": round(median["vmap"] / median["library"], 3),
                              "relative_difference": difference}), flush=True)


if __name__ == "__main__":
    main()
