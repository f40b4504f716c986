"""Lanczos eigensolver against explicit matrices with known spectra."""

import numpy as np
import pytest
import torch
from helpers import OperatorCalls
from matrices import matrix_with_spectrum

from dynlens.linalg import (
    LinearOperator,
    dense_operator,
    lanczos_eigsh,
    lanczos_tridiagonal,
)

SPREAD = np.concatenate(
    [
        [25.0, 22.0, 19.5, 17.0, 15.0, 13.5],
        np.linspace(-2.0, 10.0, 288),
        [-4.0, -5.0, -6.5, -8.0, -10.0, -12.0],
    ]
)


def relative_error(found, expected):
    expected = torch.tensor(np.array(expected, dtype=np.float64))
    return float(((found - expected).abs() / expected.abs()).max())


def test_top_eigenvalues_match_dense_spectrum_in_float64():
    result = lanczos_eigsh(dense_operator(matrix_with_spectrum(SPREAD)), k=5, tol=1e-10)
    assert result.converged
    assert relative_error(result.values, np.sort(SPREAD)[::-1][:5]) <= 1e-8


def test_bottom_eigenvalues_are_the_smallest_algebraic_ascending():
    result = lanczos_eigsh(
        dense_operator(matrix_with_spectrum(SPREAD)), k=3, which="bottom", tol=1e-10
    )
    assert result.converged
    assert result.values.tolist() == sorted(result.values.tolist())
    assert relative_error(result.values, [-12.0, -10.0, -8.0]) <= 1e-8


def test_both_returns_top_descending_then_bottom_ascending():
    result = lanczos_eigsh(
        dense_operator(matrix_with_spectrum(SPREAD)), k=4, which="both", tol=1e-10
    )
    assert result.converged
    assert result.values.shape == (8,)
    assert relative_error(result.top, [25.0, 22.0, 19.5, 17.0]) <= 1e-8
    assert relative_error(result.bottom, [-12.0, -10.0, -8.0, -6.5]) <= 1e-8
    assert torch.equal(torch.cat([result.top, result.bottom]), result.values)


def test_float32_operator_reaches_single_precision_accuracy():
    a = matrix_with_spectrum(SPREAD, dtype=torch.float32)
    result = lanczos_eigsh(dense_operator(a), k=5, which="both", tol=1e-6, return_vectors=True)
    assert result.values.dtype == torch.float64
    assert result.vectors.dtype == torch.float32
    expected = np.concatenate([np.sort(SPREAD)[::-1][:5], np.sort(SPREAD)[:5]])
    assert relative_error(result.values, expected) <= 1e-4


def test_clustered_top_eigenvalues_are_resolved():
    spectrum = np.concatenate([[10.0, 9.999, 9.998], np.linspace(0.0, 5.0, 197)])
    result = lanczos_eigsh(dense_operator(matrix_with_spectrum(spectrum)), k=3, tol=1e-10)
    assert result.converged
    assert relative_error(result.values, [10.0, 9.999, 9.998]) <= 1e-8


def test_k_equal_to_n_returns_the_whole_spectrum_exactly():
    spectrum = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 4.0, 7.0, 11.0])
    result = lanczos_eigsh(dense_operator(matrix_with_spectrum(spectrum, seed=3)), k=10)
    assert result.converged
    assert result.iterations == 10
    np.testing.assert_allclose(result.values.numpy(), spectrum[::-1], rtol=0, atol=1e-12)


