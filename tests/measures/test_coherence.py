"""dl.gradient_coherence against per-example gradients from a plain loop of loss.backward()."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from helpers import Checkpointed, peak_bytes
from torch import nn

import dynlens as dl
from dynlens.measures.coherence import VmapUnsupportedError

RTOL = 1e-8


# ----------------------------------------------------------------------------- oracle


def loop_gradients(model: nn.Module, loss_fn, x, y) -> tuple[np.ndarray, list[str]]:
    """(m, P) per-example gradients by loss.backward() on one example at a time (a copy of the
    model in eval mode), and the parameter names in column order."""
    model = copy.deepcopy(model).eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=False)
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                               for p in model.parameters() if p.requires_grad]).double().numpy().copy())
    return np.stack(rows), names


def reference(g: np.ndarray, labels: np.ndarray | None, sizes: list[int], names: list[str]) -> dict:
    """Every statistic of the docs' What dynlens measures § Gradient coherence, computed directly from the (m, P) matrix g."""
    m = g.shape[0]
    total = g.sum(0)
    sq = (g ** 2).sum(1)
    out = {"m_coherence": total @ total / sq.sum(), "alpha": (total / m) @ (total / m) / sq.mean()}
    mean, var = g.mean(0), g.var(0)  # population variance
    kept = var > 1e-12 * (g ** 2).mean(0)
    r = np.where(kept, mean ** 2 / np.where(kept, var, 1), np.nan)
    out["gsnr"] = np.nanmean(r)
    out["gsnr_excluded"] = int((~kept).sum())
    layers: dict[str, list[np.ndarray]] = {}
    for name, piece in zip(names, np.split(r, np.cumsum(sizes)[:-1]), strict=True):
        layers.setdefault(name.rsplit(".", 1)[0], []).append(piece)
    out["gsnr_per_layer"] = {k: np.nanmean(np.concatenate(v)) if np.isfinite(np.concatenate(v)).any()
                             else np.nan for k, v in layers.items()}
    trace = ((g - mean) ** 2).sum() / (m - 1)
    out["trace_sigma"] = trace
    out["grad_sq_norm"] = mean @ mean - trace / m
    out["noise_scale"] = trace / out["grad_sq_norm"] if out["grad_sq_norm"] > 0 else np.inf
    out["grad_norms"] = np.sqrt(sq)
    norms = np.sqrt(sq)
    cos = (g @ g.T) / np.outer(norms, norms)
    out["stiffness"] = cos
    off = ~np.eye(m, dtype=bool)
    out["stiffness_mean"] = cos[off].mean()
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        out["stiffness_within"] = cos[same & off].mean()
        out["stiffness_between"] = cos[~same].mean()
        out["per_class"] = {}
        for c in np.unique(labels):
            gc = g[labels == c]
            s = gc.sum(0)
            out["per_class"][int(c)] = s @ s / (gc ** 2).sum()
        classes = np.unique(labels)
        out["class_stiffness"] = np.array([[_mean(cos[np.outer(labels == a, labels == b) & off])
                                            for b in classes] for a in classes])
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else np.nan


def assert_matches(result: dl.Coherence, ref: dict, stiffness: bool = True) -> None:
    for key in ("alpha", "m_coherence", "gsnr", "trace_sigma", "grad_sq_norm", "noise_scale",
                *(("stiffness_mean", "stiffness_within", "stiffness_between") if stiffness else ())):
        if key in ref:
            np.testing.assert_allclose(getattr(result, key), ref[key], rtol=RTOL, err_msg=key)
    np.testing.assert_allclose(result.grad_norms, ref["grad_norms"], rtol=RTOL)
    if stiffness:
        np.testing.assert_allclose(result.stiffness, ref["stiffness"], rtol=RTOL, atol=1e-12)
    else:
        assert result.stiffness is None
    assert result.gsnr_excluded == ref["gsnr_excluded"]
    assert result.gsnr_per_layer.keys() == ref["gsnr_per_layer"].keys()
    for layer, value in ref["gsnr_per_layer"].items():
        np.testing.assert_allclose(result.gsnr_per_layer[layer], value, rtol=RTOL, err_msg=layer)
    if "per_class" in ref:
        assert result.per_class.keys() == ref["per_class"].keys()
        for c, value in ref["per_class"].items():
            np.testing.assert_allclose(result.per_class[c], value, rtol=RTOL)
        if stiffness:
            np.testing.assert_allclose(result.class_stiffness, ref["class_stiffness"], rtol=RTOL)


def _sizes(model: nn.Module) -> list[int]:
    return [p.numel() for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- models


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3)).double()


