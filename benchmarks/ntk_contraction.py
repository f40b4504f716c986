"""Experiment (issue #12): the NTK's two dense pieces on their own, at the shapes a ResNet-18's
kernel gives them, each way we could write it, timed in alternation in one process.

1. The contraction of per-example Jacobians, ``einsum("iap,jap->ij")`` (trace) and
   ``einsum("iap,jbp->ijab")`` (full): a product whose inner dimension (O·P, up to 23.6M) is
   far longer than its output (n₁ × n₂). One GEMM of that shape has few output tiles to spread
   over the device; "split" cuts the inner dimension into S pieces, one batched product of S
   small products, summed after (split-K by hand).
2. The per-example Jacobians of a convolution, ``einsum("aitl,itk->ialk")`` (output gradients
   g (O, n, T, out) by unfolded inputs a (n, T, k)).
3. With ``--model``: one ``ntk_of`` call with ``torch.backends.cudnn.benchmark`` off and on
   (the O backward passes run cuDNN's data-gradient kernels, chosen by heuristics when off),
   of images in the default layout and channels-last (``--model-only`` leaves out 1 and 2).

    python benchmarks/ntk_contraction.py --device cuda --n 152
    python benchmarks/ntk_contraction.py --tiny                       # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402


def _timed(device: str, fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """The median seconds of each function, run in alternation ``repeat`` times after one warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def split_trace(a: torch.Tensor, b: torch.Tensor, pieces: int) -> torch.Tensor:
    """Σ_(a,p) A_iap B_jap with the inner dimension cut into ``pieces`` batched products."""
    n1, n2 = a.shape[0], b.shape[0]
    x = a.reshape(n1, pieces, -1).transpose(0, 1)
    y = b.reshape(n2, pieces, -1).transpose(0, 1)
    return torch.bmm(x, y.transpose(1, 2)).sum(0)


def split_full(a: torch.Tensor, b: torch.Tensor, pieces: int) -> torch.Tensor:
    """Σ_p A_iap B_jbp, (n₁, n₂, O, O), the parameters cut into ``pieces``."""
    n1, o, _ = a.shape
    n2 = b.shape[0]
    x = a.reshape(n1 * o, pieces, -1).transpose(0, 1)
    y = b.reshape(n2 * o, pieces, -1).transpose(0, 1)
    return torch.bmm(x, y.transpose(1, 2)).sum(0).reshape(n1, o, n2, o).permute(0, 2, 1, 3)


def contraction(device: str, n: int, outputs: int, sizes: list[int], repeat: int) -> None:
    for size in sizes:
        a = torch.randn(n, outputs, size, device=device)
        b = torch.randn(n, outputs, size, device=device)
        flops = {"trace": 2 * n * n * outputs * size, "full": 2 * n * n * outputs * outputs * size}
        for mode in ("trace", "full"):
            ref = (torch.einsum("iap,jap->ij", a, b) if mode == "trace"
                   else torch.einsum("iap,jbp->ijab", a, b))
            equation = "iap,jap->ij" if mode == "trace" else "iap,jbp->ijab"
            fns: dict[str, Callable[[], object]] = {
                "einsum": lambda equation=equation, a=a, b=b: torch.einsum(equation, a, b)}
            for pieces in (4, 16, 64):
                if size % pieces == 0:
                    fn = split_trace if mode == "trace" else split_full
                    fns[f"split{pieces}"] = lambda fn=fn, pieces=pieces, a=a, b=b: fn(a, b, pieces)
                    err = float((fn(a, b, pieces) - ref).abs().max() / ref.abs().max())
                    assert err < 1e-4, (mode, pieces, err)
            t = _timed(device, fns, repeat)
            print(json.dumps({"piece": "contraction", "mode": mode, "n": n, "O": outputs, "P": size,
                              **{k: round(v * 1e3, 3) for k, v in t.items()},
                              "einsum_tflops": round(flops[mode] / t["einsum"] / 1e12, 2),
                              "best_tflops": round(flops[mode] / min(t.values()) / 1e12, 2)}), flush=True)


def sizes_of_n(device: str, ns: list[int], outputs: int, size: int, repeat: int) -> None:
    """The trace contraction's rate against the number of examples (its output's side): a GEMM
    cut into output tiles of 64 or 128 wastes the part of its last tiles past n."""
    for n in ns:
        a = torch.randn(n, outputs, size, device=device)
        b = torch.randn(n, outputs, size, device=device)
        ao, bo = a.transpose(0, 1).contiguous(), b.transpose(0, 1).contiguous()
        fns: dict[str, Callable[[], object]] = {
            "einsum": lambda a=a, b=b: torch.einsum("iap,jap->ij", a, b),
            "mm": lambda a=a, b=b, n=n: a.reshape(n, -1) @ b.reshape(n, -1).T,
            "bmm_by_output": lambda ao=ao, bo=bo: torch.bmm(ao, bo.transpose(1, 2)).sum(0)}
        t = _timed(device, fns, repeat)
        flops = 2 * n * n * outputs * size
        print(json.dumps({"piece": "trace_by_n", "n": n, "O": outputs, "P": size,
                          **{k: round(v * 1e3, 3) for k, v in t.items()},
                          **{f"{k}_tflops": round(flops / v / 1e12, 2) for k, v in t.items()}}), flush=True)


