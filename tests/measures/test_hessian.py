"""dl.hessian_eigenvalues / hessian_trace / hessian_density against a dense Hessian
(torch.autograd.functional.hessian) and against PyHessian; options, no side effects, bad input."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from helpers import Checkpointed, single_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn

import dynlens as dl
from dynlens.functional import ModelFunction, isolated
from dynlens.measures.hessian import curvature_operator

# ----------------------------------------------------------------------------- models


class AttentionBlock(nn.Module):
    """Token features -> linear -> multi-head attention (residual) -> LayerNorm -> pooled head."""

    def __init__(self, d_in: int = 3, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.attention = nn.MultiheadAttention(width, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.head(torch.tanh(h).mean(1))


class TiedEmbedding(nn.Module):
    """Bag of tokens -> embedding -> tanh layer -> output layer tied to the embedding."""

    def __init__(self, vocab: int = 9, width: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embedding(tokens).mean(1))))


def _mlp(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(24, 6, generator=g, dtype=dtype), torch.randint(0, 3, (24,), generator=g))


def _cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(12, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))


def _attention() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = AttentionBlock().double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(8, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))


def _tied() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = TiedEmbedding().double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 9, (16, 3), generator=g), torch.randint(0, 9, (16,), generator=g))


LOSS = nn.CrossEntropyLoss()
MODELS = {"mlp": (_mlp, "eval"), "cnn_batchnorm_eval": (_cnn, "eval"), "cnn_batchnorm_train": (_cnn, "train"),
          "attention_layernorm": (_attention, "eval"), "tied_weights": (_tied, "eval")}


def dense_hessian(model: nn.Module, batch: tuple, mode: str = "eval") -> torch.Tensor:
    """The oracle: the full Hessian of the mean loss by torch.autograd.functional.hessian (float64)."""
    model = copy.deepcopy(model).double()
    inputs, targets = batch
    if inputs.is_floating_point():
        inputs = inputs.double()
    with isolated(model, mode):
        fn = ModelFunction(model, LOSS, (inputs, targets))
        matrix = torch.autograd.functional.hessian(lambda v: fn.loss(fn.as_params(v)), fn.vector())
    return (matrix + matrix.T) / 2


def _relative_error(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((found - exact).abs() / exact.abs()).max())


# ----------------------------------------------------------------------------- against the dense Hessian


@pytest.mark.parametrize("name", list(MODELS))
def test_top5_and_bottom3_eigenvalues_match_dense_hessian_in_float64(name: str) -> None:
    make, mode = MODELS[name]
    model, batch = make()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch, mode))
    top = dl.hessian_eigenvalues(model, LOSS, batch, k=5, which="top", mode=mode)
    bottom = dl.hessian_eigenvalues(model, LOSS, batch, k=3, which="bottom", mode=mode)
    assert top.converged and bottom.converged
    assert _relative_error(top.values, exact.flip(0)[:5]) < 1e-4
    assert _relative_error(bottom.values, exact[:3].flip(0)) < 1e-4
    assert top.matvecs > 0 and top.elapsed > 0 and top.values.dtype == torch.float64


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm_eval", "attention_layernorm"])
def test_a_start_from_the_gradient_finds_the_same_top5(name: str) -> None:
    make, mode = MODELS[name]
    model, batch = make()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch, mode)).flip(0)[:5]
    found = dl.hessian_eigenvalues(model, LOSS, batch, k=5, mode=mode, start="gradient")
    assert found.converged and _relative_error(found.values, exact) < 1e-4
    # the start differs from the Gaussian one (the runs take different paths); "auto" takes the
    # gradient for the top of the spectrum and the Gaussian vector for the bottom

    def short(which: str, start: str) -> torch.Tensor:
        return dl.hessian_eigenvalues(model, LOSS, batch, k=3, which=which, mode=mode, tol=0,
                                      max_iters=6, start=start).values

    assert not torch.allclose(short("top", "random"), short("top", "gradient"))
    assert torch.equal(short("top", "auto"), short("top", "gradient"))
    assert torch.equal(short("bottom", "auto"), short("bottom", "random"))


def test_top5_and_bottom3_eigenvalues_match_dense_hessian_in_float32() -> None:
    model, batch = _mlp(torch.float32)
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch))
    top = dl.hessian_eigenvalues(model, LOSS, batch, k=5, tol=1e-3)
    bottom = dl.hessian_eigenvalues(model, LOSS, batch, k=3, which="bottom", tol=1e-3)
    assert _relative_error(top.values, exact.flip(0)[:5]) < 1e-3
    assert _relative_error(bottom.values, exact[:3].flip(0)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_measured_in_float32_at_its_own_weights(dtype: torch.dtype) -> None:
    """The oracle is the dense float64 Hessian at the model's rounded weights and inputs; half
    precision arithmetic would be ~1e-2 off, and Hutch++'s QR has no half-precision kernel."""
    model, (x, y) = _mlp(torch.float32)
    model, x = model.to(dtype), x.to(dtype)
    weights = [p.clone() for p in model.parameters()]
    dense = dense_hessian(model, (x.double(), y))
    exact = torch.linalg.eigvalsh(dense)
    top = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, tol=1e-3)
    assert _relative_error(top.values, exact.flip(0)[:3]) < 1e-3
    trace = dl.hessian_trace(model, LOSS, (x, y), samples=48)
    assert abs(trace.value - float(dense.trace())) <= 3 * trace.stderr + 1e-4 * abs(float(dense.trace()))
    assert dl.hessian_density(model, LOSS, (x, y), runs=2, iters=10).nodes.dtype == torch.float64
    assert all(p.dtype == dtype and torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_both_ends_and_eigenvectors_are_eigenpairs_of_the_dense_hessian() -> None:
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    exact = torch.linalg.eigvalsh(matrix)
    both = dl.hessian_eigenvalues(model, LOSS, batch, k=2, which="both", return_vectors=True)
    expected = torch.cat([exact.flip(0)[:2], exact[:2].flip(0)])
    assert _relative_error(both.values, expected) < 1e-6
    assert torch.all(both.values[:-1] >= both.values[1:])
    residual = matrix @ both.vectors - both.vectors * both.values
    assert float(residual.norm(dim=0).max()) < 1e-3 * float(exact.abs().max())


@pytest.mark.parametrize("hvp", ["reuse", "forward_over_reverse"])
def test_both_hvp_methods_give_the_same_top_eigenvalue(hvp: str) -> None:
    model, batch = _attention()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch))[-1]
    assert abs(dl.hessian_eigenvalues(model, LOSS, batch, hvp=hvp).max - float(exact)) < 1e-6 * float(exact)


