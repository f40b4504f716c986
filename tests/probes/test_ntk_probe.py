"""dl.probes.NTK in a Lens: the kernel's motion and alignment against an independent kernel from
explicit Jacobians, the output projection, the rules on planted runs and the figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_run
from torch import nn
from torch.func import functional_call, jacrev

import dynlens as dl
from dynlens.measures.ntk import kernel_distance, kernel_target_alignment

PROBE = "ntk"


def _jacobian_kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    outputs = jac[next(iter(jac))].shape[1]
    per_output = torch.cat([j.reshape(x.shape[0], outputs, -1) for j in jac.values()], dim=2)
    return torch.einsum("iap,jap->ij", per_output, per_output)


def test_the_probe_tracks_distance_velocity_and_alignment_of_the_kernel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    initial = _jacobian_kernel(model, x[:12])
    with dl.Lens(model, nn.CrossEntropyLoss(), (x, y), optimizer, run_dir=tmp_path, basic=False, budget=None,
                 probes=[dl.probes.NTK(every=5, n=12)]) as lens:
        for _ in range(10):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            lens.step()
    run = dl.load_run(tmp_path)
    final = _jacobian_kernel(model, x[:12])
    assert run.series(PROBE, "distance_from_init")[0] == pytest.approx(0.0, abs=1e-12)
    assert run.series(PROBE, "distance_from_init")[10] == pytest.approx(kernel_distance(final, initial), rel=1e-6)
    assert run.series(PROBE, "alignment")[10] == pytest.approx(kernel_target_alignment(final, y[:12]), rel=1e-6)
    assert run.series(PROBE, "trace")[10] == pytest.approx(float(final.diagonal().sum()), rel=1e-6)
    assert set(run.series(PROBE, "velocity").index) == {5, 10}
    # the stored kernel, its spectrum and the targets it is sorted by in the report
    (first_step, first_kernel), *_, (last_step, last_kernel) = run.arrays(PROBE, "kernel")
    assert (first_step, last_step) == (0, 10) and first_kernel.dtype == np.float32
    np.testing.assert_allclose(first_kernel, initial.numpy(), rtol=1e-5)
    np.testing.assert_allclose(last_kernel, final.numpy(), rtol=1e-5)
    np.testing.assert_allclose(run.arrays(PROBE, "eigenvalues")[-1][1],
                               np.linalg.eigvalsh(final.numpy())[::-1], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(run.arrays(PROBE, "targets")[-1][1], y[:12].numpy())
    assert run.array_labels(PROBE, "alignment_per_layer") == ["0", "2"]
    assert run.array_labels(PROBE, "top_eigenvalues")[0] == "λ1"
    for draw in (dl.reports.plot_kernel_motion, dl.reports.plot_kernel_alignment,
                 dl.reports.plot_kernel_alignment_per_layer, dl.reports.plot_kernel_eigenvalues,
                 dl.reports.plot_kernel_spectra, dl.reports.plot_kernel_by_class):
        assert draw(run) is not None


def test_the_relative_parameter_change_is_taken_from_the_first_kernels_parameters(tmp_path, monkeypatch):
    import dynlens.probes.ntk as probe_module

    monkeypatch.setattr(probe_module, "_PIECE", 7)  # pieces that cut every parameter, the last one short
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model[0].bias.requires_grad_(False)  # frozen: not a parameter of the kernel nor of the change
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters() if p.requires_grad])

    expected = {}
    with dl.Lens(model, nn.CrossEntropyLoss(), (x, y), optimizer, run_dir=tmp_path, basic=False, budget=None,
                 probes=[dl.probes.NTK(every=3, n=8)]) as lens:
        start = flat()
        for step in range(1, 7):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            lens.step()
            expected[step] = float((flat() - start).norm() / start.norm())
    change = dl.load_run(tmp_path).series(PROBE, "parameter_change")
    assert change[0] == 0.0 and list(change.index) == [0, 3, 6]
    assert change[3] == pytest.approx(expected[3], rel=1e-12) and change[6] == pytest.approx(expected[6], rel=1e-12)
    assert 0 < change[3] < change[6]


def test_the_parameter_change_takes_pieces_that_fit_the_memory_allowance(monkeypatch):
    from dynlens.probes.ntk import _relative_change

    torch.manual_seed(0)
    parameters = [torch.randn(1000, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)]
    initial = [p + 0.1 * torch.randn_like(p) for p in parameters]
    norm = float(torch.cat([p.reshape(-1) for p in initial]).norm())
    expected = float(torch.cat([(p - q).reshape(-1) for p, q in zip(parameters, initial)]).norm()) / norm
    seen = []
    original = torch.linalg.vector_norm

    def counted(piece, *args, **kwargs):
        seen.append(piece.numel())
        return original(piece, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "vector_norm", counted)
    found = _relative_change(parameters, initial, norm, memory=24 * 100)  # 100 float64 entries a piece
    assert found == pytest.approx(expected, rel=1e-12)
    assert max(seen) == 100 and sum(seen) == 1000 + 21


def test_a_large_kernel_is_stored_for_its_first_examples_with_their_classes(monkeypatch):
    import dynlens.probes.ntk as probe_module

    monkeypatch.setattr(probe_module, "STORED_KERNEL", 5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    values = dl.probes.NTK(n=8).measure(ctx)
    whole = _jacobian_kernel(model, x)
    np.testing.assert_allclose(values["kernel"], whole[:5, :5].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(values["targets"], y[:5].numpy())
    assert len(values["eigenvalues"]) == 8  # the spectrum of the whole kernel
    np.testing.assert_allclose(values["eigenvalues"], np.linalg.eigvalsh(whole.numpy())[::-1], rtol=1e-6, atol=1e-9)


def test_a_model_too_large_to_copy_has_no_parameter_change_and_a_note_says_why(monkeypatch):
    import dynlens.probes.ntk as probe_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()  # 147 parameters, 1,176 bytes
    monkeypatch.setattr(probe_module, "PARAMETER_COPY_BYTES", 1_000)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    probe = dl.probes.NTK(n=8)
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    assert "parameter_change" not in probe.measure(ctx) and "parameter_change" not in probe.measure(ctx)
    assert "147 trainable parameters would take 1.18e-06 GB" in probe.notes["parameter_change"]


def test_examples_with_an_ignored_target_are_left_out_of_the_alignment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    y[[2, 7]] = -100  # padding: no class
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    values = dl.probes.NTK(n=12).measure(ctx)
    kernel = _jacobian_kernel(model, x)
    keep = y >= 0
    assert values["alignment"] == pytest.approx(kernel_target_alignment(kernel[keep][:, keep], y[keep]), rel=1e-6)
    assert values["trace"] == pytest.approx(float(kernel.diagonal().sum()), rel=1e-6)  # every example


def test_many_outputs_are_projected_and_a_sequence_model_is_measured_at_its_last_position(tmp_path):
    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(7, 6), nn.Linear(6, 100)

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    torch.manual_seed(0)
    model = Sequence()
    tokens = torch.randint(0, 7, (8, 5))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1))

    with dl.Lens(model, loss_fn, (tokens, torch.randint(0, 100, (8, 5))), run_dir=tmp_path, basic=False, budget=None,
                 probes=[dl.probes.NTK(every=1, n=4, max_outputs=16)]) as lens:
        lens.step()
    run = dl.load_run(tmp_path)
    assert run.series(PROBE, "outputs")[1] == 16
    assert "100 outputs on 16" in run.meta["notes"][PROBE]["projection"]
    assert run.events().query("level == 'error'").empty


@pytest.mark.parametrize(("rule", "records", "quiet"), [
    ("lazy_regime", {"distance_from_init": [0.0, 0.01, 0.02, 0.03]}, {"distance_from_init": [0.0, 0.2, 0.3, 0.4]}),
    # the kernel barely moves in both; in the second the parameters moved 30% of their norm
    ("lazy_regime", {"distance_from_init": [0.0, 0.01, 0.02, 0.03], "parameter_change": [0.0, 0.01, 0.02, 0.04]},
     {"distance_from_init": [0.0, 0.01, 0.02, 0.03], "parameter_change": [0.0, 0.1, 0.2, 0.3]}),
    ("kernel_alignment_rising", {"alignment": [0.1, 0.15, 0.3]}, {"alignment": [0.1, 0.12, 0.11]}),
    ("fast_then_slow_kernel", {"velocity": [1e-2, 8e-3, 1e-4, 5e-4, 2e-4]}, {"velocity": [1e-3, 8e-4, 9e-4, 7e-4, 6e-4]}),
    ("ill_conditioned_kernel", {"condition_number": [1e3, 1e5, 3e8]}, {"condition_number": [1e3, 1e4, 1e5]}),
])
def test_each_ntk_rule_fires_on_its_planted_run_only(tmp_path, rule, records, quiet):
    import numpy as np

    def planted(path, values):
        count = len(next(iter(values.values())))
        measurements: dict = {PROBE: {}}
        for name, series in values.items():
            for i, v in enumerate(series):
                measurements[PROBE].setdefault(i * 100, {})[name] = v
        steps = 100 * (count - 1)
        write_run(path, steps=steps, loss=np.linspace(2.0, 0.5, steps), measurements=measurements)
        return [f.rule for f in dl.diagnose(path) if f.probe == PROBE]

    assert planted(tmp_path / "a", records) == [rule]
    assert planted(tmp_path / "b", quiet) == []


class _TinyLanguageModel(nn.Module):
    """Tokens → embedding → a causal running mean → linear → logits at every position: each
    position's outputs depend on all tokens up to it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(1000, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype)
        return self.head(torch.tanh(self.mix(h.cumsum(1) / steps[:, None])))


