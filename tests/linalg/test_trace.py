"""Hutchinson and Hutch++ trace estimates against explicit matrices with known traces."""

import numpy as np
import pytest
import torch
from matrices import matrix_with_spectrum

from dynlens.linalg import LinearOperator, dense_operator, hutch_plus_plus, hutchinson

PSD = 10.0 * np.exp(-np.arange(150) / 15.0)
INDEFINITE = np.linspace(-4.0, 6.0, 150)
ESTIMATORS = [hutchinson, hutch_plus_plus]


def low_rank_plus_noise(seed):
    spectrum = np.concatenate([np.linspace(50.0, 10.0, 8), np.zeros(192)])
    a = matrix_with_spectrum(spectrum, seed=seed)
    noise = torch.randn(
        200, 200, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64
    )
    return a + 0.01 * (noise + noise.T) / 2


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("spectrum", [PSD, INDEFINITE], ids=["psd", "indefinite"])
def test_estimate_is_within_three_standard_errors_of_the_trace(estimator, spectrum):
    op = dense_operator(matrix_with_spectrum(spectrum))
    estimate = estimator(op, samples=60, generator=torch.Generator().manual_seed(1))
    assert estimate.stderr > 0
    assert abs(estimate.value - spectrum.sum()) <= 3 * estimate.stderr


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matvec_count_equals_the_sample_budget(estimator):
    op = dense_operator(matrix_with_spectrum(PSD))
    estimate = estimator(op, samples=31)
    assert estimate.matvecs == estimate.samples == op.matvecs == 31


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_operator_without_matmat_gives_the_same_estimate(estimator):
    a = matrix_with_spectrum(INDEFINITE)
    plain = LinearOperator(matvec=lambda v: a @ v, size=150, dtype=a.dtype, device=a.device)
    looped = estimator(plain, samples=12, generator=torch.Generator().manual_seed(3))
    batched = estimator(dense_operator(a), samples=12, generator=torch.Generator().manual_seed(3))
    assert looped.value == pytest.approx(batched.value, rel=1e-12)
    assert looped.stderr == pytest.approx(batched.stderr, rel=1e-9)


def test_hutchinson_stderr_matches_the_theoretical_standard_deviation():
    a = matrix_with_spectrum(INDEFINITE)
    samples = 400
    estimate = hutchinson(dense_operator(a), samples=samples)
    # Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²) for Rademacher z.
    variance = 2 * float((a**2).sum() - (torch.diagonal(a) ** 2).sum())
    assert estimate.stderr == pytest.approx(np.sqrt(variance / samples), rel=0.2)


def test_hutch_plus_plus_is_exact_for_rank_at_most_a_third_of_the_budget():
    spectrum = np.concatenate([[7.0, 3.0, -2.0, 1.5, 0.5], np.zeros(95)])
    op = dense_operator(matrix_with_spectrum(spectrum))
    estimate = hutch_plus_plus(op, samples=15, generator=torch.Generator().manual_seed(0))
    assert estimate.value == pytest.approx(spectrum.sum(), abs=1e-10)
    assert estimate.stderr <= 1e-10


def test_hutch_plus_plus_beats_hutchinson_on_low_rank_plus_noise():
    errors = {hutchinson: [], hutch_plus_plus: []}
    for seed in range(10):
        a = low_rank_plus_noise(seed)
        trace = float(torch.trace(a))
        for estimator, found in errors.items():
            estimate = estimator(
                dense_operator(a), samples=30, generator=torch.Generator().manual_seed(seed)
            )
            found.append(abs(estimate.value - trace))
    assert np.mean(errors[hutch_plus_plus]) < 0.1 * np.mean(errors[hutchinson])


def test_float32_operator_gives_a_float_estimate_near_the_trace():
    op = dense_operator(matrix_with_spectrum(PSD, dtype=torch.float32))
    estimate = hutch_plus_plus(op, samples=60, generator=torch.Generator().manual_seed(1))
    assert isinstance(estimate.value, float)
    assert abs(estimate.value - PSD.sum()) <= 3 * estimate.stderr + 1e-4 * PSD.sum()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_global_torch_rng_is_untouched(estimator):
    state = torch.get_rng_state()
    estimator(dense_operator(matrix_with_spectrum(PSD)), samples=9)
    assert torch.equal(torch.get_rng_state(), state)


def test_too_few_samples_raise():
    op = dense_operator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="samples >= 2"):
        hutchinson(op, samples=1)
    with pytest.raises(ValueError, match="samples >= 4"):
        hutch_plus_plus(op, samples=3)