def cnn_with_batchnorm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def classification_data(m: int = 23, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, features, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (m,), generator=g))


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
@pytest.mark.parametrize("chunk", [5, 64, "auto"])
def test_every_statistic_matches_a_loop_of_single_example_backward_passes_on_an_mlp(chunk, hooks):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = classification_data()
    result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=chunk, hooks=hooks)
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))
    assert result.size == 23 and result.alpha_orthogonal == pytest.approx(1 / 23)
    assert result.method == ("hooks" if hooks else "vmap")


class SequenceHead(nn.Module):
    """A linear layer over the positions of a sequence, then a mean over the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x.reshape(x.shape[0], 2, 3))).mean(dim=1))


def _layer_zoo(name: str) -> tuple[nn.Module, tuple]:
    """Models whose every parameter is taken by a hook rule, and their float64 batches."""
    torch.manual_seed(0)
    g0 = torch.Generator().manual_seed(2)
    if name == "conv2d":  # stride, padding, dilation, groups, no bias; then BatchNorm, Linear
        model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
                              nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, (2, 3), padding=(1, 0)),
                              nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(13, 4, 7, 6, generator=g0, dtype=torch.float64)
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.BatchNorm1d(4), nn.Tanh(),
                              nn.Conv1d(4, 2, 2, dilation=2, groups=2), nn.Flatten(), nn.LazyLinear(3))
        x = torch.randn(13, 3, 9, generator=g0, dtype=torch.float64)
    else:
        model = SequenceHead()
        x = torch.randn(13, 6, generator=g0, dtype=torch.float64)
    model = model.double()
    model(x)  # materialise the lazy layers
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model, (x, torch.randint(0, 3, (13,), generator=g0))


def test_layers_without_a_hook_rule_are_taken_by_vmap_beside_the_hooked_ones():
    """A convolution with string padding and a LayerNorm have no hook rule: their gradients come
    from vmap, the others' from hooks, and every statistic still matches the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(),
                          nn.LayerNorm(3 * 5 * 5), nn.Linear(3 * 5 * 5, 40), nn.Tanh(),
                          nn.Linear(40, 3)).double()
    g0 = torch.Generator().manual_seed(4)
    x, y = torch.randn(11, 2, 5, 5, generator=g0, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g0)
    result = dl.gradient_coherence(model, nn.CrossEntropyLoss(), (x, y), chunk_size=4, hooks=True)
    assert result.method == "hooks + vmap", result.notes
    g, names = loop_gradients(model, nn.CrossEntropyLoss(), x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


@pytest.mark.parametrize("rule", ["grouped", "unfold"])
@pytest.mark.parametrize("name", ["conv2d", "conv1d", "sequence-linear"])
@pytest.mark.parametrize("chunk", [4, "auto"])
def test_hook_rules_for_convolutions_batchnorm_and_sequence_linears_match_the_loop(name, chunk, rule, monkeypatch):
    from dynlens.measures import layer_grads

    monkeypatch.setattr(layer_grads, "CONV_RULE", rule)
    model, (x, y) = _layer_zoo(name)
    loss_fn = nn.CrossEntropyLoss()
    result = dl.gradient_coherence(model.eval(), loss_fn, (x, y), chunk_size=chunk, hooks=True)
    assert result.method == "hooks", result.notes
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


class CentreOverBatch(nn.Module):
    """Subtracts the mean over the leading dimension: mixes the examples of a batch (alone, an
    example is its own mean)."""

    def forward(self, x):
        return x - 0.5 * x.mean(dim=0, keepdim=True)


class TiedLinear(nn.Module):
    """One linear layer applied twice (its weight's gradient is not one outer product)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(6, 8), CentreOverBatch(), nn.Tanh(), nn.Linear(8, 3)),
    TiedLinear,
], ids=["mixes-examples", "layer-called-twice"])
@pytest.mark.parametrize("chunk", [4, "auto"])
def test_linear_layers_that_cannot_be_factored_are_taken_by_vmap_with_the_same_numbers(make, chunk):
    torch.manual_seed(0)
    model, loss_fn = make().double(), nn.CrossEntropyLoss()
    x, y = classification_data(m=11)
    result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=chunk, hooks=True)
    assert result.method == "vmap" and result.notes
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


def test_hooks_and_vmap_agree_on_a_float32_cnn_with_a_linear_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 16), nn.Tanh(), nn.Linear(16, 3))
    g0 = torch.Generator().manual_seed(3)
    batch = (torch.randn(20, 2, 5, 5, generator=g0), torch.randint(0, 3, (20,), generator=g0))
    factored = dl.gradient_coherence(model, nn.CrossEntropyLoss(), batch, chunk_size=8, hooks=True)
    dense = dl.gradient_coherence(model, nn.CrossEntropyLoss(), batch, chunk_size=8, hooks=False)
    assert factored.method == "hooks" and dense.method == "vmap"
    for key in ("alpha", "m_coherence", "gsnr", "noise_scale", "stiffness_within", "stiffness_between"):
        np.testing.assert_allclose(getattr(factored, key), getattr(dense, key), rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(factored.grad_norms, dense.grad_norms, rtol=1e-5)
    for layer in dense.gsnr_per_layer:
        np.testing.assert_allclose(factored.gsnr_per_layer[layer], dense.gsnr_per_layer[layer], rtol=1e-3)


def test_every_statistic_matches_the_loop_on_a_cnn_with_batchnorm_in_eval_mode():
    model, loss_fn = cnn_with_batchnorm(), nn.CrossEntropyLoss()
    g0 = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 2, 6, 6, generator=g0, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g0)
    g, names = loop_gradients(model, loss_fn, x, y)
    for hooks in (True, False):
        result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=5, hooks=hooks)
        assert result.method == ("hooks" if hooks else "vmap")
        assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


def test_layers_followed_by_an_in_place_relu_give_the_loop_numbers():
    # AlexNet's pattern: ReLU(inplace=True) right after a convolution (the first layer, whose
    # output is taken as a leaf, and a later one): the hooked pass cannot read those layers'
    # output gradients, so the statistics come from vmap, equal to the loop
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 3, padding=1),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    g0 = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 2, 5, 5, generator=g0, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g0)
    g, names = loop_gradients(model, loss_fn, x, y)
    result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=4, hooks=True)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


# uneven classes: class 0 spans several chunks, a chunk of 5 holds whole classes and parts of others
UNEVEN = np.array([0, 1, 0, 2, 0, 0, 3, 0, 1, 0, 0, 2, 0])


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_class_sums_carried_across_chunks_in_class_order_match_the_loop(chunk, hooks):
    """Without stiffness a batch in several chunks is measured sorted by class, one class's sum
    carried from a chunk into the next: every statistic, the norms in batch order included, is
    the loop's."""
    model, (x, y) = _layer_zoo("conv2d")
    loss_fn = nn.CrossEntropyLoss()
    result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=chunk, stiffness=False, hooks=hooks,
                                   classes=UNEVEN)
    assert result.method == ("hooks" if hooks else "vmap"), result.notes
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, UNEVEN, _sizes(model), names), stiffness=False)
    assert result.class_counts == {0: 8, 1: 2, 2: 2, 3: 1}


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
@pytest.mark.parametrize("chunk", [4, 13])
def test_parameter_tensors_reduced_in_blocks_give_the_loop_numbers(chunk, hooks, monkeypatch):
    """Large parameter tensors are reduced a block of entries at a time (moments, class sums,
    a factored layer's rows): blocks of 7 and 5 entries here, every tensor split."""
    from dynlens.measures import coherence

    monkeypatch.setattr(coherence, "BLOCK", 7)
    monkeypatch.setattr(coherence, "CLASS_BLOCK", 5)
    model, loss_fn = cnn_with_batchnorm(), nn.CrossEntropyLoss()
    g0 = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 2, 6, 6, generator=g0, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g0)
    result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=chunk, stiffness=False, hooks=hooks)
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names), stiffness=False)


