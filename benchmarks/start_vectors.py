"""Would a better Lanczos start vector cut the top-5 Hessian-vector products at random init?

ResNet-18 as in ``benchmarks/hessian.py`` (width 8, batch 32 on the CPU). Candidate start vectors,
each from at most one backward pass: a Gaussian vector, the gradient, and Jᵀu (J the Jacobian of
the outputs) for u Gaussian over the outputs, u constant within a class (a random row per class),
and u Gaussian centred by the softmax (u_i = p_i ⊙ z_i − p_i (p_i·z_i), the output-space factor of
the GGN). For each: its share of the top-5 eigenspace (from a long Lanczos run), and the HVPs
Lanczos needs for the top 5 at ``--tol`` from it plus ``w`` times a unit Gaussian vector.

    python benchmarks/start_vectors.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
import hessian as bench  # noqa: E402

from dynlens.functional import ModelFunction, flatten, isolated  # noqa: E402
from dynlens.linalg import lanczos_eigsh  # noqa: E402
from dynlens.linalg.operator import gaussian_vector  # noqa: E402
from dynlens.measures.hessian import curvature_operator  # noqa: E402


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


def candidates(model: torch.nn.Module, data: tuple, gradient: Tensor, size: int,
               generator: torch.Generator) -> dict[str, Tensor]:
    """name -> unit start vector (flat, float32, on the model's device)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    device = x.device

    def gauss(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    with torch.enable_grad():
        out = model(x)
        probs = out.softmax(1).detach()

        def pullback(u: Tensor) -> Tensor:
            return unit(flatten(list(torch.autograd.grad(out, params, u, retain_graph=True))).detach())

        z = gauss(*out.shape)
        found: dict[str, Callable[[], Tensor]] = {
            "gaussian": lambda: unit(gaussian_vector(size, generator, gradient.dtype, device)),
            "gradient": lambda: unit(gradient),
            "J^T u, u Gaussian": lambda: pullback(gauss(*out.shape)),
            "J^T u, u by class": lambda: pullback(gauss(out.shape[1], out.shape[1])[y]),
            "J^T u, u softmax-centred": lambda: pullback(probs * z - probs * (probs * z).sum(1, keepdim=True)),
        }
        return {name: make() for name, make in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=0, help="SGD steps before measuring")
    parser.add_argument("--tol", type=float, default=1e-2)
    parser.add_argument("--reference-iters", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    bench.torch_settings(args.threads)
    device = torch.device(args.device)
    model, loss_fn, data = bench.resnet_case(device, args.width, args.batch, args.steps)
    results: dict = {"command": " ".join([sys.executable, *sys.argv]), "torch": torch.__version__, "rows": {}}
    with isolated(model, "eval"):
        op, gradient = curvature_operator(ModelFunction(model, loss_fn, data))
        reference = lanczos_eigsh(op, k=8, which="top", tol=1e-8, max_iters=args.reference_iters,
                                  generator=torch.Generator().manual_seed(0), return_vectors=True)
    top = reference.vectors[:, :5]
    results["top_eigenvalues"] = reference.values.tolist()
    print("top eigenvalues", [round(v, 4) for v in reference.values.tolist()], flush=True)
    starts = candidates(model, data, gradient, op.size, torch.Generator().manual_seed(1))
    noise = unit(gaussian_vector(op.size, torch.Generator().manual_seed(5), gradient.dtype, gradient.device))
    with isolated(model, "eval"):
        op, _ = curvature_operator(ModelFunction(model, loss_fn, data))
        for name, v in starts.items():
            for weight in (1.0, 0.01):
                v0 = v + weight * noise
                share = float((top.T @ unit(v0).to(top.dtype)).pow(2).sum())
                run = lanczos_eigsh(op, k=5, which="top", tol=args.tol, v0=v0,
                                    generator=torch.Generator().manual_seed(0))
                error = max(bench.relative_errors(run.values, reference.values[:5]))
                results["rows"][f"{name} + {weight:g} gaussian"] = {"top5_share": share, "hvps": run.matvecs,
                                                                  "max_relative_error": error}
                print(f"{name:28s} + {weight:<4g} Gaussian: share of the top-5 eigenspace {share:.1e}, "
                      f"{run.matvecs} HVPs, max error {error:.1e}", flush=True)
    results["gaussian_share_expected"] = 5 / op.size
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
