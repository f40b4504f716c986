"""The Hessian probe's stopped first tries: how much of a stopped try the next one keeps.

    python benchmarks/hessian_restart.py --device cuda --out hessian_restart.json
    python benchmarks/hessian_restart.py --device cpu --small --out hessian_restart_cpu.json

A probe's first measurement has no cost to predict from, so the Lens runs it to a deadline; a
try stopped there is tried again later with twice the time. Before the restart, every try began
cold and a try stopped at 1 s and then at 2 s did not help the third. Now a stopped try keeps
the Ritz vectors of the products it did, and the next starts from them (``Hessian._restart``).

For each deadline, on the 124M decoder (AdamW, bf16 autocast training, as in ``ddp_gpu.py``; a
probe batch of 8 sequences of 256 tokens; ``--small``: a 2-layer decoder on the CPU): train
``--warmup`` steps; a Hessian probe's measurement with that deadline (stopped, or finished);
``--gap`` more training steps (the parameters move, as between a Lens's tries); then, at the same
parameters, the stopped probe's next measurement (from its Ritz vectors) and a fresh probe's
(cold), in alternating order, each without a deadline (a first try that finished within its
deadline is recorded alone). Recorded: the products, the seconds and
the compared sharpness of each, and their relative difference. The probe runs with its
defaults except the optional parts (λ_min, trace, density), which a first try under a deadline
does not run; with AdamW the compared value is the preconditioned sharpness
(``--probe-optimizer none``: λ_max of the loss).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402
from dynlens.budget import OverBudget  # noqa: E402
from dynlens.isolation import isolated  # noqa: E402
from dynlens.probes import Context  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer decoder of width 64, vocabulary 500")
    parser.add_argument("--deadlines", type=float, nargs="+", default=[1.0, 2.0],
                        help="seconds of the first try (the Lens's FIRST_SECONDS is 1)")
    parser.add_argument("--warmup", type=int, default=30, help="training steps before the first try")
    parser.add_argument("--gap", type=int, default=100, help="training steps between the try and the next")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--probe-sequences", type=int, default=8)
    parser.add_argument("--probe-length", type=int, default=256)
    parser.add_argument("--probe-optimizer", choices=("adamw", "none"), default="adamw",
                        help="what the probe is told of the optimizer: AdamW (the compared value is the "
                             "preconditioned sharpness) or none (λ_max of the loss itself)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any], steps: int,
          device: torch.device) -> None:
    for i in range(steps):
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = models.language_model_loss(model(x), y)
        loss.backward()
        optimizer.step()
    sync(device)


def measured(probe: dl.probes.Hessian, ctx: Context, device: torch.device) -> dict[str, Any]:
    sync(device)
    start = time.perf_counter()
    try:
        with isolated(ctx.model, probe.mode):  # as the Lens runs it (eval mode, attention's math kernel)
            values = probe.measure(ctx)
    except OverBudget:
        sync(device)
        return {"stopped": True, "seconds": time.perf_counter() - start,
                "kept": sorted(probe._restart)}
    sync(device)
    key = "preconditioned_sharpness" if "preconditioned_sharpness" in values else "sharpness"
    return {"stopped": False, "seconds": time.perf_counter() - start, "products": probe._last.compared_products,
            "all_products": values["hvps"], "value": values[key], "value_name": key,
            "warm_start": values.get("warm_start")}


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    vocab = 500 if args.small else 50257
    torch.manual_seed(0)
    model = (models.gpt2(vocab=500, context=64, width=64, layers=2, heads=2) if args.small
             else models.gpt2()).to(device)
    if args.small:
        args.length, args.probe_length = min(args.length, 32), min(args.probe_length, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batches = [tuple(t.to(device) for t in models.token_batch(args.batch, args.length, vocab, seed=i))
               for i in range(4)]
    probe_batch = tuple(t.to(device) for t in models.token_batch(args.probe_sequences, args.probe_length,
                                                                 vocab, seed=99))
    options = dict(lambda_min=False, trace=False, density=False)
    train(model, optimizer, batches, args.warmup, device)

    def context(deadline: float) -> Context:
        now = time.perf_counter()
        return Context(model=model, loss_fn=models.language_model_loss, probe_batch=probe_batch,
                       optimizer=optimizer if args.probe_optimizer == "adamw" else None, step=0,
                       allowance=deadline,
                       deadline=now + deadline if deadline != math.inf else math.inf)

    rows = []
    for i, deadline in enumerate(args.deadlines):
        probe = dl.probes.Hessian(**options)
        first = measured(probe, context(deadline), device)
        train(model, optimizer, batches, args.gap, device)
        if not first["stopped"]:  # it finished within its deadline: nothing to go on from
            rows.append({"deadline_s": deadline, "first": first})
            print(json.dumps(rows[-1]), flush=True)
            continue
        order = ("restart", "cold") if i % 2 == 0 else ("cold", "restart")
        result: dict[str, Any] = {"deadline_s": deadline, "first": first}
        for which in order:
            result[which] = measured(probe if which == "restart" else dl.probes.Hessian(**options),
                                     context(math.inf), device)
        restart, cold = result["restart"], result["cold"]
        result["relative_difference"] = abs(restart["value"] - cold["value"]) / abs(cold["value"])
        result["products_ratio"] = restart["products"] / cold["products"]
        result["seconds_ratio"] = restart["seconds"] / cold["seconds"]
        rows.append(result)
        print(json.dumps(result), flush=True)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "arguments": vars(args), "parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