def test_chunk_size_does_not_change_the_results():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    batch = classification_data()
    results = [dl.gradient_coherence(model, loss_fn, batch, chunk_size=c) for c in (3, 4, 23, 100)]
    for other in results[1:]:
        for key in ("alpha", "m_coherence", "gsnr", "noise_scale", "trace_sigma",
                    "stiffness_within", "stiffness_between"):
            np.testing.assert_allclose(getattr(other, key), getattr(results[0], key), rtol=1e-12)
        np.testing.assert_allclose(other.stiffness, results[0].stiffness, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(other.grad_norms, results[0].grad_norms, rtol=1e-12)
        for c in results[0].per_class:
            np.testing.assert_allclose(other.per_class[c], results[0].per_class[c], rtol=1e-12)


def _chunks_taken(monkeypatch) -> list[tuple[int, int]]:
    """Record the (start, stop) of every chunk of per-example gradients the measurement takes."""
    from dynlens.measures import coherence

    taken: list[tuple[int, int]] = []
    original = coherence._Gradients.chunk

    def chunk(self, start, stop):
        taken.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(coherence._Gradients, "chunk", chunk)
    return taken


def test_an_explicit_chunk_size_is_honoured(monkeypatch):
    taken = _chunks_taken(monkeypatch)
    dl.gradient_coherence(mlp(), nn.CrossEntropyLoss(), classification_data(), chunk_size=10, stiffness=False)
    assert taken == [(0, 10), (10, 20), (20, 23)]


def test_auto_chunk_size_takes_the_whole_batch_when_its_gradients_fit_the_budget(monkeypatch):
    taken = _chunks_taken(monkeypatch)
    dl.gradient_coherence(mlp(), nn.CrossEntropyLoss(), classification_data())
    assert taken == [(0, 23)]


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
def test_auto_chunk_size_splits_the_batch_to_fit_a_small_budget_with_the_same_numbers(monkeypatch, hooks):
    from dynlens.measures import coherence

    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = classification_data()
    whole = dl.gradient_coherence(model, loss_fn, (x, y), stiffness=False, hooks=hooks)
    # bytes per example: by vmap the MLP's 213 float64 parameters; by hooks, the input and output
    # gradient of each linear layer, (in + out) × 2 × 8
    per_example = (16 + 20 + 13) * 16 if hooks else 213 * 8
    monkeypatch.setattr(coherence, "CPU_BUDGET", 5 * per_example)
    taken = _chunks_taken(monkeypatch)
    split = dl.gradient_coherence(model, loss_fn, (x, y), stiffness=False, hooks=hooks)
    assert taken == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for key in ("alpha", "m_coherence", "gsnr", "noise_scale", "trace_sigma"):
        np.testing.assert_allclose(getattr(split, key), getattr(whole, key), rtol=1e-12, err_msg=key)
    g, names = loop_gradients(model, loss_fn, x, y)
    ref = reference(g, y.numpy(), _sizes(model), names)
    for c in ref["per_class"]:
        np.testing.assert_allclose(split.per_class[c], ref["per_class"][c], rtol=RTOL)


def test_auto_chunk_size_holds_two_chunks_when_stiffness_spans_several():
    from dynlens.measures.coherence import CPU_BUDGET, auto_chunk_size

    cpu = torch.device("cpu")
    assert auto_chunk_size(CPU_BUDGET // 100, 1000, cpu, pairs=True) == 50
    assert auto_chunk_size(CPU_BUDGET // 100, 80, cpu, pairs=True) == 80
    assert auto_chunk_size(2 * CPU_BUDGET, 80, cpu) == 1


def test_auto_chunk_size_keeps_chunks_without_pairs_within_the_cache_budget_in_equal_parts():
    from dynlens.measures.coherence import CPU_BUDGET, CPU_CACHE_BUDGET, auto_chunk_size

    cpu = torch.device("cpu")
    assert CPU_CACHE_BUDGET < CPU_BUDGET
    assert auto_chunk_size(CPU_CACHE_BUDGET // 100, 1000, cpu) == 100
    assert auto_chunk_size(CPU_CACHE_BUDGET // 100, 1000, cpu, pairs=True) == CPU_BUDGET // CPU_CACHE_BUDGET * 50
    assert auto_chunk_size(CPU_CACHE_BUDGET // 100, 100, cpu) == 100
    assert auto_chunk_size(CPU_CACHE_BUDGET // 100, 230, cpu) == 77  # 77 + 77 + 76, not 100 + 100 + 30


def test_chunk_size_must_be_auto_or_a_positive_integer():
    with pytest.raises(ValueError, match="chunk_size must be 'auto' or a positive number"):
        dl.gradient_coherence(mlp(), nn.CrossEntropyLoss(), classification_data(), chunk_size=0)


def test_gsnr_uses_the_population_variance():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = classification_data(m=5)
    result = dl.gradient_coherence(model, loss_fn, (x, y), stiffness=False)
    g, _ = loop_gradients(model, loss_fn, x, y)
    population = np.mean(g.mean(0) ** 2 / g.var(0, ddof=0))
    unbiased = np.mean(g.mean(0) ** 2 / g.var(0, ddof=1))
    np.testing.assert_allclose(result.gsnr, population, rtol=RTOL)
    assert abs(result.gsnr - unbiased) > 0.1 * unbiased  # m = 5: the two differ by 5/4


class WithUnusedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.unused = nn.Linear(3, 2).double()  # never called: its gradient is 0 for every example

    def forward(self, x):
        return self.body(x)


def test_parameters_with_zero_gradient_variance_are_excluded_from_the_gsnr():
    model, loss_fn = WithUnusedParameter(), nn.CrossEntropyLoss()
    x, y = classification_data()
    result = dl.gradient_coherence(model, loss_fn, (x, y))
    assert result.gsnr_excluded == 3 * 2 + 2
    assert np.isnan(result.gsnr_per_layer["unused"])
    assert np.isfinite(result.gsnr)
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


def test_noise_scale_is_infinite_when_the_unbiased_true_gradient_norm_is_not_positive():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    x = torch.ones(2, 1, dtype=torch.float64)
    y = torch.tensor([[2.0], [0.0]], dtype=torch.float64)  # g_1 = −2, g_2 = +2: ḡ = 0
    result = dl.gradient_coherence(model, nn.MSELoss(), (x, y))
    assert result.grad_sq_norm == pytest.approx(-4.0)
    assert result.trace_sigma == pytest.approx(8.0)
    assert result.noise_scale == np.inf
    assert result.m_coherence == pytest.approx(0.0)
    assert result.per_class == {} and np.isnan(result.stiffness_within)
    assert result.stiffness_mean == pytest.approx(-1.0)


def test_regression_targets_skip_per_class_statistics_but_keep_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    result = dl.gradient_coherence(model, nn.MSELoss(), (x, y), chunk_size=3)
    assert result.per_class == {} and result.class_stiffness is None and len(result.classes) == 0
    assert np.isnan(result.stiffness_within) and np.isnan(result.stiffness_between)
    g, names = loop_gradients(model, nn.MSELoss(), x, y)
    assert_matches(result, reference(g, None, _sizes(model), names))


def test_explicit_classes_group_the_examples():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = classification_data()
    groups = np.arange(23) % 2
    result = dl.gradient_coherence(model, loss_fn, (x, y), classes=groups)
    assert sorted(result.per_class) == [0, 1]
    assert result.class_counts == {0: 12, 1: 11}
    assert dl.gradient_coherence(model, loss_fn, (x, y), classes=False).per_class == {}


def test_train_mode_with_batchnorm_is_refused_with_an_explanation():
    model = cnn_with_batchnorm()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="ill-defined in train mode.*BatchNorm"):
        dl.gradient_coherence(model, nn.CrossEntropyLoss(), (x, y), mode="train")


def test_a_measurement_leaves_grad_buffers_training_flags_and_random_states_unchanged():
    model, loss_fn = cnn_with_batchnorm(), nn.CrossEntropyLoss()
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before_grads = [p.grad.clone() for p in model.parameters()]
    before_params = [p.detach().clone() for p in model.parameters()]
    before_buffers = [b.clone() for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=3)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before_grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before_params, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), before_buffers, strict=True))
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks for m in model.modules())  # the linear layers' hooks are gone
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


# ----------------------------------------------------------------------------- vmap-breaking layers


class DataDependentGate(nn.Module):
    """Python control flow on a tensor value: vmap cannot batch it."""

    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(x)
        return 0.5 * x


class InPlaceAccumulate(nn.Module):
    """An in-place add of a batched tensor into an unbatched buffer: vmap cannot batch it."""

    def forward(self, x):
        out = torch.zeros(x.shape[-1], dtype=x.dtype)
        out.add_(x[0])
        return x + out


def breaking_model(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), layer, nn.Linear(8, 3)).double()


@pytest.mark.parametrize("layer", [DataDependentGate(), InPlaceAccumulate()], ids=["control-flow", "in-place"])
def test_models_vmap_cannot_run_fall_back_to_a_loop_with_the_same_numbers(layer):
    model, loss_fn = breaking_model(layer), nn.CrossEntropyLoss()
    x, y = classification_data(m=9)
    with pytest.warns(RuntimeWarning, match="vmap failed in layer '1'"):
        result = dl.gradient_coherence(model, loss_fn, (x, y), chunk_size=4)
    assert result.method == "loop" and result.notes  # vmap cannot evaluate the examples alone
    g, names = loop_gradients(model, loss_fn, x, y)
    assert_matches(result, reference(g, y.numpy(), _sizes(model), names))


@pytest.mark.parametrize("layer", [DataDependentGate(), InPlaceAccumulate()], ids=["control-flow", "in-place"])
def test_models_vmap_cannot_run_raise_an_error_naming_the_layer_when_asked(layer):
    model = breaking_model(layer)
    x, y = classification_data(m=4)
    with pytest.raises(VmapUnsupportedError, match=rf"layer '1' \({type(layer).__name__}\).*fallback='loop'"):
        dl.gradient_coherence(model, nn.CrossEntropyLoss(), (x, y), fallback="error")


def test_the_loop_fallback_does_not_touch_grad():
    model = breaking_model(DataDependentGate())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = classification_data(m=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dl.gradient_coherence(model, nn.CrossEntropyLoss(), (x, y))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


# ----------------------------------------------------------------------------- real vs shuffled labels


def test_real_labels_have_higher_m_coherence_than_shuffled_labels_on_the_same_model_and_inputs():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 10, generator=g)
    y_real = torch.arange(128) % 4
    x = centres[y_real] + torch.randn(128, 10, generator=g)
    y_shuffled = y_real[torch.randperm(128, generator=g)]
    values = {}
    for name, y in (("real", y_real), ("shuffled", y_shuffled)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        values[name] = dl.gradient_coherence(model, nn.CrossEntropyLoss(), (x, y), stiffness=False).m_coherence
    assert values["real"] > 3 * values["shuffled"], values


# ----------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch
    from torch import nn
    import dynlens as dl
    from dynlens.functional import ModelFunction

    def status_kb(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.set_num_threads(1)
    m, hoard, hooks = int(sys.argv[1]), sys.argv[2] == "hoard", sys.argv[2] == "hooks"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(m, 64), torch.randint(0, 10, (m,))
    loss = nn.CrossEntropyLoss()
    dl.gradient_coherence(model, loss, (x[:16], y[:16]), chunk_size=16, stiffness=False, hooks=hooks)  # warm-up
    # the peak resident set of this process (VmHWM) restarts from the current one (Linux >= 4.0);
    # ru_maxrss would not do: a child inherits its parent's peak through fork and exec
    open("/proc/self/clear_refs", "w").write("5")
    before = status_kb("VmRSS")
    if hoard:  # the instrument's control: keeping every per-example gradient must show up
        kept = [g for _, g in ModelFunction(model, loss, (x, y)).per_example_grads(16)]
    else:
        dl.gradient_coherence(model, loss, (x, y), chunk_size=16, stiffness=False, hooks=hooks)
    print(json.dumps({"delta_mb": (status_kb("VmHWM") - before) / 1024}))
""")


def _peak_deltas_mb(cases: list[tuple[int, str]]) -> list[float]:
    """Peak resident-set growth of each (m, mode) case, each in its own process (run in parallel)."""
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the OS when
    # freed, so the peak resident set tracks the peak of live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, str(m), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m, mode in cases]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1])["delta_mb"])
    return results


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_grows_with_the_chunk_not_with_the_batch():
    # P = 85k parameters: all 512 per-example gradients are 174 MB in float32, a chunk of 16 is
    # 5 MB by vmap; by layer hooks a chunk holds the layers' inputs and output gradients (50 kB)
    small, large, small_hooks, large_hooks, hoarded = _peak_deltas_mb(
        [(64, "vmap"), (512, "vmap"), (64, "hooks"), (512, "hooks"), (512, "hoard")])
    assert hoarded > 80, f"the instrument missed 174 MB of kept gradients: {hoarded:.1f} MB"
    assert small > 2, f"the instrument missed the chunk of gradients (5 MB): {small:.1f} MB"
    assert large < small + 10, f"peak grew from {small:.1f} MB (m=64) to {large:.1f} MB (m=512)"
    assert large_hooks < small_hooks + 10, f"by hooks: {small_hooks:.1f} MB (m=64), {large_hooks:.1f} MB (m=512)"
    assert large_hooks < large, f"hooks {large_hooks:.1f} MB against vmap {large:.1f} MB"


def test_the_profiler_instrument_sees_the_most_a_call_held_at_once():
    def call():
        first = torch.ones(2**20, dtype=torch.uint8)
        second = torch.ones(3 * 2**20, dtype=torch.uint8)
        del first, second
        return torch.ones(2**20, dtype=torch.uint8)

    kept, peak = peak_bytes(call)
    assert 4 * 2**20 <= peak <= 4 * 2**20 + 2**12
    assert kept.numel() == 2**20


def memory_cnn() -> tuple[nn.Module, tuple]:
    """A float32 CNN whose parameters (19k) and activations outweigh the bookkeeping, and a
    batch of 24 images of 3 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(128, 3)).eval()
    g0 = torch.Generator().manual_seed(5)
    return model, (torch.randn(24, 3, 8, 8, generator=g0), torch.randint(0, 3, (24,), generator=g0))


@pytest.mark.parametrize("stiffness", [False, True], ids=["plain", "stiffness"])
@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "vmap"])
def test_the_memory_model_bounds_the_peak_the_profiler_measures(hooks, stiffness, monkeypatch):
    from dynlens.functional import ModelFunction, isolated
    from dynlens.measures.coherence import coherence_of, memory_model

    model, batch = memory_cnn()
    # oneDNN's convolutions off: with 16 threads, torch 2.11's oneDNN convolutions under vmap
    # allocated 1.7 MB of their own in the chunk of 24 (peak 4.83 MB, predicted 3.86 MB), where
    # with it off, on 2 threads, or on torch 2.13 with 16 the peak was 3.10 MB: working memory of
    # the library and its threads, not a tensor of the measurement that a memory model could count
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with isolated(model):
        fn = ModelFunction(model, nn.CrossEntropyLoss(), batch)
        plan = memory_model(fn, stiffness=stiffness, hooks=hooks)
        for chunk in (1, 6, 24):
            _, peak = peak_bytes(lambda c=chunk: coherence_of(fn, chunk_size=c, stiffness=stiffness,
                                                               hooks=hooks, graphs=False))
            predicted = plan.peak(chunk, 24)
            # an upper bound, and not a loose one: a loose model would cut batches needlessly small
            assert 0.4 * predicted <= peak <= predicted, (chunk, peak, predicted)


