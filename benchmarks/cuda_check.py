"""CUDA check of the Lens: every built-in probe on a small CNN trained on the GPU.

Checks that probes run on the model's device without errors, that the CUDA and CPU random
states are what they were (so dropout masks in training are unchanged), that `.grad` and the
BatchNorm buffers are untouched by a measurement, and reports each probe's seconds per call
against a training step.

    python benchmarks/cuda_check.py
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from torch import nn

import dynlens as dl


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 8 * 8, 10)).to(device)
    x = torch.randn(512, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (512,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    probes = [p.with_schedule(every=10) for p in dl.probes.default()]
    with tempfile.TemporaryDirectory() as tmp:
        lens = dl.Lens(model, loss_fn, (x[:128].cpu(), y[:128].cpu()), opt, run_dir=tmp, probes=probes)
        steps, start = 0, time.perf_counter()
        for _ in range(3):
            for idx in torch.randperm(512, device=device).split(64):
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                cuda_state, cpu_state = torch.cuda.get_rng_state(), torch.get_rng_state()
                grads = [p.grad.clone() for p in model.parameters()]
                buffers = [b.clone() for b in model.buffers()]
                lens.step(loss=loss)
                steps += 1
                assert torch.equal(cuda_state, torch.cuda.get_rng_state()), "CUDA RNG moved"
                assert torch.equal(cpu_state, torch.get_rng_state()), "CPU RNG moved"
                assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
                assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        lens.close()
        run = dl.load_run(tmp)
        events = run.events()
        seconds = run.scalars("lens").groupby("name").value.median().to_dict()
        result = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "steps": steps,
            "seconds_per_step_with_probes": total / steps,
            "probe_seconds_median": seconds,
            "sharpness_last": float(run.series("hessian", "sharpness").iloc[-1]),
            "m_coherence_last": float(run.series("coherence", "m_coherence").iloc[-1]),
            "events": events.message.tolist(),
        }
    print(json.dumps(result, indent=2))
    assert events.empty, "a probe failed on CUDA"
    print("cuda check: OK")


if __name__ == "__main__":
    main()
