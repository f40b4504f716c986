"""Sub-batched Hessian-vector products on a GPU, replayed from CUDA graphs (off by default:
hessian.GRAPHED_SUB_BATCHES). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynlens.functional import ModelFunction, isolated
from dynlens.measures.hessian import curvature_operator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphed_sub_batch_products_equal_the_whole_batch_product(monkeypatch):
    import dynlens.measures.hessian as hessian

    recorded = []

    class Counting(hessian.GraphCache):
        def record(self, key, inputs, body):
            result = super().record(key, inputs, body)
            recorded.append((key, result is not None, dict(self.failed)))
            return result

    monkeypatch.setattr(hessian, "GraphCache", Counting)
    monkeypatch.setattr(hessian, "GRAPHED_SUB_BATCHES", True)  # off by default (its memory)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).cuda()
    x, y = torch.randn(64, 3, 16, 16).cuda(), torch.randint(0, 10, (64,)).cuda()
    with isolated(model):
        fn = ModelFunction(model, nn.CrossEntropyLoss(), (x, y))
        whole, gradient = curvature_operator(fn, "hessian", "reuse")
        split, split_gradient = curvature_operator(fn, "hessian", "reuse", chunk_size=16)
        v = torch.randn(fn.num_params, device="cuda")
        expected = whole.matvec(v)
        for _ in range(3):  # eager, recorded, then replayed
            got = split.matvec(v)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(split_gradient, gradient, rtol=1e-4, atol=1e-7)
        # one shape of sub-batch: recorded once (at its second sight), replayed after
        assert [ok for _, ok, _ in recorded] == [True], recorded
        w = torch.randn(fn.num_params, device="cuda")
        torch.testing.assert_close(split.matvec(w), whole.matvec(w), rtol=1e-4, atol=1e-6)


def test_tf32_products_give_sharpness_within_their_stated_error():
    import dynlens as dl
    from dynlens.probes.base import Context

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 16 * 16, 10)).cuda()
    batch = (torch.randn(64, 3, 16, 16).cuda(), torch.randint(0, 10, (64,)).cuda())
    ctx = Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=batch, optimizer=None, step=0)
    fast = dl.probes.Hessian(precision="tf32", tol=1e-6, trace=False, lambda_min=False).measure(ctx)
    exact = dl.probes.Hessian(tol=1e-6, trace=False, lambda_min=False).measure(ctx)
    assert fast["sharpness"] == pytest.approx(exact["sharpness"], rel=1e-2)