@pytest.mark.parametrize("stiffness", [False, True], ids=["plain", "stiffness"])
def test_auto_chunks_keep_the_peak_within_the_memory_limit_with_the_same_numbers(stiffness, monkeypatch):
    from dynlens.functional import ModelFunction, isolated
    from dynlens.measures.coherence import coherence_of, memory_model

    model, batch = memory_cnn()
    taken = _chunks_taken(monkeypatch)
    with isolated(model):
        fn = ModelFunction(model, nn.CrossEntropyLoss(), batch)
        whole = coherence_of(fn, stiffness=stiffness, graphs=False)
        limit = memory_model(fn, stiffness=stiffness).peak(5, 24)
        taken.clear()
        limited, peak = peak_bytes(lambda: coherence_of(fn, stiffness=stiffness, graphs=False, memory=limit))
    assert peak <= limit
    sizes = {stop - start for start, stop in taken}
    assert max(sizes) == 5 and min(sizes) >= 4  # 24 in five chunks of 5 or 4
    for key in ("alpha", "m_coherence", "gsnr", "noise_scale", "trace_sigma", "stiffness_within"):
        np.testing.assert_allclose(getattr(limited, key), getattr(whole, key), rtol=1e-4, err_msg=key)
    for c in whole.per_class:
        np.testing.assert_allclose(limited.per_class[c], whole.per_class[c], rtol=1e-4)
    np.testing.assert_allclose(limited.grad_norms, whole.grad_norms, rtol=1e-5)


