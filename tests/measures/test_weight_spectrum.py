"""dl.measures.weight_spectrum against torch.linalg.svdvals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynlens.measures.weight_spectrum import weight_matrices, weight_spectrum


def _exact(parameter: torch.Tensor) -> tuple[float, float]:
    singular = torch.linalg.svdvals(parameter.detach().double().reshape(parameter.shape[0], -1))
    return float(singular[0]), float((singular**2).sum() / singular[0] ** 2)


def test_top_singular_value_and_stable_rank_match_the_svd_of_every_kind_of_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
                          nn.Linear(10, 1), nn.Embedding(50, 4), nn.LayerNorm(4))
    result = weight_spectrum(model)
    matrices = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    assert result.names == tuple(n for n, _ in matrices)  # biases and LayerNorm left out
    assert result.shapes == ((8, 27), (10, 288), (1, 10), (50, 4))
    for (_, parameter), top, rank in zip(matrices, result.top_singular_value, result.stable_rank, strict=True):
        exact_top, exact_rank = _exact(parameter)
        assert top == pytest.approx(exact_top, rel=1e-6)
        assert rank == pytest.approx(exact_rank, rel=1e-5)
    assert (result.products >= 1).all()


def test_a_rank_one_matrix_has_stable_rank_one_and_equal_singular_values_the_full_rank():
    model = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.outer(torch.arange(1.0, 5.0), torch.ones(6)))
    result = weight_spectrum(model)
    assert result.stable_rank[0] == pytest.approx(1.0, rel=1e-6)
    assert result.top_singular_value[0] == pytest.approx(float(torch.arange(1.0, 5.0).norm() * 6**0.5), rel=1e-6)
    with torch.no_grad():
        model.weight.copy_(3 * torch.eye(4, 6))
    result = weight_spectrum(model)
    assert result.stable_rank[0] == pytest.approx(4.0, rel=1e-6)
    assert result.top_singular_value[0] == pytest.approx(3.0, rel=1e-6)


def test_float64_and_bfloat16_weights_and_a_zero_matrix():
    torch.manual_seed(1)
    model = nn.Linear(7, 5).double()
    exact_top, _ = _exact(model.weight)
    assert weight_spectrum(model, tol=1e-10).top_singular_value[0] == pytest.approx(exact_top, rel=1e-12)
    half = nn.Linear(7, 5).to(torch.bfloat16)
    exact_top, _ = _exact(half.weight.float())
    assert weight_spectrum(half).top_singular_value[0] == pytest.approx(exact_top, rel=1e-5)
    zero = nn.Linear(3, 3, bias=False)
    nn.init.zeros_(zero.weight)
    result = weight_spectrum(zero)
    assert result.top_singular_value[0] == 0.0 and result.products[0] == 0


def test_frozen_weights_are_left_out_unless_asked_for_and_no_matrix_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert [n for n, _ in weight_matrices(model)] == ["1.weight"]
    assert weight_spectrum(model, trainable_only=False).names == ("0.weight", "1.weight")
    with pytest.raises(ValueError, match="no weight matrix"):
        weight_spectrum(nn.LayerNorm(4))
    before = [p.detach().clone() for p in model.parameters()]
    weight_spectrum(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