class _LastPosition(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[:, -1]


def test_a_sequence_models_first_kernel_takes_the_last_tokens_that_fit_and_keeps_them(monkeypatch):
    import dynlens.probes.ntk as probe_module
    from dynlens.budget import MemoryBudgetTooSmall, OverBudget
    from dynlens.measures.ntk import ntk_of

    torch.manual_seed(0)
    model = _TinyLanguageModel().double()
    tokens, targets = torch.randint(0, 1000, (6, 32)), torch.randint(0, 5, (6, 32))
    memory = 100_000

    def fits(keep: int) -> bool:
        try:
            ntk_of(_LastPosition(model), tokens[:, 32 - keep:], memory=memory, vector_products=False)
        except MemoryBudgetTooSmall:
            return False
        return True

    expected = next(keep for keep in (32, 16, 8) if fits(keep))
    assert expected < 32  # the whole sequences do not fit: the case under test

    probe = dl.probes.NTK(n=6)
    # a first try stopped at its deadline (past the memory test): the next starts at the tokens that fitted
    lengths: list[int] = []
    monkeypatch.setattr(probe_module, "ntk_of", lambda m, x, **k: lengths.append(x.shape[1]) or ntk_of(m, x, **k))
    late = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(tokens, targets),
                             optimizer=None, step=0, memory=memory, clock=lambda: 1.0, deadline=0.5)
    with pytest.raises(OverBudget):
        probe.measure(late)
    assert lengths[0] == 32 and lengths[-1] == expected
    lengths.clear()
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(tokens, targets),
                            optimizer=None, step=0, memory=memory)
    first = probe.measure(ctx)
    assert lengths == [expected]
    oracle = _jacobian_kernel(_LastPosition(model), tokens[:, 32 - expected:])
    assert first["tokens"] == expected
    assert first["trace"] == pytest.approx(float(oracle.diagonal().sum()), rel=1e-9)
    assert f"last {expected} of 32 tokens" in probe.notes["tokens"]
    # a later kernel with memory to spare is taken on as many tokens, so the two compare
    later = probe.measure(dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(tokens, targets),
                                            optimizer=None, step=5))
    assert later["tokens"] == expected and later["distance_from_init"] == pytest.approx(0.0, abs=1e-12)

    # not even MIN_TOKENS fit: the probe waits (the Lens's memory error), as an image model does
    tight = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(tokens, targets),
                              optimizer=None, step=0, memory=2_000)
    with pytest.raises(MemoryBudgetTooSmall):
        dl.probes.NTK(n=6).measure(tight)
    images = dl.probes.Context(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 5)),
                               loss_fn=nn.CrossEntropyLoss(), probe_batch=(torch.randn(6, 8, 8), targets[:, 0]),
                               optimizer=None, step=0, memory=2_000)
    with pytest.raises(MemoryBudgetTooSmall):
        dl.probes.NTK(n=6).measure(images)
    # integer features, not a sequence: the shortened inputs fail in the model, and the probe
    # waits with the whole inputs' memory error
    features = nn.Sequential(nn.Embedding(1000, 4), nn.Flatten(), nn.Linear(64, 5))
    categorical = dl.probes.Context(model=features, loss_fn=nn.CrossEntropyLoss(),
                                    probe_batch=(torch.randint(0, 1000, (6, 16)), targets[:, 0]),
                                    optimizer=None, step=0, memory=2_000)
    with pytest.raises(MemoryBudgetTooSmall) as waited:
        dl.probes.NTK(n=6).measure(categorical)
    assert isinstance(waited.value.__cause__, RuntimeError)