@pytest.mark.parametrize("name", ["mlp", "cnn_batchnorm_train", "tied_weights"])
def test_trace_is_within_three_standard_errors_of_the_dense_trace(name: str) -> None:
    make, mode = MODELS[name]
    model, batch = make()
    exact = float(torch.trace(dense_hessian(model, batch, mode)))
    for method in ("hutch++", "hutchinson"):
        estimate = dl.hessian_trace(model, LOSS, batch, samples=60, method=method, mode=mode)
        assert estimate.matvecs == 60
        assert abs(estimate.value - exact) <= 3 * estimate.stderr + 1e-9 * abs(exact)


@pytest.mark.parametrize("name", ["mlp", "attention_layernorm"])
def test_density_moments_match_the_dense_spectrum(name: str) -> None:
    make, mode = MODELS[name]
    model, batch = make()
    matrix = dense_hessian(model, batch, mode)
    size = matrix.shape[0]
    runs = 8
    density = dl.hessian_density(model, LOSS, batch, runs=runs, iters=20)
    assert abs(float(density.weights.sum()) - 1) < 1e-10
    found = density.moments(4)
    power = torch.eye(size, dtype=torch.float64)
    for p in range(1, 5):
        power = power @ matrix
        exact = float(torch.trace(power)) / size
        # the SLQ moment is a Hutchinson estimate of tr(H^p)/P: Var = 2(‖H^p‖_F² − Σ diag²)/P²/runs
        sd = float(2 * (power.pow(2).sum() - power.diagonal().pow(2).sum())) ** 0.5 / size / runs**0.5
        assert abs(found[p] - exact) <= 4 * sd + 1e-12, (p, found[p], exact, sd)


# ----------------------------------------------------------------------------- options


