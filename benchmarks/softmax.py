"""What one SoftmaxCollapse measurement costs, in forward passes of the probe batch.

    python benchmarks/softmax.py                       # CPU: a small decoder and an MLP
    python benchmarks/softmax.py --device cuda --full  # GPU: the 124M decoder of the reference job

For each model: the median time of a forward pass of the probe batch (no grad, the model's
dtype, in dynlens's isolation as the probe runs), then of one SoftmaxCollapse measurement
without attention capture, with it, and of its NLM part (one gradient) alone; each as a ratio
to the forward pass (issue #13's targets: ≤ 1.5× without capture, ≤ 2.5× with), and in
training steps (forward, backward, AdamW step) for the cost model. Medians of ``--repeat``
alternating rounds, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402
from dynlens.probes.base import Context  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str) -> float:
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - began


def jobs(device: str, full: bool) -> dict[str, tuple[Any, Any, Any]]:
    torch.manual_seed(0)
    if full:
        decoder = models.gpt2().to(device)
        tokens = models.token_batch(8, 512, 50257)
    else:
        decoder = models.gpt2(vocab=2000, context=128, width=128, layers=2, heads=4).to(device)
        tokens = models.token_batch(8, 128, 2000)
    mlp = models.mlp(784, 512, 10, depth=2).to(device)
    images = (torch.randn(128, 784), torch.randint(0, 10, (128,)))
    return {
        "decoder": (decoder, models.language_model_loss, tuple(t.to(device) for t in tokens)),
        "mlp": (mlp, torch.nn.CrossEntropyLoss(), tuple(t.to(device) for t in images)),
    }


def measure(name: str, model: Any, loss_fn: Any, batch: Any, device: str, repeat: int) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx_args = {"model": model, "loss_fn": loss_fn, "probe_batch": batch, "optimizer": None, "step": 1}

    def forward() -> None:
        with dl.functional.isolated(model), torch.no_grad():
            model(batch[0])

    def probe(attention: bool) -> None:
        ctx = Context(**ctx_args, allowance=-1.0)  # no time for the NLM part: the per-step cost
        p = dl.probes.SoftmaxCollapse(attention=attention)
        p._nlm.tick()  # its first measurement is past: NLM not due
        with dl.functional.isolated(model):
            p.measure(ctx)

    def nlm() -> None:
        with dl.functional.isolated(model):
            dl.nlm_alignment(model, loss_fn, batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parts = {"forward": forward, "without_attention": lambda: probe(False), "with_attention": lambda: probe(True),
             "nlm": nlm, "training_step": step}
    for fn in parts.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeat):
        for key, fn in parts.items():
            times[key].append(_timed(fn, device))
    model.load_state_dict(state)
    median = {k: statistics.median(v) for k, v in times.items()}
    row = {"seconds": median,
           "forward_passes": {k: median[k] / median["forward"] for k in ("without_attention", "with_attention", "nlm")},
           "training_steps": {k: median[k] / median["training_step"] for k in ("without_attention", "with_attention",
                                                                                 "nlm")}}
    print(name, json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="the 124M decoder of the GPU reference job")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, (model, loss_fn, batch) in jobs(args.device, args.full).items():
        results[name] = measure(name, model, loss_fn, batch, args.device, args.repeat)
    path = os.path.join(os.environ.get("OUT", "."), "softmax.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
