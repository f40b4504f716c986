"""An experiment for issue #12: the host's work in an ``ntk_of`` call, while the device waits.
Arms, in rotation in one process, the kernels compared:

- ``before``: one example's activation bytes counted at every call (a forward pass with a hook
  on every saved tensor), and the convolutions' patches by ``F.unfold``;
- ``kept``: those bytes kept per model, shapes and O (``_one_example``; O itself from a plain
  forward pass of one example at every call), patches by ``F.unfold``;
- ``now``: kept, and the patches one copy of a strided view (``_unfolded``, on a GPU);
- ``tutorial``: the torch.func tutorial's Jacobian contraction.

    python benchmarks/ntk_host_work.py --device cuda --model resnet18 --n 64 --kernel trace full --pairs 9

Before any of the kernel's work reaches the device, ``ntk_of`` plans it on the host, and the
factor passes' forward pass issues its operations: on an H200 the device waited 24 ms of a
ResNet-18's full kernel of 64 images (0.12 s), 12 of them in that forward pass, where F.unfold
launched one im2col kernel per example (9 ms of the host), and 9 in ``ntk_of``'s own steps
(``ntk_profile.py --gaps --host``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import tutorial_jacobian  # noqa: E402
from ntk_profile import rotation_case  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402

_STRIDED = ntk_module._STRIDED_PATCHES_ON


def main() -> None:
    args, model, inputs = rotation_case(__doc__.split("\n\n")[0])
    cuda = args.device.startswith("cuda")

    def timed(run: Any) -> tuple[float, torch.Tensor]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        kernel = run()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, kernel

    def call(x: torch.Tensor, mode: str, kept: bool, strided: bool) -> torch.Tensor:
        if not kept:
            ntk_module._ACTIVATION_BYTES.clear()
        ntk_module._STRIDED_PATCHES_ON = ("cuda",) if strided else ()
        try:
            return ntk_module.ntk_of(model, x, mode=mode).kernel
        finally:
            ntk_module._STRIDED_PATCHES_ON = _STRIDED

    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            arms = {
                "before": lambda x=x, mode=mode: call(x, mode, False, False),
                "kept": lambda x=x, mode=mode: call(x, mode, True, False),
                "now": lambda x=x, mode=mode: call(x, mode, True, True),
                "tutorial": lambda x=x, mode=mode: tutorial_jacobian(model, x, mode),
            }
            for run in arms.values():
                timed(run)
            times: dict[str, list[float]] = {name: [] for name in arms}
            kernels: dict[str, torch.Tensor] = {}
            for _ in range(args.pairs):
                for name, run in arms.items():
                    seconds, kernels[name] = timed(run)
                    times[name].append(seconds)
            reference = kernels["tutorial"]
            median = {name: statistics.median(t) for name, t in times.items()}
            print(json.dumps({
                "n": n, "kernel": mode, **{f"{k}_s": round(v, 4) for k, v in median.items()},
                "kept_over_before": round(median["kept"] / median["before"], 3),
                "now_over_kept": round(median["now"] / median["kept"], 3),
                "now_over_before": round(median["now"] / median["before"], 3),
                **{f"tutorial_over_{k}": round(median["tutorial"] / median[k], 3) for k in ("before", "kept", "now")},
                "relative_difference": max(float((reference - k).norm() / reference.norm())
                                           for k in kernels.values()),
                "now_against_before": float((kernels["now"] - kernels["before"]).norm() / kernels["before"].norm())}),
                flush=True)


if __name__ == "__main__":
    main()
