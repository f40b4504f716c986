"""dl.probes.Hessian: what it records, the stability thresholds it reads from the optimizer, and
that it neither changes training nor stops it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import dense_hessian, precision_settings, sgd_steps, single_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn

import dynlens as dl
from dynlens.probes.base import Context
from dynlens.probes.hessian import (
    ACTIVATION_FACTOR,
    FIXED_VECTORS,
    WARM_PRODUCTS,
    hvp_chunk_size,
    stability_threshold,
)

LOSS = nn.CrossEntropyLoss()


def _setup(seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, steps: int, lens=None) -> None:  # noqa: ANN001
    sgd_steps(model, LOSS, batch, optimizer, lens, steps)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: torch.optim.SGD(p, lr=0.1), ("gd", 20.0)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ("momentum", 38.0)),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True), ("momentum", 30.0)),
    (lambda p: torch.optim.Adam(p, lr=0.01), ("adam", 3800.0)),
    (lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.999)), ("adam", 3.6 / 0.2 / 0.01)),
])
def test_stability_threshold_follows_the_optimizer(make, expected) -> None:  # noqa: ANN001
    model, _ = _setup()
    kind, value = stability_threshold(make(model.parameters()))
    assert kind == expected[0] and math.isclose(value, expected[1], rel_tol=1e-12)


def test_probe_records_eigenvalues_threshold_trace_and_density(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = dl.probes.Hessian(every=2, k=3, density=True, density_runs=2, density_iters=10, trace_samples=12,
                              tol=1e-4, extras_every=1)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path, probes=[probe], budget=None) as lens:
        _train(model, optimizer, batch, 2, lens)
        expected = dl.hessian_eigenvalues(model, LOSS, batch, k=3)
        lam_min = dl.hessian_eigenvalues(model, LOSS, batch, k=1, which="bottom", tol=1e-6).min
        trace = dl.hessian_trace(model, LOSS, batch, samples=60)
    run = dl.load_run(tmp_path)
    names = set(run.scalar_names("hessian"))
    assert {"sharpness", "lambda_2", "lambda_3", "lambda_min", "threshold", "sharpness_ratio", "trace",
            "trace_stderr", "sgd_trace_ratio", "hvps", "residual_max"} <= names
    assert set(run.array_names("hessian")) == {"density_nodes", "density_weights"}
    at = run.scalars("hessian").query("step == 2").set_index("name")["value"]
    assert math.isclose(at["sharpness"], float(expected.values[0]), rel_tol=1e-6)
    assert math.isclose(at["lambda_3"], float(expected.values[2]), rel_tol=1e-6)
    assert math.isclose(at["lambda_min"], lam_min, rel_tol=1e-2)
    assert at["threshold"] == pytest.approx(20.0)
    assert at["sharpness_ratio"] == pytest.approx(at["sharpness"] / 20.0)
    assert abs(at["trace"] - trace.value) <= 3 * (at["trace_stderr"] + trace.stderr)
    assert at["sgd_trace_ratio"] == pytest.approx(0.1 * at["trace"] / 2)
    assert at["residual_max"] <= 1e-4


def test_adam_ratio_uses_the_preconditioned_sharpness(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = dl.probes.Hessian(every=3, trace=False, lambda_min=False, tol=1e-4)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path, probes=[probe], budget=None) as lens:
        _train(model, optimizer, batch, 3, lens)
        expected = dl.hessian_eigenvalues(model, LOSS, batch, preconditioner=optimizer).max
    series = dl.load_run(tmp_path).series("hessian", "preconditioned_sharpness")
    assert 0 not in series.index  # no Adam state before the first step
    assert math.isclose(series[3], expected, rel_tol=1e-6)
    ratio = dl.load_run(tmp_path).series("hessian", "sharpness_ratio")
    assert math.isclose(ratio[3], expected / 3800.0, rel_tol=1e-6)


def test_under_adam_the_preconditioned_sharpness_is_tracked_and_raw_sharpness_is_sparser(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=1, extras_every=3, trace=False, lambda_min=False)],
                 budget=None) as lens:
        _train(model, optimizer, batch, 6, lens)
    run = dl.load_run(tmp_path)
    assert run.series("hessian", "preconditioned_sharpness").index.tolist() == [1, 2, 3, 4, 5, 6]
    # before Adam's first step λ_max(H) is the measurement; after, every 3rd measurement
    assert run.series("hessian", "sharpness").index.tolist() == [0, 1, 4]


def test_tracked_sharpness_at_the_default_tolerance_is_within_its_stated_error(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=2, k=2)], budget=None) as lens:
        _train(model, optimizer, batch, 6, lens)
        exact = dl.hessian_eigenvalues(model, LOSS, batch, k=2, tol=1e-10)
    scalars = dl.load_run(tmp_path).scalars("hessian")
    at = scalars.query("step == 6").set_index("name")["value"]
    # tol=1e-2 on the residual: the eigenvalue's error is about tol²·λ, far below 1%
    assert abs(at["sharpness"] - exact.max) <= 1e-3 * exact.max
    assert at["residual_max"] <= 1e-2
    warm = scalars.query("name == 'warm_start'").set_index("step")["value"]
    assert warm[0] == 0 and (warm.drop(0) == 1).all()  # from the previous eigenvectors after the first
    overlap = scalars.query("name == 'eigenvector_overlap'")["value"]
    assert ((overlap > 0.5) & (overlap <= 1 + 1e-9)).all()


def test_lambda_min_and_trace_follow_their_sparser_sub_schedule(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=1, extras_every=3)], budget=None) as lens:
        _train(model, optimizer, batch, 6, lens)
    run = dl.load_run(tmp_path)
    assert run.series("hessian", "sharpness").index.tolist() == list(range(7))
    # measurements 1, 4, 7 (steps 0, 3, 6) take λ_min and the trace
    assert run.series("hessian", "lambda_min").index.tolist() == [0, 3, 6]
    assert run.series("hessian", "trace").index.tolist() == [0, 3, 6]


def test_extras_wait_while_the_time_budget_cannot_afford_them() -> None:
    model, batch = _setup()
    probe = dl.probes.Hessian(extras_every=1)
    ctx = Context(model=model, loss_fn=LOSS, probe_batch=batch, optimizer=None, step=0, allowance=-1.0)
    values = probe.measure(ctx)
    assert "sharpness" in values and "trace" not in values and "lambda_min" not in values
    ctx = Context(model=model, loss_fn=LOSS, probe_batch=batch, optimizer=None, step=1)
    values = probe.measure(ctx)
    assert "trace" in values and "lambda_min" in values


def test_after_a_cold_start_the_next_measurement_is_predicted_at_a_warm_starts_cost() -> None:
    model, batch = _setup()
    probe = dl.probes.Hessian(tol=1e-6)  # extras at the first measurement only
    ctx = Context(model=model, loss_fn=LOSS, probe_batch=batch, optimizer=None, step=0)
    first = probe.measure(ctx)
    assert "trace" in first and first["hvps"] > 30  # cold λ_max, λ_min and the trace
    # the next one: λ_max alone, warm: at most WARM_PRODUCTS products and the set-up
    assert probe.predicted_seconds(1.0) <= (WARM_PRODUCTS + 1) / (first["hvps"] + 1)
    second = probe.measure(Context(model=model, loss_fn=LOSS, probe_batch=batch, optimizer=None, step=1))
    assert second["warm_start"] == 1.0 and "trace" not in second
    assert probe.predicted_seconds(1.0) == 1.0  # λ_max was all of it: its own cost
    assert dl.probes.Hessian().predicted_seconds(2.5) == 2.5  # nothing measured yet


def test_under_a_memory_budget_products_are_summed_over_sub_batches_with_the_same_result(tmp_path) -> None:  # noqa: ANN001
    model, batch = _setup()
    model = model.double()
    batch = (batch[0].double(), batch[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fn_bytes = dl.functional.ModelFunction(model, LOSS, batch).activation_bytes(1)
    params = sum(p.numel() for p in model.parameters())
    # room for the fixed vectors and about 5 examples' activations: the batch of 32 is split
    memory = int(FIXED_VECTORS * params * 8 + ACTIVATION_FACTOR * fn_bytes * 5.5)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=2, tol=1e-8, trace=False, lambda_min=False)],
                 budget=None, memory_budget=memory) as lens:
        _train(model, optimizer, batch, 2, lens)
        exact = dl.hessian_eigenvalues(model, LOSS, batch, tol=1e-10).max
    at = dl.load_run(tmp_path).scalars("hessian").query("step == 2").set_index("name")["value"]
    assert at["chunk_size"] <= 6
    assert at["sharpness"] == pytest.approx(exact, rel=1e-9)


def test_precision_is_checked_and_leaves_the_settings_as_they_were() -> None:
    with pytest.raises(ValueError, match="precision must be"):
        dl.probes.Hessian(precision="bfloat16")
    model, batch = _setup()
    before = precision_settings()
    ctx = Context(model=model, loss_fn=LOSS, probe_batch=batch, optimizer=None, step=0)
    fast = dl.probes.Hessian(precision="tf32", tol=1e-8, trace=False, lambda_min=False).measure(ctx)
    exact = dl.probes.Hessian(tol=1e-8, trace=False, lambda_min=False).measure(ctx)
    assert precision_settings() == before  # the fp32_precision settings of torch >= 2.9 too
    assert fast["sharpness"] == pytest.approx(exact["sharpness"], rel=1e-6)  # the CPU has no TF32


def test_hvp_chunk_size_fits_the_memory_model_and_refuses_what_cannot_fit() -> None:
    from dynlens.budget import MemoryBudgetTooSmall

    vector = 1000 * 4
    fixed = FIXED_VECTORS * vector
    # 10 examples fit, the batch has 32: 4 equal pieces of 8
    chunk, basis = hvp_chunk_size(1000, 4, 100, 32, int(fixed + ACTIVATION_FACTOR * 100 * 10))
    assert chunk == 8 and basis == int(ACTIVATION_FACTOR * 100 * 2)
    assert hvp_chunk_size(1000, 4, 100, 32, None) == (None, None)
    assert hvp_chunk_size(1000, 4, 100, 32, 10**9)[0] is None  # the whole batch fits
    with pytest.raises(MemoryBudgetTooSmall, match="needs about"):
        hvp_chunk_size(1000, 4, 100, 32, fixed)
    # a preconditioned operator's three vectors more: the same memory holds 10 examples, not 32
    memory = int((FIXED_VECTORS + 3) * vector + ACTIVATION_FACTOR * 100 * 10)
    assert hvp_chunk_size(1000, 4, 100, 32, memory)[0] is None
    assert hvp_chunk_size(1000, 4, 100, 32, memory, FIXED_VECTORS + 3)[0] == 8


def test_probe_does_not_change_the_training_trajectory(tmp_path) -> None:  # noqa: ANN001
    finals = []
    for attach in (False, True):
        model, batch = _setup()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if attach:
            probe = dl.probes.Hessian(every=2, k=2, density=True, density_runs=2, density_iters=5, trace_samples=8)
            with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path,
                         probes=[probe], budget=None) as lens:
                _train(model, optimizer, batch, 4, lens)
        else:
            _train(model, optimizer, batch, 4)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_non_finite_loss_is_recorded_as_an_event_and_training_goes_on(tmp_path) -> None:  # noqa: ANN001
    model, (x, y) = _setup()
    x = x.clone()
    x[0, 0] = float("inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, LOSS, probe_batch=(x, y), optimizer=optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=1)], budget=None) as lens:
        _train(model, optimizer, _setup()[1], 2, lens)
    events = dl.load_run(tmp_path).events()
    assert events["message"].str.contains("non-finite").any()


def _dense_hessian(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The oracle in float64 (helpers.dense_hessian on a double copy)."""
    return dense_hessian(copy.deepcopy(model).double(), LOSS, (batch[0].double(), batch[1]))


