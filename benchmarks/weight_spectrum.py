"""One WeightSpectrum measurement against one training step of the same model, on the CPU.

    python benchmarks/weight_spectrum.py

ResNet-18 (batch 64 of 32×32 images) and the 124M decoder (2 sequences of 128 tokens): the
seconds of ``dynlens.measures.weight_spectrum.weight_spectrum`` (every weight matrix's σ_max by
Lanczos at tol 1e-4, and its stable rank) and of one SGD training step, after a warm-up.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

from dynlens.measures.weight_spectrum import weight_spectrum  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    cases = [("resnet18", models.resnet18(), models.image_batch(64), torch.nn.CrossEntropyLoss()),
             ("decoder-124M", models.gpt2(), models.token_batch(2, 128, 50257), models.language_model_loss)]
    for name, model, batch, loss_fn in cases:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, batch=batch, loss_fn=loss_fn, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            optimizer.step()

        step()
        weight_spectrum(model)
        began = time.perf_counter()
        step()
        training = time.perf_counter() - began
        began = time.perf_counter()
        result = weight_spectrum(model)
        spectrum = time.perf_counter() - began
        print(f"{name}: {len(result.names)} matrices, {int(result.products.sum())} products, "
              f"{spectrum:.3f} s against a training step's {training:.3f} s ({spectrum / training:.2f} steps)")


if __name__ == "__main__":
    main()
