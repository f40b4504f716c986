"""Which device memory a probe keeps between steps (CUDA): a diagnostic.

Trains the small CNN of ``tests/test_budget_cuda.py`` a few steps under a Lens with one probe,
and after each ``lens.step`` prints the bytes in use, the Lens's count of the probes' lasting
state (``lens.memory.retained``) and, for every block allocated since the Lens was created and
still alive, its size and the Python frames that allocated it (PyTorch's memory history).

    python benchmarks/lens_memory_trace.py --probe hessian --memory-budget-mib 64
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import torch
from torch import nn

import dynlens as dl


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).cuda()


def live_blocks() -> dict[int, dict]:
    """Active blocks by address, with their allocation frames."""
    blocks = {}
    for segment in torch.cuda.memory._snapshot()["segments"]:
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                blocks[address] = block
            address += block["size"]
    return blocks


def describe(block: dict) -> str:
    frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in block.get("frames", [])
              if "dynlens" in f["filename"] or "benchmarks" in f["filename"]]
    return f"{block['size'] / 2**20:8.2f} MiB  " + " <- ".join(frames[:6])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", default="hessian", choices=["hessian", "coherence", "ntk", "softmax_collapse"])
    parser.add_argument("--memory-budget-mib", type=float, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(256, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (256,), generator=g).cuda()

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    probe = {"hessian": lambda: dl.probes.Hessian(every=1, lambda_min=False, trace=False, tol=1e-6),
             "coherence": lambda: dl.probes.Coherence(every=1),
             "ntk": lambda: dl.probes.NTK(every=1),
             "softmax_collapse": lambda: dl.probes.SoftmaxCollapse(every=1)}[args.probe]()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    before = set(live_blocks())
    with tempfile.TemporaryDirectory() as tmp:
        lens = dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp, basic=False, probes=[probe],
                       budget=None, memory_budget=int(args.memory_budget_mib * 2**20))
        for i in range(args.steps):
            lens.step(loss=step())
            torch.cuda.synchronize()
            in_use = torch.cuda.memory_allocated()
            print(f"step {i + 1}: in use {in_use / 2**20:.1f} MiB, retained {lens.memory.retained / 2**20:.1f} MiB, "
                  f"training's peak {lens.memory.training_peak / 2**20:.1f} MiB", flush=True)
            kept = {a: b for a, b in live_blocks().items() if a not in before}
            for block in sorted(kept.values(), key=lambda b: -b["size"])[:8]:
                print("   ", describe(block), flush=True)
            gc.collect()
            print(f"   after gc.collect(): in use {torch.cuda.memory_allocated() / 2**20:.1f} MiB", flush=True)
        lens.close()
        events = dl.load_run(tmp).events()
        for message in events.message:
            print("event:", message[:300])
    torch.cuda.memory._record_memory_history(enabled=None)


if __name__ == "__main__":
    main()
