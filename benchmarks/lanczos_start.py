"""Does starting Lanczos from the gradient save Hessian-vector products for the top-5 eigenvalues?

ResNet-18 (the issue's setting on the GPU, width 8 and batch 32 on the CPU), at random
initialisation and after a few SGD steps on the batch, as in ``benchmarks/hessian.py``. For
seeds 0..S-1: ``dl.hessian_eigenvalues(k=5, tol=...)`` from a Gaussian start (``start="random"``)
and from the unit gradient plus a unit Gaussian vector (``start="gradient"``): HVPs and the
largest relative error against a 150-step Lanczos reference. PyHessian's top-5 HVP count and
error (its defaults) are the yardstick: the issue asks for a third of its HVPs at a tenth of its
error. PyHessian starts its power iterations from random vectors too, so its count is measured
for ``--pyhessian-seeds`` seeds of torch's global generator (0, 1, ...), and the ratios printed
are of the medians over seeds (the worst case beside them).

    python benchmarks/lanczos_start.py --device cuda
    python benchmarks/lanczos_start.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import hessian as bench  # noqa: E402

import dynlens as dl  # noqa: E402

SETTINGS = {"cuda": {"width": 64, "batch": 256, "steps": [0, 20]},
            "cpu": {"width": 8, "batch": 32, "steps": [0, 10]}}


def scenario(device: torch.device, width: int, batch: int, steps: int, seeds: int, tols: list[float],
             pyhessian_seeds: range, ks: list[int], model_seed: int = 0) -> dict:
    model, loss_fn, data = bench.resnet_case(device, width, batch, steps, model_seed)
    reference = torch.tensor(bench.plain_lanczos(model, loss_fn, data, device, k=5, steps=150)["values"],
                             dtype=torch.float64)
    out: dict = {"train_steps": steps, "model_seed": model_seed, "reference": reference.tolist(), "runs": {}}
    for k, tol, start in ((k, tol, start) for k in ks for tol in tols for start in ("random", "gradient")):
        rows = []
        for seed in range(seeds):
            result = dl.hessian_eigenvalues(model, loss_fn, data, k=k, tol=tol, start=start, seed=seed)
            error = max(bench.relative_errors(result.values, reference[:k]))
            rows.append({"seed": seed, "hvps": result.matvecs, "error": error, "seconds": result.elapsed})
        out["runs"][f"k={k} tol={tol:g} start={start}"] = {
            "k": k, "rows": rows, "hvps_median": statistics.median(r["hvps"] for r in rows),
            "hvps_max": max(r["hvps"] for r in rows), "error_max": max(r["error"] for r in rows)}
    py_rows: dict[str, list[dict]] = {"top1": [], "top5": []}
    for seed in pyhessian_seeds:
        py = bench.pyhessian_runs(model, loss_fn, data, device, 1, seed=seed, spectra_only=True)
        for name, rows in py_rows.items():
            if name in py:
                values = torch.tensor(py[name]["values"])
                rows.append({"seed": seed, "hvps": py[name]["hvps"], "seconds": py[name]["seconds"],
                             "error": max(bench.relative_errors(values, reference[:len(values)]))})
    for name, rows in py_rows.items():
        if rows:
            out[f"pyhessian_{name}"] = {"rows": rows, "hvps": statistics.median(r["hvps"] for r in rows),
                                        "hvps_min": min(r["hvps"] for r in rows),
                                        "seconds": statistics.median(r["seconds"] for r in rows),
                                        "error": statistics.median(r["error"] for r in rows),
                                        "error_min": min(r["error"] for r in rows)}
    return out


def pyhessian_line(py: dict) -> str:
    """PyHessian's HVP counts and errors over its seeds, for the printout."""
    errors = ", ".join(f"{row['error']:.1e}" for row in py["rows"])
    return f"HVPs {[row['hvps'] for row in py['rows']]} (median {py['hvps']:g}), errors {errors}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tols", default="1e-2,1e-3")
    parser.add_argument("--ks", default="5", help="numbers of top eigenvalues, comma-separated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pyhessian-seeds", default="1",
                        help="seeds of PyHessian's random start vectors: N for 0..N-1 (0: no PyHessian), "
                             "or A-B for A..B")
    parser.add_argument("--model-seed", type=int, default=0,
                        help="seed of the ResNet-18's initialisation (the batch stays seed 0's)")
    parser.add_argument("--train-steps", default=None,
                        help="SGD steps before measuring, comma-separated (default: the device's setting)")
    parser.add_argument("--no-pyhessian", action="store_true", help="the same as --pyhessian-seeds 0")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    bench.torch_settings(args.threads)
    device = torch.device(args.device)
    setting = SETTINGS[args.device]
    tols = [float(t) for t in args.tols.split(",")]
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "command": " ".join([sys.executable, *sys.argv]), "scenarios": []}
    first, _, last = args.pyhessian_seeds.partition("-")
    pyhessian_seeds = range(int(first), int(last) + 1) if last else range(int(first))
    if args.no_pyhessian:
        pyhessian_seeds = range(0)
    train_steps = [int(s) for s in args.train_steps.split(",")] if args.train_steps else setting["steps"]
    for steps in train_steps:
        found = scenario(device, setting["width"], setting["batch"], steps, args.seeds, tols,
                         pyhessian_seeds, [int(k) for k in args.ks.split(",")], args.model_seed)
        results["scenarios"].append(found)
        print(f"ResNet-18 width {setting['width']} (init seed {args.model_seed}), batch {setting['batch']}, "
              f"after {steps} steps"
              + "".join(f"; PyHessian top-{n}: {pyhessian_line(py)}"
                        for n in (1, 5) if (py := found.get(f"pyhessian_top{n}"))))
        for name, run in found["runs"].items():
            py = found.get(f"pyhessian_top{run['k']}")
            ratio = (f", median HVPs / PyHessian's median {run['hvps_median'] / py['hvps']:.3f} (worst: our max over "
                     f"its min {run['hvps_max'] / py['hvps_min']:.3f}); PyHessian's median error / our max "
                     f"{py['error'] / run['error_max']:.0f}" if py else "")
            print(f"  {name}: HVPs {[r['hvps'] for r in run['rows']]}, max error {run['error_max']:.1e}{ratio}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