def test_ggn_eigenvalues_match_the_dense_gauss_newton_matrix() -> None:
    model, (x, y) = _mlp()
    with isolated(model):
        fn = ModelFunction(model, LOSS, (x, y))
        jacobian = torch.autograd.functional.jacobian(lambda v: fn.outputs(fn.as_params(v)), fn.vector())
        probs = torch.softmax(fn.outputs(), dim=1)
    # cross-entropy's Hessian in the logits of example i is (diag p_i − p_i p_iᵀ)/m
    out_hessian = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]) / len(y)
    ggn = torch.einsum("iap,iab,ibq->pq", jacobian, out_hessian, jacobian)
    exact = torch.linalg.eigvalsh((ggn + ggn.T) / 2)
    found = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, curvature="ggn")
    assert _relative_error(found.values, exact.flip(0)[:3]) < 1e-4


def test_per_layer_spectra_are_the_eigenvalues_of_the_diagonal_blocks() -> None:
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    results = dl.hessian_eigenvalues(model, LOSS, batch, k=2, params="per_layer")
    assert list(results) == ["0", "2", "4"]
    offset = 0
    for layer, names in zip(results, [["0.weight", "0.bias"], ["2.weight", "2.bias"], ["4.weight", "4.bias"]],
                            strict=True):
        size = sum(dict(model.named_parameters())[n].numel() for n in names)
        block = matrix[offset : offset + size, offset : offset + size]
        offset += size
        assert _relative_error(results[layer].values, torch.linalg.eigvalsh(block).flip(0)[:2]) < 1e-4
    traces = dl.hessian_trace(model, LOSS, batch, params="per_layer", samples=30)
    assert set(traces) == {"0", "2", "4"}


def test_parameter_subset_gives_the_block_of_those_parameters() -> None:
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    block = matrix[-33:, -33:]  # 4.weight (30) and 4.bias (3) are the last parameters
    found = dl.hessian_eigenvalues(model, LOSS, batch, k=1, params=["4.weight", "4.bias"])
    assert found.num_params == 33
    assert _relative_error(found.values, torch.linalg.eigvalsh(block)[-1:]) < 1e-6


def test_batch_size_dependence_is_the_mean_over_sub_batches() -> None:
    model, (x, y) = _mlp()
    found = dl.hessian_eigenvalues(model, LOSS, (x, y), k=1, batch_size=8)
    assert found.batch_values.shape == (3, 1)
    for i in range(3):
        sub = (x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        exact = torch.linalg.eigvalsh(dense_hessian(model, sub))[-1]
        assert abs(float(found.batch_values[i, 0]) - float(exact)) < 1e-6 * float(exact)
    assert torch.allclose(found.values, found.batch_values.mean(0))


def test_gradient_overlap_is_the_share_of_the_gradient_in_the_top_subspace() -> None:
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    with isolated(model):
        gradient = ModelFunction(model, LOSS, batch).vector(ModelFunction(model, LOSS, batch).grad())
    _, vectors = torch.linalg.eigh(matrix)
    top = vectors[:, -3:]
    exact = float((top.T @ gradient).pow(2).sum() / gradient.pow(2).sum())
    found = dl.hessian_eigenvalues(model, LOSS, batch, k=3, gradient_overlap=True)
    assert abs(found.gradient_overlap - exact) < 1e-4  # eigenvector error ≈ residual / gap


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h() -> None:
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    g = torch.Generator().manual_seed(3)
    diagonal = torch.rand(matrix.shape[0], generator=g, dtype=torch.float64) + 0.1
    exact = torch.linalg.eigvals(torch.diag(1 / diagonal) @ matrix).real.max()
    found = dl.hessian_eigenvalues(model, LOSS, batch, preconditioner=diagonal)
    assert abs(found.max - float(exact)) < 1e-6 * float(exact)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_read_from_the_optimizer_state(amsgrad: bool) -> None:
    """P is Adam's own: its step is exactly -lr P^-1 m_t (with AMSGrad, P holds the running
    maximum of the second moment, as Adam's update does)."""
    from dynlens.measures.hessian import adam_preconditioner

    model, (x, y) = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, amsgrad=amsgrad)
    assert adam_preconditioner(optimizer, model) is None
    for scale in (1.0, 1.0, 1e-3):  # the second moment then falls below its running maximum
        optimizer.zero_grad()
        (scale * LOSS(model(x), y)).backward()
        optimizer.step()
    found = adam_preconditioner(optimizer, model)
    p = model[0].weight
    state = optimizer.state[p]
    second = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
    expected = (1 - 0.9**3) * ((second / (1 - 0.99**3)).sqrt() + 1e-8)
    assert torch.allclose(found["0.weight"], expected)
    # an Adam step is then exactly -lr * P^-1 m_t
    before = p.detach().clone()
    optimizer.zero_grad()
    LOSS(model(x), y).backward()
    m_t = 0.9 * state["exp_avg"] + 0.1 * p.grad
    optimizer.step()
    precond_next = adam_preconditioner(optimizer, model)["0.weight"]
    assert torch.allclose(p.detach() - before, -1e-3 * m_t / precond_next, atol=1e-12)


