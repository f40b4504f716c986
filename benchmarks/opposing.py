"""What the opposing-signals probe's ledger costs, in training steps.

    python benchmarks/opposing.py                 # CPU: an MLP and a small CNN
    python benchmarks/opposing.py --device cuda   # GPU: ResNet-18 (batch 256) as in overhead_gpu.py

For each model: the median time of a training step (forward, backward, SGD step) on a batch,
and of one ledger entry (``dynlens.measures.opposing.ledger_entry``: every tracked example's
loss, p(y) and correctness, eval mode, no autograd) for a tracked set as large as the batch
and 10× larger; the ratio is the probe's cost in training steps (its cost model). Also the
bytes one measurement adds to the run database (9 per example). Medians of ``--repeat``
alternating rounds in one process. ``--ledger-size N T`` also writes a run holding a ledger of N
examples over T steps as the probe stores it, and times reading it back
(``dl.rules.opposing_signals.ledger_of``) and its size on disk.
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
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

from dynlens.measures.opposing import ledger_entry  # noqa: E402


def _timed(fn: Any, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def cases(device: str) -> dict[str, tuple[nn.Module, int, tuple[int, ...]]]:
    if device == "cuda":
        return {"resnet18": (models.resnet18(), 256, (3, 32, 32))}
    return {"mlp": (models.mlp(784, 512, 10, depth=2), 128, (784,)),
            "cnn": (models.small_cnn(3, 16, 10), 128, (3, 32, 32))}


def measure(model: nn.Module, batch: int, shape: tuple[int, ...], device: str, repeat: int) -> dict[str, Any]:
    """One model's training step and ledger entries (1× and 10× the batch), medians in seconds."""
    torch.manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch * 10, *shape, device=device), torch.randint(0, 10, (batch * 10,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x[:batch]), y[:batch]).backward()
        optimizer.step()

    parts = {"training_step": step,
             "ledger_1x": lambda: ledger_entry(model, loss_fn, (x[:batch], y[:batch])),
             "ledger_10x": lambda: ledger_entry(model, loss_fn, (x, y), chunk_size=batch)}
    for fn in parts.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeat):
        for key, fn in parts.items():
            times[key].append(_timed(fn, device))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": median, "batch": batch,
            "training_steps": {k: median[k] / median["training_step"] for k in ("ledger_1x", "ledger_10x")},
            "bytes_per_measurement": {"ledger_1x": 9 * batch, "ledger_10x": 90 * batch}}


def stored_ledger(examples: int, steps: int) -> dict[str, Any]:
    """Write a run with a ledger of ``examples`` × ``steps`` as the probe stores it; time reading
    it back and measure the database."""
    import tempfile

    import numpy as np

    import dynlens as dl
    from dynlens.rules.opposing_signals import ledger_of
    from dynlens.store import RunWriter

    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(examples)]
    with tempfile.TemporaryDirectory() as path:
        writer = RunWriter(path)
        writer.array(0, "opposing_signals", "labels", rng.integers(0, 10, examples))
        for step in range(steps):
            for name in ("loss", "p_y", "correct"):
                values = rng.random(examples, dtype=np.float32)
                writer.array(step, "opposing_signals", name, (values > 0.5).astype(np.uint8) if name == "correct" else values)
                writer.array_labels(step, "opposing_signals", name, ids)
            writer.commit()
        writer.close()
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        times = []
        for _ in range(3):
            began = time.perf_counter()
            ledger = ledger_of(dl.load_run(path))
            times.append(time.perf_counter() - began)
    return {"examples": examples, "steps": steps, "database_bytes": size, "load_seconds": statistics.median(times),
            "ledger_bytes": ledger.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--ledger-size", type=int, nargs=2, default=None, metavar=("N", "T"))
    args = parser.parse_args()
    if args.ledger_size:
        print(json.dumps(stored_ledger(*args.ledger_size)), flush=True)
        return
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, (model, batch, shape) in cases(args.device).items():
        results[name] = measure(model, batch, shape, args.device, args.repeat)
        print(name, json.dumps(results[name], indent=1), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "opposing.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