def test_measure_called_on_a_model_in_train_mode_leaves_its_batchnorm_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    values = dl.probes.NTK(n=8).measure(ctx)  # the output count was taken on one example in train mode
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    oracle = _jacobian_kernel(model.eval(), x[:8])  # the kernel is the eval-mode one
    assert values["trace"] == pytest.approx(float(oracle.diagonal().sum()), rel=1e-9)


def test_measurements_of_one_model_check_its_layers_once_and_a_copy_leaves_the_model_alone(monkeypatch):
    import dynlens.measures.ntk as ntk_module

    checks = []
    original = ntk_module._checked_layers
    monkeypatch.setattr(ntk_module, "_checked_layers", lambda *a, **k: checks.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 40)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 40, (12,))
    ctx = dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    probe = dl.probes.NTK(n=8, max_outputs=4)
    first = probe.measure(ctx)
    with torch.no_grad():
        model[2].weight.mul_(2)
    second = probe.measure(ctx)
    assert len(checks) == 1  # the second measurement reused what the first learnt of the layers
    assert second["trace"] > first["trace"]  # of the changed weights: not a kept kernel
    copied = probe.with_schedule(every=7)
    assert copied._wrapper is None and probe._wrapper is not None and probe._wrapper.model is model
    # another model: its own wrapper and its own check
    other = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 40)).double()
    probe.measure(dl.probes.Context(model=other, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y),
                                    optimizer=None, step=1))
    assert probe._wrapper.model is other and len(checks) == 2


