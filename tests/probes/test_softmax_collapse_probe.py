"""dl.probes.SoftmaxCollapse in a Lens, its rules on planted runs, and its figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import sgd_steps, tiny_problem
from torch import nn

import dynlens as dl
from dynlens.store import RunWriter

PROBE = "softmax_collapse"


def test_the_probe_records_collapse_margins_and_both_cosines_in_a_lens(tmp_path):
    model, loss_fn, batch = tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, loss_fn, batch, optimizer, run_dir=tmp_path, basic=False, budget=None,
                 probes=[dl.probes.SoftmaxCollapse(every=2, nlm_every=1)]) as lens:
        sgd_steps(model, loss_fn, batch, optimizer, lens, 4)
    run = dl.load_run(tmp_path)
    expected = dl.softmax_collapse(model(batch[0]).detach(), batch[1])
    assert run.series(PROBE, "margin_median")[4] == pytest.approx(expected.margin_median, rel=1e-6)
    assert run.series(PROBE, "fraction_float32")[4] == expected.by_dtype["float32"]
    assert run.series(PROBE, "nlm_cosine")[4] == pytest.approx(
        dl.nlm_alignment(model, loss_fn, batch).cosine, rel=1e-6)
    assert set(run.series(PROBE, "update_cosine").index) == {2, 4}  # the step before was kept
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert run.array_labels(PROBE, "nlm_per_tensor") == names
    assert run.array_labels(PROBE, "margin_quantiles")[0] == "q0"
    for draw in (dl.reports.plot_collapse, dl.reports.plot_margins, dl.reports.plot_nlm):
        assert draw(run) is not None
    assert dl.reports.plot_attention_logits(run) is None  # no attention layer


def test_attention_logits_are_recorded_per_layer_and_a_regression_is_skipped_with_a_note(tmp_path):
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 11)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.attention(h, h, h)[0])

    torch.manual_seed(0)
    model = Tiny()
    batch = (torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6)))
    def loss_fn(logits, targets):  # a language model's loss over every token
        return nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))

    with dl.Lens(model, loss_fn, batch, run_dir=tmp_path / "seq", basic=False, budget=None,
                 probes=[dl.probes.SoftmaxCollapse(every=1)]) as lens:
        lens.step()
    run = dl.load_run(tmp_path / "seq")
    assert run.array_labels(PROBE, "attention_max_logit") == ["attention"]
    assert run.series(PROBE, "count")[1] == 24  # every token
    model = nn.Linear(3, 1)
    with dl.Lens(model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 1)), run_dir=tmp_path / "reg", basic=False,
                 budget=None, probes=[dl.probes.SoftmaxCollapse(every=1)]) as lens:
        lens.step()
    run = dl.load_run(tmp_path / "reg")
    assert PROBE not in run.probes() and "class indices" in run.meta["notes"][PROBE]["skipped"]
    assert run.events().query("level == 'error'").empty


def test_autocast_logits_count_as_training_sees_them():
    model, loss_fn, batch = tiny_problem()
    ctx = dl.probes.Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=0)
    with dl.functional.isolated(model):
        values = dl.probes.SoftmaxCollapse(autocast=torch.bfloat16).measure(ctx)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[0])
    assert values["margin_min"] == pytest.approx(dl.softmax_collapse(logits, batch[1]).margin_min)
    with pytest.raises(ValueError, match="autocast"):
        dl.probes.SoftmaxCollapse(autocast=torch.float32)


def _planted(path, **series):
    writer = RunWriter(path)
    writer.set_meta({"probes": [{"name": PROBE, "dtype": "torch.float32"}]})
    for name, values in series.items():
        for step, value in enumerate(values):
            if name == "attention_max_logit":
                writer.array(step * 10, PROBE, name, np.asarray(value, dtype=float))
                writer.array_labels(step * 10, PROBE, name, ["blocks.0.attn", "blocks.1.attn"])
            else:
                writer.scalar(step * 10, PROBE, name, value)
    writer.close()
    return [f for f in dl.diagnose(path) if f.probe == PROBE]


@pytest.mark.parametrize(("rule", "series"), [
    ("softmax_collapse", {"fraction": [0.0, 0.02, 0.3, 0.5]}),
    ("collapse_imminent", {"fraction": [0.0, 0.0, 0.0], "margin_median": [3.0, 9.0, 13.0]}),
    ("naive_loss_minimisation", {"nlm_cosine": [0.2, 0.5, 0.93, 0.95]}),
    ("attention_logit_growth", {"attention_max_logit": [[5.0, 4.0], [8.0, 9.0], [12.0, 60.0]]}),
    ("output_logit_divergence", {"log_z_mean": [-1.0, -8.0, -25.0]}),
])
def test_each_rule_fires_on_its_planted_run_and_not_on_a_quiet_one(tmp_path, rule, series):
    found = _planted(tmp_path / "a", **series)
    assert [f.rule for f in found] == [rule]
    assert found[0].suggestion
    quiet = {name: [v if not isinstance(v, list) else [1.0, 1.0] for v in values][:1] * len(values)
             for name, values in series.items()}
    assert _planted(tmp_path / "b", **quiet) == []


def test_under_a_memory_allowance_the_forward_runs_in_chunks_and_the_nlm_cosine_waits():
    model, loss_fn, batch = tiny_problem()
    ctx = dl.probes.Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=0)
    whole = dl.probes.SoftmaxCollapse(nlm_every=1).measure(ctx)
    per_example = ctx.fn.activation_bytes(1)
    n = batch[1].shape[0]
    # room for a third of the batch's activations at once: chunks, and no whole-batch gradient
    ctx.memory = per_example * n // 3
    probe = dl.probes.SoftmaxCollapse(nlm_every=1)
    chunked = probe.measure(ctx)
    for name in ("margin_median", "margin_min", "logit_norm_max", "fraction_float32", "log_z_mean"):
        assert chunked[name] == pytest.approx(whole[name], rel=1e-6)
    assert "nlm_cosine" in whole and "nlm_cosine" not in chunked
    assert "memory allowance" in probe.notes["nlm"]
    ctx.memory = per_example // 2  # not even one example: it waits for memory
    with pytest.raises(dl.budget.MemoryBudgetTooSmall, match="the forward pass"):
        dl.probes.SoftmaxCollapse().measure(ctx)
