"""An experiment for issue #12: ``ntk_of``'s one-example pass (the outputs' count and one
example's activation bytes) kept per model and shapes, against that pass taken at every call
(as before), with the torch.func tutorial's Jacobian contraction as the third arm, all in
rotation in one process; the kernels compared.

    python benchmarks/ntk_kept_plan.py --device cuda --model resnet18 --n 64 --kernel trace full --pairs 9

Before any of the kernel's work reaches the device, ``ntk_of`` plans it on the host: on an H200
the device waited about 20 ms of a ResNet-18's full kernel of 64 images (0.137 s) for those
steps (``ntk_profile.py --gaps``), of which the one-example pass was 3–5 ms.
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

    def forgetting(x: torch.Tensor, mode: str) -> torch.Tensor:
        ntk_module._ONE_EXAMPLE.clear()
        return ntk_module.ntk_of(model, x, mode=mode).kernel

    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            arms = {
                "every_call": lambda x=x, mode=mode: forgetting(x, mode),
                "kept": lambda x=x, mode=mode: ntk_module.ntk_of(model, x, mode=mode).kernel,
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
                "kept_over_every_call": round(median["kept"] / median["every_call"], 3),
                "tutorial_over_kept": round(median["tutorial"] / median["kept"], 3),
                "tutorial_over_every_call": round(median["tutorial"] / median["every_call"], 3),
                "relative_difference": max(float((reference - k).norm() / reference.norm())
                                           for k in kernels.values())}), flush=True)


if __name__ == "__main__":
    main()