def jacobians(device: str, n: int, outputs: int, shapes: list[tuple[int, int, int]], repeat: int) -> None:
    for t_, out, k in shapes:
        g = torch.randn(outputs, n, t_, out, device=device)
        a = torch.randn(n, t_, k, device=device)

        def by_einsum(g: torch.Tensor = g, a: torch.Tensor = a) -> torch.Tensor:
            return torch.einsum("aitl,itk->ialk", g, a)

        def by_bmm(g: torch.Tensor = g, a: torch.Tensor = a, shape: tuple[int, int, int] = (n, outputs * out, t_)
                   ) -> torch.Tensor:
            # (n, O·out, T) @ (n, T, k)
            return torch.bmm(g.permute(1, 0, 3, 2).reshape(shape), a)

        def by_bmm_transposed(g: torch.Tensor = g, a: torch.Tensor = a,
                              shape: tuple[int, int, int] = (n, t_, outputs * out)) -> torch.Tensor:
            # g laid out (n, T, O·out): the product reads it transposed
            return torch.bmm(g.permute(1, 2, 0, 3).reshape(shape).transpose(1, 2), a)

        t = _timed(device, {"einsum": by_einsum, "bmm": by_bmm, "bmm_t": by_bmm_transposed}, repeat)
        flops = 2 * n * outputs * t_ * out * k
        print(json.dumps({"piece": "jacobians", "n": n, "O": outputs, "T": t_, "out": out, "k": k,
                          **{k_: round(v * 1e3, 3) for k_, v in t.items()},
                          "einsum_tflops": round(flops / t["einsum"] / 1e12, 2)}), flush=True)


def whole(device: str, args: argparse.Namespace) -> None:
    model, inputs, what = build(args.model, args, device)
    print(what, flush=True)
    for n in args.whole_n:
        x = inputs(n).to(device)
        for mode in args.kernel:
            fns: dict[str, Callable[[], object]] = {}
            layouts = {"": x}
            if x.dim() == 4:
                layouts["channels_last_"] = x.contiguous(memory_format=torch.channels_last)
            for layout, xs in layouts.items():
                for bench in (False, True):
                    def run(bench: bool = bench, mode: str = mode, x: torch.Tensor = xs) -> object:
                        old = torch.backends.cudnn.benchmark
                        torch.backends.cudnn.benchmark = bench
                        try:
                            return ntk_module.ntk_of(model, x, mode=mode)
                        finally:
                            torch.backends.cudnn.benchmark = old
                    fns[f"{layout}cudnn_benchmark_{bench}"] = run
            kernels = {k: fn().kernel for k, fn in fns.items()}  # type: ignore[attr-defined]
            first = next(iter(kernels.values()))
            difference = max(float((k - first).abs().max() / first.abs().max()) for k in kernels.values())
            t = _timed(device, fns, args.repeat)
            print(json.dumps({"piece": "ntk_of", "model": args.model, "n": n, "kernel": mode,
                              **{k: round(v, 4) for k, v in t.items()},
                              "max_relative_difference": difference}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=152)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--by-n", type=int, nargs="*", default=[],
                        help="only the trace contraction's rate at these n (the largest but one size)")
    parser.add_argument("--model", default=None, choices=["mlp", "resnet18", "decoder"])
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--whole-n", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kernel", nargs="+", default=["trace", "full"])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--positions", type=int, default=1)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        sizes, shapes, n = [64 * 9, 128 * 9], [(64, 8, 72)], 8
    else:
        # ResNet-18 (CIFAR) weights: 64·64·9 … 512·512·9; convolutions at 32², 16², 8² positions
        sizes = [64 * 64 * 9, 128 * 128 * 9, 256 * 256 * 9, 512 * 512 * 9]
        shapes, n = [(1024, 64, 576), (256, 128, 1152), (64, 256, 2304)], args.n
    if args.model_only:
        pass
    elif args.by_n:
        sizes_of_n(args.device, args.by_n, args.outputs, sizes[-2], args.repeat)
    else:
        contraction(args.device, n, args.outputs, sizes, args.repeat)
        jacobians(args.device, n, args.outputs, shapes, args.repeat)
    if args.model:
        whole(args.device, args)


if __name__ == "__main__":
    main()
