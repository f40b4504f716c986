"""dynlens.measures.stability: the Hessian probe's measurement, against a dense Hessian."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import dense_hessian
from torch import nn

from dynlens.functional import ModelFunction, isolated
from dynlens.measures.stability import StabilityOptions, stability_measurement


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 4, generator=g).double(), torch.randint(0, 3, (16,), generator=g))
    return model, batch


def test_every_part_against_the_dense_hessian_and_the_thresholds_rule():
    model, batch = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, nn.CrossEntropyLoss(), batch))
    with isolated(model):
        result = stability_measurement(ModelFunction(model, nn.CrossEntropyLoss(), batch), optimizer, model,
                                       StabilityOptions(tol=1e-8, tol_min=1e-8, trace_samples=200, max_iters=200))
    values = result.values
    assert values["sharpness"] == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert values["lambda_min"] == pytest.approx(float(eigenvalues[0]), rel=1e-6, abs=1e-8)
    assert values["trace"] == pytest.approx(float(eigenvalues.sum()), rel=1e-6)  # 200 ≥ P samples: exact
    assert values["threshold"] == pytest.approx(3.8 / 0.1)
    assert values["sharpness_ratio"] == pytest.approx(values["sharpness"] / values["threshold"])
    assert result.compared_cold and result.products == values["hvps"]
    assert set(result.vectors) == {"hessian"}


def test_a_gate_that_declines_leaves_out_the_optional_parts_and_a_warm_start_is_used():
    model, batch = _problem()
    seen = []

    def decline(name, enabled, predicted, spent):
        seen.append((name, enabled, predicted >= 0, spent >= 0))
        return None

    fn = ModelFunction(model, nn.CrossEntropyLoss(), batch)
    with isolated(model):
        first = stability_measurement(fn, None, model, StabilityOptions(tol=1e-6), gate=decline)
        second = stability_measurement(fn, None, model, StabilityOptions(tol=1e-6), previous=first.vectors,
                                       gate=lambda *args: contextlib.nullcontext() if args[0] == "trace" else None)
    assert "lambda_min" not in first.values and "trace" not in first.values
    assert [s[0] for s in seen] == ["lambda_min", "trace", "density"] and all(all(s[2:]) for s in seen)
    assert second.values["warm_start"] == 1.0 and not second.compared_cold
    assert second.compared_products < first.compared_products
    assert second.values["sharpness"] == pytest.approx(first.values["sharpness"], rel=1e-9)
    assert "trace" in second.values
