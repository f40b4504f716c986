"""dl.measures.ntk: the empirical NTK against explicit products of Jacobians (torch.func.jacrev of
the whole batch's outputs), in every mode and by every implementation; per-layer kernels; the
infinite-width limit of a one-hidden-layer ReLU network; no side effects; the kernel statistics."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from helpers import OperatorCalls, kernel_from_jacobians, peak_bytes, relative_error, single_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn import functional as F

import dynlens.measures.ntk as ntk_module
from dynlens.budget import MemoryBudgetTooSmall
from dynlens.functional import ModelFunction, isolated
from dynlens.measures.ntk import (
    _Layer,
    _route,
    _structured_layers,
    _unfolded,
    condition_number,
    effective_rank,
    kernel_distance,
    kernel_eigenvalues,
    kernel_target_alignment,
    ntk_of,
)

# ----------------------------------------------------------------------------- models


class TiedLayers(nn.Module):
    """Two linear layers sharing one weight matrix (each with its own bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))[:, :3]


class GridOutputs(nn.Module):
    """Outputs of shape (n, 2, 3) per batch: six outputs an example."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).view(-1, 2, 3)


class BagOfEmbeddings(nn.Module):
    """Token ids (n, 5) -> embedding -> mean over tokens -> linear head (3 outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(1)))


class TokenwiseLinear(nn.Module):
    """Linear layers applied at every position of (n, 3, 4) inputs, then a mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).mean(1)


class WeightReadOutside(nn.Module):
    """The head's weight is also read directly in forward (a penalty-like extra output term)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x))
        return self.head(h) + (h @ self.head.weight.T) ** 2


class LayerCalledTwice(nn.Module):
    """One linear layer applied twice (a two-step recurrence), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.step(torch.tanh(self.step(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def weight_normed() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2))


def cnn_with_batchnorm() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    batchnorm = model[1]
    batchnorm.running_mean.uniform_(-0.5, 0.5)
    batchnorm.running_var.uniform_(0.5, 2.0)
    return model


def cnn_grouped() -> nn.Module:
    """cnn_with_batchnorm with a grouped convolution (Jacobian contraction: not structured)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def _randomise_norm(norm: nn.Module) -> None:
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -0.5, 0.5)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)


class StructuredCNN(nn.Module):
    """Convolutions as the structured products take them (stride 2, padding 1, dilation 2 with a
    bias; padding 1 without), BatchNorm in eval mode followed by an in-place ReLU, a grouped
    convolution (Jacobian contraction) and a linear head: (n, 2, 8, 8) -> 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 3 * 3, 3)
        _randomise_norm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.grouped(torch.tanh(self.conv2(h))))
        return self.head(h.flatten(1))


class Normalisations(nn.Module):
    """Conv1d with padding="same", GroupNorm, LayerNorm over the channels at each position, a
    linear head: (n, 3, 6) -> 2 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding="same")
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm(4)
        self.head = nn.Linear(4 * 6, 2)
        _randomise_norm(self.group)
        _randomise_norm(self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.group(self.conv(x)))
        return self.head(self.layer(h.transpose(1, 2)).flatten(1))


