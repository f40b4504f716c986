"""Softmax collapse, NLM alignment and the remedies, against hand-built cases and definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlens as dl
from dynlens.measures.softmax import absorption_margin, cosines


def _two_class(margins: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [m, 0] with target 0: s = 1 + exp(−m)."""
    m = torch.tensor(margins, dtype=torch.float64)
    return torch.stack([m, torch.zeros_like(m)], dim=1), torch.zeros(len(margins), dtype=torch.long)


@pytest.mark.parametrize(("dtype", "bits"), [(torch.float32, 24), (torch.float16, 11), (torch.bfloat16, 8)])
def test_collapse_sets_in_just_past_each_dtypes_absorption_margin(dtype, bits):
    edge = bits * math.log(2)
    assert absorption_margin(dtype) == pytest.approx(edge)
    below, above = edge - 0.6, edge + 0.6
    logits, targets = _two_class([below, below, above, above, above])
    result = dl.softmax_collapse(logits, targets, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert result.dtype == name and result.fraction == pytest.approx(3 / 5)
    assert result.by_dtype[name] == pytest.approx(3 / 5)
    # the recipe in the dtype, by hand: 1 + exp(-m) rounds to exactly 1 past the margin
    by_hand = [(torch.tensor(1.0, dtype=dtype) + torch.exp(torch.tensor(-m, dtype=dtype))).item() == 1.0
               for m in (below, above)]
    assert by_hand == [False, True]
    assert result.margin_above[name] == pytest.approx(3 / 5)
    assert result.margin_min == pytest.approx(below) and result.margin_median == pytest.approx(above)


def test_a_margin_collapsed_in_bfloat16_is_not_in_float32_and_many_classes_add_up():
    logits, targets = _two_class([10.0])
    result = dl.softmax_collapse(logits, targets)
    assert result.by_dtype == {"float32": 0.0, "bfloat16": 1.0, "float16": 1.0}
    # 1,000 classes each at −16.0 below the target's logit: each term is absorbed alone in float32
    # (16 < 16.6 is not; pick 17), but they are summed before the 1 is added in the recipe
    z = torch.full((1, 1000), -17.0, dtype=torch.float64)
    z[0, 0] = 0.0
    summed = dl.softmax_collapse(z, torch.zeros(1, dtype=torch.long))
    assert summed.fraction == 0.0  # 999·e^-17 ≈ 4e-5 survives: not collapsed


def test_zero_loss_fraction_matches_cross_entropy_in_float32_and_sequences_skip_ignored_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=g, dtype=torch.float64) * 12
    targets = logits.argmax(-1)
    targets[0, :3] = -100
    targets[1, 2] = (targets[1, 2] + 1) % 11  # a wrong class: never zero loss
    result = dl.softmax_collapse(logits, targets)
    keep = targets != -100
    losses = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    assert result.count == int(keep.sum())
    assert result.zero_loss_fraction == pytest.approx(float((losses == 0).double().mean()))
    assert result.log_z_min == pytest.approx(float(torch.logsumexp(logits[keep], -1).min()))
    assert result.logit_norm_max == pytest.approx(float(logits[keep].norm(dim=-1).max()))
    with pytest.raises(ValueError, match="one class index per row"):
        dl.softmax_collapse(logits, targets[:, :2])
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        dl.softmax_collapse(logits, torch.full_like(targets, -100))


def test_nlm_cosine_against_a_hand_computation_per_tensor_and_overall():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    result = dl.nlm_alignment(model, nn.CrossEntropyLoss(), (x, y))
    F.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert result.cosine == pytest.approx(float(-g @ theta / (g.norm() * theta.norm())), rel=1e-12)
    for name, p in model.named_parameters():
        expected = float(-(p.grad * p.detach()).sum() / (p.grad.norm() * p.detach().norm()))
        assert result.per_tensor[name] == pytest.approx(expected, rel=1e-12)
    assert math.isnan(cosines({"w": torch.zeros(2)}, {"w": torch.ones(2)}).per_tensor["w"])


