"""ModelFunction and isolated() against plain autograd on the same model and batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import UserNet, counting_backend, precision_settings
from torch import nn

from dynlens.functional import (
    ModelFunction,
    _unreduced,
    example_losses,
    flatten,
    isolated,
    unflatten,
    unwrap_model,
)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(4 * 4 * 4, 3),
    ).double()


@pytest.fixture
def problem():
    model = cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def autograd_grad(model, loss_fn, x, y):
    params = [p for p in model.parameters()]
    loss = loss_fn(model(x), y)
    return torch.autograd.grad(loss, params)


def test_loss_and_grad_match_plain_autograd_in_eval_mode(problem):
    model, loss_fn, (x, y) = problem
    f = ModelFunction(model, loss_fn, (x, y))
    with isolated(model):
        ours_loss = f.loss()
        ours = flatten(f.grad())
        ref = flatten(autograd_grad(model, loss_fn, x, y))
        ref_loss = loss_fn(model(x), y)
    assert torch.allclose(ours_loss, ref_loss, rtol=1e-12)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-14)


def test_hvp_matches_double_backward_and_reuse_operator(problem):
    model, loss_fn, (x, y) = problem
    f = ModelFunction(model, loss_fn, (x, y))
    v = torch.randn(f.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with isolated(model):
        params = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        ref = flatten(torch.autograd.grad(grads, params, list(unflatten(v, f.params).values())))
        forward_over_reverse = flatten(f.hvp(f.as_params(v)))
        reuse = f.hvp_operator("reuse")
        first, second = reuse(v), reuse(v)
    assert torch.allclose(forward_over_reverse, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(first, ref, rtol=1e-9, atol=1e-12)
    assert torch.equal(first, second)


def test_hvp_in_train_mode_uses_fixed_dropout_masks(problem):
    model, loss_fn, batch = problem
    f = ModelFunction(model, loss_fn, batch, seed=3)
    v = f.as_params(torch.ones(f.num_params, dtype=torch.float64))
    with isolated(model, "train", seed=3):
        a = flatten(f.hvp(v))
        b = f.hvp_operator("reuse")(flatten(v))
        c = flatten(f.hvp(v))
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.equal(a, c)


def test_ggn_vector_product_matches_explicit_jacobian_product(problem):
    model, loss_fn, (x, y) = problem
    f = ModelFunction(model, loss_fn, (x, y))
    v = torch.randn(f.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with isolated(model):
        jac = torch.func.jacrev(lambda p: f.outputs(f.as_params(p)))(f.vector())  # (n, O, P)
        out = f.outputs()
        h_out = torch.func.hessian(lambda z: loss_fn(z, y))(out)  # (n, O, n, O)
        n, o = out.shape
        j = jac.reshape(n * o, -1)
        ref = j.T @ (h_out.reshape(n * o, n * o) @ (j @ v))
        ours = flatten(f.ggn_vp(f.as_params(v)))
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_jvp_and_vjp_match_the_explicit_jacobian(problem):
    model, loss_fn, (x, y) = problem
    f = ModelFunction(model, loss_fn, (x, y))
    g = torch.Generator().manual_seed(5)
    v = torch.randn(f.num_params, dtype=torch.float64, generator=g)
    with isolated(model):
        out = f.outputs()
        u = torch.randn(out.shape, dtype=torch.float64, generator=g)
        jac = torch.func.jacrev(lambda p: f.outputs(f.as_params(p)))(f.vector()).reshape(out.numel(), -1)
        assert torch.allclose(f.jvp(f.as_params(v)).reshape(-1), jac @ v, rtol=1e-9, atol=1e-12)
        assert torch.allclose(flatten(f.vjp(u)), jac.T @ u.reshape(-1), rtol=1e-9, atol=1e-12)


def test_per_example_losses_and_grads_match_a_loop_over_single_examples(problem):
    model, loss_fn, (x, y) = problem
    f = ModelFunction(model, loss_fn, (x, y))
    with isolated(model):
        losses = f.per_example_losses(chunk_size=3)
        chunks = list(f.per_example_grads(chunk_size=3))
        for i in range(len(y)):
            ref_loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
            ref_grad = flatten(autograd_grad(model, loss_fn, x[i : i + 1], y[i : i + 1]))
            start, grads = chunks[i // 3]
            ours = flatten([t[i - start] for t in grads.values()])
            assert torch.allclose(losses[i], ref_loss, rtol=1e-12)
            assert torch.allclose(ours, ref_grad, rtol=1e-9, atol=1e-13)
    assert [s for s, _ in chunks] == [0, 3, 6]


def test_tuple_and_dict_inputs_follow_the_calling_convention():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)

    torch.manual_seed(0)
    model = TwoInputs()
    left, right, y = torch.randn(5, 3), torch.randn(5, 4), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    expected = loss_fn(model(left, right), y)
    as_tuple = ModelFunction(model, loss_fn, ((left, right), y)).loss()
    as_dict = ModelFunction(model, loss_fn, ({"left": left, "right": right}, y)).loss()
    assert torch.allclose(as_tuple, expected) and torch.allclose(as_dict, expected)
    losses = ModelFunction(model, loss_fn, ({"left": left, "right": right}, y)).per_example_losses()
    assert torch.allclose(losses.mean(), expected, rtol=1e-6)


def test_measurements_leave_grad_buffers_flags_and_rng_untouched(problem):
    model, loss_fn, batch = problem
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    buffers = [b.clone() for b in model.buffers()]
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    f = ModelFunction(model, loss_fn, batch)
    for mode in ("eval", "train"):
        with isolated(model, mode):
            f.grad()
            f.hvp_operator()(torch.ones(f.num_params, dtype=torch.float64))
            list(f.per_example_grads(4)) if mode == "eval" else None
            torch.rand(3), random.random(), np.random.rand()  # the body may draw as it likes
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[2].weight.grad is None if hasattr(model[2], "weight") else True
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_isolated_restores_state_when_the_body_raises(problem):
    model, _, _ = problem
    model.train()
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError), isolated(model):
        torch.rand(5)
        raise RuntimeError("boom")
    assert model.training and torch.equal(before, torch.get_rng_state())


def test_hvp_through_multihead_attention_works_inside_isolated():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.norm(x + self.attn(x, x, x, need_weights=False)[0]).mean(1))

    torch.manual_seed(0)
    model = Block()
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    f = ModelFunction(model, nn.CrossEntropyLoss(), (x, y))
    v = f.as_params(torch.randn(f.num_params))
    with isolated(model):
        hv = flatten(f.hvp(v))
        reuse = f.hvp_operator()(flatten(v))
    assert torch.isfinite(hv).all() and torch.allclose(hv, reuse, rtol=1e-3, atol=1e-5)


def test_model_without_trainable_parameters_is_refused_with_advice():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ModelFunction(model, nn.MSELoss(), (torch.randn(2, 3), torch.randn(2, 2)))


def test_non_scalar_loss_is_refused_with_advice():
    model = nn.Linear(3, 2)
    f = ModelFunction(model, nn.CrossEntropyLoss(reduction="none"), (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError, match=r"loss_fn returned shape \(4,\).*mean loss"):
        f.loss()


def test_auto_hvp_picks_a_method_once_per_model_and_agrees_with_both(problem, monkeypatch):
    model, loss_fn, batch = problem
    f = ModelFunction(model, loss_fn, batch)
    v = torch.randn(f.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with isolated(model):
        choice = f.fastest_hvp_method()
        assert choice in ("reuse", "forward_over_reverse")
        calls = []
        original = ModelFunction.curvature_products
        monkeypatch.setattr(ModelFunction, "curvature_products",
                            lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
        assert ModelFunction(model, loss_fn, batch).fastest_hvp_method() == choice
        assert calls == []  # remembered, not timed again
        auto = f.hvp_operator("auto")(v)
        reuse = f.hvp_operator("reuse")(v)
    assert torch.allclose(auto, reuse, rtol=1e-9, atol=1e-12)


def test_auto_hvp_avoids_forward_over_reverse_where_torch_cannot_run_it():
    """torch 2.13's forward-mode rule of mse_loss's backward fails ("ZeroTensors are immutable");
    the automatic choice must fall back to the reused graph and still give H v."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    f = ModelFunction(model, nn.MSELoss(), (x, y))
    v = torch.randn(f.num_params, dtype=torch.float64)
    with isolated(model):
        params = list(model.parameters())
        grads = torch.autograd.grad(nn.MSELoss()(model(x), y), params, create_graph=True)
        ref = flatten(torch.autograd.grad(grads, params, list(f.as_params(v).values())))
        assert torch.allclose(f.hvp_operator("auto")(v), ref, rtol=1e-9, atol=1e-12)


