"""The NTK probe's relative parameter change, ‖θ − θ₀‖/‖θ₀‖: what it adds to a measurement, in
training steps of the two reference jobs.

    python benchmarks/ntk_parameter_change.py --device cuda --out ntk_parameter_change.json

For each job (the ResNet-18 on 256 images of 32×32, SGD with momentum; the 124M decoder on 8
sequences of 512 tokens, AdamW; both with bf16 autocast on CUDA, as in ``overhead_gpu.py``) it
times, with the device synchronised: one training step (median of ``--steps`` after warm-up),
the probe's host copy of the parameters at its first kernel (``NTK._kept_parameters``, once),
and the change against that copy (``_relative_change``: the copy read back to the device in
64-MB pieces, median of ``--repeat``), and checks the change against ‖θ − θ₀‖/‖θ₀‖ computed from
the concatenated parameters on the host in float64.
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
from dynlens.probes.ntk import _relative_change  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Any) -> tuple[float, Any]:
    sync(device)
    began = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - began, result


def job(name: str, device: torch.device) -> tuple[torch.nn.Module, Any, Any]:
    """(model, optimizer, a training step's closure) of a reference job."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = models.resnet18().to(device)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = (t.to(device) for t in models.image_batch(256, seed=0))

        def loss() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(x), y)
    else:
        model = models.gpt2().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        x, y = (t.to(device) for t in models.token_batch(8, 512, 50257, seed=0))

        def loss() -> torch.Tensor:
            return models.language_model_loss(model(x), y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = loss()
        value.backward()
        optimizer.step()

    return model, optimizer, step


def measure(name: str, device: torch.device, steps: int, repeat: int) -> dict[str, Any]:
    model, _, step = job(name, device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    probe = dl.probes.NTK()
    copy_seconds, kept = timed(device, lambda: probe._kept_parameters(parameters))
    assert kept is not None, "the model is past PARAMETER_COPY_BYTES"
    initial, norm = kept
    for _ in range(3):
        step()
    step_times = [timed(device, step)[0] for _ in range(steps)]
    change_times, change = [], float("nan")
    for _ in range(repeat):
        seconds, change = timed(device, lambda: _relative_change(parameters, initial, norm))
        change_times.append(seconds)
    now = torch.cat([p.detach().reshape(-1).double().cpu() for p in parameters])
    then = torch.cat([p.reshape(-1).double() for p in initial])
    oracle = float((now - then).norm() / then.norm())
    training_step = statistics.median(step_times)
    return {
        "parameters": sum(p.numel() for p in parameters),
        "bytes": sum(p.numel() * p.element_size() for p in parameters),
        "training_step_s": training_step, "host_copy_s": copy_seconds,
        "change_s_median": statistics.median(change_times), "change_s_all": change_times,
        "change_in_training_steps": statistics.median(change_times) / training_step,
        "change": change, "oracle": oracle, "relative_error": abs(change - oracle) / max(oracle, 1e-300),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", nargs="+", default=["resnet18", "gpt2"], choices=["resnet18", "gpt2"])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--repeat", type=int, default=5, help="timed parameter changes (median)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "jobs": {}}
    for name in args.jobs:
        results["jobs"][name] = found = measure(name, device, args.steps, args.repeat)
        print(json.dumps({name: {k: v for k, v in found.items() if k != "change_s_all"}}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