def test_a_limit_that_one_example_does_not_fit_raises_before_the_sums_are_allocated():
    from dynlens.budget import MemoryBudgetTooSmall
    from dynlens.functional import ModelFunction, isolated
    from dynlens.measures.coherence import coherence_of, memory_model

    model, batch = memory_cnn()
    with isolated(model):
        fn = ModelFunction(model, nn.CrossEntropyLoss(), batch)
        needed = memory_model(fn, stiffness=False).peak(1, 24)

        def refused():
            with pytest.raises(MemoryBudgetTooSmall, match=r"needs about .* per example .* is allowed") as err:
                coherence_of(fn, stiffness=False, memory=needed - 1)
            return err

        err, peak = peak_bytes(refused)
    assert f"{(needed - 1) / 2**20:.1f} MiB is allowed" in str(err.value)
    # one example's forward pass to size the activations, not the 16 bytes per parameter of the sums
    assert peak < 16 * fn.num_params


def test_the_memory_model_takes_the_largest_chunk_whose_peak_fits():
    from dynlens.measures.coherence import MemoryModel

    # peak(n) = max(1000 + 100 n + min(10 min(3, n), 25), 1200) for n < 50, 5000 for n = 50
    plan = MemoryModel(fixed=1000, per_example=100, classes=3, per_class=10, class_cap=25, whole=5000,
                       finish=1200)
    assert [plan.peak(n, 50) for n in (1, 2, 3, 4, 49, 50)] == [1200, 1220, 1325, 1425, 5925, 5000]
    assert plan.largest_chunk(1424, 50) == 3
    assert plan.largest_chunk(1425, 50) == 4
    assert plan.largest_chunk(1199, 50) == 0
    assert plan.largest_chunk(4999, 50) == 39  # 1025 + 100 · 39 = 4925
    assert plan.largest_chunk(5000, 50) == 50  # the whole batch in one chunk
    margined = MemoryModel(1000, 100, 3, 10, 25, 5000, 1200, margin=(0.1, 64))
    assert margined.peak(4, 50) == int(1425 * 1.1) + 64
    assert margined.largest_chunk(int(1425 * 1.1) + 64, 50) == 4