def test_adam_preconditioner_of_parameters_adam_does_not_move_is_a_clear_error() -> None:
    model, (x, y) = _mlp()
    optimizer = torch.optim.Adam(model[4].parameters(), lr=1e-3)
    LOSS(model(x), y).backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"no state for the parameters \['0.weight'.*pass params="):
        dl.hessian_eigenvalues(model, LOSS, (x, y), preconditioner=optimizer)
    found = dl.hessian_eigenvalues(model, LOSS, (x, y), preconditioner=optimizer, params=["4.weight", "4.bias"])
    assert found.converged and found.max > 0


# ----------------------------------------------------------------------------- bounded memory


def _operators(make, curvature: str, chunk_size: int | None, hvp: str = "auto", loss=LOSS):
    model, batch = make()
    with isolated(model):
        fn = ModelFunction(model, loss, batch)
        op, gradient = curvature_operator(fn, curvature, hvp, chunk_size=chunk_size)
        g = torch.Generator().manual_seed(5)
        block = torch.randn(fn.num_params, 3, generator=g, dtype=torch.float64)
        return op.mv(block[:, 0]), op.mm(block), gradient, op.matvecs


def _relative_distance(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float((found - exact).norm() / exact.norm())


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn_batchnorm_eval"])
def test_sub_batched_products_and_gradient_equal_the_whole_batch_ones(make, curvature: str) -> None:
    """Batches of 24 and 12 examples in sub-batches of at most 5 (the last one smaller): each
    product is Σ_s (m_s/m) C_s v, which is C v for a mean of per-example losses."""
    whole_mv, whole_mm, whole_gradient, _ = _operators(make, curvature, None)
    mv, mm, gradient, matvecs = _operators(make, curvature, 5)
    assert _relative_distance(mv, whole_mv) < 1e-10
    assert _relative_distance(mm, whole_mm) < 1e-10
    assert _relative_distance(gradient, whole_gradient) < 1e-10
    assert matvecs == 1 + 3  # one product a vector, however many sub-batches it takes


@pytest.mark.parametrize("hvp", ["reuse", "forward_over_reverse"])
def test_sub_batched_hessian_products_of_either_method_match_the_dense_hessian(hvp: str) -> None:
    """hvp="reuse" rebuilds each sub-batch's graph for every product; the oracle is the dense
    Hessian of the whole batch."""
    model, batch = _mlp()
    matrix = dense_hessian(model, batch)
    mv, mm, _, _ = _operators(_mlp, "hessian", 7, hvp=hvp)
    block = torch.randn(matrix.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert _relative_distance(mv, matrix @ block[:, 0]) < 1e-10
    assert _relative_distance(mm, matrix @ block) < 1e-10


def test_sub_batched_products_of_a_loss_without_forward_mode_derivative_use_the_reused_graph() -> None:
    """torch 2.13 has no forward-mode derivative of mse_loss's backward; hvp="auto" then falls
    back to a reused graph per sub-batch and product."""

    def regression():
        model, (x, _) = _mlp()
        return model, (x, torch.randn(len(x), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))

    whole_mv, whole_mm, _, _ = _operators(regression, "hessian", None, loss=nn.MSELoss())
    mv, mm, _, _ = _operators(regression, "hessian", 5, loss=nn.MSELoss())
    assert _relative_distance(mv, whole_mv) < 1e-10 and _relative_distance(mm, whole_mm) < 1e-10


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn_batchnorm_eval"])
def test_eigenvalues_with_chunk_size_match_the_dense_hessian(make) -> None:
    model, batch = make()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch)).flip(0)[:3]
    found = dl.hessian_eigenvalues(model, LOSS, batch, k=3, chunk_size=5)
    assert found.converged and _relative_error(found.values, exact) < 1e-4


