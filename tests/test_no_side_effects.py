"""Promise 1: attaching every probe never changes the training trajectory (bit for bit)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from helpers import bn_dropout_cnn, image_data, process_settings, train

import dynlens as dl


def every_probe() -> list[dl.Probe]:
    """Every built-in probe (basic ones and all of probes.default()), on a dense schedule, with
    their optional parts on dense sub-schedules too (the Hessian's λ_min, trace and density every
    2nd measurement from warm-started eigenvectors, products over sub-batches of 5; stiffness
    every 2nd)."""
    probes = [p.with_schedule(every=4) for p in dl.probes.basic()]
    options = {"hessian": {"extras_every": 2, "density": True, "density_iters": 8, "chunk_size": 5},
               "coherence": {"stiffness_every": 2}}
    probes += [type(p)(every=7, **options.get(p.name, {})) for p in dl.probes.default()]
    return probes


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


class _CheckpointedCNN(torch.nn.Module):
    """bn_dropout_cnn run under non-reentrant activation checkpointing (dropout included)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = bn_dropout_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.net, x, use_reentrant=False)


def final_state(kind: str, tmp_path, with_lens: bool, compiled: bool = False, checkpointed: bool = False,
                budget: float | None = None):
    model = _CheckpointedCNN() if checkpointed else bn_dropout_cnn()
    optimizer = make_optimizer(kind, model)
    data = image_data()
    random.seed(0)
    np.random.seed(0)
    # compiled: training runs torch.compile'd code (aot_autograd: no double backward), and the
    # Lens gets the compiled wrapper, as a user would pass it
    trained = torch.compile(model, backend="aot_eager") if compiled else model
    lens = None
    settings = process_settings()
    if with_lens:
        lens = dl.Lens(trained, torch.nn.CrossEntropyLoss(), probe_batch=image_data(24, seed=5),
                       optimizer=optimizer, run_dir=tmp_path / kind, probes=every_probe(), budget=budget)
    train(trained, optimizer, data, steps=30, lens=lens)
    if lens is not None:
        lens.close()
        messages = dl.load_run(tmp_path / kind).events().message.tolist()
        assert lens.disabled == [] and not [m for m in messages if "failed" in m], messages
        # nor any process-wide setting: cuBLAS's fp32_precision was left "ieee" after every
        # measurement (assigning allow_tf32 on torch >= 2.9 writes it)
        assert process_settings() == settings
    after = (random.random(), float(np.random.rand()), torch.rand(1).item())
    return model, optimizer, after


@pytest.mark.parametrize("kind", ["sgd", "adam", "sgd-compiled", "adam-checkpointed", "sgd-budget"])
def test_training_with_all_probes_is_bit_identical_to_training_without(kind, tmp_path):
    kind, _, variant = kind.partition("-")
    # "budget": the default time budget defers measurements (the loss of every step is kept)
    options = {"compiled": variant == "compiled", "checkpointed": variant == "checkpointed",
               "budget": 0.05 if variant == "budget" else None}
    plain, plain_opt, plain_rng = final_state(kind, tmp_path, with_lens=False, **options)
    watched, watched_opt, watched_rng = final_state(kind, tmp_path, with_lens=True, **options)
    for (name, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(a, b), f"parameter {name} differs"
    for (name, a), (_, b) in zip(plain.named_buffers(), watched.named_buffers()):
        assert torch.equal(a, b), f"buffer {name} differs"
    for state_a, state_b in zip(plain_opt.state.values(), watched_opt.state.values()):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key
    assert plain_rng == watched_rng
    run = dl.load_run(tmp_path / kind)
    recorded = set(run.probes())
    assert {p.name for p in every_probe()} <= recorded | {"update_size"}
    assert run.series("train", "loss").index.tolist() == list(range(1, 31))


def test_the_test_can_fail_a_probe_that_moves_batchnorm_statistics_is_caught(tmp_path):
    """A deliberately impure measurement (train-mode forward) would move the BatchNorm running
    statistics; the Lens must restore them, so training stays bit-identical."""

    class Careless(dl.Probe):
        name = "careless"
        mode = "train"

        def measure(self, ctx):
            ctx.model(ctx.probe_batch[0]).sum().backward()
            torch.rand(10)
            return {"x": 1.0}

    plain, _, _ = final_state("sgd", tmp_path / "a", with_lens=False)
    model = bn_dropout_cnn()
    optimizer = make_optimizer("sgd", model)
    random.seed(0)
    np.random.seed(0)
    lens = dl.Lens(model, torch.nn.CrossEntropyLoss(), probe_batch=image_data(24, seed=5),
                   optimizer=optimizer, run_dir=tmp_path / "b", probes=[Careless(every=3)], budget=None)
    train(model, optimizer, image_data(), steps=30, lens=lens)
    lens.close()
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.buffers(), model.buffers()):
        assert torch.equal(a, b)