def _scaled_top(matrix: torch.Tensor, scales: torch.Tensor) -> float:
    root = scales.double().sqrt()
    return float(torch.linalg.eigvalsh(root[:, None] * matrix * root[None, :])[-1])


def test_sgd_groups_with_other_learning_rates_compare_the_lr_weighted_sharpness(tmp_path) -> None:  # noqa: ANN001
    """Group 0 at η₀ = 0.1, the output layer at 0.02: GD is stable while λ_max(SH) ≤ 2/η₀ with
    S = η_g/η₀ per entry (0.2 on the output layer), and SGD's trace ratio is η₀·tr(SH)/2."""
    model, batch = _setup()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()},
                                 {"params": model[2].parameters(), "lr": 0.02}], lr=0.1)
    probe = dl.probes.Hessian(every=2, lambda_min=False, trace_samples=240, tol=1e-4, extras_every=1)  # 240/3 > P: exact trace
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path, probes=[probe], budget=None) as lens:
        _train(model, optimizer, batch, 2, lens)
    dense = _dense_hessian(model, batch)
    scales = torch.cat([torch.ones(5 * 8 + 8), torch.full((8 * 3 + 3,), 0.2)])
    expected = _scaled_top(dense, scales)
    run = dl.load_run(tmp_path)
    assert run.events().empty
    assert math.isclose(run.series("hessian", "preconditioned_sharpness")[2], expected, rel_tol=1e-6)
    assert math.isclose(run.series("hessian", "sharpness_ratio")[2], expected / 20.0, rel_tol=1e-6)
    assert math.isclose(run.series("hessian", "sharpness")[2], float(torch.linalg.eigvalsh(dense)[-1]), rel_tol=1e-6)
    weighted_trace = float((scales.double() * dense.diagonal()).sum())
    assert math.isclose(run.series("hessian", "sgd_trace_ratio")[2], 0.1 * weighted_trace / 2, rel_tol=1e-6)


