"""Which Hessian-vector product is cheapest on this device? (ResNet-18, 32×32, eval mode)

Times one gradient and one HVP by: the reused first-order graph (double backward through a
graph built once) with PyTorch's convolution double backward (``reuse``) and with
:func:`dynlens.convgrad.fast_conv_second_order` (``reuse_fastconv``, what dynlens's "reuse" runs),
forward-over-reverse (``jvp`` of ``grad``), and ``torch.func.linearize`` of the gradient (the
primal pass traced once, each product runs only the tangent computation); each with cuDNN's
autotuner off and on. Reports each in gradients (median of 5 after warm-up), the cost of
building each reused graph, and the relative difference of the two reused products.

    python benchmarks/hvp_methods.py --device cuda [--batch 256] [--tf32] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import image_batch, resnet18  # noqa: E402

from dynlens.convgrad import fast_conv_second_order  # noqa: E402
from dynlens.functional import ModelFunction, flatten, isolated  # noqa: E402


def timed(fn, device, repeats=5) -> float:
    fn()
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def reused_graph(f: ModelFunction, fast: bool) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The leaves and the gradient's graph (``create_graph=True``), convolutions routed by
    ``fast_conv_second_order`` when ``fast``."""
    leaves = [t.detach().requires_grad_(True) for t in f.params.values()]
    with torch.enable_grad(), fast_conv_second_order() if fast else contextlib.nullcontext():
        grads = torch.autograd.grad(f.loss(dict(zip(f.params, leaves))), leaves, create_graph=True)
    return leaves, grads


def reuse_product(f: ModelFunction, v: torch.Tensor, fast: bool) -> Callable[[], torch.Tensor]:
    """H v by differentiating the reused graph again (the graph built once, here)."""
    leaves, grads = reused_graph(f, fast)
    vectors = list(f.as_params(v).values())
    return lambda: flatten(torch.autograd.grad(grads, leaves, vectors, retain_graph=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    model = resnet18(width=args.width).to(device)
    x, y = image_batch(args.batch, seed=0)
    f = ModelFunction(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(f.num_params, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    with isolated(model):
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            tag = "autotune" if bench else "default"
            grad = timed(lambda: f.grad(), device)
            results[f"gradient_ms[{tag}]"] = grad * 1e3
            products = {}
            for name, fast in (("", False), ("_fastconv", True)):
                product = reuse_product(f, v, fast)
                products[name] = product()
                results[f"reuse{name}[{tag}]"] = timed(product, device) / grad
                results[f"build_graph{name}[{tag}]"] = timed(lambda fast=fast: reused_graph(f, fast), device) / grad
                del product
            plain, fast_product = products[""], products["_fastconv"]
            results[f"reuse_fastconv_relative_difference[{tag}]"] = float(
                (fast_product - plain).norm() / plain.norm())
            results[f"forward_over_reverse[{tag}]"] = timed(lambda: flatten(f.hvp(f.as_params(v))), device) / grad
            try:
                start = time.perf_counter()
                _, lin = torch.func.linearize(torch.func.grad(f.loss), f.params)
                results[f"linearize_setup_s[{tag}]"] = time.perf_counter() - start
                results[f"linearize[{tag}]"] = timed(lambda fn=lin: fn(f.as_params(v)), device) / grad
            except Exception as err:  # noqa: BLE001 - report what fails
                results[f"linearize[{tag}]"] = f"{type(err).__name__}: {str(err)[:200]}"
    torch.backends.cudnn.benchmark = False
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "tf32": args.tf32, "batch": args.batch, "in_gradients": results}, indent=1))


if __name__ == "__main__":
    main()