@pytest.mark.parametrize("flagged", ["few", "most"])
def test_float32_factored_sums_are_resummed_in_float64_where_they_cancel(flagged):
    """A float32 linear layer on the CPU is summed in float32; the entries whose variance is small
    against their squared mean (where Σ g² − n·mean² cancels) are summed again in float64."""
    from dynlens.measures.coherence import CANCELLATION, MAX_RESUMMED, _factored_moments
    from dynlens.measures.layer_grads import Outer

    g = torch.Generator().manual_seed(0)
    n, out, width = 64, 8, 12
    delta = torch.randn(n, out, generator=g)
    inputs = torch.randn(n, width, generator=g)
    if flagged == "few":  # two nearly constant entries: δ_i0 ≈ 1 and a_i0 ≈ 1
        delta[:, 0] = 1 + 1e-3 * torch.randn(n, generator=g)
        inputs[:, 0] = 1 + 1e-3 * torch.randn(n, generator=g)
    else:  # every entry nearly constant
        delta = 1 + 1e-3 * delta
        inputs = 1 + 1e-3 * inputs
    d64, a64 = delta.double(), inputs.double()
    per_example = d64[:, :, None] * a64[:, None, :]
    want_mean = per_example.mean(0).reshape(-1)
    want_centred = ((per_example - per_example.mean(0)) ** 2).sum(0).reshape(-1)
    mean = torch.empty(out * width, dtype=torch.float64)
    centred = torch.empty_like(mean)
    _factored_moments(Outer(delta, inputs), n, mean, centred)
    bound = n * 2.0**-24 / CANCELLATION  # the documented worst case for entries not resummed
    # a float32 sum of terms of mixed signs: rounding relative to the terms' size, not the mean's
    scale = per_example.abs().mean(0).reshape(-1).numpy()
    assert np.all(np.abs(mean.numpy() - want_mean.numpy()) <= 1e-6 * np.abs(want_mean.numpy()) + n * 2.0**-24 * scale)
    # float32 sums alone would leave errors of order 1e-7 · mean² here: relative errors of 1e-1
    np.testing.assert_allclose(centred.numpy(), want_centred.numpy(), rtol=bound)
    if flagged == "few":
        assert MAX_RESUMMED * out * width >= 1  # the resummed path, not the whole layer in float64