def test_adam_holding_some_of_the_parameters_compares_only_what_it_moves(tmp_path) -> None:  # noqa: ANN001
    """Adam on the output layer alone: the hidden layer never moves (S = 0 there), so the
    preconditioned sharpness is that of the output layer's block of P⁻¹H."""
    from dynlens.measures.hessian import adam_preconditioner

    model, batch = _setup()
    optimizer = torch.optim.Adam(model[2].parameters(), lr=0.01)
    probe = dl.probes.Hessian(every=3, trace=False, lambda_min=False, tol=1e-4)
    with dl.Lens(model, LOSS, probe_batch=batch, optimizer=optimizer, run_dir=tmp_path, probes=[probe], budget=None) as lens:
        _train(model, optimizer, batch, 3, lens)
    precond = adam_preconditioner(optimizer, model)
    assert set(precond) == {"2.weight", "2.bias"}
    scales = torch.cat([torch.zeros(5 * 8 + 8), 1 / precond["2.weight"].reshape(-1), 1 / precond["2.bias"]])
    run = dl.load_run(tmp_path)
    assert run.events().empty
    expected = _scaled_top(_dense_hessian(model, batch), scales)
    assert math.isclose(run.series("hessian", "preconditioned_sharpness")[3], expected, rel_tol=1e-6)


def test_a_wrapped_optimizer_is_read_through_for_its_threshold() -> None:
    model, _ = _setup()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kind, threshold = stability_threshold(dl.remedies.OrthoGrad(inner))
    assert (kind, threshold) == stability_threshold(inner)
    assert kind == "momentum" and threshold == pytest.approx(38.0)