def test_trace_and_density_with_chunk_size_equal_the_whole_batch_ones() -> None:
    """The same probe vectors through the same operator (to rounding) give the same estimates."""
    model, batch = _mlp()
    whole = dl.hessian_trace(model, LOSS, batch, samples=12)
    chunked = dl.hessian_trace(model, LOSS, batch, samples=12, chunk_size=5)
    assert chunked.matvecs == whole.matvecs == 12
    assert abs(chunked.value - whole.value) < 1e-10 * abs(whole.value)
    density = dl.hessian_density(model, LOSS, batch, runs=2, iters=8)
    chunked_density = dl.hessian_density(model, LOSS, batch, runs=2, iters=8, chunk_size=5)
    assert chunked_density.matvecs == density.matvecs
    torch.testing.assert_close(chunked_density.nodes, density.nodes, rtol=1e-8, atol=1e-10)


def test_chunk_size_in_train_mode_with_batchnorm_is_refused_with_advice() -> None:
    """Batch statistics make every example's loss depend on the others: no sum over sub-batches."""
    model, batch = _cnn()
    with pytest.raises(ValueError, match=r"BatchNorm layers \['1', '4'\].*mode='eval'"):
        dl.hessian_eigenvalues(model, LOSS, batch, mode="train", chunk_size=5)
    with pytest.raises(ValueError, match="BatchNorm"):
        dl.hessian_trace(model, LOSS, batch, mode="train", chunk_size=5)
    whole = dl.hessian_eigenvalues(model, LOSS, batch, mode="train")
    one_chunk = dl.hessian_eigenvalues(model, LOSS, batch, mode="train", chunk_size=12)  # no split
    assert torch.equal(whole.values, one_chunk.values)
    with pytest.raises(ValueError, match="chunk_size"):
        dl.hessian_eigenvalues(model, LOSS, batch, chunk_size=0)


def test_a_lanczos_basis_in_host_memory_gives_the_same_eigenvalues() -> None:
    model, batch = _mlp()
    default = dl.hessian_eigenvalues(model, LOSS, batch, k=3)
    host = dl.hessian_eigenvalues(model, LOSS, batch, k=3, memory=0)
    assert host.matvecs == default.matvecs
    torch.testing.assert_close(host.values, default.values, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- warm start


def test_a_warm_start_from_earlier_eigenvectors_needs_no_more_products_than_a_cold_start() -> None:
    """After 5 SGD steps the top-3 eigenvectors of the step before start Lanczos; at tol=1e-2
    λ_max is within tol of the tol=1e-8 value, in no more products than a cold start."""
    model, (x, y) = _mlp()
    before = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, return_vectors=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        LOSS(model(x), y).backward()
        optimizer.step()
    exact = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, tol=1e-8)
    cold = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, tol=1e-2)
    warm = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, tol=1e-2, start=before.vectors)
    assert warm.converged and abs(warm.max - exact.max) <= 1e-2 * exact.max
    assert warm.matvecs <= cold.matvecs
    # a single earlier eigenvector is a start too
    single = dl.hessian_eigenvalues(model, LOSS, (x, y), k=1, tol=1e-2, start=before.vectors[:, 0])
    assert abs(single.max - exact.max) <= 1e-2 * exact.max


def test_a_warm_start_keeps_a_small_gaussian_part_so_no_eigenvector_is_missing(monkeypatch) -> None:
    """A start orthogonal to the top eigenvector (the 2nd to 4th eigenvectors plus some of the
    rest, so that the Krylov space never becomes invariant) would never find it: without the
    Gaussian part Lanczos converges to λ_2 instead. The part of relative norm 1e-3 brings the top
    eigenvector in."""
    import dynlens.measures.hessian as hessian

    model, batch = _mlp()
    exact, vectors = torch.linalg.eigh(dense_hessian(model, batch))
    rest = vectors[:, :-4] @ torch.randn(len(exact) - 4, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64)
    start = vectors[:, -4:-1].sum(1) + 1e-2 * rest / rest.norm()
    found = dl.hessian_eigenvalues(model, LOSS, batch, k=1, tol=1e-6, start=start)
    assert abs(found.max - float(exact[-1])) < 1e-6 * float(exact[-1])
    monkeypatch.setattr(hessian, "_WARM_START_NOISE", 0.0)
    missed = dl.hessian_eigenvalues(model, LOSS, batch, k=1, tol=1e-6, start=start)
    assert abs(missed.max - float(exact[-2])) < 1e-6 * float(exact[-2])


