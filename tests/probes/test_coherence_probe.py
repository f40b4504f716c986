"""dl.probes.Coherence inside a Lens: what it records, and that it leaves training alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dynlens as dl


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def train(model, x, y, steps, lens=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        idx = torch.arange(step * 8, step * 8 + 8) % len(y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if lens is not None:
            lens.step(loss=loss)


def test_probe_records_every_statistic_of_the_measurement(tmp_path):
    model, x, y = setup()
    probe_batch = (x[:16], y[:16])
    with dl.Lens(model, nn.CrossEntropyLoss(), probe_batch, run_dir=tmp_path / "run",
                 probes=[dl.probes.Coherence(every=2, chunk_size=5, stiffness_every=1)], basic=False,
                 budget=None) as lens:
        train(model, x, y, 4, lens)
    run = dl.load_run(tmp_path / "run")
    assert list(run.series("coherence", "m_coherence").index) == [0, 2, 4]
    expected = dl.gradient_coherence(model, nn.CrossEntropyLoss(), probe_batch)
    for name in ("alpha", "m_coherence", "gsnr", "noise_scale", "stiffness_within", "stiffness_between"):
        np.testing.assert_allclose(run.series("coherence", name).iloc[-1], getattr(expected, name), rtol=1e-6)
    step, norms = run.arrays("coherence", "grad_norms")[-1]
    assert step == 4
    np.testing.assert_allclose(norms, expected.grad_norms, rtol=1e-6)
    per_layer = run.arrays("coherence", "gsnr_per_layer")[-1][1]
    assert per_layer.shape == (len(run.meta["layers"]),)
    np.testing.assert_allclose(per_layer, [expected.gsnr_per_layer[name] for name in run.meta["layers"]], rtol=1e-6)
    classes = run.arrays("coherence", "classes")[-1][1]
    per_class = run.arrays("coherence", "per_class")[-1][1]
    np.testing.assert_allclose(per_class, [expected.per_class[int(c)] for c in classes], rtol=1e-6)
    assert run.arrays("coherence", "stiffness")[-1][1].shape == (16, 16)
    assert run.series("coherence", "vmap_fallback").eq(0).all()


def test_stiffness_runs_on_its_sparser_sub_schedule(tmp_path):
    model, x, y = setup()
    probe_batch = (x[:16], y[:16])
    with dl.Lens(model, nn.CrossEntropyLoss(), probe_batch, run_dir=tmp_path / "run",
                 probes=[dl.probes.Coherence(every=1, stiffness_every=3)], basic=False, budget=None) as lens:
        train(model, x, y, 7, lens)
    run = dl.load_run(tmp_path / "run")
    assert list(run.series("coherence", "m_coherence").index) == list(range(8))
    # the 1st, 4th and 7th measurements (steps 0, 3, 6) carry the stiffness statistics
    assert list(run.series("coherence", "stiffness_within").index) == [0, 3, 6]
    assert [s for s, _ in run.arrays("coherence", "stiffness")] == [0, 3, 6]
    expected = dl.gradient_coherence(model, nn.CrossEntropyLoss(), probe_batch)
    np.testing.assert_allclose(run.series("coherence", "m_coherence").iloc[-1], expected.m_coherence, rtol=1e-6)


def test_stiffness_waits_while_the_time_budget_cannot_afford_it(tmp_path):
    model, x, y = setup()
    probe = dl.probes.Coherence(every=1, stiffness_every=1)
    with dl.Lens(model, nn.CrossEntropyLoss(), (x[:16], y[:16]), run_dir=tmp_path / "run",
                 probes=[probe], basic=False, budget=None) as lens:
        lens.step()
    # at step 0 under a budget the allowance is negative: the plain statistics only
    from dynlens.probes.base import Context

    ctx = Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x[:16], y[:16]),
                  optimizer=None, step=5, allowance=-1.0)
    values = dl.probes.Coherence(stiffness_every=1).measure(ctx)
    assert "m_coherence" in values and "stiffness_within" not in values
    assert "stiffness_within" in dl.probes.Coherence(stiffness_every=1).measure(
        Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x[:16], y[:16]),
                optimizer=None, step=5))


def test_infinite_noise_scale_is_stored_and_read_back_as_inf(tmp_path):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    batch = (torch.ones(2, 1), torch.tensor([[2.0], [0.0]]))
    lens = dl.Lens(model, nn.MSELoss(), batch, run_dir=tmp_path / "run",
                   probes=[dl.probes.Coherence()], basic=False, budget=None)
    lens.close()
    assert run_value(tmp_path / "run", "noise_scale") == np.inf


def run_value(path, name):
    return dl.load_run(path).series("coherence", name).iloc[-1]


def test_attaching_the_probe_leaves_the_training_trajectory_bit_identical(tmp_path):
    model_a, x, y = setup()
    train(model_a, x, y, 6)
    model_b, _, _ = setup()
    with dl.Lens(model_b, nn.CrossEntropyLoss(), (x[:12], y[:12]), run_dir=tmp_path / "run",
                 probes=[dl.probes.Coherence(every=1, chunk_size=5)], budget=None) as lens:
        train(model_b, x, y, 6, lens)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert dl.load_run(tmp_path / "run").events().empty


def test_train_mode_with_batchnorm_is_recorded_as_an_error_not_raised(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with dl.Lens(model, nn.CrossEntropyLoss(), batch, run_dir=tmp_path / "run",
                 probes=[dl.probes.Coherence(mode="train")], basic=False, budget=None):
        pass
    events = dl.load_run(tmp_path / "run").events()
    assert events["message"].str.contains("ill-defined in train mode").any()


def test_the_probe_sizes_its_chunks_automatically_by_default():
    probe = dl.probes.Coherence()
    assert probe.chunk_size == "auto" and probe.describe()["chunk_size"] == "auto"


def test_coherence_is_among_the_default_probes():
    assert any(isinstance(p, dl.probes.Coherence) for p in dl.probes.default())


@pytest.mark.parametrize("size", [300])
def test_large_probe_batches_keep_the_statistics_but_not_the_matrix(tmp_path, size):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batch = (torch.randn(size, 3), torch.randint(0, 2, (size,)))
    dl.Lens(model, nn.CrossEntropyLoss(), batch, run_dir=tmp_path / "run",
            probes=[dl.probes.Coherence(chunk_size=size)], basic=False, budget=None).close()
    run = dl.load_run(tmp_path / "run")
    assert "stiffness" not in run.array_names("coherence")
    assert np.isfinite(run.series("coherence", "stiffness_within").iloc[-1])


def test_every_coherence_figure_draws_one_run_and_an_overlay_of_two(tmp_path):
    from dynlens.reports import plot_coherence, plot_grad_norms, plot_noise_scale, plot_stiffness

    paths = []
    for k in range(2):
        model, x, y = setup(seed=k)
        path = tmp_path / f"run{k}"
        with dl.Lens(model, nn.CrossEntropyLoss(), (x[:16], y[:16]), run_dir=path,
                     config={"batch_size": 8}, probes=[dl.probes.Coherence(every=2, stiffness_every=1)],
                     basic=False, budget=None) as lens:
            train(model, x, y, 4, lens)
        paths.append(path)
    for fn in (plot_coherence, plot_noise_scale, plot_stiffness, plot_grad_norms):
        for runs in (paths[0], paths):
            fig = fn(runs, findings=[])
            assert fig is not None and fig.axes, fn.__name__
    assert plot_stiffness(paths[0], steps=[2]).axes[0].get_title() == "step 2"


def test_the_probe_fits_its_chunks_to_the_memory_it_is_allowed_and_refuses_less_than_one_example():
    from dynlens.budget import MemoryBudgetTooSmall
    from dynlens.functional import ModelFunction, isolated
    from dynlens.measures.coherence import memory_model
    from dynlens.probes.base import Context

    model, x, y = setup()
    batch, loss_fn = (x[:16], y[:16]), nn.CrossEntropyLoss()
    with isolated(model):
        plan = memory_model(ModelFunction(model, loss_fn, batch), stiffness=False)

    def measure(memory):
        ctx = Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=0,
                      allowance=-1.0, memory=memory)  # no time for stiffness
        with isolated(model):
            return dl.probes.Coherence().measure(ctx)

    values = measure(plan.peak(4, 16))
    expected = dl.gradient_coherence(model, loss_fn, batch, stiffness=False)
    np.testing.assert_allclose(values["m_coherence"], expected.m_coherence, rtol=1e-5)
    np.testing.assert_allclose(values["per_class"], [expected.per_class[int(c)] for c in values["classes"]],
                               rtol=1e-5)
    with pytest.raises(MemoryBudgetTooSmall, match="needs about"):
        measure(plan.peak(1, 16) - 1)


def test_a_lens_whose_memory_budget_holds_no_example_defers_the_probe_with_a_note(tmp_path):
    model, x, y = setup()
    with dl.Lens(model, nn.CrossEntropyLoss(), (x[:16], y[:16]), run_dir=tmp_path / "run",
                 probes=[dl.probes.Coherence(every=1)], basic=False, budget=None, memory_budget=1024) as lens:
        train(model, x, y, 2, lens)
    run = dl.load_run(tmp_path / "run")
    assert run.series("coherence", "m_coherence").empty
    assert run.events()["message"].str.contains("coherence waits for memory").any()


@pytest.mark.parametrize(("graphs", "memory", "expected"), [
    ("auto", None, "auto"), ("auto", 2**30, False), (True, 2**30, True), (False, None, False)])
def test_cuda_graphs_which_keep_their_memory_are_off_by_default_under_a_memory_limit(
        monkeypatch, graphs, memory, expected):
    import dynlens.probes.coherence as probe_module
    from dynlens.probes.base import Context

    seen = []
    real = probe_module.coherence_of

    def spy(*args, **kwargs):
        seen.append(kwargs["graphs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "coherence_of", spy)
    model, x, y = setup()
    ctx = Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x[:16], y[:16]), optimizer=None,
                  step=0, memory=memory)
    dl.probes.Coherence(graphs=graphs).measure(ctx)
    assert seen == [expected]


def test_stiffness_over_several_chunks_is_predicted_to_cost_a_pass_per_pair_of_chunks():
    from dynlens.functional import ModelFunction, isolated
    from dynlens.measures.coherence import memory_model
    from dynlens.probes.base import Context

    model, x, y = setup()
    batch, loss_fn = (x[:16], y[:16]), nn.CrossEntropyLoss()
    with isolated(model):
        plan = memory_model(ModelFunction(model, loss_fn, batch), stiffness=True)
    probe = dl.probes.Coherence()
    probe._stiffness.tick()

    def factor(memory):
        ctx = Context(model=model, loss_fn=loss_fn, probe_batch=batch, optimizer=None, step=0, memory=memory)
        with isolated(model):
            return probe._stiffness_factor(ctx)

    assert factor(None) == 8.0
    assert factor(plan.peak(16, 16)) == 8.0  # one chunk
    assert factor(plan.peak(4, 16)) == 8.0 * 6  # four chunks: six pairs
    assert factor(plan.peak(1, 16) - 1) == float("inf")