def test_isolated_turns_tf32_off_inside_and_restores_the_users_settings(problem):
    model, _, _ = problem
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with isolated(model):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_isolated_leaves_every_precision_setting_as_it_was_also_the_newer_fp32_precision(problem):
    """From torch 2.9, assigning allow_tf32 writes "ieee"/"tf32" over an fp32_precision of
    "none"; restoring the boolean alone left torch.backends.cuda.matmul.fp32_precision "ieee"
    after every measurement (a Lens changed the process's settings)."""
    model, _, _ = problem
    matmul = torch.backends.cuda.matmul
    newer = hasattr(matmul, "fp32_precision")
    saved = matmul.fp32_precision if newer else None
    try:
        if newer:
            matmul.fp32_precision = "none"  # the default: the generic setting decides
        before = precision_settings()
        with isolated(model):
            assert not matmul.allow_tf32
        assert precision_settings() == before
        if newer:
            assert matmul.fp32_precision == "none"
    finally:
        if newer:
            matmul.fp32_precision = saved


def test_unwrap_model_strips_compile_and_data_parallel_wrappers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    for wrapped in (torch.compile(model, backend="eager"), nn.DataParallel(model),
                    torch.compile(nn.DataParallel(model), backend="eager")):
        assert unwrap_model(wrapped) is model
        assert [n for n, _ in ModelFunction(wrapped, nn.MSELoss(), (torch.zeros(2, 3), torch.zeros(2, 2))).params.items()] \
            == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert unwrap_model(model) is model