class ConvWeightReadOutside(nn.Module):
    """A convolution whose weight is also read outside its forward (a penalty-like output term)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(h) + (h.sum(1, keepdim=True) * self.conv.weight.sum()) ** 2


class SharedQuery(nn.Module):
    """A linear layer applied to a learned query shared by all examples (no examples' dimension)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(3))
        self.query_proj = nn.Linear(3, 3)
        self.key = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.key(x) * torch.tanh(self.query_proj(self.query))


class ChannelsLastNorm(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: a LayerNorm subclass whose forward permutes its
    (n, C, H, W) input to channels-last; structured as a LayerNorm it raised on the GPU zoo."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PaddedConv(nn.Conv2d):
    """timm's Conv2dSame: a Conv2d subclass that pads its input in its forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class OverriddenForwards(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = PaddedConv(2, 3, 3), ChannelsLastNorm(3)
        _randomise_norm(self.norm)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class PaddedEmbedding(nn.Module):
    """Tokens (n, 3) with a padding token 0 -> embedding -> linear head (2 outputs); a second
    embedding of one token per example (n,)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.single = nn.Embedding(6, 2)
        self.head = nn.Linear(3 * 4 + 2, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.embed(tokens).flatten(1), self.single(tokens[:, 0])], dim=1)
        return self.head(torch.tanh(h))


MODELS = {
    "mlp": (mlp, lambda g, n: torch.randn(n, 4, generator=g)),
    "cnn_batchnorm": (cnn_with_batchnorm, lambda g, n: torch.randn(n, 2, 6, 6, generator=g)),
    "grid_outputs": (GridOutputs, lambda g, n: torch.randn(n, 4, generator=g)),
    "tied": (TiedLayers, lambda g, n: torch.randn(n, 4, generator=g)),
    "embedding": (BagOfEmbeddings, lambda g, n: torch.randint(0, 10, (n, 5), generator=g)),
    "tokenwise": (TokenwiseLinear, lambda g, n: torch.randn(n, 3, 4, generator=g)),
    "weight_read_outside": (WeightReadOutside, lambda g, n: torch.randn(n, 4, generator=g)),
    "layer_called_twice": (LayerCalledTwice, lambda g, n: torch.randn(n, 4, generator=g)),
    "weight_norm": (weight_normed, lambda g, n: torch.randn(n, 4, generator=g)),
    "cnn_grouped": (cnn_grouped, lambda g, n: torch.randn(n, 2, 6, 6, generator=g)),
    "cnn_structured": (StructuredCNN, lambda g, n: torch.randn(n, 2, 8, 8, generator=g)),
    "normalisations": (Normalisations, lambda g, n: torch.randn(n, 3, 6, generator=g)),
    "conv_weight_read_outside": (ConvWeightReadOutside, lambda g, n: torch.randn(n, 2, 4, 4, generator=g)),
    "shared_query": (SharedQuery, lambda g, n: torch.randn(n, 4, generator=g)),
    "padded_embedding": (PaddedEmbedding, lambda g, n: torch.randint(0, 6, (n, 3), generator=g)),
    "overridden_forwards": (OverriddenForwards, lambda g, n: torch.randn(n, 2, 4, 4, generator=g)),
}
IMPLEMENTATIONS = ["jacobian", "ntk_vector", "structured"]


def make(name: str, n: int = 5, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, data = MODELS[name]
    torch.manual_seed(seed)
    model = build().double()
    g = torch.Generator().manual_seed(seed + 1)
    x, x2 = data(g, n), data(g, n - 2)
    if x.is_floating_point():
        x, x2 = x.double(), x2.double()
    return model, x, x2


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, O, P): the Jacobian of every example's flat outputs, from the whole batch at once."""
    reference = copy.deepcopy(model).eval()
    params = {n: p.detach() for n, p in reference.named_parameters()}
    jac = jacrev(lambda p: functional_call(reference, p, (x,)).reshape(x.shape[0], -1))(params)
    # the outputs of example i depend on θ through x_i alone: jac[name] is (n, O, *shape)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def reference(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    a = jacobian(model, x)
    return kernel_from_jacobians(a, a if x2 is None else jacobian(model, x2), mode)


# ----------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_matches_explicit_jacobian_products(name, mode, implementation):
    model, x, _ = make(name)
    result = ntk_of(model, x, mode=mode, implementation=implementation)
    assert result.implementation == implementation
    assert relative_error(result.kernel, reference(model, x, None, mode)) < 1e-6


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_between_two_sets_in_chunks_matches_explicit_jacobian_products(name, mode, implementation):
    model, x, x2 = make(name)
    result = ntk_of(model, x, x2, mode=mode, implementation=implementation, chunk_size=2)
    assert result.kernel.shape[:2] == (x.shape[0], x2.shape[0])
    assert relative_error(result.kernel, reference(model, x, x2, mode)) < 1e-6


def test_full_kernel_shape_and_output_count_on_multidimensional_outputs():
    model, x, _ = make("grid_outputs")
    result = ntk_of(model, x, mode="full")
    assert result.kernel.shape == (5, 5, 6, 6)
    assert result.num_outputs == 6
    assert result.num_params == sum(p.numel() for p in model.parameters())


def test_tied_weight_counts_once():
    model, x, _ = make("tied")
    result = ntk_of(model, x)
    assert result.num_params == 16 + 4 + 4


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_per_layer_kernels_sum_to_the_whole_and_match_each_layers_jacobian(mode, implementation):
    model, x, _ = make("cnn_batchnorm")
    result = ntk_of(model, x, mode=mode, implementation=implementation, per_layer=True)
    assert list(result.per_layer) == ["0", "1", "4"]
    total = torch.stack(list(result.per_layer.values())).sum(0)
    assert relative_error(total, result.kernel) < 1e-12
    head = ntk_of(model, x, mode=mode, implementation=implementation, params=["4.weight", "4.bias"])
    assert relative_error(result.per_layer["4"], head.kernel) < 1e-12


def test_params_restricts_the_kernel_to_the_named_parameters():
    model, x, _ = make("mlp")
    result = ntk_of(model, x, params=["2.weight"])
    # the last layer's weight: J = e_o ⊗ h(x), so Θ_oo' = δ_oo' h(x)·h(x')
    h = torch.tanh(model[0](x)).detach()
    assert relative_error(result.kernel, 3 * h @ h.T) < 1e-12


def test_structured_product_covers_exactly_the_layers_it_computes_exactly():
    expected = {"mlp": ["0", "2"], "cnn_batchnorm": ["0", "1", "4"], "grid_outputs": ["hidden", "out"], "tied": [],
                "embedding": ["embed", "head"], "tokenwise": ["hidden", "out"], "weight_read_outside": ["hidden"],
                "layer_called_twice": ["head"], "weight_norm": ["2"], "cnn_grouped": ["1", "4"],
                "cnn_structured": ["conv1", "bn", "conv2", "head"], "normalisations": ["conv", "group", "layer", "head"],
                "conv_weight_read_outside": ["head"], "shared_query": ["key"],
                "padded_embedding": ["embed", "single", "head"]}
    for name, layers in expected.items():
        model, x, _ = make(name)
        function = ModelFunction(model, lambda outputs, targets: outputs.sum(), (x, None))
        with isolated(model, "eval"):
            outputs = model(x[:1]).numel()
            assert list(_structured_layers(function, function.inputs, outputs)) == layers, name


def test_auto_takes_structured_products_for_linear_layers_only():
    model, x, _ = make("mlp")
    assert ntk_of(model, x).implementation == "structured"


def test_the_structure_check_runs_once_per_model_and_input_shape():
    model, x, _ = make("mlp")
    passes = []
    model[0].register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    first = ntk_of(model, x)
    checked = len(passes)
    again = ntk_of(model, x)
    assert again.implementation == first.implementation == "structured"
    assert len(passes) - checked < checked  # the second call skipped the check's passes
    torch.testing.assert_close(again.kernel, first.kernel)
    wider = torch.randn(x.shape[0], 4, dtype=torch.float64)
    assert relative_error(ntk_of(model, wider).kernel, reference(model, wider, None, "trace")) < 1e-10


def test_one_examples_activation_bytes_are_counted_once_per_model_and_shapes_and_again_when_they_change():
    model, x, _ = make("mlp")
    counted = []  # the passes of one example that build a graph: the one whose saved tensors are counted
    model[0].register_forward_hook(
        lambda module, args, out: counted.append(1) if args[0].shape[0] == 1 and torch.is_grad_enabled() else None)
    first = ntk_of(model, x)
    assert len(counted) == 1
    again = ntk_of(model, x, mode="full")
    assert len(counted) == 1  # kept: the same model, parameters, example shape and O
    torch.testing.assert_close(again.kernel.diagonal(0, 2, 3).sum(-1), first.kernel)
    # another dtype of the weights: activations of another size
    model.float()
    single = ntk_of(model, x.float())
    assert len(counted) == 2
    assert relative_error(single.kernel.double(), reference(model.double(), x, None, "trace")) < 1e-5
    # a parameter of another shape
    model[0] = nn.Linear(x.shape[1], 7).double()
    model[2] = nn.Linear(7, model[2].out_features).double()
    model[0].register_forward_hook(
        lambda module, args, out: counted.append(1) if args[0].shape[0] == 1 and torch.is_grad_enabled() else None)
    assert relative_error(ntk_of(model, x).kernel, reference(model, x, None, "trace")) < 1e-10
    assert len(counted) == 3


class Heads(nn.Module):
    """Outputs whose count a flag sets, not the parameters or the inputs' shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.both = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return torch.cat([out, out.tanh()], 1) if self.both else out


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian", "ntk_vector"])
def test_outputs_counted_at_every_call_follow_a_flag_that_changes_them(implementation):
    torch.manual_seed(0)
    model, x = Heads().double(), torch.randn(5, 4, dtype=torch.float64)
    for both in (False, True, False):
        model.both = both
        result = ntk_of(model, x, mode="full", implementation=implementation)
        assert result.num_outputs == (6 if both else 3)
        assert relative_error(result.kernel, reference(model, x, None, "full")) < 1e-10


def test_auto_takes_jacobian_contraction_when_chunks_of_two_fit_and_products_otherwise():
    # the grouped convolution (40 of 178 parameters) is not structured: more than a tenth is left
    model, x, _ = make("cnn_grouped")
    assert ntk_of(model, x).implementation == "jacobian"
    # one example's Jacobians take 2·178·8 = 2,848 bytes; two chunks of two 11,392, two chunks
    # of all five 28,480: chunked contraction is still the faster method
    chunked = ntk_of(model, x, memory=12_000)
    assert chunked.implementation == "jacobian"
    assert relative_error(chunked.kernel, reference(model, x, None, "trace")) < 1e-6
    # one product takes 178·8 bytes and one example's activations
    small = ntk_of(model, x, memory=4000)
    assert small.implementation == "ntk_vector"
    assert relative_error(small.kernel, reference(model, x, None, "trace")) < 1e-6


def test_without_vector_products_auto_contracts_jacobians_in_chunks_or_waits_for_memory():
    model, x, _ = make("cnn_grouped")
    # two examples' Jacobians take 2·2·178·8 = 5,696 bytes: chunks of one example fit 6,000
    chunked = ntk_of(model, x, memory=6000, vector_products=False)
    assert chunked.implementation == "jacobian"
    assert relative_error(chunked.kernel, reference(model, x, None, "trace")) < 1e-6
    with pytest.raises(MemoryBudgetTooSmall, match="the Jacobians of one example"):
        ntk_of(model, x, memory=4000, vector_products=False)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_memory_too_small_for_one_example_raises_before_computing(implementation):
    model, x, _ = make("cnn_batchnorm")
    with pytest.raises(MemoryBudgetTooSmall, match="memory=500"):
        ntk_of(model, x, implementation=implementation, memory=500)


class DictInTupleOut(nn.Module):
    """model(**{"a": ..., "b": ...}) -> (logits (n, 2), auxiliary (n, 3, 1))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.logits = nn.Linear(4, 2)
        self.auxiliary = nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(a) + self.b(b))
        return self.logits(h), self.auxiliary(h).unsqueeze(-1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dict_inputs_and_tuple_outputs_flatten_every_output_in_order(implementation):
    torch.manual_seed(0)
    model = DictInTupleOut().double()
    g = torch.Generator().manual_seed(1)
    inputs = {"a": torch.randn(4, 3, generator=g).double(), "b": torch.randn(4, 2, generator=g).double()}
    result = ntk_of(model, inputs, mode="full", implementation=implementation)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def flat(p):
        logits, auxiliary = functional_call(model, p, (), inputs)
        return torch.cat([logits, auxiliary.reshape(4, -1)], dim=1)

    j = torch.cat([t.flatten(2) for t in jacrev(flat)(params).values()], dim=2)
    assert result.num_outputs == 5
    assert relative_error(result.kernel, torch.einsum("iap,jbp->ijab", j, j)) < 1e-6


def test_model_mode_as_kernel_mode_raises_saying_the_kernel_is_defined_in_eval_mode():
    model, x, _ = make("cnn_batchnorm")
    with pytest.raises(ValueError, match="eval mode"):
        ntk_of(model, x, mode="train")  # type: ignore[arg-type]


def test_training_model_with_batchnorm_is_measured_in_eval_mode():
    model, x, _ = make("cnn_batchnorm")
    model.train()
    result = ntk_of(model, x, mode="trace")
    assert relative_error(result.kernel, reference(model, x, None, "trace")) < 1e-6
    assert model.training


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernel_is_computed_inside_no_grad(implementation):
    model, x, _ = make("cnn_batchnorm")
    with torch.no_grad():
        result = ntk_of(model, x, implementation=implementation)
    assert relative_error(result.kernel, reference(model, x, None, "trace")) < 1e-6


def test_leaves_no_trace():
    model, x, _ = make("cnn_batchnorm")
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    for implementation in IMPLEMENTATIONS:
        ntk_of(model, x, mode="full", implementation=implementation, per_layer=True)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert flags == [m.training for m in model.modules()]
    assert torch.equal(rng, torch.get_rng_state())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_arguments_raise():
    model, x, x2 = make("mlp")
    with pytest.raises(ValueError, match="'trace', 'full' or 'diagonal'"):
        ntk_of(model, x, mode="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inputs2=None"):
        ntk_of(model, x, x2, mode="diagonal")
    with pytest.raises(ValueError, match="implementation"):
        ntk_of(model, x, implementation="nngeometry")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- infinite width


class OneHiddenReLU(nn.Module):
    """f(x) = m^{-1/2} Σ_r a_r relu(w_rᵀx), w_r ~ N(0, I), a_r ~ N(0, 1) (the docs: What dynlens measures § Empirical neural tangent kernel)."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=False)
        self.out = nn.Linear(width, 1, bias=False)
        nn.init.normal_(self.hidden.weight)
        nn.init.normal_(self.out.weight)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x))) / math.sqrt(self.width)


def arc_cosine_ntk(x: torch.Tensor) -> torch.Tensor:
    cos = (x @ x.T).clamp(-1, 1)
    phi = torch.arccos(cos)
    return (torch.sin(phi) + (math.pi - phi) * cos) / (2 * math.pi) + cos * (math.pi - phi) / (2 * math.pi)


def width_error(width: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = OneHiddenReLU(3, width).double()
    x = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))
    kernel = ntk_of(model, x).kernel
    return relative_error(kernel, arc_cosine_ntk(x))


def test_wide_relu_network_kernel_tends_to_the_arc_cosine_kernel():
    wide = [width_error(20_000, seed) for seed in range(3)]
    narrow = [width_error(200, seed) for seed in range(3)]
    assert max(wide) < 0.05
    # fluctuations O(m^{-1/2}): a 100 times wider network is about 10 times closer
    assert sum(wide) < sum(narrow) / 3


# ----------------------------------------------------------------------------- statistics


def test_eigenvalues_and_condition_number_of_the_full_kernel_match_the_jacobian_gram_matrix():
    model, x, _ = make("mlp")
    kernel = ntk_of(model, x, mode="full").kernel
    j = jacobian(model, x).reshape(-1, sum(p.numel() for p in model.parameters()))
    expected = torch.linalg.eigvalsh(j @ j.T).flip(0)
    values = kernel_eigenvalues(kernel)
    assert torch.allclose(values, expected, rtol=1e-8, atol=1e-10)
    assert condition_number(kernel) == pytest.approx(float(expected[0] / expected[-1]), rel=1e-6)


def test_condition_number_of_a_singular_kernel_is_infinite():
    assert condition_number(torch.ones(3, 3, dtype=torch.float64)) == math.inf


def test_effective_rank_is_n_for_the_identity_and_one_for_rank_one():
    for kind in ("participation", "entropy"):
        assert effective_rank(torch.eye(4, dtype=torch.float64), kind) == pytest.approx(4.0)
        assert effective_rank(torch.ones(4, 4, dtype=torch.float64), kind) == pytest.approx(1.0)
    # participation ratio of eigenvalues (2, 1, 1): 16 / 6
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(16 / 6)


def test_kernel_distance_to_itself_and_to_a_scaled_copy_is_zero():
    model, x, _ = make("mlp")
    kernel = ntk_of(model, x).kernel
    assert kernel_distance(kernel, kernel) == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(kernel, 3.5 * kernel) == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(1.0)


def test_kernel_distance_is_never_negative_nor_above_two_by_rounding():
    # kernels whose 1 − cosine with themselves (or their negation's 1 + 1) rounds past the range
    generator = torch.Generator().manual_seed(0)
    below = above = None
    for _ in range(500):
        k = torch.rand(32, 32, generator=generator, dtype=torch.float64) * 1e3
        a = k.reshape(-1)
        cosine = float(a @ a) / float(a.norm() * a.norm())
        below = k if below is None and 1.0 - cosine < 0 else below
        above = k if above is None and 1.0 + cosine > 2 else above
    assert below is not None and above is not None  # the rounding this guards against happens
    assert kernel_distance(below, below) == 0.0
    assert kernel_distance(above, -above) == 2.0


class BranchesOnValues(nn.Module):
    """Python control flow on tensor values, as a Hugging Face model's attention-mask checks:
    vmap over examples cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 2)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 10).any()):  # never true here, but vmap must evaluate it
            x = x.clamp(max=10)
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