def test_reported_residuals_agree_with_true_residuals():
    a = matrix_with_spectrum(SPREAD)
    result = lanczos_eigsh(dense_operator(a), k=4, which="both", tol=1e-5, return_vectors=True)
    vectors = result.vectors
    true = torch.linalg.vector_norm(a @ vectors - vectors * result.values, dim=0)
    np.testing.assert_allclose(result.residuals.numpy(), true.numpy(), rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(
        torch.linalg.vector_norm(vectors, dim=0).numpy(), np.ones(8), rtol=0, atol=1e-12
    )


def test_matvec_count_equals_iterations_and_the_operator_counter():
    op = dense_operator(matrix_with_spectrum(SPREAD))
    result = lanczos_eigsh(op, k=2, tol=1e-8)
    assert result.matvecs == result.iterations == op.matvecs
    again = lanczos_eigsh(op, k=2, tol=1e-8)
    assert again.matvecs == result.matvecs
    assert op.matvecs == 2 * result.matvecs


def test_k_larger_than_n_raises_a_clear_error():
    op = dense_operator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="k=5 .* size n=4"):
        lanczos_eigsh(op, k=5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_an_operator_in_half_precision_or_integers_is_refused_with_advice(dtype):
    with pytest.raises(ValueError, match="float32 or float64; got torch.(bfloat16|float16|int64).*cast"):
        LinearOperator(matvec=lambda v: v, size=3, dtype=dtype, device="cpu")


def test_invalid_which_raises():
    with pytest.raises(ValueError, match="which must be"):
        lanczos_eigsh(dense_operator(torch.eye(4, dtype=torch.float64)), which="largest")


def test_breakdown_with_three_distinct_eigenvalues_gives_no_nan():
    spectrum = np.array([5.0] * 3 + [2.0] * 20 + [1.0] * 27)
    op = dense_operator(matrix_with_spectrum(spectrum))
    for which in ("top", "bottom", "both"):
        result = lanczos_eigsh(op, k=2, which=which, tol=1e-8)
        assert result.converged
        assert result.restarts >= 1
        assert not torch.isnan(result.values).any()
        assert not torch.isnan(result.residuals).any()
        assert result.matvecs == result.iterations


def test_repeated_eigenvalue_is_found_with_its_multiplicity_through_restarts():
    spectrum = np.array([5.0] * 3 + [2.0] * 20 + [1.0] * 27)
    result = lanczos_eigsh(dense_operator(matrix_with_spectrum(spectrum)), k=3, tol=1e-8)
    assert result.converged
    np.testing.assert_allclose(result.values.numpy(), [5.0, 5.0, 5.0], rtol=1e-10)


def test_breakdown_restart_makes_the_tridiagonal_block_diagonal():
    spectrum = np.array([5.0] * 3 + [2.0] * 20 + [1.0] * 27)
    result = lanczos_eigsh(dense_operator(matrix_with_spectrum(spectrum)), k=1, tol=1e-8)
    assert (result.tridiagonal.beta == 0).sum() == result.restarts
    assert len(result.tridiagonal.alpha) == result.iterations


def test_global_torch_rng_is_untouched():
    state = torch.get_rng_state()
    lanczos_eigsh(dense_operator(matrix_with_spectrum(SPREAD)), k=2, which="both")
    lanczos_eigsh(dense_operator(matrix_with_spectrum([5.0] * 3 + [1.0] * 7)), k=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_same_generator_seed_gives_identical_results():
    op = dense_operator(matrix_with_spectrum(SPREAD))
    first = lanczos_eigsh(op, k=3, generator=torch.Generator().manual_seed(7))
    second = lanczos_eigsh(op, k=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.values, second.values)


def test_too_small_max_iters_returns_unconverged_result():
    spectrum = np.linspace(0.0, 1.0, 300)
    result = lanczos_eigsh(
        dense_operator(matrix_with_spectrum(spectrum)), k=3, tol=1e-10, max_iters=8
    )
    assert not result.converged
    assert result.iterations == 8
    assert result.values.shape == (3,)


def test_max_iters_below_k_raises():
    with pytest.raises(ValueError, match="max_iters"):
        lanczos_eigsh(dense_operator(torch.eye(10, dtype=torch.float64)), k=5, max_iters=3)


def test_operator_without_matmat_counts_each_column():
    a = matrix_with_spectrum(np.arange(20.0))
    op = LinearOperator(matvec=lambda v: a @ v, size=20, dtype=a.dtype, device=a.device)
    out = op.mm(torch.ones(20, 3, dtype=a.dtype))
    assert op.matvecs == 3
    torch.testing.assert_close(out, a @ torch.ones(20, 3, dtype=a.dtype))


def test_matvec_of_wrong_shape_raises():
    op = LinearOperator(matvec=lambda v: v[:2], size=4, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        op.mv(torch.ones(4, dtype=torch.float64))


def test_dense_operator_rejects_an_asymmetric_matrix():
    with pytest.raises(ValueError, match="symmetric"):
        dense_operator(torch.triu(torch.ones(4, 4, dtype=torch.float64)))


def test_lockstep_tridiagonals_equal_one_run_at_a_time():
    op = dense_operator(matrix_with_spectrum(SPREAD))
    starts = torch.randn(300, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    together = lanczos_tridiagonal(op, starts, 15)
    for run, tridiagonal in enumerate(together):
        alone = lanczos_tridiagonal(op, starts[:, run], 15)[0]
        torch.testing.assert_close(tridiagonal.alpha, alone.alpha, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tridiagonal.beta, alone.beta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, floor", [(1, 4), (2, 5), (3, 6)])
def test_no_stop_before_a_krylov_space_of_2k_plus_1_dimensions(k, floor):
    """A start vector inside the top eigenspace passes the residual test at once; Lanczos still
    runs the floor of steps, k + max(k, 3), before it may stop."""
    a = matrix_with_spectrum(SPREAD)
    _, vectors = torch.linalg.eigh(a)
    v0 = vectors[:, -k:].sum(dim=1) + 1e-9 * torch.randn(len(SPREAD), generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64)
    result = lanczos_eigsh(dense_operator(a), k=k, tol=1e-6, v0=v0)
    assert result.converged and result.matvecs == floor
    assert relative_error(result.values, np.sort(SPREAD)[::-1][:k]) <= 1e-8


# ----------------------------------------------------------------------------- a memory limit


@pytest.fixture(params=["tensor", "rows"])
def host_layout(request, monkeypatch):
    """A basis in host memory as one CPU tensor (a CPU operator's), and as one pinned row a
    vector (:class:`_HostRows`, a GPU operator's), here with a CPU operator standing in."""
    import dynlens.linalg.lanczos as lanczos_module

    if request.param == "rows":
        monkeypatch.setattr(lanczos_module, "_use_host_rows", lambda op: True)
    return request.param


def _same_run(first, second):
    """Two runs took the same steps and found the same pairs, to rounding."""
    assert first.iterations == second.iterations and first.restarts == second.restarts
    np.testing.assert_allclose(first.values.numpy(), second.values.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(first.residuals.numpy(), second.residuals.numpy(), rtol=1e-9, atol=1e-12)
    if first.vectors is not None:
        torch.testing.assert_close(first.vectors.cpu(), second.vectors.cpu(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_a_basis_in_host_memory_gives_the_values_of_the_default_basis(which, host_layout):
    """memory=0: no basis vector may live on the operator's device, so the basis is kept in host
    memory from the start; the products and the reorthogonalisation are the same arithmetic."""
    a = matrix_with_spectrum(SPREAD)
    default = lanczos_eigsh(dense_operator(a), k=4, which=which, tol=1e-10, return_vectors=True)
    host = lanczos_eigsh(dense_operator(a), k=4, which=which, tol=1e-10, return_vectors=True, memory=0)
    assert host.basis_device == default.basis_device == "cpu"
    assert host.converged
    _same_run(host, default)


def test_a_basis_that_outgrows_the_memory_limit_moves_to_host_memory_and_gives_the_same_values(host_layout):
    """The limit holds the first 12 vectors; the run takes more steps, so the basis must grow
    past it (12 + 24 vectors alive while it grows) and continue in host memory."""
    a = matrix_with_spectrum(SPREAD)
    vector_bytes = a.shape[0] * a.element_size()
    default = lanczos_eigsh(dense_operator(a), k=5, tol=1e-10, return_vectors=True)
    limited = lanczos_eigsh(dense_operator(a), k=5, tol=1e-10, return_vectors=True, memory=12 * vector_bytes)
    assert limited.iterations > 12 and limited.converged
    _same_run(limited, default)
    assert relative_error(limited.values, np.sort(SPREAD)[::-1][:5]) <= 1e-8


def test_a_host_basis_restarts_after_breakdown_like_the_default_basis(host_layout):
    spectrum = np.array([5.0] * 3 + [2.0] * 20 + [1.0] * 27)
    op = dense_operator(matrix_with_spectrum(spectrum))
    default = lanczos_eigsh(op, k=3, tol=1e-8)
    host = lanczos_eigsh(op, k=3, tol=1e-8, memory=0)
    assert host.restarts >= 1
    _same_run(host, default)


def _host_holds(monkeypatch, vectors, vector_bytes):
    """Make the host's available memory hold ``vectors`` basis vectors under Lanczos's share."""
    import dynlens.linalg.lanczos as lanczos_module

    available = int(vectors * vector_bytes / lanczos_module._HOST_SHARE)
    monkeypatch.setattr(lanczos_module, "available_host_memory", lambda: available)


@pytest.mark.parametrize("memory", [0, None])
def test_a_host_basis_stops_where_the_host_memory_ends_instead_of_outgrowing_it(monkeypatch, memory, host_layout):
    """A basis in host memory (memory=0 on any operator; a CPU operator's basis in any case)
    grows only within half of the host's available memory: a 644M-parameter model's basis of
    100 vectors is 258 GB. Here 20 vectors fit; the run needs more to converge at tol=1e-12, so it
    stops at 20 steps (unconverged, as at max_iters), with the values those 20 steps give."""
    a = matrix_with_spectrum(SPREAD)
    vector_bytes = a.shape[0] * a.element_size()
    free = lanczos_eigsh(dense_operator(a), k=2, tol=1e-12, max_iters=20)
    assert not free.converged and free.iterations == 20
    _host_holds(monkeypatch, 20, vector_bytes)
    held = lanczos_eigsh(dense_operator(a), k=2, tol=1e-12, memory=memory)
    assert held.iterations == 20 and not held.converged
    assert torch.equal(held.values, free.values)
    assert relative_error(held.values, [25.0, 22.0]) < 1e-2  # 20 steps get close to the top two


def test_a_host_basis_that_cannot_hold_k_plus_one_vectors_raises_a_memory_error(monkeypatch, host_layout):
    a = matrix_with_spectrum(SPREAD)
    _host_holds(monkeypatch, 3, a.shape[0] * a.element_size())
    with pytest.raises(MemoryError, match="ask for fewer eigenvalues"):
        lanczos_eigsh(dense_operator(a), k=3, memory=0)
    assert lanczos_eigsh(dense_operator(a), k=2, tol=1e-6, memory=0).iterations <= 3


def test_a_negative_memory_limit_raises():
    with pytest.raises(ValueError, match="memory"):
        lanczos_eigsh(dense_operator(torch.eye(4, dtype=torch.float64)), memory=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_basis_stays_within_the_memory_limit_and_moves_to_pinned_host_memory(monkeypatch):
    """The oracle is the same run with the basis on the GPU; the device's peak allocation during
    the limited run stays within the limit plus a few working vectors and the piece of the host
    basis streamed to the device (here 4 vectors' worth; 64 MiB by default, which on the H200
    took this test's peak 64 MiB past a bound without it)."""
    import dynlens.linalg.lanczos as lanczos_module

    n = 4096
    monkeypatch.setattr(lanczos_module, "STREAM_BLOCK_BYTES", 4 * n * 8)
    spectrum = np.concatenate([[30.0, 28.0, 26.0, 25.0, 24.0], np.linspace(-1.0, 10.0, n - 5)])
    a = matrix_with_spectrum(spectrum).cuda()
    vector_bytes = n * a.element_size()
    free = lanczos_eigsh(dense_operator(a), k=5, tol=1e-10, return_vectors=True)
    assert free.basis_device == "cuda:0" and free.iterations > 10
    for memory in (0, 10 * vector_bytes):
        op = dense_operator(a)  # its symmetry check takes n² entries on the device
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        limited = lanczos_eigsh(op, k=5, tol=1e-10, return_vectors=True, memory=memory)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base <= memory + 16 * vector_bytes + 4 * vector_bytes
        assert limited.basis_device == "cpu" and limited.vectors.device.type == "cuda"
        _same_run(limited, free)
    roomy = lanczos_eigsh(dense_operator(a), k=5, tol=1e-10, memory=1000 * vector_bytes)
    assert roomy.basis_device == "cuda:0"


def test_the_streamed_gram_schmidt_is_the_two_passes_of_the_lanczos_step():
    """The reorthogonalisation of a host basis for a GPU operator, piece by piece (here on the
    CPU, pieces of 7 numbers so that every vector spans several), against the plain passes."""
    from dynlens.linalg.lanczos import _streamed_gram_schmidt

    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 6, dtype=torch.float64, generator=generator))
    krylov = q.T  # 6 orthonormal rows, n = 50
    w = torch.randn(1, 50, dtype=torch.float64, generator=generator)
    expected, alpha = w.clone(), torch.zeros(1, dtype=torch.float64)
    for _ in range(2):
        c = krylov @ expected[0]
        expected = expected - (krylov.T @ c).unsqueeze(0)
        alpha = alpha + c[3]
    # pieces of 7 columns (6 rows × 7 numbers × 8 bytes): 8 pieces, the last of 1 column
    with OperatorCalls(torch.ops.aten.copy_.default) as copies:
        got_alpha, got = _streamed_gram_schmidt(list(krylov), w, 3, block_bytes=6 * 7 * 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(got_alpha, alpha, rtol=0, atol=1e-13)
    assert (krylov @ got[0]).abs().max() < 1e-13  # orthogonal to the basis
    # the basis is read three times (the plain passes read it four times): 3 reads of 8 pieces
    # of each of the 6 rows
    assert copies.count == 3 * 8 * 6


def test_host_rows_are_each_allocated_once_as_the_basis_grows(monkeypatch):
    """A basis that moves to host memory at 12 vectors and then grows there: every row is
    allocated once (the 12 device vectors copied over once, each later one when reached), where
    one tensor for the whole basis was allocated again, and the old rows copied, at each doubling."""
    import dynlens.linalg.lanczos as lanczos_module

    monkeypatch.setattr(lanczos_module, "_use_host_rows", lambda op: True)
    made, puts = [], []

    class Counted(lanczos_module._HostRows):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def put(self, j, vector):
            puts.append(j)
            super().put(j, vector)

    monkeypatch.setattr(lanczos_module, "_HostRows", Counted)
    a = matrix_with_spectrum(SPREAD)
    result = lanczos_eigsh(dense_operator(a), k=5, tol=1e-10, memory=12 * a.shape[0] * a.element_size())
    assert result.basis_device == "cpu" and result.iterations > 24  # grown twice there at least
    assert len(made) == 1
    rows = made[0].rows
    assert len(rows) == result.iterations and len({r.data_ptr() for r in rows}) == len(rows)
    assert puts == list(range(result.iterations))  # each row set once, in order
