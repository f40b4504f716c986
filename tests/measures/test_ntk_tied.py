"""dl.measures.ntk: a weight tied between an ``nn.Embedding`` and an ``nn.Linear`` (GPT-2's token
embedding and output layer) is structured, J = J_emb + J_lin with the cross terms, against
explicit per-example Jacobians (torch.func.jacrev of each example alone); any other sharing is
still contracted as Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import kernel_from_jacobians, relative_error, single_thread  # noqa: F401  (autouse: one torch thread)
from torch import nn
from torch.func import functional_call, jacrev, vmap

import dynlens.measures.ntk as ntk_module
from dynlens.functional import ModelFunction, isolated
from dynlens.measures.ntk import _structured_layers, ntk_of

VOCABULARY, WIDTH, POSITIONS, PADDING = 11, 6, 5, 3


class TiedLanguageModel(nn.Module):
    """Tokens (n, 5) -> Embedding(11, 6) -> LayerNorm -> Linear(6, 6) + tanh -> LayerNorm -> the
    output layer Linear(6, 11, bias=False) tied to the embedding; the last position's logits
    (11 outputs) or every position's, flattened (55)."""

    def __init__(self, every_position: bool = False, padding_idx: int | None = None) -> None:
        super().__init__()
        self.every_position = every_position
        self.embed = nn.Embedding(VOCABULARY, WIDTH, padding_idx=padding_idx)
        self.ln1 = nn.LayerNorm(WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.head.weight = self.embed.weight
        for norm in (self.ln1, self.ln2):
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        # a causal mix of the positions, so that the last position reads every token
        x = torch.cumsum(self.ln1(x), dim=1) / torch.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[:, None]
        logits = self.head(self.ln2(torch.tanh(self.hidden(x))))
        return logits.flatten(1) if self.every_position else logits[:, -1]


class SharedByTwoLinears(nn.Module):
    """Tokens -> embedding -> two linear layers sharing one weight (not the embedding's)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)
        self.second.weight = self.first.weight
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.second(torch.tanh(self.first(self.embed(tokens))))
        return self.head(torch.tanh(x).mean(1))


class TiedWithBias(TiedLanguageModel):
    """The tied output layer with its own bias (an unshared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.head.bias = nn.Parameter(torch.randn(VOCABULARY) * 0.1)


class EmbeddingTiedTwice(TiedLanguageModel):
    """The embedding's weight shared by two output layers: three modules, not structured."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.extra.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) + 0.5 * self.extra(self.embed(tokens).mean(1))


def tokens(n: int, seed: int, padding: bool = False) -> torch.Tensor:
    """n random sequences of POSITIONS tokens; with ``padding`` the padding token in each."""
    x = torch.randint(0, VOCABULARY, (n, POSITIONS), generator=torch.Generator().manual_seed(seed))
    if padding:
        x[:, 1] = PADDING
        x[0, -1] = PADDING
    return x


def build(cls: type[nn.Module] = TiedLanguageModel, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kwargs).double()


def per_example_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, O, P): each example's Jacobian taken alone (jacrev of one example's outputs, vmapped),
    the tied weight once (``named_parameters`` lists it once; ``functional_call`` ties it)."""
    model = model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, example):
        return functional_call(model, p, (example[None],)).reshape(-1)

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def oracle(model: nn.Module, x: torch.Tensor, x2: torch.Tensor | None, mode: str) -> torch.Tensor:
    a = per_example_jacobian(model, x)
    return kernel_from_jacobians(a, a if x2 is None else per_example_jacobian(model, x2), mode)


def structured(model: nn.Module, x: torch.Tensor) -> dict:
    """The layers the structured products take, as _structured_layers finds them."""
    function = ModelFunction(model, lambda outputs, targets: outputs.sum(), (x, None))
    with isolated(model, "eval"):
        return _structured_layers(function, function.inputs, model(x[:1]).numel())


def routes_taken(monkeypatch) -> dict[str, str]:
    """Record the route _route gives each layer kind."""
    taken: dict[str, str] = {}
    route = ntk_module._route

    def spy(layer, *args):
        taken[layer.kind] = route(layer, *args)
        return taken[layer.kind]

    monkeypatch.setattr(ntk_module, "_route", spy)
    return taken


# ----------------------------------------------------------------------------- the tied weight


@pytest.mark.parametrize("route_below", [0.0, math.inf], ids=["positions", "jacobians"])
@pytest.mark.parametrize("every_position", [False, True], ids=["O=11", "O=55"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_tied_weight_is_structured_and_matches_per_example_jacobians(mode, every_position, route_below,
                                                                     monkeypatch):
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", route_below)
    taken = routes_taken(monkeypatch)
    model, x = build(every_position=every_position), tokens(4, 1)
    layers = structured(model, x)
    assert layers["embed"].kind == "tied" and layers["embed"].names == ("embed.weight",)
    assert layers["embed"].modules == ("embed", "head")
    # the last position's logits: one of the output layer's five positions has a gradient
    assert layers["embed"].active == (POSITIONS if every_position else 1)
    result = ntk_of(model, x, mode=mode, implementation="structured", per_layer=True)
    assert result.num_outputs == (POSITIONS if every_position else 1) * VOCABULARY
    assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6
    assert taken["tied"] == ("positions" if route_below == 0.0 else "jacobians")
    # the tied weight's kernel is its layer's, the embedding's name
    assert list(result.per_layer) == ["embed", "ln1", "hidden", "ln2"]
    alone = ntk_of(model, x, mode=mode, implementation="jacobian", params=["embed.weight"])
    assert relative_error(result.per_layer["embed"], alone.kernel) < 1e-6


@pytest.mark.parametrize("route_below", [0.0, math.inf], ids=["positions", "jacobians"])
@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_padding_token_rows_get_no_gradient_from_the_embedding(mode, route_below, monkeypatch):
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", route_below)
    model, x = build(padding_idx=PADDING), tokens(4, 2, padding=True)
    assert structured(model, x)["embed"].kind == "tied"
    for every_position in (False, True):
        model.every_position = every_position
        result = ntk_of(model, x, mode=mode, implementation="structured")
        assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6


@pytest.mark.parametrize("route_below", [0.0, math.inf], ids=["positions", "jacobians"])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_two_sets_of_inputs_in_either_order(mode, chunk_size, route_below, monkeypatch):
    monkeypatch.setattr(ntk_module, "_JACOBIAN_ROUTE_BELOW", route_below)
    model = build(padding_idx=PADDING)
    x, x2 = tokens(5, 3, padding=True), tokens(3, 4)
    for every_position in (False, True):
        model.every_position = every_position
        forward = ntk_of(model, x, x2, mode=mode, implementation="structured", chunk_size=chunk_size)
        backward = ntk_of(model, x2, x, mode=mode, implementation="structured", chunk_size=chunk_size)
        assert forward.implementation == "structured"
        assert forward.kernel.shape[:2] == (5, 3) and backward.kernel.shape[:2] == (3, 5)
        assert relative_error(forward.kernel, oracle(model, x, x2, mode)) < 1e-6
        assert relative_error(backward.kernel, oracle(model, x2, x, mode)) < 1e-6


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_auto_takes_structured_products_for_a_tied_language_model(mode):
    model, x = build(), tokens(4, 5)
    result = ntk_of(model, x, mode=mode)
    assert result.implementation == "structured"
    assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_the_tied_output_layers_own_bias_is_contracted_as_jacobians(mode):
    model, x = build(TiedWithBias), tokens(4, 6)
    layers = structured(model, x)
    assert layers["embed"].kind == "tied" and "head" not in layers
    result = ntk_of(model, x, mode=mode, implementation="structured", per_layer=True)
    assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6
    assert "head" in result.per_layer  # its bias


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
@pytest.mark.parametrize(("cls", "sharing"), [(SharedByTwoLinears, {"first", "second"}),
                                              (EmbeddingTiedTwice, {"embed", "head", "extra"})])
def test_other_sharing_falls_back_to_jacobian_contraction(cls, sharing, mode):
    model, x = build(cls), tokens(4, 7)
    layers = structured(model, x)
    assert all(layer.kind != "tied" for layer in layers.values())
    assert not sharing & set(layers)
    for implementation in ("structured", "auto"):
        result = ntk_of(model, x, mode=mode, implementation=implementation)
        assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6
    x2 = tokens(3, 8)
    if mode != "diagonal":
        result = ntk_of(model, x, x2, mode=mode, implementation="structured")
        assert relative_error(result.kernel, oracle(model, x, x2, mode)) < 1e-6


def test_a_tied_module_called_twice_is_not_structured():
    class CalledTwice(TiedLanguageModel):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return super().forward(tokens) + self.head(self.embed(tokens[:, 0]))

    model, x = build(CalledTwice), tokens(4, 9)
    assert "embed" not in structured(model, x)
    result = ntk_of(model, x, mode="full", implementation="structured")
    assert relative_error(result.kernel, oracle(model, x, None, "full")) < 1e-6


def test_the_tied_weight_read_outside_its_modules_is_not_structured():
    class ReadOutside(TiedLanguageModel):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return super().forward(tokens) + self.embed.weight.sum() ** 2

    model, x = build(ReadOutside), tokens(4, 10)
    assert "embed" not in structured(model, x)
    result = ntk_of(model, x, mode="trace", implementation="structured")
    assert relative_error(result.kernel, oracle(model, x, None, "trace")) < 1e-6


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_tied_chunks_equal_one_chunk_and_memory_splits_them(mode, monkeypatch):
    chunks = []
    rule = ntk_module._structured_chunk
    monkeypatch.setattr(ntk_module, "_structured_chunk", lambda *a: chunks.append(rule(*a)) or chunks[-1])
    model, x = build(every_position=True), tokens(7, 11)
    second = None if mode == "diagonal" else tokens(5, 12)
    whole = ntk_of(model, x, second, mode=mode, implementation="structured")
    assert chunks[-1] >= 7
    small = ntk_of(model, x, second, mode=mode, implementation="structured", memory=300_000)
    assert 1 <= chunks[-1] < 7
    torch.testing.assert_close(small.kernel, whole.kernel, rtol=1e-10, atol=1e-12)
    assert relative_error(whole.kernel, oracle(model, x, second, mode)) < 1e-6


@pytest.mark.parametrize("every_position", [False, True], ids=["last position", "every position"])
def test_the_kept_factors_are_as_many_numbers_as_the_plan_counts(every_position):
    """The chunk rule's count of what a chunk keeps (``_Layer.kept_numbers``) against the factors
    ``_factors`` hands the blocks: a tied weight measured at the last position keeps its output
    layer's gradient at one position of five, so counting all five would shrink the chunks."""
    model, x = build(every_position=every_position), tokens(4, 6)
    layers = structured(model, x)
    outputs = model(x[:1]).numel()
    function = ModelFunction(model, lambda out, targets: out.sum(), (x, None))
    routes = {name: "jacobians" if layer.kind == "norm" else "positions" for name, layer in layers.items()}
    with isolated(model, "eval"):
        factors = ntk_module._factors(function, layers, function.inputs, outputs, routes)
    for name, layer in layers.items():
        if routes[name] == "positions":
            held = sum(t.numel() for t in factors[name])
            assert held == x.shape[0] * layer.kept_numbers(outputs), name
    tied = layers["embed"]
    # while computed: the output layer's inputs at all five positions and one output's gradient
    # there beside the active positions' of all outputs; kept: the active positions only
    assert tied.factor_numbers(outputs) - tied.kept_numbers(outputs) == \
        (POSITIONS - tied.linear_positions()) * WIDTH + POSITIONS * VOCABULARY
    assert (tied.linear_positions() < POSITIONS) != every_position


class WithPositions(TiedLanguageModel):
    """TiedLanguageModel with a learned position embedding called on ``arange(T)`` (GPT-2's),
    its output added to the tokens' by broadcasting, or, with ``unsqueezed``, after
    ``unsqueeze(0)`` (the same function; expanded to the examples it would be another)."""

    def __init__(self, unsqueezed: bool = False) -> None:
        super().__init__()
        self.unsqueezed = unsqueezed
        self.positions = nn.Embedding(POSITIONS, WIDTH)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.positions(torch.arange(tokens.shape[1]))
        x = self.embed(tokens) + (p.unsqueeze(0) if self.unsqueezed else p)
        x = torch.cumsum(self.ln1(x), dim=1) / torch.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.head(self.ln2(torch.tanh(self.hidden(x))))[:, -1]


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_an_embedding_of_positions_shared_by_the_examples_is_structured(mode):
    model, x = build(WithPositions), tokens(4, 7)
    layers = structured(model, x)
    assert layers["positions"].shared and layers["positions"].positions == POSITIONS
    result = ntk_of(model, x, mode=mode, per_layer=True)
    assert result.implementation == "structured"
    assert relative_error(result.kernel, oracle(model, x, None, mode)) < 1e-6
    alone = ntk_of(model, x, mode=mode, implementation="jacobian", params=["positions.weight"])
    assert relative_error(result.per_layer["positions"], alone.kernel) < 1e-6
    # a model that reshapes the shared output computes something else with it expanded: not structured
    reshaping = build(WithPositions, unsqueezed=True)
    assert "positions" not in structured(reshaping, x) and "hidden" in structured(reshaping, x)
    result = ntk_of(reshaping, x, mode=mode, implementation="structured")
    assert relative_error(result.kernel, oracle(reshaping, x, None, mode)) < 1e-6
