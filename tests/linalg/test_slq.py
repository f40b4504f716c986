"""Stochastic Lanczos quadrature against explicit matrices."""

import numpy as np
import pytest
import torch
from matrices import matrix_with_spectrum

from dynlens.linalg import (
    LinearOperator,
    dense_operator,
    density_moments,
    rademacher_vectors,
    slq,
    smooth_density,
)

SPECTRUM = np.concatenate([np.linspace(-1.0, 2.0, 195), [4.0, 6.0, 9.0, 12.0, 20.0]])


def test_quadrature_moments_equal_the_quadratic_forms_of_the_start_vectors():
    """With 12 steps each run's Gauss quadrature is exact up to degree 23: an exact oracle."""
    a = matrix_with_spectrum(SPECTRUM)
    density = slq(dense_operator(a), runs=5, iters=12, generator=torch.Generator().manual_seed(4))
    starts = rademacher_vectors(200, 5, torch.Generator().manual_seed(4), a.dtype, a.device)
    starts = starts / np.sqrt(200)
    expected = [
        float(torch.einsum("il,il->", starts, torch.linalg.matrix_power(a, p) @ starts)) / 5
        for p in range(7)
    ]
    np.testing.assert_allclose(density.moments(6), expected, rtol=1e-9, atol=1e-12)


def test_moments_estimate_normalised_traces_within_statistical_error():
    a = matrix_with_spectrum(SPECTRUM)
    runs = 64
    density = slq(
        dense_operator(a), runs=runs, iters=10, generator=torch.Generator().manual_seed(0)
    )
    moments = density.moments(4)
    for p in range(1, 5):
        power = torch.linalg.matrix_power(a, p)
        exact = float(torch.trace(power)) / 200
        # Var(zᵀBz) = 2(‖B‖_F² − Σ B_ii²) for Rademacher z; the estimate is zᵀBz/n per run.
        variance = 2 * float((power**2).sum() - (torch.diagonal(power) ** 2).sum()) / 200**2
        assert abs(moments[p] - exact) <= 4 * np.sqrt(variance / runs)


def test_weights_are_nonnegative_and_sum_to_one():
    density = slq(dense_operator(matrix_with_spectrum(SPECTRUM)), runs=4, iters=30)
    assert density.nodes.shape == density.weights.shape == (120,)
    assert density.nodes.dtype == density.weights.dtype == torch.float64
    assert (density.weights >= 0).all()
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert density.matvecs == 120
    assert density.nodes.min() >= -1.0 - 1e-9 and density.nodes.max() <= 20.0 + 1e-9


def test_lockstep_and_sequential_runs_give_the_same_density():
    a = matrix_with_spectrum(SPECTRUM)
    together = slq(dense_operator(a), runs=3, iters=20, generator=torch.Generator().manual_seed(2))
    plain = LinearOperator(matvec=lambda v: a @ v, size=200, dtype=a.dtype, device=a.device)
    alone = slq(plain, runs=3, iters=20, generator=torch.Generator().manual_seed(2))
    unbatched = slq(
        dense_operator(a), runs=3, iters=20, generator=torch.Generator().manual_seed(2), batch=False
    )
    for other in (alone, unbatched):
        torch.testing.assert_close(together.nodes, other.nodes, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(together.weights, other.weights, rtol=1e-8, atol=1e-10)
        assert other.matvecs == together.matvecs == 60


def test_breakdown_stops_a_run_early_and_nodes_are_the_eigenvalues():
    spectrum = np.array([5.0] * 3 + [2.0] * 20 + [-1.0] * 27)
    op = dense_operator(matrix_with_spectrum(spectrum))
    density = slq(op, runs=4, iters=20)
    assert len(density.nodes) == 12
    assert density.matvecs == 12
    assert not torch.isnan(density.nodes).any()
    distance = (density.nodes[:, None] - torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64)).abs()
    assert float(distance.min(dim=1).values.max()) <= 1e-10
    for value, multiplicity in ((5.0, 3), (2.0, 20), (-1.0, 27)):
        weight = float(density.weights[(density.nodes - value).abs() < 1e-6].sum())
        assert weight == pytest.approx(multiplicity / 50, abs=0.15)


def test_float32_operator_matches_float64_moments():
    a = matrix_with_spectrum(SPECTRUM)
    high = slq(dense_operator(a), runs=4, iters=15, generator=torch.Generator().manual_seed(5))
    low = slq(
        dense_operator(a.float()), runs=4, iters=15, generator=torch.Generator().manual_seed(5)
    )
    np.testing.assert_allclose(low.moments(4), high.moments(4), rtol=1e-4)


def test_smoothed_density_integrates_to_one_and_peaks_at_an_isolated_node():
    nodes = np.array([0.0, 0.1, 5.0])
    weights = np.array([0.45, 0.45, 0.1])
    grid = np.linspace(-3.0, 8.0, 4001)
    phi = smooth_density(nodes, weights, grid, sigma=0.2)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    assert trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-6)
    right = grid > 2.5
    assert grid[right][np.argmax(phi[right])] == pytest.approx(5.0, abs=0.01)


def test_density_method_matches_smooth_density():
    density = slq(dense_operator(matrix_with_spectrum(SPECTRUM)), runs=2, iters=10)
    grid = np.linspace(-2.0, 21.0, 50)
    np.testing.assert_array_equal(
        density.density(grid, 0.5), smooth_density(density.nodes, density.weights, grid, 0.5)
    )


def test_density_moments_are_weighted_power_sums():
    moments = density_moments(np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.25, 0.25]), 3)
    np.testing.assert_allclose(moments, [1.0, 0.75, 3.75, 5.25])


def test_global_torch_rng_is_untouched():
    state = torch.get_rng_state()
    slq(dense_operator(matrix_with_spectrum(SPECTRUM)), runs=2, iters=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_invalid_arguments_raise():
    op = dense_operator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="runs"):
        slq(op, runs=0)
    with pytest.raises(ValueError, match="sigma"):
        smooth_density(np.zeros(1), np.ones(1), np.zeros(3), sigma=0.0)