def test_nlm_cosine_nears_one_for_a_bias_free_homogeneous_network_trained_past_fitting():
    torch.manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16, bias=False), nn.ReLU(), nn.Linear(16, 2, bias=False)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    early = dl.nlm_alignment(model, nn.CrossEntropyLoss(), (x, y)).cosine
    for _ in range(1000):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert F.cross_entropy(model(x), y).item() < 1e-3  # fitted
    # descent now mostly scales θ (0.88 here; it creeps towards 1, 0.92 after 20,000 steps)
    late = dl.nlm_alignment(model, nn.CrossEntropyLoss(), (x, y)).cosine
    assert late > 0.85 and late > early + 0.5


def test_stablemax_cross_entropy_and_z_loss_equal_their_definitions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=g) * 3
    targets = torch.tensor([0, 3, 1, 1, 2])

    def s(v: float) -> float:
        return v + 1 if v >= 0 else 1 / (1 - v)

    expected = []
    for row, t in zip(logits.double().tolist(), targets.tolist(), strict=True):
        expected.append(-math.log(s(row[t]) / sum(s(v) for v in row)))
    got = dl.remedies.stablemax_cross_entropy(logits, targets, reduction="none")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert dl.remedies.stablemax_cross_entropy(logits, targets).item() == pytest.approx(sum(expected) / 5, rel=1e-14)
    masked = targets.clone()
    masked[1] = -100
    assert dl.remedies.stablemax_cross_entropy(logits, masked).item() == pytest.approx(
        (sum(expected) - expected[1]) / 4, rel=1e-14)
    z = dl.remedies.z_loss(logits, weight=1e-4)
    assert z.item() == pytest.approx(1e-4 * float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)


def test_orthograd_steps_orthogonally_to_each_tensor_and_keeps_the_wrapped_optimizers_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = dl.remedies.OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    raw = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    for theta, after, g in zip(before, model.parameters(), raw, strict=True):
        step = (theta - after.detach()) / 0.1  # = g⊥
        assert float((step * theta).sum()) == pytest.approx(0.0, abs=1e-12 * float(theta.norm() * g.norm()))
        assert float(step.norm()) == pytest.approx(float(g.norm()), rel=1e-10)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-25, weight_decay=0.0)
    wrapped = dl.remedies.OrthoGrad(inner)
    assert wrapped.param_groups[0]["betas"] == (0.8, 0.9) and wrapped.param_groups[0]["eps"] == 1e-25
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
    wrapped.zero_grad()
    F.cross_entropy(model(x), y).backward()
    wrapped.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-4)  # the schedule reached the wrapped optimizer
    assert len(inner.state) == len(list(model.parameters()))  # AdamW's own state, stepped once
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        dl.remedies.OrthoGrad(model)  # type: ignore[arg-type]


def test_counting_only_rows_that_could_collapse_equals_the_recipe_on_every_row():
    from dynlens.measures.softmax import COLLAPSE_DTYPES, collapsed

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, 7, generator=g, dtype=torch.float64)
    logits[:, 0] += torch.linspace(0, 25, 3000, dtype=torch.float64)  # gaps sweeping past every margin
    targets = torch.zeros(3000, dtype=torch.long)
    targets[::3] = 1  # some rows misclassified
    result = dl.softmax_collapse(logits, targets)
    for name, dtype in COLLAPSE_DTYPES.items():
        assert result.by_dtype[name] == pytest.approx(float(collapsed(logits, dtype).double().mean()), abs=1e-12)
    zero = (F.cross_entropy(logits.float(), targets, reduction="none") == 0).double().mean()
    assert result.zero_loss_fraction == pytest.approx(float(zero), abs=1e-12)
    assert 0 < result.by_dtype["float32"] < result.by_dtype["bfloat16"]


@pytest.mark.parametrize(("row", "label", "margin"), [
    ([2.0, 2.0, 1.0], 0, 0.0),   # tied with another class: no margin
    ([2.0, 2.0, 1.0], 1, 0.0),
    ([2.0, 2.0, 1.0], 2, -1.0),  # below both
    ([3.0, 1.0, 0.0], 0, 2.0),   # the label first: its lead over the second
    ([0.0, 1.0, 3.0], 0, -3.0),
])
def test_the_margin_is_the_labels_logit_less_the_largest_other(row, label, margin):
    result = dl.softmax_collapse(torch.tensor([row]), torch.tensor([label]))
    assert result.margin_min == pytest.approx(margin)
