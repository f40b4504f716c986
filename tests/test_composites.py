"""Layers without a second derivative in PyTorch (nn.Hardsigmoid, nn.EmbeddingBag) measured
through composites of equal value: the composites against the kernels, the Hessian against a
dense one, coherence against the per-example loop, and training left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_hessian, sgd_steps
from torch import nn

import dynlens as dl
from dynlens.composites import (
    composite_layers,
    cosine_similarity,
    embedding_bag,
    hardsigmoid,
    normalize,
)
from dynlens.functional import isolated


def _value_and_grad(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], cotangent)
    return out, grads


@pytest.mark.parametrize("inplace", [False, True])
def test_hardsigmoid_composite_equals_the_kernel_and_its_first_derivative(inplace):
    x = torch.randn(1000, dtype=torch.float64) * 4
    x = x[(x.abs() - 3).abs() > 1e-6]  # away from the kinks at ±3
    run = (lambda t: F.hardsigmoid(t.clone(), inplace)), (lambda t: hardsigmoid(t.clone(), inplace))
    (a, (ga,)), (b, (gb,)) = (_value_and_grad(f, x) for f in run)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # the derivative: 1/6 between the kinks, else 0 (the cotangent is the seeded Gaussian)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    torch.testing.assert_close(gb, cotangent * ((x.abs() < 3).double() / 6), rtol=0, atol=1e-15)
    # the kernel's backward multiplies by a float32 1/6 (3e-8 relative): equal to that
    torch.testing.assert_close(gb, ga, rtol=1e-7, atol=0)


BAGS = [
    ({"mode": "sum"}, "2d"), ({"mode": "mean"}, "2d"), ({"mode": "max"}, "2d"),
    ({"mode": "sum"}, "offsets"), ({"mode": "mean"}, "offsets"), ({"mode": "max"}, "offsets"),
    ({"mode": "sum", "include_last_offset": True}, "offsets"),
    ({"mode": "mean", "include_last_offset": True}, "offsets"),
    ({"mode": "sum"}, "weights"), ({"mode": "sum"}, "weights-2d"),
    ({"mode": "mean", "padding_idx": 2}, "2d"), ({"mode": "sum", "padding_idx": 2}, "offsets"),
    ({"mode": "max", "padding_idx": 2}, "offsets"), ({"mode": "mean"}, "empty-bag"),
]


@pytest.mark.parametrize(("options", "layout"), BAGS)
def test_embedding_bag_composite_equals_the_kernel_and_its_first_derivative(options, layout):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 4, generator=g, dtype=torch.float64)
    if layout in ("2d", "weights-2d"):
        indices, offsets = torch.randint(0, 10, (5, 3), generator=g), None
    else:
        indices = torch.randint(0, 10, (12,), generator=g)
        indices[[1, 5]] = 2  # padding_idx's rows appear
        offsets = torch.tensor([0, 3, 3, 7, 12] if layout == "empty-bag" else [0, 3, 4, 9])
        if options.get("include_last_offset"):
            offsets = torch.cat([offsets, torch.tensor([12])])
    weights = (torch.rand(indices.shape, generator=g, dtype=torch.float64) if layout.startswith("weights")
               else None)

    def kernel(w, *psw):
        return F.embedding_bag(indices, w, offsets, per_sample_weights=psw[0] if psw else None, **options)

    def composite(w, *psw):
        return embedding_bag(indices, w, offsets, per_sample_weights=psw[0] if psw else None, **options)

    tensors = [weight] + ([weights] if weights is not None else [])
    (a, ga), (b, gb) = _value_and_grad(kernel, *tensors), _value_and_grad(composite, *tensors)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    for x, y in zip(gb, ga, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


class Recommender(nn.Module):
    """An embedding bag feeding a squeeze-excitation-like gate (hardsigmoid) and hardswish."""

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 5, mode=mode)
        self.gate = nn.Sequential(nn.Linear(5, 5), nn.Hardsigmoid())
        self.head = nn.Sequential(nn.Linear(5, 6), nn.Hardswish(), nn.Linear(6, 3))

    def forward(self, x):
        h = self.bag(x)
        return self.head(h * self.gate(h))


def _problem(mode: str = "mean"):
    torch.manual_seed(0)
    model = Recommender(mode).double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 12, (16, 4), generator=g), torch.randint(0, 3, (16,), generator=g))


def _dense_hessian(model, batch) -> torch.Tensor:
    with composite_layers():  # the kernels have no double backward: the oracle needs them too
        return torch.linalg.eigvalsh(dense_hessian(model, nn.CrossEntropyLoss(), batch))


@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_hessian_of_a_model_with_embedding_bag_hardsigmoid_and_hardswish_matches_a_dense_one(mode):
    model, batch = _problem(mode)
    exact = _dense_hessian(model, batch)
    top = dl.hessian_eigenvalues(model, nn.CrossEntropyLoss(), batch, k=2, tol=1e-10)
    bottom = dl.hessian_eigenvalues(model, nn.CrossEntropyLoss(), batch, k=1, which="bottom", tol=1e-10)
    torch.testing.assert_close(top.values, exact[-2:].flip(0), rtol=1e-6, atol=1e-10)
    assert float(bottom.values[0]) == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-10)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    first = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="not implemented"):  # the kernel alone fails
        torch.autograd.grad(first.sum(), x)


def test_coherence_through_the_composites_matches_the_per_example_loop():
    model, batch = _problem("sum")
    result = dl.gradient_coherence(model, nn.CrossEntropyLoss(), batch, stiffness=False)
    grads = []
    for i in range(len(batch[1])):
        model.zero_grad()
        F.cross_entropy(model(batch[0][i:i + 1]), batch[1][i:i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    stacked = torch.stack(grads)
    alpha = float((stacked.mean(0) ** 2).sum() / (stacked**2).sum(1).mean())
    assert result.alpha == pytest.approx(alpha, rel=1e-8)


def test_the_composites_are_in_place_only_inside_a_measurement_and_training_is_bit_identical(tmp_path):
    original = F.hardsigmoid, F.embedding_bag, F.normalize, F.cosine_similarity
    model, batch = _problem()
    with isolated(model):
        assert (F.hardsigmoid, F.embedding_bag, F.normalize, F.cosine_similarity) == (
            hardsigmoid, embedding_bag, normalize, cosine_similarity)
    assert (F.hardsigmoid, F.embedding_bag, F.normalize, F.cosine_similarity) == original

    def train(lens_dir):
        model, batch = _problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        lens = None if lens_dir is None else dl.Lens(
            model, nn.CrossEntropyLoss(), batch, optimizer, run_dir=lens_dir, budget=None,
            probes=[p.with_schedule(every=2) for p in dl.probes.default()])
        sgd_steps(model, nn.CrossEntropyLoss(), batch, optimizer, lens, 5)
        if lens is not None:
            lens.close()
            assert dl.load_run(lens_dir).events().query("level == 'error'").empty
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(None), train(tmp_path), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [1, -1])
def test_normalize_composite_equals_the_kernel_and_its_first_derivative(dim):
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    x[1] = 0.0  # zero vectors: the kernel's x/eps, whose second derivative is NaN
    x[2] *= 1e-14  # below eps
    eps = 1e-12
    a, ga = _value_and_grad(lambda t: F.normalize(t, 2.0, dim, eps), x)
    b, gb = _value_and_grad(lambda t: normalize(t, 2.0, dim, eps), x)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-12, atol=1e-12 * float(ga[0].abs().max()))
    torch.testing.assert_close(normalize(x, 1.0, dim), F.normalize(x, 1.0, dim), rtol=0, atol=0)  # p=1: the kernel


class ZeroKeys(nn.Module):
    """Swin V2's case: keys without bias on inputs that include zero vectors (the padding of a
    window), normalised, against normalised queries."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(1, 3)

    def forward(self, x):  # x: (n, tokens, 4)
        q, k = F.normalize(self.query(x), dim=-1), F.normalize(self.key(x), dim=-1)
        return self.head((q * k).sum(-1).mean(1, keepdim=True))


