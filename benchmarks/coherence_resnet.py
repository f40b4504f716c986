"""Gradient coherence on ResNet-18 on a GPU: layer hooks against vmap, eagerly.

Times ``dl.gradient_coherence`` with ``hooks=True`` and ``hooks=False`` (no CUDA graph: a
ResNet-18's per-example pass is beyond their memory cap) against one batch backward, for width 16
with m = 256 and width 64 with m = 64, TF32 off. This decided ``hooks="auto"`` on GPUs (vmap for
models with convolutions).

    python benchmarks/coherence_resnet.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from hessian import best_time, torch_settings  # noqa: E402

import dynlens as dl  # noqa: E402


def measure(device: torch.device, width: int, m: int) -> dict:
    """{method: (ms, × batch backward)} for ResNet-18 of ``width`` on a batch of ``m``."""
    torch.manual_seed(0)
    model = models.resnet18(width=width).to(device).eval()
    x, y = models.image_batch(m, seed=0)
    x, y = x.to(device), y.to(device)
    loss_fn = nn.CrossEntropyLoss()

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    base = best_time(backward, device, 3)
    row: dict = {"batch_backward_ms": round(base * 1e3, 2)}
    for hooks in (True, False):
        for stiffness in (False, True):
            seconds = best_time(lambda h=hooks, s=stiffness: dl.gradient_coherence(
                model, loss_fn, (x, y), hooks=h, stiffness=s, graphs=False), device, 3)
            row[f"hooks={hooks}, stiffness={stiffness}"] = (round(seconds * 1e3, 1), round(seconds / base, 1))
    return row


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch_settings(None)
    for width, m in ((16, 256), (64, 64)):
        print(f"ResNet-18 width {width}, m = {m}: {measure(torch.device('cuda'), width, m)}", flush=True)


if __name__ == "__main__":
    main()
