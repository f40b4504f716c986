"""The Lens's cost control on a GPU: no synchronisation in lens.step(), a real out-of-memory error
inside a probe, and a Hessian measurement held within the memory budget. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlens as dl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).cuda()


def data(n: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (n,), generator=g).cuda()


def step(model, optimizer, batch):
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    return loss


def test_lens_step_never_synchronises_with_the_gpu_and_keeps_every_loss(tmp_path):
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = data()
    losses = []
    lens = dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp_path, basic=False)
    for _ in range(150):
        loss = step(model, optimizer, batch)
        losses.append(loss.detach())
        # any operation that waits for the device raises in this mode
        torch.cuda.set_sync_debug_mode("error")
        try:
            lens.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lens.close()
    stored = dl.load_run(tmp_path).series("train", "loss")
    assert stored.index.tolist() == list(range(1, 151))
    assert stored.tolist() == pytest.approx([float(v) for v in losses], rel=0, abs=0)


def test_the_host_counts_as_ahead_only_while_the_previous_steps_work_is_queued(tmp_path):
    """Lens.step()'s own time is free only when the host was a step ahead of the GPU: the event
    it records at the end of a step is still pending while training's queued work runs."""
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = data()
    lens = dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp_path, basic=False)
    assert not lens._host_ahead()  # no step yet
    step(model, optimizer, batch)
    torch.cuda._sleep(2_000_000_000)  # about a second of queued work on the device
    lens.step()
    assert lens._host_ahead()  # the work queued before the last step's end is still running
    torch.cuda.synchronize()
    assert not lens._host_ahead()  # the device has caught up: a host-bound job looks like this
    lens.close()


def test_the_basic_probes_wait_for_the_gpu_once_per_measurement_step(tmp_path):
    import warnings

    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = data()
    lens = dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp_path, budget=None)
    for _ in range(49):
        lens.step(loss=step(model, optimizer, batch))
    loss = step(model, optimizer, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lens.step(loss=loss)  # step 50: the four basic probes are due
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lens.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    run = dl.load_run(tmp_path)
    norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters()))
    # each tensor's norm is a float32 reduction (torch._foreach_norm), summed in float64
    assert run.series("param_norm", "total")[50] == pytest.approx(float(norm), rel=1e-6)


class Greedy(dl.Probe):
    """Allocates more than the process may have: a real CUDA out-of-memory error."""

    name = "greedy"
    pure = True

    def measure(self, ctx):
        free, total = torch.cuda.mem_get_info()
        hog = torch.empty(int(total * 0.5), dtype=torch.uint8, device="cuda")
        return {"bytes": float(hog.numel())}


def test_a_real_out_of_memory_error_in_a_probe_leaves_training_running(tmp_path):
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = data()
    torch.cuda.set_per_process_memory_fraction(0.2)
    try:
        with dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp_path, basic=False,
                     probes=[Greedy(every=2)], budget=None) as lens:
            for _ in range(4):
                lens.step(loss=step(model, optimizer, batch))
            assert lens.disabled == []
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    run = dl.load_run(tmp_path)
    events = run.events()
    assert (events.level == "warning").all() and events.message.str.contains("ran out of device memory").all()
    assert sorted(events.step) == [0, 2, 4]
    assert run.series("train", "loss").index.tolist() == [1, 2, 3, 4]


def test_the_hessian_probe_stays_within_its_memory_budget_and_matches_the_whole_batch(tmp_path):
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = data(256)
    for _ in range(3):
        step(model, optimizer, batch)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    budget = 64 * 2**20
    lens = dl.Lens(model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=tmp_path, basic=False,
                   probes=[dl.probes.Hessian(every=1, lambda_min=False, trace=False, tol=1e-6)],
                   budget=None, memory_budget=budget)
    lens.step(loss=step(model, optimizer, batch))
    torch.cuda.synchronize()
    in_use = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lens.step(loss=step(model, optimizer, batch))  # training raises its own peak, then the probe
    training_peak = lens.memory.training_peak
    probe_peak = torch.cuda.max_memory_allocated()
    lens.close()
    run = dl.load_run(tmp_path)
    at = run.scalars("hessian").query("step == 2").set_index("name")["value"]
    assert "chunk_size" in at, run.events().message.tolist()
    assert at["chunk_size"] < 256  # the batch was split to fit
    assert probe_peak <= max(training_peak, in_use) + budget
    exact = dl.hessian_eigenvalues(model, nn.CrossEntropyLoss(), batch, tol=1e-8)
    assert at["sharpness"] == pytest.approx(exact.max, rel=1e-4)
