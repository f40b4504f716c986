"""An experiment for issue #12: the structured NTK's factor passes (O backward passes of the chunk,
``_output_gradients``) against one pass batched over the outputs (``is_grads_batched``, a vmap
of the backward), timed end to end in alternating calls of ``ntk_of``; the kernels compared.

    python benchmarks/ntk_factor_passes.py --device cuda --n 64 --kernel trace full

The library now batches the passes on a GPU in the room its chunk rule leaves
(``_pass_group``); this compares its two extremes, one output a pass and all O in one (the
chunk rule's room ignored), the library's own choice, and all O in one by ``is_grads_batched``
(``legacy``, its batching until the twelfth session), in rotation.
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
                  group: int = 1, trimmed: dict | None = None) -> list[torch.Tensor]:
    """``_output_gradients`` one output a pass, whatever group the library chose."""
    return _LIBRARY(out, layer_outputs, num_outputs, 1, trimmed)


def batched_output_gradients(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int,
                             group: int = 1, trimmed: dict | None = None) -> list[torch.Tensor]:
    """``_output_gradients`` in one backward pass batched over all O outputs."""
    return _LIBRARY(out, layer_outputs, num_outputs, num_outputs, trimmed)


def legacy_output_gradients(out: torch.Tensor, layer_outputs: list[torch.Tensor], num_outputs: int,
                            group: int = 1, trimmed: dict | None = None) -> list[torch.Tensor]:
    """All O outputs' passes as one backward pass with ``is_grads_batched`` (the library's way
    until the twelfth session), whose older vmap loops over the outputs through a
    convolution's or normalisation's backward and stacks the results; the library's batched
    pass is ``torch.func.vmap``'s (``_batched_pass``). Nothing trimmed: a tied output layer's
    gradients come at every position (``_tied_factors`` takes them so)."""
    basis = torch.zeros((num_outputs, *out.shape), dtype=out.dtype, device=out.device)
    basis[torch.arange(num_outputs), :, torch.arange(num_outputs)] = 1
    with torch.enable_grad():
        grads = torch.autograd.grad(out, layer_outputs, grad_outputs=basis, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    return [torch.zeros((num_outputs, *z.shape), dtype=z.dtype, device=z.device) if g is None else g
            for g, z in zip(grads, layer_outputs, strict=True)]


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
            arms = {"loop": loop, "batched": batched_output_gradients, "legacy": legacy_output_gradients,
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
                              "library_over_legacy": round(median["library"] / median["legacy"], 3),
                              "relative_difference": difference}), flush=True)


if __name__ == "__main__":
    main()