def test_a_warm_start_of_the_wrong_shape_is_a_clear_error() -> None:
    model, batch = _mlp()
    size = sum(p.numel() for p in model.parameters())
    for bad in (torch.ones(size + 1), torch.ones(size, 2, 1), torch.ones(2, size)):
        with pytest.raises(ValueError, match=rf"shape \({size},\) or .* \({size}, j\)"):
            dl.hessian_eigenvalues(model, LOSS, batch, start=bad)
    with pytest.raises(ValueError, match="zero"):
        dl.hessian_eigenvalues(model, LOSS, batch, start=torch.zeros(size))
    with pytest.raises(ValueError, match="per_layer"):
        dl.hessian_eigenvalues(model, LOSS, batch, start=torch.ones(size), params="per_layer")


# ----------------------------------------------------------------------------- no side effects


def test_measurements_leave_grad_buffers_flags_and_rng_untouched() -> None:
    model, (x, y) = _cnn()
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    LOSS(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    params = [p.detach().clone() for p in model.parameters()]
    for mode in ("eval", "train"):
        dl.hessian_eigenvalues(model, LOSS, (x, y), k=2, mode=mode, gradient_overlap=True)
        dl.hessian_trace(model, LOSS, (x, y), samples=8, mode=mode)
        dl.hessian_density(model, LOSS, (x, y), runs=2, iters=5, mode=mode)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_attention_hessian_works_while_fused_kernels_stay_selected_outside() -> None:
    model, batch = _attention()
    result = dl.hessian_eigenvalues(model, LOSS, batch)
    assert result.converged and result.max > 0
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


class _Compiled(nn.Module):
    """The MLP of _mlp inside a module of user code (dynamo does not compile torch.nn's own
    frames, so ``compile()`` in place needs one); ``inside=True`` wraps its first layer alone by
    torch.compile (a compiled submodule)."""

    def __init__(self, mlp: nn.Module, inside: bool = False) -> None:
        super().__init__()
        self.mlp = mlp
        if inside:
            self.mlp[0] = torch.compile(mlp[0], backend="aot_eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _second_derivative_fails(model: nn.Module, batch: tuple) -> bool:
    """Whether plain autograd through ``model`` fails at the second derivative, as through
    torch.compile'd code (aot_autograd raises)."""
    params = list(model.parameters())
    g = torch.autograd.grad(LOSS(model(batch[0]), batch[1]), params, create_graph=True)
    try:
        torch.autograd.grad(sum(t.sum() for t in g), params, allow_unused=True)
    except RuntimeError as err:
        return "double backward" in str(err)
    return False


def test_compiled_models_are_measured_through_their_eager_module() -> None:
    """torch.compile'd code has no double backward; a compiled model is measured through the
    module it wraps, with that module's parameter names, and compiled code inside a model runs
    eagerly for the measurement (the dense Hessian is the oracle)."""
    model, batch = _mlp()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batch)).flip(0)[:2]
    wrapped = torch.compile(model, backend="aot_eager")
    assert _second_derivative_fails(wrapped, batch)  # what the measurement must avoid
    assert _relative_error(dl.hessian_eigenvalues(wrapped, LOSS, batch, k=2).values, exact) < 1e-4
    per_layer = dl.hessian_eigenvalues(wrapped, LOSS, batch, params="per_layer")
    assert list(per_layer) == list(dl.hessian_eigenvalues(model, LOSS, batch, params="per_layer"))
    assert abs(dl.hessian_trace(wrapped, LOSS, batch, samples=8).value
               - dl.hessian_trace(model, LOSS, batch, samples=8).value) < 1e-10
    assert _relative_error(dl.hessian_eigenvalues(nn.DataParallel(model), LOSS, batch, k=2).values, exact) < 1e-4

    in_place = _Compiled(_mlp()[0])
    in_place.compile(backend="aot_eager")
    assert _second_derivative_fails(in_place, batch)
    assert _relative_error(dl.hessian_eigenvalues(in_place, LOSS, batch, k=2).values, exact) < 1e-4

    inside = _Compiled(_mlp()[0], inside=True)
    assert _second_derivative_fails(inside, batch)
    if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6 runs any compiled code eagerly
        assert _relative_error(dl.hessian_eigenvalues(inside, LOSS, batch, k=2).values, exact) < 1e-4
    else:
        with pytest.raises(ValueError, match="torch >= 2.6"):
            dl.hessian_eigenvalues(inside, LOSS, batch, k=2, hvp="reuse")


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_is_measured_as_the_plain_model(use_reentrant: bool) -> None:
    """The reentrant kind refuses torch.autograd.grad and has no second derivative; the
    non-reentrant kind recomputes its block in backward. Measurements run the blocks as plain
    calls (the same values) and leave checkpointing in place for training."""
    import torch.utils.checkpoint as ckpt

    model, (x, y) = Checkpointed(use_reentrant).double(), _mlp()[1]
    plain = Checkpointed(None).double()
    exact = torch.linalg.eigvalsh(dense_hessian(plain, (x, y))).flip(0)[:3]
    originals = (ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator)
    for hvp in ("reuse", "forward_over_reverse"):
        found = dl.hessian_eigenvalues(model, LOSS, (x, y), k=3, hvp=hvp)
        assert _relative_error(found.values, exact) < 1e-8
    assert (ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator) == originals
    with pytest.raises(RuntimeError, match=r"\.grad\(\)") if use_reentrant else contextlib.nullcontext():
        torch.autograd.grad(LOSS(model(x), y), list(model.parameters()))  # what a measurement avoids