@pytest.mark.parametrize("option", [{"hooks": "yes"}, {"graphs": "always"}])
def test_hooks_and_graphs_options_are_checked(option):
    with pytest.raises(ValueError, match="must be True, False or 'auto'"):
        dl.gradient_coherence(mlp(), nn.CrossEntropyLoss(), classification_data(), **option)


@pytest.mark.parametrize("hooks", [True, False])
def test_a_bfloat16_model_is_measured_in_float32_at_its_own_weights(hooks):
    """Half precision is computed in float32 at the model's bfloat16 values: the float64 loop on
    those same (rounded) weights and inputs is the oracle, to float32 accuracy."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = classification_data()
    model16 = mlp().to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    rounded = copy.deepcopy(model16).double()
    g, names = loop_gradients(rounded, loss_fn, x16.double(), y)
    want = reference(g, y.numpy(), _sizes(rounded), names)
    found = dl.gradient_coherence(model16, loss_fn, (x16, y), hooks=hooks)
    assert found.method.startswith("hooks" if hooks else "vmap")
    for key in ("alpha", "m_coherence", "trace_sigma"):
        np.testing.assert_allclose(getattr(found, key), want[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(found.grad_norms, want["grad_norms"], rtol=1e-4)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("hooks", [True, False])
def test_activation_checkpointing_gives_the_loop_numbers_of_the_plain_model(use_reentrant, hooks):
    """Checkpointed blocks run as plain calls in a measurement: the layer hooks see one forward
    and no recomputation, and vmap needs no autograd.Function support."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = classification_data()
    plain = Checkpointed(None).double()
    g, names = loop_gradients(plain, loss_fn, x, y)
    want = reference(g, y.numpy(), _sizes(plain), names)
    found = dl.gradient_coherence(Checkpointed(use_reentrant).double(), loss_fn, (x, y), hooks=hooks)
    assert found.method.startswith("hooks" if hooks else "vmap")
    for key in ("alpha", "m_coherence", "trace_sigma"):
        np.testing.assert_allclose(getattr(found, key), want[key], rtol=1e-10, err_msg=key)