@pytest.mark.parametrize("mode", ["trace", "full", "diagonal"])
def test_jacobians_are_taken_one_example_at_a_time_where_vmap_cannot_run_the_model(mode):
    torch.manual_seed(0)
    model = BranchesOnValues().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="vmap failed.*one example at a time"):
        # Jacobian contraction named: "auto" takes the structured products here (a Conv1d and a
        # linear head), which need no vmap
        result = ntk_of(model, x, mode=mode, implementation="jacobian")
    assert result.implementation == "jacobian"
    assert relative_error(result.kernel, reference(model, x, None, mode)) < 1e-10


def test_distance_and_alignment_of_a_zero_kernel_are_nan_not_an_error():
    # a layer whose parameters start at zero (a residual branch's last normalisation in timm)
    zero = torch.zeros(4, 4, dtype=torch.float64)
    assert math.isnan(kernel_distance(zero, torch.eye(4, dtype=torch.float64)))
    assert math.isnan(kernel_target_alignment(zero, torch.tensor([0, 1, 0, 1])))
    assert math.isnan(kernel_target_alignment(torch.eye(4, dtype=torch.float64), torch.tensor([1, 1, 1, 1])))


def test_alignment_of_the_target_kernel_with_itself_is_one():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    y = torch.nn.functional.one_hot(labels).double()
    assert kernel_target_alignment(y @ y.T, labels) == pytest.approx(1.0)
    assert kernel_target_alignment(2.0 * y @ y.T, labels, centred=False) == pytest.approx(1.0)
    values = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert kernel_target_alignment(values @ values.T, values) == pytest.approx(1.0)


def test_centred_alignment_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    kernel = a @ a.T
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    y = torch.nn.functional.one_hot(labels).double()
    h = torch.eye(6, dtype=torch.float64) - 1 / 6
    kc, yc = h @ kernel @ h, h @ y @ y.T @ h
    expected = float((kc * yc).sum() / (kc.norm() * yc.norm()))
    assert kernel_target_alignment(kernel, labels) == pytest.approx(expected, rel=1e-12)