# ----------------------------------------------------------------------------- bad input


def test_k_larger_than_the_parameter_count_is_a_clear_error() -> None:
    model, batch = _mlp()
    with pytest.raises(ValueError, match="at most"):
        dl.hessian_eigenvalues(model, LOSS, batch, k=10_000)


def test_a_loss_without_second_derivative_is_a_clear_error() -> None:
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x.pow(2)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    model, batch = _mlp()

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return Once.apply(outputs).mean()

    with pytest.raises(ValueError, match="twice differentiable"):
        dl.hessian_eigenvalues(model, loss_fn, batch)

    def error_rate(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) != targets).double().mean()

    with pytest.raises(ValueError, match="twice differentiable"):
        dl.hessian_trace(model, error_rate, batch)


def test_a_non_finite_loss_is_a_clear_error() -> None:
    model, (x, y) = _mlp()
    x = x.clone()
    x[0, 0] = float("nan")
    for measure in (dl.hessian_eigenvalues, dl.hessian_trace, dl.hessian_density):
        with pytest.raises(ValueError, match="non-finite"):
            measure(model, LOSS, (x, y))


def test_unknown_options_are_clear_errors() -> None:
    model, batch = _mlp()
    with pytest.raises(ValueError, match="curvature"):
        dl.hessian_eigenvalues(model, LOSS, batch, curvature="fisher")
    with pytest.raises(ValueError, match="which"):
        dl.hessian_eigenvalues(model, LOSS, batch, which="middle")
    with pytest.raises(ValueError, match="start"):
        dl.hessian_eigenvalues(model, LOSS, batch, start="ones")
    with pytest.raises(ValueError, match="per_layer"):
        dl.hessian_trace(model, LOSS, batch, params="layers")


# ----------------------------------------------------------------------------- against PyHessian


def test_top_eigenvalue_and_trace_agree_with_pyhessian() -> None:
    pyhessian = pytest.importorskip("pyhessian")
    model, batch = _mlp(torch.float32)
    probe = copy.deepcopy(model)  # PyHessian calls backward() on the model it gets
    torch.manual_seed(0)
    computer = pyhessian.hessian(probe, LOSS, data=batch, cuda=False)
    top, _ = computer.eigenvalues(top_n=1)
    samples = computer.trace(maxIter=200)
    ours = dl.hessian_eigenvalues(model, LOSS, batch, tol=1e-5)
    # PyHessian stops its power iteration at a relative change of 1e-3
    assert abs(top[0] - ours.max) <= 5e-3 * ours.max
    trace = dl.hessian_trace(model, LOSS, batch, samples=90)
    pyhessian_stderr = np.std(samples, ddof=1) / np.sqrt(len(samples))
    assert abs(np.mean(samples) - trace.value) <= 3 * (pyhessian_stderr + trace.stderr)
