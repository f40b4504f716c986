"""What no exact reverse-mode NTK avoids (issue #12): the forward pass of n examples and the O
backward passes to every parameterised layer's output, timed in rotation, in one process, with
``ntk_of``'s automatic choice and the torch.func tutorial's Jacobian contraction, whole and
without its final ``einsum``.

    python benchmarks/ntk_floor.py --device cuda --model resnet18 --n 64 256 --kernel trace full
    python benchmarks/ntk_floor.py --model resnet18 --tiny --n 16 --pairs 2      # CPU check
    python benchmarks/ntk_floor.py --device cuda --model resnet18 --n 64 128 256 --kernel trace \
        --groups 2 5 --passes-only        # the passes alone, by outputs a batched pass

Arms (each call synchronised, medians over ``--pairs`` rounds after one untimed round):

- ``passes``: the forward pass with hooks on the modules that own parameters, then the O backward
  passes to their outputs (``_output_gradients``), all O in one batched pass and one output a
  pass, the faster of the two taken per round: the gradients every exact method needs (the
  tutorial's ``vmap(jacrev)`` runs the same passes, batched over n·O); ``--groups``: also
  ``passes_group_G``, G outputs a batched pass (``--passes-only``: these arms alone);
- ``auto``: ``ntk_of(model, x, mode)``;
- ``tutorial_jacobians``: the tutorial's per-example Jacobians alone (``vmap(jacrev)``);
- ``tutorial``: the tutorial's whole method, Jacobians then ``einsum``.

Everything runs in ``dynlens.functional.isolated(model, "eval")`` (TF32 off), as ``ntk_of`` does.
Prints one JSON line per case with the medians and ``tutorial / passes``: 3× the tutorial needs
the whole kernel in a third of the tutorial's time, so where the passes alone take more than a
third of it, no exact method that runs them meets 3×.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(__file__))

from ntk import tutorial_jacobian  # noqa: E402
from ntk_profile import rotation_case  # noqa: E402

from dynlens.functional import isolated  # noqa: E402
from dynlens.measures.ntk import _output_gradients, ntk_of  # noqa: E402


def passes(model: nn.Module, x: torch.Tensor, group: int) -> list[torch.Tensor]:
    """The forward pass and the O backward passes (``group`` outputs a pass) to the outputs of
    every module that owns parameters, as the structured products' factor passes run them."""
    captured: list[torch.Tensor] = []
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda _m, _a, out: captured.append(out)) for m in owners]
    try:
        with torch.enable_grad():
            out = model(x).reshape(x.shape[0], -1)
    finally:
        for handle in handles:
            handle.remove()
    with torch.enable_grad():
        return _output_gradients(out, captured, out.shape[1], group)


def tutorial_jacobians(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tutorial's per-example Jacobians (``vmap(jacrev)``), without its contraction."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    return list(vmap(jacrev(f), (None, 0))(params, x).values())


def _arms(model: nn.Module, x: torch.Tensor, mode: str, outputs: int, groups: list[int],
          passes_only: bool) -> dict[str, Callable[[], Any]]:
    arms: dict[str, Callable[[], Any]] = {
        "passes_batched": lambda: passes(model, x, outputs),
        "passes_one_by_one": lambda: passes(model, x, 1),
        **{f"passes_group_{g}": (lambda g=g: passes(model, x, g)) for g in groups if 1 < g < outputs},
    }
    if not passes_only:
        arms.update(auto=lambda: ntk_of(model, x, mode=mode),
                    tutorial_jacobians=lambda: tutorial_jacobians(model, x),
                    tutorial=lambda: tutorial_jacobian(model, x, mode))
    return arms


def _timed(fn: Callable[[], Any], cuda: bool) -> float:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del result
    return seconds


def main() -> None:
    args, model, inputs = rotation_case(__doc__.split("\n\n")[0], [
        (("--groups",), {"type": int, "nargs": "+", "default": [], "help": "outputs a batched pass, more arms"}),
        (("--passes-only",), {"action": "store_true", "help": "time the passes' arms alone"})])
    cuda = args.device.startswith("cuda")
    for n in args.n:
        x = inputs(n).to(args.device)
        with torch.no_grad():
            outputs = model(x[:1]).numel()
        for mode in args.kernel:
            arms = _arms(model, x, mode, outputs, args.groups, args.passes_only)
            times: dict[str, list[float]] = {name: [] for name in arms}
            with isolated(model, "eval"):
                for fn in arms.values():  # untimed: cuDNN's and cuBLAS's first calls
                    _timed(fn, cuda)
                for _ in range(args.pairs):
                    for name, fn in arms.items():
                        times[name].append(_timed(fn, cuda))
            median = {name: statistics.median(t) for name, t in times.items()}
            floor = statistics.median(min(rounds) for rounds in zip(
                *(t for name, t in times.items() if name.startswith("passes")), strict=True))
            row = {"model": args.model, "n": n, "kernel": mode, "outputs": outputs,
                   **{f"{k}_s": round(v, 4) for k, v in median.items()}, "passes_s": round(floor, 4)}
            if not args.passes_only:
                row.update(tutorial_over_passes=round(median["tutorial"] / floor, 2),
                           tutorial_over_auto=round(median["tutorial"] / median["auto"], 2),
                           passes_share_of_auto=round(floor / median["auto"], 3),
                           tutorial_jacobians_share=round(median["tutorial_jacobians"] / median["tutorial"], 3))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