def test_the_public_function_returns_the_kernel_tensor_or_the_layers_kernels():
    from dynlens.measures.ntk import empirical_ntk

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    kernel = empirical_ntk(model, x)
    assert isinstance(kernel, torch.Tensor) and kernel.shape == (5, 5)
    torch.testing.assert_close(kernel, ntk_of(model, x).kernel)
    layers = empirical_ntk(model, x, per_layer=True)
    assert set(layers) == {"0", "2"}
    torch.testing.assert_close(sum(layers.values()), kernel)


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
def test_per_layer_kernels_over_several_chunks_of_one_set_sum_to_the_one_chunk_kernel(implementation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    whole = ntk_of(model, x, mode="full", per_layer=True, implementation=implementation)
    chunked = ntk_of(model, x, mode="full", per_layer=True, implementation=implementation, chunk_size=2)
    torch.testing.assert_close(chunked.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    for layer in whole.per_layer:
        torch.testing.assert_close(chunked.per_layer[layer], whole.per_layer[layer], rtol=1e-10, atol=1e-12)


def test_auto_skips_the_structured_check_whose_factors_would_not_fit_memory():
    torch.manual_seed(0)
    # many outputs: the check's factors (each layer's inputs and 200 output gradients on two
    # examples, ~330 KB) outweigh an NTK-vector product (a P-vector and activations, ~12 KB)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 200))
    x = torch.randn(5, 4)
    assert ntk_of(model, x).implementation == "structured"
    small = ntk_of(model, x, memory=100_000)
    assert small.implementation == "ntk_vector"
    assert relative_error(small.kernel, reference(model, x, None, "trace")) < 1e-5


# ----------------------------------------------------------------------------- structured CNNs


def layer_reference(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None, mode: str) -> dict[str, torch.Tensor]:
    """Each layer's kernel from explicit Jacobians restricted to its parameters."""
    a, b = jacobian(model, x), None if x2 is None else jacobian(model, x2)
    kernels, start = {}, 0
    for layer, size in _layer_sizes(model).items():
        ja = a[:, :, start:start + size]
        jb = ja if b is None else b[:, :, start:start + size]
        if mode == "full":
            kernels[layer] = torch.einsum("iap,jbp->ijab", ja, jb)
        elif mode == "trace":
            kernels[layer] = torch.einsum("iap,jap->ij", ja, jb)
        else:
            kernels[layer] = (ja * ja).sum(2)
        start += size
    return kernels


def _layer_sizes(model: nn.Module) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        sizes[layer] = sizes.get(layer, 0) + p.numel()
    return sizes


def _routes_taken(monkeypatch) -> dict[str, str]:
    """Record the route :func:`_route` gives each layer kind and shape."""
    taken: dict[str, str] = {}

    def spy(layer, *args):
        route = _route(layer, *args)
        taken[f"{layer.kind} T={layer.positions} k={layer.inputs}"] = route
        return route

    monkeypatch.setattr(ntk_module, "_route", spy)
    return taken


@pytest.mark.parametrize("route_below", [0.0, 1.0, math.inf], ids=["positions", "estimate", "jacobians"])
@pytest.mark.parametrize("second", [False, True], ids=["one set", "two sets"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("name", ["cnn_structured", "normalisations", "padded_embedding"])
def test_structured_layers_per_layer_match_each_layers_jacobian_on_either_route(name, mode, second, route_below,
                                                                                monkeypatch):
    if mode == "diagonal" and second:
        pytest.skip("the diagonal kernel is of one set")
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", route_below)
    taken = _routes_taken(monkeypatch)
    model, x, x2 = make(name)
    x2 = x2 if second else None
    result = ntk_of(model, x, x2, mode=mode, implementation="structured", per_layer=True)
    expected = layer_reference(model, x, x2, mode)
    assert list(result.per_layer) == list(expected)
    for layer, kernel in expected.items():
        assert relative_error(result.per_layer[layer], kernel) < 1e-6, layer
    assert relative_error(result.kernel, sum(expected.values())) < 1e-6
    total = torch.stack(list(result.per_layer.values())).sum(0)
    assert relative_error(total, result.kernel) < 1e-12
    # a layer applied once takes the positions route, a normalisation the Jacobian one, the
    # convolutions the one forced
    assert taken["linear T=1 k=" + str(model.head.in_features)] == "positions"
    assert all(route == "jacobians" for key, route in taken.items() if key.startswith("norm"))
    assert all(route == "positions" for key, route in taken.items() if key.startswith("embedding"))
    convs = {route for key, route in taken.items() if key.startswith("conv")}
    if route_below == 0.0:
        assert convs <= {"positions"}
    elif route_below == math.inf:
        assert convs <= {"jacobians"}


@pytest.mark.parametrize("route_below", [0.0, math.inf], ids=["positions", "jacobians"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_structured_products_in_chunks_equal_one_chunk(mode, route_below, monkeypatch):
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", route_below)
    chunks = []
    chunk_rule = ntk_module._structured_chunk
    monkeypatch.setattr(ntk_module, "_structured_chunk", lambda *a: chunks.append(chunk_rule(*a)) or chunks[-1])
    model, x, x2 = make("cnn_structured", n=7)
    second = None if mode == "diagonal" else x2
    whole = ntk_of(model, x, second, mode=mode, implementation="structured", per_layer=True)
    assert chunks[-1] >= 7
    # bytes for a few examples: the chunk rule must split the sets
    small = ntk_of(model, x, second, mode=mode, implementation="structured", per_layer=True, memory=60_000)
    assert 1 <= chunks[-1] < 5
    sized = ntk_of(model, x, second, mode=mode, implementation="structured", per_layer=True, chunk_size=2)
    for chunked in (small, sized):
        torch.testing.assert_close(chunked.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
        for layer in whole.per_layer:
            torch.testing.assert_close(chunked.per_layer[layer], whole.per_layer[layer], rtol=1e-10, atol=1e-12)
    assert relative_error(whole.kernel, reference(model, x, second, mode)) < 1e-6


def _counted_factors(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calls of the structured products' factor computation (O backward passes a chunk)."""
    calls = [0]
    factors = ntk_module._factors

    def counted(*args, **kwargs):
        calls[0] += 1
        return factors(*args, **kwargs)

    monkeypatch.setattr(ntk_module, "_factors", counted)
    return calls


@pytest.mark.parametrize("two_sets", [False, True], ids=["one set", "two sets"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_kept_factors_are_computed_once_a_chunk_and_give_the_same_kernel(mode, two_sets, monkeypatch):
    model, x, x2 = make("cnn_structured", n=7)
    second = x2 if two_sets else None
    whole = ntk_of(model, x, second, mode=mode, implementation="structured")  # and the structure check, kept
    calls = _counted_factors(monkeypatch)
    kept = ntk_of(model, x, second, mode=mode, implementation="structured", chunk_size=2)
    rows, columns = math.ceil(len(x) / 2), math.ceil(len(second if two_sets else x) / 2)
    assert rows == 4
    assert calls[0] == (rows + columns if two_sets else rows)  # every chunk of each set once
    monkeypatch.setattr(ntk_module, "_keeps_factors", lambda *args: False)
    calls[0] = 0
    again = ntk_of(model, x, second, mode=mode, implementation="structured", chunk_size=2)
    # each row of blocks: its own chunk, and every chunk of the second set again; of the same
    # set, the first row's own chunk and each block above the diagonal, the chunk after the
    # diagonal carried to the next row
    assert calls[0] == (rows * (1 + columns) if two_sets else 1 + rows * (rows - 1) // 2)
    for chunked in (kept, again):
        torch.testing.assert_close(chunked.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    assert relative_error(whole.kernel, reference(model, x, second, mode)) < 1e-6


@pytest.mark.parametrize("cheaper", ["full", "trace"])
def test_a_trace_kernel_takes_the_full_kernels_routes_when_those_keep_or_cost_less(cheaper, monkeypatch):
    # made explicit: the trace's routes send the convolutions to Jacobians, the full kernel's to
    # positions, and only factors without the convolutions' Jacobians are kept (or none); the
    # cost model (_plan_cost, its arithmetic tested below) made to prefer one or the other
    model, x, _ = make("cnn_structured", n=7)
    whole = ntk_of(model, x, mode="trace", implementation="structured")
    route = ntk_module._route

    def routed(layer, num_outputs, mode, examples, pairs):
        if layer.kind == "conv":
            return "jacobians" if mode == "trace" else "positions"
        return route(layer, num_outputs, mode, examples, pairs)

    def on_positions(routes):
        return {r for name, r in routes.items() if name.startswith("conv")} == {"positions"}

    monkeypatch.setattr(ntk_module, "_route", routed)
    monkeypatch.setattr(ntk_module, "_keeps_factors", lambda layers, routes, *a: all(
        routes[name] != "jacobians" for name, layer in layers.items() if layer.kind == "conv"))
    factored: dict[str, int] = {}

    def cost(layers, routes, num_outputs, mode, pairs, examples):
        factored["full" if on_positions(routes) else "trace"] = examples
        return 1 if on_positions(routes) == (cheaper == "full") else 2

    monkeypatch.setattr(ntk_module, "_plan_cost", cost)
    used = {}
    by_structure = ntk_module._by_structure

    def recorded(*args):
        used["routes"], used["keep"] = args[6], args[9]
        return by_structure(*args)

    monkeypatch.setattr(ntk_module, "_by_structure", recorded)
    chosen = ntk_of(model, x, mode="trace", implementation="structured", chunk_size=2)
    # the full kernel's routes keep their factors: taken, whatever the costs
    assert not factored
    assert used["keep"] is True and on_positions(used["routes"])
    torch.testing.assert_close(chosen.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    # neither keeps: the cheaper; in chunks of 2 of 7 examples both compute 1 + 4·3/2 chunks of
    # factors
    monkeypatch.setattr(ntk_module, "_keeps_factors", lambda *a: False)
    chosen = ntk_of(model, x, mode="trace", implementation="structured", chunk_size=2)
    assert factored == {"trace": 2 * 7, "full": 2 * 7}
    assert used["keep"] is False and on_positions(used["routes"]) is (cheaper == "full")
    torch.testing.assert_close(chosen.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    # in two chunks no factor is computed twice without keeping them: the trace's routes stay,
    # whatever the costs
    factored.clear()
    calls = _counted_factors(monkeypatch)
    two = ntk_of(model, x, mode="trace", implementation="structured", chunk_size=4)
    assert used["keep"] is False and calls[0] == 2 and not factored
    assert not on_positions(used["routes"])
    torch.testing.assert_close(two.kernel, whole.kernel, rtol=1e-10, atol=1e-12)


def test_the_plans_cost_counts_the_factors_computed_again_and_the_routes_products():
    linear = ntk_module._Layer(kind="linear", names=("w",), positions=1, inputs=5, outputs=3, size=15)
    conv = ntk_module._Layer(kind="conv", names=("c",), positions=4, inputs=6, outputs=2, size=12)
    norm = ntk_module._Layer(kind="norm", names=("g",), positions=4, inputs=1, outputs=2, size=2)
    layers = {"lin": linear, "conv": conv, "norm": norm}
    o, pairs, examples = 3, 10, 7
    by_jacobians = ntk_module._plan_cost(layers, {"lin": "positions", "conv": "jacobians", "norm": "jacobians"},
                                         o, "trace", pairs, examples)
    # passes O·T·k·out an example and layer; the linear layer's products pairs·T²·(k + O·out + O);
    # the convolution's Jacobians O·T·out·k an example and contraction pairs·O·out·k; the
    # normalisation left out
    passes = examples * o * (1 * 5 * 3 + 4 * 6 * 2)
    assert by_jacobians == passes + pairs * (5 + o * 3 + o) + examples * o * 4 * 2 * 6 + pairs * o * 2 * 6
    by_positions = ntk_module._plan_cost(layers, {"lin": "positions", "conv": "positions", "norm": "jacobians"},
                                         o, "full", pairs, examples)
    o2 = o * o
    assert by_positions == passes + pairs * (5 + o2 * 3 + o2) + pairs * (16 * (6 + o * 2) + 4 * o2 * 2)
    # examples factored: kept, each once; of one set in C chunks, 1 + C(C−1)/2 chunks; of two,
    # the second set again for each chunk of the first
    assert ntk_module._factored_examples(7, 7, True, 2, True) == 7
    assert ntk_module._factored_examples(7, 7, True, 2, False) == 2 * (1 + 6)
    assert ntk_module._factored_examples(7, 7, True, 10, False) == 7
    assert ntk_module._factored_examples(7, 5, False, 2, True) == 12
    assert ntk_module._factored_examples(7, 5, False, 2, False) == 7 + 4 * 5


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("implementation", ["structured", "jacobian"])
def test_blocks_below_the_diagonal_are_mirrored_not_computed(mode, implementation, monkeypatch):
    model, x, _ = make("cnn_structured", n=7)
    whole = ntk_of(model, x, mode=mode, implementation=implementation)
    blocks = []
    contract = ntk_module._contract

    def counted(j1, j2, names, mode_):
        blocks.append((j1 is j2, next(iter(j1.values())).shape[0], next(iter(j2.values())).shape[0]))
        return contract(j1, j2, names, mode_)

    monkeypatch.setattr(ntk_module, "_contract", counted)
    chunked = ntk_of(model, x, mode=mode, implementation=implementation, chunk_size=3)
    # chunks of 3, 3 and 1: the three diagonal blocks and the three above them, of every group
    # of Jacobians contracted
    pairs = {(same, a, b) for same, a, b in blocks}
    assert pairs == {(True, 3, 3), (True, 1, 1), (False, 3, 3), (False, 3, 1)}
    assert len(blocks) % 6 == 0
    torch.testing.assert_close(chunked.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    assert relative_error(chunked.kernel, reference(model, x, None, mode)) < 1e-6


def test_chunks_that_split_the_examples_are_whole_tiles_on_the_tiled_devices(monkeypatch):
    assert ntk_module._tiled(200, 256, torch.device("cpu")) == 200  # the CPU is not tiled
    monkeypatch.setattr(ntk_module, "_TILED_ON", ("cpu",))
    device = torch.device("cpu")
    assert ntk_module._tiled(200, 256, device) == 128
    assert ntk_module._tiled(300, 256, device) == 300  # one chunk holds them all
    assert ntk_module._tiled(100, 256, device) == 86  # less than a tile: three even chunks
    monkeypatch.setattr(ntk_module, "_TILE", 2)
    model, x, _ = make("cnn_structured", n=7)
    chosen = {}
    by_structure = ntk_module._by_structure

    def recorded(*args):
        chosen["chunk"] = args[7]
        return by_structure(*args)

    monkeypatch.setattr(ntk_module, "_by_structure", recorded)
    monkeypatch.setattr(ntk_module, "_structured_chunk", lambda *a, **k: 5)
    tiled = ntk_of(model, x, mode="trace", implementation="structured")
    assert chosen["chunk"] == 4
    assert relative_error(tiled.kernel, reference(model, x, None, "trace")) < 1e-6


def _wide_cnn() -> nn.Module:
    """Convolutions at 16×16 positions whose factors (the unfolded inputs and O output
    gradients, 0.3 MB an example) outweigh the model: 48 examples' are 30 MB."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).eval()


def _as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The GPU's rules on the CPU: the full kernel's columns at once, chunks in tiles (of 8 here)
    or evened out, factor passes batched over the outputs, layer groups that keep their factors,
    patches from strided views; returns the groups the passes took."""
    for name in ("_COLUMNS_AT_ONCE_ON", "_TILED_ON", "_BATCHED_PASSES_ON", "_LAYER_GROUPS_ON", "_STRIDED_PATCHES_ON"):
        monkeypatch.setattr(ntk_module, name, ("cuda", "cpu"))
    monkeypatch.setattr(ntk_module, "_TILE", 8)
    return _spied(monkeypatch, "_output_gradients", lambda out, layer_outputs, num_outputs, group=1, trimmed=None: group)


def _spied(monkeypatch: pytest.MonkeyPatch, name: str, seen: object) -> list:
    """``ntk_module.<name>`` wrapped to record ``seen(*its arguments)`` at each call."""
    record: list = []
    original = getattr(ntk_module, name)

    def spy(*args, **kwargs):
        record.append(seen(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ntk_module, name, spy)
    return record


@pytest.mark.parametrize("gpu_rules", [False, True])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_structured_products_that_keep_factors_hold_at_most_their_memory(mode, gpu_rules, monkeypatch):
    model, x = _wide_cnn(), torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = ntk_of(model, x, mode=mode, implementation="structured")
    groups = _as_on_a_gpu(monkeypatch) if gpu_rules else []
    decided: dict[str, object] = {}
    keeps, chunk_rule = ntk_module._keeps_factors, ntk_module._structured_chunk
    monkeypatch.setattr(ntk_module, "_keeps_factors", lambda *a: decided.setdefault("keep", keeps(*a)))
    monkeypatch.setattr(ntk_module, "_structured_chunk", lambda *a: decided.setdefault("chunk", chunk_rule(*a)))
    memory = 16_000_000
    limited, peak = peak_bytes(lambda: ntk_of(model, x, mode=mode, implementation="structured", memory=memory))
    assert decided["keep"] is True and decided["chunk"] < 48, decided  # chunks, and every factor kept
    assert peak <= memory, f"held {peak:,} bytes at once with memory={memory:,}"
    torch.testing.assert_close(limited.kernel, whole.kernel, rtol=1e-5, atol=1e-6)
    if gpu_rules:  # the passes took several outputs at once in the room left
        assert groups and max(groups) > 1, groups


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_structured_memory_too_small_for_one_example_raises_naming_the_structured_layers(mode):
    model, x, _ = make("cnn_structured")
    with pytest.raises(MemoryBudgetTooSmall, match="structured layers.*on one example.*memory=2,000"):
        ntk_of(model, x, mode=mode, implementation="structured", memory=2000, params=[
            n for n, _ in model.named_parameters() if not n.startswith("grouped")])


def test_routes_by_multiply_adds_on_resnet18_shapes():
    # ResNet-18 at 32×32, 10 outputs, 64 examples: the stem and first stage (1,024 positions,
    # small patches) form Jacobians, the last stage (16 positions, 4,608-entry patches) and the
    # head (one position) take the positions
    stem = _Layer("conv", ("w",), 1024, 27, 64, 64 * 27)
    first = _Layer("conv", ("w",), 1024, 576, 64, 64 * 576)
    last = _Layer("conv", ("w",), 16, 4608, 512, 512 * 4608)
    head = _Layer("linear", ("w", "b"), 1, 512, 10, 5130)
    for mode, pairs in (("trace", 64 * 64), ("full", 64 * 64), ("diagonal", 64)):
        assert _route(stem, 10, mode, 64, pairs) == "jacobians"
        assert _route(first, 10, mode, 64, pairs) == "jacobians"
        assert _route(last, 10, mode, 64, pairs) == "positions"
        assert _route(head, 10, mode, 64, pairs) == "positions"


def _benchmark_models():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "models.py"
    spec = importlib.util.spec_from_file_location("benchmark_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_takes_structured_products_for_a_resnet():
    models = _benchmark_models()
    torch.manual_seed(0)
    model = models.resnet18(num_classes=3, width=2).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            _randomise_norm(module)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    function = ModelFunction(model, lambda outputs, targets: outputs.sum(), (x, None))
    with isolated(model, "eval"):
        layers = _structured_layers(function, function.inputs, 3)
    # every convolution, BatchNorm and the head
    assert {p for layer in layers.values() for p in layer.names} == {n for n, _ in model.named_parameters()}
    result = ntk_of(model, x, mode="full")
    assert result.implementation == "structured"
    assert relative_error(result.kernel, reference(model, x, None, "full")) < 1e-6


class MostlyStructured(nn.Module):
    """A linear layer holding most parameters and a small grouped convolution."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.grouped = nn.Conv1d(2, 2, 3, groups=2)
        self.hidden = nn.Linear(8, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.grouped(x)).flatten(1))))


def test_auto_takes_structured_products_when_the_rest_is_at_most_a_tenth_and_fits():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    # 8 grouped-convolution parameters of 8 + 8·20 + 20 + 20·2 + 2 = 230
    model = MostlyStructured(20).double()
    result = ntk_of(model, x, mode="full")
    assert result.implementation == "structured"
    assert relative_error(result.kernel, reference(model, x, None, "full")) < 1e-6
    # the rest's Jacobians for chunks of two, 2·2·2·8·8 = 512 bytes, must fit memory: with 500
    # bytes auto takes Jacobian contraction of every parameter (which does not fit either)
    with pytest.raises(MemoryBudgetTooSmall, match="the Jacobians of one example needs"):
        ntk_of(model, x, memory=500, vector_products=False)
    # 8 of 8 + 8·2 + 2 + 2·2 + 2 = 32: more than a tenth left
    assert ntk_of(MostlyStructured(2).double(), x).implementation == "jacobian"


def test_a_layer_subclass_with_its_own_forward_is_not_structured():
    model, x, _ = make("overridden_forwards")
    function = ModelFunction(model, lambda out, _: out.sum(), (x, None))
    with isolated(model, "eval"):
        found = _structured_layers(function, x, 3)
    assert set(found) == {"head"}  # the subclasses are contracted as Jacobians
    result = ntk_of(model, x, mode="full")
    assert result.implementation != "structured" or relative_error(
        result.kernel, reference(model, x, None, "full")) < 1e-6
    assert relative_error(result.kernel, reference(model, x, None, "full")) < 1e-6


@pytest.mark.parametrize(("available", "expected"), [
    (0, 2**30),  # unknown: 1 GiB
    (2 * 2**30, 2**30),  # a quarter is less than 1 GiB: 1 GiB
    (20 * 2**30, 5 * 2**30),  # a quarter of what is available
    (100 * 2**30, 25 * 2**30),  # no upper cap
])
def test_the_default_memory_on_the_cpu_is_a_quarter_of_the_available_host_memory(monkeypatch, available, expected):
    monkeypatch.setattr(ntk_module, "available_host_memory", lambda: available)
    assert ntk_module._default_memory(torch.device("cpu")) == expected


def test_the_default_memory_on_a_gpu_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    # after a large kernel the allocator keeps its memory reserved, which the driver counts as
    # used: the next call's allowance must not shrink by it
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    assert ntk_module._default_memory(torch.device("cuda")) == (40 + 60 - 20) * gib // 4


@pytest.mark.parametrize("examples_at_once", [1, 3, 7])
def test_full_kernel_over_positions_takes_several_examples_at_once_in_its_room(examples_at_once, monkeypatch):
    # Σ_(t,s) (a_t·a'_s)(g_(a,t)·g'_(b,s)) written out over every index, against the batched
    # products of _full_by_positions handling 1, 3 (7 = 3 + 3 + 1) or all 7 examples j at once
    gen = torch.Generator().manual_seed(3)
    o, n1, n2, t, s, out = 4, 5, 7, 3, 2, 6
    a1 = torch.randn(n1, t, 8, dtype=torch.float64, generator=gen)
    a2 = torch.randn(n2, s, 8, dtype=torch.float64, generator=gen)
    g1 = torch.randn(o, n1, t, out, dtype=torch.float64, generator=gen)
    g2 = torch.randn(o, n2, s, out, dtype=torch.float64, generator=gen)
    inputs = torch.einsum("itk,jsk->ijts", a1, a2)
    expected = torch.einsum("ijts,aitl,bjsl->ijab", inputs, g1, g2)
    room = (examples_at_once - 1) * n1 * t * (s + 2 * out * o)
    calls: list[int] = []
    bmm = torch.bmm

    def counted(x, y):
        calls.append(1)
        return bmm(x, y)

    monkeypatch.setattr(torch, "bmm", counted)
    got = ntk_module._full_by_positions(inputs, g1, g2, room)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2 * math.ceil(n2 / examples_at_once)


@pytest.mark.parametrize("memory", [16_000_000, 40_000_000])
@pytest.mark.parametrize("at_once", [True, False])
def test_full_kernel_over_positions_in_chunks_holds_at_most_its_memory(memory, at_once, monkeypatch):
    # every convolution on the positions route (1,024 and 256 positions): the full kernel takes
    # several examples of the second set at once where the device is listed (on a GPU; here the
    # CPU is added), else one at a time (the CPU's default), and stays within the allowance
    model, x = _wide_cnn(), torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", 0.0)
    whole = ntk_of(model, x, mode="full", implementation="structured")
    if at_once:  # with the GPU's other rules: tiles or even chunks, batched factor passes
        _as_on_a_gpu(monkeypatch)
    rooms = _spied(monkeypatch, "_full_by_positions", lambda inputs, g1, g2, room=0: room)
    limited, peak = peak_bytes(lambda: ntk_of(model, x, mode="full", implementation="structured", memory=memory))
    assert (max(rooms) > 0) is at_once
    assert peak <= memory, f"held {peak:,} bytes at once with memory={memory:,}"
    torch.testing.assert_close(limited.kernel, whole.kernel, rtol=1e-5, atol=1e-6)


def _positions_mlp(depth: int = 5) -> nn.Module:
    """Linear layers of similar size (seven with ``depth`` 5) applied at each of 6 positions (a
    transformer's MLP-like stack), every output position measured (O = 12): no layer holds most
    of the factors."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 48)]
    for _ in range(depth):
        layers += [nn.Tanh(), nn.Linear(48, 48)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(48, 2), nn.Flatten()).eval()


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_a_chunk_counts_the_other_chunks_kept_factors_once_and_holds_its_memory(mode, monkeypatch):
    # a chunk's factors are the passes' own gradients and inputs: while computed they are W,
    # beside the other chunk's K, and a block reads two chunks' K and copies of one layer's
    # factors; the count before took W beside two chunks' K. Chunks larger than that double
    # count allowed, and the peak within the memory
    model, x = _positions_mlp(), torch.randn(24, 6, 16, generator=torch.Generator().manual_seed(1))
    whole = ntk_of(model, x, mode=mode, implementation="structured")
    seen: list = []
    chunk_terms = ntk_module._chunk_terms

    def recorded(layers, routes, o, mode_, itemsize, activation):
        terms = chunk_terms(layers, routes, o, mode_, itemsize, activation)
        seen.append((terms, ntk_module._structured_numbers(layers, routes, o, mode_), -(-activation // itemsize),
                     itemsize))
        return terms

    monkeypatch.setattr(ntk_module, "_chunk_terms", recorded)
    chunks = _spied(monkeypatch, "_by_structure", lambda *a: (a[7], a[9]))
    memory = 1_500_000
    held, peak = peak_bytes(lambda: ntk_of(model, x, mode=mode, implementation="structured", memory=memory))
    (linear, kept, quadratic), (working, _, _), activation, itemsize = seen[-1]
    chunk, keep = chunks[-1]
    assert not keep and 1 < chunk < 24, chunks[-1]
    numbers = memory // itemsize
    assert chunk * linear + chunk * chunk * quadratic <= numbers < (chunk + 1) * linear + (chunk + 1) ** 2 * quadratic
    # fewer numbers an example than W + A + 2·K, and a larger chunk than that count allowed
    double = working + activation + 2 * kept
    assert linear < double
    assert chunk * double + chunk * chunk * quadratic > numbers
    # the kernel on top (ntk_of's docstring), once: each block added into it as it comes; one
    # kernel, not one a layer (the layers' blocks are summed as they come: 3.9 MB were held here
    # before)
    kernel = held.kernel.numel() * held.kernel.element_size()
    assert peak <= memory + kernel, f"held {peak:,} bytes at once with memory={memory:,} and a kernel of {kernel:,}"
    torch.testing.assert_close(held.kernel, whole.kernel, rtol=1e-5, atol=1e-6)
    assert relative_error(whole.kernel, reference(model, x, None, mode)) < 1e-5


@pytest.mark.parametrize("two_sets", [False, True])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_layer_groups_keep_their_factors_compute_each_once_and_hold_their_memory(mode, two_sets, monkeypatch):
    # twenty-two layers whose factors for every example do not fit 2–2.5 MB at once: in one set,
    # small chunks whose factors are computed again block after block; in groups of layers that
    # each keep theirs (the GPU's rule where their passes cost less: _passes_cost), each example's factors
    # computed once a group
    model, x = _positions_mlp(20), torch.randn(48, 6, 16, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(10, 6, 16, generator=torch.Generator().manual_seed(2)) if two_sets else None
    memory = 2_000_000 if mode == "trace" else 2_500_000
    _as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(ntk_module, "_LAYER_GROUPS_ON", ())
    factored = _spied(monkeypatch, "_factors", lambda function, layers, inputs, *a: (tuple(layers), len(inputs)))
    plans = _spied(monkeypatch, "_by_structure", lambda *a: (tuple(a[5]), a[7], a[9]))
    together = ntk_of(model, x, x2, mode=mode, implementation="structured", memory=memory)
    assert len(plans) == 1 and not plans[0][2]  # one set of layers, factors not kept
    factored_together = sum(size for _, size in factored)
    layers = plans[0][0]
    factored.clear(), plans.clear()
    monkeypatch.setattr(ntk_module, "_LAYER_GROUPS_ON", ("cuda", "cpu"))
    apart, peak = peak_bytes(lambda: ntk_of(model, x, x2, mode=mode, implementation="structured", memory=memory))
    assert len(plans) > 1 and all(keep for _, _, keep in plans), plans
    assert tuple(name for group, _, _ in plans for name in group) == layers  # every layer once, in order
    # each group's factors computed once per chunk of each set, with its own layers hooked
    n = 48 + (10 if two_sets else 0)
    assert factored_together > n  # in one set, some examples' factors were computed more than once
    for group, _, _ in plans:
        assert sum(size for hooked, size in factored if hooked == group) == n
    # one kernel on top: every group's blocks added into it as they come
    kernel = apart.kernel.numel() * apart.kernel.element_size()
    assert peak <= memory + kernel, f"held {peak:,} bytes at once with memory={memory:,} and a kernel of {kernel:,}"
    torch.testing.assert_close(apart.kernel, together.kernel, rtol=1e-5, atol=1e-6)
    assert relative_error(apart.kernel, reference(model, x, x2, mode)) < 1e-4  # float32, twenty-two layers
    per_layer = ntk_of(model, x, x2, mode=mode, implementation="structured", memory=memory, per_layer=True)
    torch.testing.assert_close(sum(per_layer.per_layer.values()), apart.kernel, rtol=1e-5, atol=1e-6)


def test_layer_groups_are_as_few_as_keep_their_factors():
    # layers of 1, 2 and 4 units of kept factors, 10 examples kept in half of a 2,000-byte budget
    def layer(units: int) -> _Layer:
        return _Layer("linear", ("w",), 1, units, 1, units)

    layers = {str(i): layer(u) for i, u in enumerate([4, 4, 1, 2, 4, 4, 4])}
    routes = dict.fromkeys(layers, "positions")
    # one example keeps a·k + g·out = 2·units numbers with O = 1; room for 10 units of 10 examples
    groups = ntk_module._layer_groups(layers, routes, 1, "trace", 8 * 250, 4, 10, 0)
    assert groups is not None and len(groups) > 1
    assert [name for g in groups for name in g] == list(layers)  # every layer once, in order
    assert all(ntk_module._keeps_factors(g, routes, 1, "trace", 8 * 250, 4, 10) for g in groups)
    merged = [{**a, **b} for a, b in zip(groups, groups[1:], strict=False)]
    assert not any(ntk_module._keeps_factors(m, routes, 1, "trace", 8 * 250, 4, 10) for m in merged)
    # a layer that alone cannot keep its factors: no groups
    assert ntk_module._layer_groups({"big": layer(1000)}, {"big": "positions"}, 1, "trace", 8 * 250, 4, 10, 0) is None


def _two_layer_graph(o: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    w1 = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(o, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    h = x @ w1.T
    out = torch.tanh(h) @ w2.T
    return out, [h, out]


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_factor_passes_batched_over_outputs_equal_one_output_a_pass(group, monkeypatch):
    out, layer_outputs = _two_layer_graph(4)
    expected = [torch.stack([torch.autograd.grad(out[:, o].sum(), z, retain_graph=True)[0] for o in range(4)])
                for z in layer_outputs]
    batched = _spied(monkeypatch, "_batched_pass", lambda out, layer_outputs, basis: basis.shape[0])
    got = ntk_module._output_gradients(out, layer_outputs, 4, group)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # groups of `group` outputs: 4 passes of one, else one batched pass a group (a last group
    # of one output is a plain pass)
    groups = [min(group, 4 - start) for start in range(0, 4, group)]
    assert batched == [size for size in groups if size > 1]


@pytest.mark.parametrize("group", [1, 2, 3])
def test_factor_passes_trim_an_outputs_positions_without_a_gradient(group):
    # a layer output (n, S, V) read at position 3 by outputs 0 and 1 and at position 1 by output
    # 2: passes of one or two outputs see different positions, which are put together with zeros
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen)
    z = x @ w  # (2, 5, 6)
    out = torch.stack([z[:, 3].sin().sum(1), z[:, 3].pow(2).sum(1), z[:, 1].sum(1)], dim=1)
    full = torch.stack([torch.autograd.grad(out[:, o].sum(), z, retain_graph=True)[0] for o in range(3)])
    trimmed = {0: None}
    (got,) = ntk_module._output_gradients(out, [z], 3, group, trimmed)
    assert trimmed[0].tolist() == [1, 3]
    torch.testing.assert_close(got, full[:, :, [1, 3]], rtol=0, atol=0)
    assert full[:, :, [0, 2, 4]].abs().max() == 0


@pytest.mark.parametrize("group", [1, 5])
def test_a_batched_factor_pass_runs_a_convolutions_backward_once_for_all_its_outputs(group):
    # is_grads_batched's vmap looped over the outputs there, one call each and a stack
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(64, 5)).double().eval()
    outputs: list[torch.Tensor] = []
    for module in net:
        module.register_forward_hook(lambda m, a, o: outputs.append(o))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    out = net(x)
    expected = [torch.stack([torch.autograd.grad(out[:, o].sum(), z, retain_graph=True)[0] for o in range(5)])
                for z in outputs]
    with OperatorCalls(torch.ops.aten.convolution_backward.default) as counted:
        got = ntk_module._output_gradients(out, outputs, 5, group)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # the second convolution's backward carries the gradient to the first one's output: one
    # call a pass
    assert counted.count == (1 if group == 5 else 5)


@pytest.mark.parametrize("group", [2, 3])
def test_a_batched_factor_pass_that_fails_is_taken_one_output_at_a_time(group, monkeypatch):
    expected = ntk_module._output_gradients(*_two_layer_graph(3), 3, 1)
    out, layer_outputs = _two_layer_graph(3)
    tried: list[int] = []

    def no_batching(function):
        def failing(basis):
            tried.append(basis.shape[0])
            raise RuntimeError("vmap: an operation without a batching rule")
        return failing

    monkeypatch.setattr(ntk_module, "vmap", no_batching)
    got = ntk_module._output_gradients(out, layer_outputs, 3, group)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # each group tried once; one of all the outputs is not tried again
    assert tried == ([3] if group == 3 else [2])


def test_the_factor_passes_take_the_outputs_the_room_holds_on_the_batching_devices():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # 1 + room · itemsize / (chunk · activation bytes), at most O; 1 where passes are not batched
    assert ntk_module._pass_group(1000, 4, 10, 100, 32, gpu) == 5
    assert ntk_module._pass_group(10**9, 4, 10, 100, 32, gpu) == 32
    assert ntk_module._pass_group(0, 4, 10, 100, 32, gpu) == 1
    assert ntk_module._pass_group(10**9, 4, 10, 100, 32, cpu) == 1
    # convolutions' passes batched for chunks of at most _BATCHED_CONVOLUTION_EXAMPLES examples
    most = ntk_module._BATCHED_CONVOLUTION_EXAMPLES
    assert ntk_module._pass_group(10**12, 4, most, 100, 32, gpu, convolutions=True) == 32
    assert ntk_module._pass_group(10**12, 4, most + 1, 100, 32, gpu, convolutions=True) == 1
    assert ntk_module._pass_group(10**12, 4, most + 1, 100, 32, gpu) == 32


@pytest.mark.parametrize("name, convolutions", [("cnn_structured", True), ("mlp", False)])
def test_the_factor_passes_are_told_whether_the_layers_include_convolutions(name, convolutions, monkeypatch):
    model, x, _ = make(name, n=6)
    told = _spied(monkeypatch, "_pass_group", lambda *args, **kwargs: (args + (False,))[6])
    ntk_of(model, x, mode="trace", implementation="structured")
    assert told == [convolutions]


@pytest.mark.parametrize("mode", ["trace", "full", "diagonal"])
def test_kernels_under_the_gpus_rules_equal_the_jacobians_products(mode, monkeypatch):
    model, x, _ = make("cnn_structured", n=7)
    groups = _as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(ntk_module, "_TILE", 4)
    got = ntk_of(model, x, mode=mode, implementation="structured", memory=4 * 2**20)
    assert max(groups) > 1
    assert relative_error(got.kernel, reference(model, x, None, mode)) < 1e-6


@pytest.mark.parametrize("implementation", ["structured", "jacobian", "ntk_vector"])
def test_a_check_runs_between_units_of_work_and_may_stop_the_kernel(implementation):
    model, x, _ = make("cnn_structured", n=7)
    calls: list[int] = []
    whole = ntk_of(model, x, mode="trace", implementation=implementation, chunk_size=3,
                   check=lambda: calls.append(1))
    # three chunks: each chunk's factors or Jacobians and each block, or each block of products
    assert len(calls) >= (6 if implementation == "ntk_vector" else 9), len(calls)
    assert relative_error(whole.kernel, reference(model, x, None, "trace")) < 1e-6

    class Stop(Exception):
        pass

    def stop_at_the_third() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        ntk_of(model, x, mode="trace", implementation=implementation, chunk_size=3, check=stop_at_the_third)
    assert len(calls) == 3


@pytest.mark.parametrize(("kernel", "dilation", "padding", "stride"), [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1), (2, 2)), ((1, 1), (1, 1), (0, 0), (2, 2)),
    ((3, 2), (2, 1), (2, 0), (1, 3)), ((1, 5), (1, 2), (0, 3), (1, 1)), ((7, 7), (1, 1), (3, 3), (2, 2))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_strided_patches_are_f_unfolds(kernel, dilation, padding, stride, layout):
    x = torch.randn(4, 3, 9, 11, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":  # a view with a storage offset and strides of a larger tensor
        x = torch.randn(6, 5, 12, 13, dtype=torch.float64)[1:5, 1:4, 2:11, 1:12]
    ours = _unfolded(x, kernel, dilation, padding, stride)
    expected = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)
    assert ours.shape == expected.shape and ours.is_contiguous()
    assert torch.equal(ours, expected)


def test_a_window_larger_than_the_input_raises_unfolds_error():
    with pytest.raises(RuntimeError):
        _unfolded(torch.randn(2, 3, 4, 4), (7, 7), (1, 1), (0, 0), (1, 1))


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_kernels_from_strided_patches_match_jacobian_products(mode, monkeypatch):
    # the GPU's way to the patches, taken on the CPU: convolutions of several geometries
    monkeypatch.setattr(ntk_module, "_STRIDED_PATCHES_ON", ("cpu",))
    calls = []
    monkeypatch.setattr(ntk_module, "_unfolded", lambda *a: calls.append(1) or _unfolded(*a))
    for name in ("cnn_batchnorm", "cnn_structured", "normalisations"):
        model, x, x2 = make(name)
        second = None if mode == "diagonal" else x2
        kernel = ntk_of(model, x, second, mode=mode, implementation="structured").kernel
        assert relative_error(kernel, reference(model, x, second, mode)) < 1e-10, name
    assert calls