@pytest.mark.parametrize("dim", [1, -1])
def test_cosine_similarity_composite_equals_the_kernel_and_its_first_derivative(dim):
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 1e-10, 0.0):  # above eps, below it, zero
        x1 = torch.randn(6, 5, 4, dtype=torch.float64, generator=g) * scale
        x1[1] = 0.0
        x2 = torch.randn(1, 5, 4, dtype=torch.float64, generator=g)  # broadcast
        a, ga = _value_and_grad(lambda s, t: F.cosine_similarity(s, t, dim), x1, x2)
        b, gb = _value_and_grad(lambda s, t: cosine_similarity(s, t, dim), x1, x2)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for mine, kernel in zip(gb, ga, strict=True):
            torch.testing.assert_close(mine, kernel, rtol=1e-12, atol=1e-12 * float(kernel.abs().max()) + 1e-300)


class CosineHead(nn.Module):
    """nn.CosineSimilarity between a bias-free projection (zero for a zero input) and learned
    class prototypes."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(4, 3, bias=False)
        self.prototypes = nn.Parameter(torch.randn(3, 3))
        self.similarity = nn.CosineSimilarity(dim=-1)

    def forward(self, x):  # x: (n, tokens, 4)
        z = self.project(x).mean(1)
        return 5 * self.similarity(z[:, None, :], self.prototypes[None])


def _zero_key_batch():
    x = torch.randn(8, 5, 4, dtype=torch.float64)
    x[:, 3:] = 0.0  # two padding tokens an example
    return x


def _zero_vector_batch():
    x = torch.randn(8, 5, 4, dtype=torch.float64)
    x[:2] = 0.0  # two examples whose projection is the zero vector
    return x


@pytest.mark.parametrize("build, inputs", [(lambda: ZeroKeys(), _zero_key_batch),
                                           (lambda: CosineHead(), _zero_vector_batch)],
                         ids=["normalize", "cosine_similarity"])
def test_hessian_through_zero_vectors_is_finite_and_matches_gradient_differences(build, inputs):
    torch.manual_seed(0)
    model = build().double()
    x = inputs()
    batch = (x, torch.randint(0, 3, (8,)))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())

    def grad() -> torch.Tensor:  # the kernels' own first derivative, finite at zero vectors
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(x), batch[1]), params)])

    # the oracle: central differences of the gradient, column by column (no second derivative)
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    h, columns = 1e-5, []
    for i in range(flat.numel()):
        for sign in (1, -1):
            shifted = flat.clone()
            shifted[i] += sign * h
            torch.nn.utils.vector_to_parameters(shifted, params)
            columns.append(grad())
    torch.nn.utils.vector_to_parameters(flat, params)
    dense = torch.stack([(columns[2 * i] - columns[2 * i + 1]) / (2 * h) for i in range(flat.numel())])
    exact = torch.linalg.eigvalsh((dense + dense.T) / 2)
    top = dl.hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-10)
    assert torch.isfinite(top.values).all()
    torch.testing.assert_close(top.values, exact[-2:].flip(0), rtol=1e-5, atol=1e-8)
    with torch.enable_grad():  # the kernel alone: NaN
        first = torch.autograd.grad(loss_fn(model(x), batch[1]), params, create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in first), params)
    assert any(torch.isnan(g).any() for g in second)