def test_isolated_runs_compiled_modules_eagerly_and_leaves_them_compiled():
    """Inside a measurement compiled code (no double backward) is bypassed; after it the model
    runs its compiled code again, as training expects."""
    calls: list[int] = []
    torch._dynamo.reset()  # no compiled code cached by another test for UserNet.forward
    model = UserNet()
    model.compile(backend=counting_backend([], calls))  # compiled in place
    x = torch.randn(5, 6)
    expected = model(x)
    assert len(calls) == 1
    with isolated(model):
        inside = model(x)
    assert len(calls) == 1 and torch.allclose(inside, expected)
    model(x)
    assert len(calls) == 2


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_weight_norm_hessian_vector_products_match_finite_differences(style):
    """PyTorch's fused weight-norm kernel has a wrong second derivative (its double backward holds
    the norms constant: 30% off here) and no forward-mode one; measurements compute weight norm
    from elementary operations. Oracle: central differences of the gradient, taken by plain
    autograd outside any measurement (first derivatives of the fused kernel are right)."""
    from torch.func import functional_call
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    wrap = parametrizations.weight_norm if style == "parametrization" else torch.nn.utils.weight_norm
    model = nn.Sequential(wrap(nn.Linear(6, 10)), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]

    def plain_grad(flat: torch.Tensor) -> torch.Tensor:
        leaves = [t.requires_grad_(True) for t in unflatten(flat.clone(), dict(model.named_parameters())).values()]
        loss = loss_fn(functional_call(model, dict(zip(names, leaves, strict=True)), (x,)), y)
        return flatten(list(torch.autograd.grad(loss, leaves)))

    fused = torch._weight_norm
    with isolated(model):
        fn = ModelFunction(model, loss_fn, (x, y))
        v = torch.randn(fn.num_params, dtype=torch.float64)
        eps = 1e-6
        expected = (plain_grad(fn.vector() + eps * v) - plain_grad(fn.vector() - eps * v)) / (2 * eps)
        for method in ("reuse", "forward_over_reverse"):
            matvec = fn.curvature_products("hessian", method)[0]
            assert torch.allclose(matvec(v), expected, rtol=1e-6, atol=1e-8), method
    assert torch._weight_norm is fused  # restored for training
    leaves = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(functional_call(model, dict(zip(names, leaves, strict=True)), (x,)), y),
                                leaves, create_graph=True)
    fused_hv = flatten(list(torch.autograd.grad(grads, leaves, list(unflatten(v, dict(model.named_parameters())).values()))))
    assert not torch.allclose(fused_hv, expected, rtol=1e-2)  # the test can fail: the fused kernel is off