def test_the_probe_measures_the_users_module_inside_a_data_parallel_wrapper():
    # DistributedDataParallel's forward synchronises buffers and prepares its reducer for a
    # backward pass; the probe's passes must go through the module it wraps (DataParallel here,
    # which unwrap_model strips the same way, needs no process group)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    wrapped = nn.DataParallel(model)
    calls = []
    wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
    # with one GPU, DataParallel moves the module there: the batch goes where the module is
    device = next(model.parameters()).device
    x, y = torch.randn(6, 5, dtype=torch.float64, device=device), torch.randint(0, 3, (6,), device=device)
    ctx = dl.probes.Context(model=wrapped, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y), optimizer=None, step=0)
    probe = dl.probes.NTK(n=6)
    values = probe.measure(ctx)
    assert calls == [] and probe._wrapper is not None and probe._wrapper.model is model
    assert values["trace"] == pytest.approx(float(_jacobian_kernel(model, x).diagonal().sum()), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_parameter_copy_is_page_locked_and_the_change_exact():
    from dynlens.probes.ntk import _relative_change

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).cuda()
    parameters = list(model.parameters())
    kept = dl.probes.NTK()._kept_parameters(parameters)
    assert kept is not None and all(c.is_pinned() for c in kept[0])
    with torch.no_grad():
        model[0].weight.add_(0.1)
    start = torch.cat([c.reshape(-1).double() for c in kept[0]])
    now = torch.cat([p.detach().reshape(-1).double().cpu() for p in parameters])
    assert _relative_change(parameters, *kept) == pytest.approx(float((now - start).norm() / start.norm()), rel=1e-6)


def test_parameters_that_change_shape_stop_the_parameter_change_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    probe = dl.probes.NTK(n=8)

    def measured(step):
        return probe.measure(dl.probes.Context(model=model, loss_fn=nn.CrossEntropyLoss(), probe_batch=(x, y),
                                               optimizer=None, step=step))

    assert measured(0)["parameter_change"] == 0.0
    model[0].bias.requires_grad_(False)  # one parameter fewer to train
    values = measured(5)
    assert "parameter_change" not in values and values["trace"] > 0  # the kernel is still measured
    assert "from step 5" in probe.notes["parameter_change"]
