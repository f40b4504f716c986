"""Compiled, half-precision and recurrent models on CUDA (skipped without a GPU): inductor code
has no double backward, bfloat16 products carry ~1e-2 error, and cuDNN's RNN backward runs only
in training mode; each is measured as its eager float32 (native-kernel) self."""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import dynlens as dl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LOSS = nn.CrossEntropyLoss()


class _Net(nn.Module):
    """User code (dynamo compiles its frames): a small CNN with BatchNorm and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Tanh())
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _case() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 3, 8, 8, generator=g).cuda(), torch.randint(0, 5, (32,), generator=g).cuda())
    return _Net().cuda().eval(), batch


def test_an_inductor_compiled_model_is_measured_as_its_eager_module_and_trains_on() -> None:
    model, batch = _case()
    eager = dl.hessian_eigenvalues(model, LOSS, batch, k=2)
    compiled = torch.compile(model)  # inductor: generated kernels, no double backward
    compiled(batch[0])
    found = dl.hessian_eigenvalues(compiled, LOSS, batch, k=2)
    np.testing.assert_allclose(found.values, eager.values, rtol=1e-5)
    in_place = copy.deepcopy(model)
    in_place.compile()
    in_place(batch[0])
    np.testing.assert_allclose(dl.hessian_eigenvalues(in_place, LOSS, batch, k=2).values, eager.values, rtol=1e-5)
    # the Lens on a compiled model in training: every probe measures, none fails
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as tmp:
        with dl.Lens(compiled, LOSS, batch, optimizer, run_dir=tmp,
                     probes=[p.with_schedule(every=2) for p in dl.probes.default()], budget=None) as lens:
            compiled.train()
            for _ in range(4):
                optimizer.zero_grad()
                loss = LOSS(compiled(batch[0]), batch[1])
                loss.backward()
                optimizer.step()
                lens.step(loss=loss)
        run = dl.load_run(tmp)
        assert run.events().empty, run.events().message.tolist()
        assert {"hessian", "coherence"} <= set(run.probes())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_measured_as_its_float32_copy(dtype: torch.dtype) -> None:
    model, (x, y) = _case()
    half = model.to(dtype)
    single = copy.deepcopy(half).float()  # the same (rounded) weights, in float32
    xh = x.to(dtype)
    for measure in (lambda m, b: dl.hessian_eigenvalues(m, LOSS, b, k=3).values,
                    lambda m, b: torch.tensor(dl.hessian_trace(m, LOSS, b, samples=12).value),
                    lambda m, b: torch.tensor(dl.gradient_coherence(m, LOSS, b).alpha)):
        np.testing.assert_allclose(measure(half, (xh, y)), measure(single, (xh.float(), y)), rtol=1e-5)
    assert all(p.dtype == dtype for p in half.parameters())


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = kind(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_a_recurrent_model_in_eval_mode_is_measured_with_the_native_kernels(kind: type[nn.RNNBase]) -> None:
    """The CPU's numbers on the same float64 model are the oracle; cuDNN stays on for training."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    model = _Recurrent(kind).double().eval()
    on_cpu = dl.hessian_eigenvalues(model, LOSS, (x, y), k=2).values
    coherence_cpu = dl.gradient_coherence(model, LOSS, (x, y)).alpha
    model.cuda()
    with pytest.raises(RuntimeError, match="training mode"):  # what the measurement avoids
        LOSS(model(x.cuda()), y.cuda()).backward()
    model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(dl.hessian_eigenvalues(model, LOSS, (x, y), k=2).values, on_cpu, rtol=1e-8)
    np.testing.assert_allclose(dl.gradient_coherence(model, LOSS, (x, y)).alpha, coherence_cpu, rtol=1e-8)
    assert torch.backends.cudnn.enabled

