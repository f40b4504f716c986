"""Calibration run for the GPU cost model: training step time and memory of the two reference
jobs, and the memory and time of gradients and Hessian-vector products over sub-batches.

    python benchmarks/explore_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

from dynlens.functional import ModelFunction, flatten, isolated, slice_examples  # noqa: E402

GiB = 2**30


def job(name: str, device: str):
    torch.manual_seed(0)
    if name == "resnet":
        model = models.resnet18().to(device)
        x, y = models.image_batch(256)
        loss_fn = torch.nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        subs = [1, 16, 32, 64, 128]
    else:
        model = models.gpt2().to(device)
        x, y = models.token_batch(8, 512, 50257)
        loss_fn = models.language_model_loss
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        subs = [1, 2, 4]
    return model, loss_fn, opt, (x.to(device), y.to(device)), subs


def train_steps(model, loss_fn, opt, batch, steps, device):
    x, y = batch
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()


def peak_of(call, device):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out, (torch.cuda.max_memory_allocated() - base) / GiB, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="resnet,gpt2")
    args = parser.parse_args()
    device = args.device
    results = {}
    for name in args.only.split(","):
        r: dict = {}
        model, loss_fn, opt, batch, subs = job(name, device)
        train_steps(model, loss_fn, opt, batch, 5, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train_steps(model, loss_fn, opt, batch, 30, device)
        torch.cuda.synchronize()
        r["step_ms"] = (time.perf_counter() - start) / 30 * 1e3
        r["train_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        r["in_use_between_steps_gib"] = torch.cuda.memory_allocated() / GiB
        x, y = batch
        for b in subs:
            sub = (slice_examples(x, 0, b), slice_examples(y, 0, b))
            row: dict = {}
            with isolated(model, "eval", 0):
                fn = ModelFunction(model, loss_fn, sub)
                # retained memory of a plain forward with grad (saved tensors)
                leaves = {n: t.detach().requires_grad_(True) for n, t in fn.params.items()}
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                with torch.enable_grad():
                    value = fn.loss(leaves)
                torch.cuda.synchronize()
                row["forward_retained_gib"] = (torch.cuda.memory_allocated() - before) / GiB
                del value, leaves
                v = torch.randn(fn.num_params, device=device)

                def gradient(fn=fn):
                    return flatten(fn.grad())

                def forward_over_reverse(fn=fn, v=v):
                    return flatten(fn.hvp(fn.as_params(v)))

                def reuse(fn=fn, v=v):
                    single, _, _ = fn.curvature_products("hessian", "reuse")
                    single(v)
                    return single(v)

                _, row["grad_peak_gib"], row["grad_s"] = peak_of(gradient, device)
                _, row["hvp_for_peak_gib"], _ = peak_of(forward_over_reverse, device)
                _, _, row["hvp_for_s"] = peak_of(forward_over_reverse, device)
                try:
                    _, row["hvp_reuse_peak_gib"], row["hvp_reuse_2_s"] = peak_of(reuse, device)
                except Exception as err:  # noqa: BLE001
                    row["reuse_error"] = repr(err)[:200]
                del fn, v, gradient, forward_over_reverse, reuse
            torch.cuda.empty_cache()
            r[f"sub{b}"] = row
            print(name, b, json.dumps(row), flush=True)
        results[name] = r
        print(name, json.dumps(r, indent=1), flush=True)
        del model, opt
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "explore_memory.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