def test_isolated_turns_the_users_autocast_off_and_back_on(problem):
    """A measurement called inside the training loop's torch.autocast block runs in full
    precision (the oracle: the same products outside autocast), and autocast is on again after."""
    model, loss_fn, (x, y) = problem
    model, batch = model.float(), (x.float(), y)  # autocast leaves float64 alone
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad),
                    generator=torch.Generator().manual_seed(2))

    def product() -> torch.Tensor:
        with isolated(model):
            assert not torch.is_autocast_cpu_enabled()
            return ModelFunction(model, loss_fn, batch).curvature_products("hessian", "reuse")[0](v)

    expected = product()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = product()
        assert torch.is_autocast_cpu_enabled()
    assert torch.equal(found, expected)


# --- example_losses: each example's loss from batched outputs ------------------------------

def _alone(loss_fn, outputs, targets):
    """The definition: loss_fn on a batch of one, example by example."""
    return torch.stack([loss_fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(outputs.shape[0])])


def _loss_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 3])
    probs = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1)
    values = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    targets = torch.randn(6, 3, 2, generator=g, dtype=torch.float64)
    bits = (torch.rand(6, 3, generator=g) > 0.5).double()
    cases = []
    for reduction in ("mean", "sum"):
        cases += [
            (nn.CrossEntropyLoss(reduction=reduction), logits, labels),
            (nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1), logits, labels),
            (nn.CrossEntropyLoss(reduction=reduction), logits, probs),
            (nn.NLLLoss(reduction=reduction), torch.log_softmax(logits, 1), labels),
            (nn.MSELoss(reduction=reduction), values, targets),
            (nn.L1Loss(reduction=reduction), values, targets),
            (nn.SmoothL1Loss(reduction=reduction, beta=0.5), values, targets),
            (nn.HuberLoss(reduction=reduction, delta=0.7), values, targets),
            (nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)),
             values[:, :, 0], bits),
            (nn.BCELoss(reduction=reduction), torch.sigmoid(values[:, :, 0]), bits),
            # not taken unreduced (class weights; a plain function): vmap gives the same definition
            (nn.CrossEntropyLoss(reduction=reduction, weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)),
             logits, labels),
        ]
    cases.append((lambda o, t: ((o - t) ** 4).mean(), values, targets))
    return cases


@pytest.mark.parametrize("case", range(len(_loss_cases())))
def test_example_losses_equal_each_example_alone(case):
    loss_fn, outputs, targets = _loss_cases()[case]
    weighted = getattr(loss_fn, "weight", None) is not None
    # the torch modules are taken in one unreduced call; the others by vmap
    assert (_unreduced(loss_fn, outputs, targets) is None) == (weighted or not isinstance(loss_fn, nn.Module))
    got = example_losses(loss_fn, outputs, targets)
    torch.testing.assert_close(got, _alone(loss_fn, outputs, targets), rtol=1e-12, atol=1e-12)


def test_example_losses_ignored_target_is_the_mean_of_nothing():
    """An example alone whose only target is ignore_index has a mean loss of 0/0 (nan), as
    loss_fn gives it; with the sum reduction, 0."""
    logits = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2])
    for reduction in ("mean", "sum"):
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        torch.testing.assert_close(example_losses(loss_fn, logits, labels), _alone(loss_fn, logits, labels),
                                   equal_nan=True)


def test_outputs_and_activation_bytes_are_the_models_outputs_and_the_bytes_of_one_pass(problem):
    model, loss_fn, (x, y) = problem
    fn = ModelFunction(model, loss_fn, (x, y))
    with isolated(model, "eval"):
        outputs, counted = fn.outputs_and_activation_bytes(3)
        expected = model(x[:3])
        alone = fn.activation_bytes(3)
    torch.testing.assert_close(outputs, expected, rtol=0, atol=0)
    assert outputs.grad_fn is None and not outputs.requires_grad
    # BatchNorm's input (the convolution's output) and ReLU's output at least: two (3, 4, 4, 4)
    # tensors of float64
    assert counted == alone and counted >= 2 * 3 * 64 * 8
