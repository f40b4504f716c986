"""The Lens: step counting, schedules, user probes, fail-safety, durability and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import UserNet, counting_backend, sgd_steps, tiny_problem
from torch import nn

import dynlens as dl


class Counter(dl.Probe):
    name = "counter"
    pure = True

    def measure(self, ctx):
        return {"step_seen": float(ctx.step), "vector": np.arange(3.0) * ctx.step}


def test_steps_are_counted_from_zero_and_probes_measure_at_zero_schedule_and_close(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[Counter(every=4)], basic=False, budget=None) as lens:
        sgd_steps(model, loss_fn, batch, opt, lens, 10)
    run = dl.load_run(tmp_path)
    seen = run.series("counter", "step_seen")
    assert seen.index.tolist() == [0, 4, 8, 10]
    assert seen.tolist() == [0.0, 4.0, 8.0, 10.0]
    steps, arrays = zip(*run.arrays("counter", "vector"))
    assert list(steps) == [0, 4, 8, 10] and np.array_equal(arrays[-1], np.arange(3.0) * 10)
    assert run.series("train", "loss").index.tolist() == list(range(1, 11))
    assert run.series("train", "lr").tolist() == [0.1] * 10
    assert run.meta["status"] == "finished" and run.meta["steps"] == 10


def test_close_does_not_measure_twice_at_a_step_already_measured(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lens = dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[Counter(every=5)], basic=False, budget=None)
    sgd_steps(model, loss_fn, batch, opt, lens, 10)
    lens.close()
    lens.close()
    assert dl.load_run(tmp_path).series("counter", "step_seen").index.tolist() == [0, 5, 10]


def test_schedules_at_and_log_are_honoured(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class AtProbe(Counter):
        name = "at_probe"

    class LogProbe(Counter):
        name = "log_probe"

    probes = [AtProbe(at=[3, 7]), LogProbe(schedule=dl.schedules.log(1, per_decade=3))]
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=probes, basic=False, budget=None) as lens:
        sgd_steps(model, loss_fn, batch, opt, lens, 25)
    run = dl.load_run(tmp_path)
    assert run.series("at_probe", "step_seen").index.tolist() == [0, 3, 7, 25]
    assert run.series("log_probe", "step_seen").index.tolist() == [0, 1, 2, 5, 10, 22, 25]


def test_basic_probes_match_values_computed_by_hand(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    initial = [p.detach().clone() for p in model.parameters()]
    every_step = [p.with_schedule(every=1) for p in dl.probes.basic()]
    lens = dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=every_step, budget=None)
    sgd_steps(model, loss_fn, batch, opt, lens, 4)
    before = [p.detach().clone() for p in model.parameters()]
    sgd_steps(model, loss_fn, batch, opt, lens, 1)
    grads = [p.grad.clone() for p in model.parameters()]
    after = [p.detach().clone() for p in model.parameters()]
    lens.close()
    run = dl.load_run(tmp_path)

    def norm(ts):
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))

    assert run.series("grad_norm", "total")[5] == pytest.approx(norm(grads), rel=1e-6)
    assert run.series("param_norm", "total")[5] == pytest.approx(norm(after), rel=1e-6)
    update = norm([a - b for a, b in zip(after, before)])
    assert run.series("update_size", "total")[5] == pytest.approx(update, rel=1e-5)
    dist = norm([a - b for a, b in zip(after, initial)]) / norm(initial)
    assert run.series("distance_from_init", "relative")[5] == pytest.approx(dist, rel=1e-5)
    assert run.meta["layers"] == ["0", "2"]
    per_layer = dict(run.arrays("grad_norm", "per_layer"))[5]
    assert per_layer == pytest.approx([norm(grads[:2]), norm(grads[2:])], rel=1e-6)
    assert 0 not in run.series("grad_norm", "total").index  # no .grad before training


class Exploding(dl.Probe):
    name = "exploding"

    def __init__(self, fail_at=(), **kw):
        super().__init__(**kw)
        self.fail_at = set(fail_at)

    def measure(self, ctx):
        if ctx.step in self.fail_at:
            raise RuntimeError(f"planted failure at {ctx.step}")
        return {"ok": 1.0}


def test_a_failing_probe_never_stops_training_and_its_traceback_is_stored(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[Exploding(fail_at={2, 5})], budget=None) as lens:
        sgd_steps(model, loss_fn, batch, opt, lens, 8)
        assert lens.disabled == []
    run = dl.load_run(tmp_path)
    events = run.events()
    errors = events[events.level == "error"]
    assert errors.step.tolist() == [2, 5]
    assert "planted failure at 2" in errors.message.iloc[0]
    assert "Traceback" in errors.traceback.iloc[0] and "RuntimeError" in errors.traceback.iloc[0]
    assert run.series("exploding", "ok").index.tolist() == [0, 1, 3, 4, 6, 7, 8]
    assert run.series("train", "loss").index.tolist() == list(range(1, 9))


def test_a_probe_failing_three_times_in_a_row_is_switched_off_with_a_warning(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="switched off"):
        with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path,
                     probes=[Exploding(fail_at={3, 4, 5, 6})], budget=None) as lens:
            sgd_steps(model, loss_fn, batch, opt, lens, 9)
            assert lens.disabled == ["exploding"]
    run = dl.load_run(tmp_path)
    events = run.events()
    assert events[events.level == "error"].step.tolist() == [3, 4, 5]
    warning = events[events.level == "warning"]
    assert len(warning) == 1 and "switched off after 3 failures" in warning.message.iloc[0]
    assert run.series("exploding", "ok").index.tolist() == [0, 1, 2]


def test_a_probe_returning_garbage_is_a_recorded_failure(tmp_path):
    class Garbage(dl.Probe):
        name = "garbage"

        def measure(self, ctx):
            return {"bad": object()}

    model, loss_fn, batch = tiny_problem()
    with dl.Lens(model, loss_fn, batch, run_dir=tmp_path, probes=[Garbage()], basic=False, budget=None):
        pass
    assert "return floats or arrays" in dl.load_run(tmp_path).events().message.iloc[0]


CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import dynlens as dl
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lens = dl.Lens(model, nn.CrossEntropyLoss(), (x, y), opt, run_dir=sys.argv[1],
                   probes=[p.with_schedule(every=10) for p in dl.probes.basic()])
    step = 0
    while True:
        opt.zero_grad(); loss = nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
        lens.step(loss=loss); step += 1
        print(step, flush=True)
""")


def test_a_run_killed_with_sigkill_keeps_every_step_that_step_returned_from(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    last = 0
    for line in proc.stdout:
        last = int(line)
        if last == 20:  # another process reads the run while it is being written
            live = dl.load_run(run_dir)
            assert live.meta["status"] == "running" and live.last_step >= 20
            assert live.series("train", "loss").index[:20].tolist() == list(range(1, 21))
        if last >= 40:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = dl.load_run(run_dir)
    steps = run.series("train", "loss").index.tolist()
    assert steps[: last] == list(range(1, last + 1))
    assert set(run.series("grad_norm", "total").index) >= set(range(10, last + 1, 10))
    assert run.meta["status"] == "running"
    # the killed process released its lock: a new Lens may take over the directory
    model, loss_fn, batch = tiny_problem()
    dl.Lens(model, loss_fn, batch, run_dir=run_dir, overwrite=True, budget=None).close()


def test_model_without_trainable_parameters_is_a_clear_error(tmp_path):
    model, loss_fn, batch = tiny_problem()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*unfreeze"):
        dl.Lens(model, loss_fn, batch, run_dir=tmp_path, budget=None)


def test_non_scalar_loss_is_a_clear_error(tmp_path):
    model, _, batch = tiny_problem()
    with pytest.raises(ValueError, match=r"shape \(32,\).*mean loss \(a scalar\)"):
        dl.Lens(model, nn.CrossEntropyLoss(reduction="none"), batch, run_dir=tmp_path, budget=None)


def test_probe_batch_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    model, loss_fn, _ = tiny_problem()
    with pytest.raises(ValueError, match="probe_batch does not fit the model.*RuntimeError"):
        dl.Lens(model, loss_fn, (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), run_dir=tmp_path, budget=None)
    with pytest.raises(ValueError, match="probe_batch does not fit the loss"):
        dl.Lens(model, loss_fn, (torch.randn(8, 4), torch.zeros(5, dtype=torch.long)), run_dir=tmp_path, budget=None)
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        dl.Lens(model, loss_fn, torch.randn(8, 4), run_dir=tmp_path, budget=None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir_is_a_clear_error_as_user(tmp_path):
    tmp_path.chmod(0o500)
    model, loss_fn, batch = tiny_problem()
    with pytest.raises(dl.RunError, match="cannot write the run directory"):
        dl.Lens(model, loss_fn, batch, run_dir=tmp_path / "sub", budget=None)


def test_run_dir_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model, loss_fn, batch = tiny_problem()
    with pytest.raises(dl.RunError, match="cannot write the run directory.*writable|cannot write the run directory"):
        dl.Lens(model, loss_fn, batch, run_dir=blocker / "run", budget=None)


def test_second_lens_on_a_directory_in_use_is_refused(tmp_path):
    model, loss_fn, batch = tiny_problem()
    first = dl.Lens(model, loss_fn, batch, run_dir=tmp_path, budget=None)
    try:
        with pytest.raises(dl.RunInUseError, match="in use by another open Lens"):
            dl.Lens(model, loss_fn, batch, run_dir=tmp_path, overwrite=True, budget=None)
    finally:
        first.close()
    with pytest.raises(dl.RunError, match="already holds a run.*overwrite=True"):
        dl.Lens(model, loss_fn, batch, run_dir=tmp_path, budget=None)


def test_the_lock_is_also_held_against_another_process(tmp_path):
    model, loss_fn, batch = tiny_problem()
    with dl.Lens(model, loss_fn, batch, run_dir=tmp_path, budget=None):
        code = (
            "import sys, dynlens as dl\n"
            "try:\n    dl.store.RunWriter(sys.argv[1], overwrite=True)\n"
            "except dl.RunInUseError:\n    sys.exit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert result.returncode == 3


def test_step_after_close_and_bad_loss_are_clear_errors(tmp_path):
    model, loss_fn, batch = tiny_problem()
    lens = dl.Lens(model, loss_fn, batch, run_dir=tmp_path, budget=None)
    with pytest.raises(ValueError, match="scalar mean loss"):
        lens.step(loss=torch.ones(3))
    lens.close()
    with pytest.raises(RuntimeError, match="after lens.close"):
        lens.step()


def test_probe_arguments_are_checked():
    with pytest.raises(ValueError, match="one of every=, at= or schedule="):
        Counter(every=2, at=[1])
    with pytest.raises(ValueError, match="every=N needs a whole number"):
        Counter(every=0)
    with pytest.raises(TypeError, match="must set a class attribute name"):
        type("Nameless", (dl.Probe,), {})()


def test_meta_records_config_model_optimizer_and_versions(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, name="exp", config={"lr": 3e-4, "obj": object()}, budget=None):
        pass
    meta = dl.load_run(tmp_path).meta
    assert meta["name"] == "exp" and meta["config"]["lr"] == 3e-4
    assert meta["config"]["obj"].startswith("<object object")
    assert meta["model"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert meta["optimizer"]["class"] == "Adam" and meta["optimizer"]["defaults"]["lr"] == 3e-4
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["probe_batch_size"] == 32


def test_an_exception_in_the_training_loop_stops_the_run_without_final_measurements(tmp_path):
    model, loss_fn, batch = tiny_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        with dl.Lens(model, loss_fn, batch, opt, run_dir=tmp_path, probes=[Counter(every=4)], basic=False, budget=None) as lens:
            sgd_steps(model, loss_fn, batch, opt, lens, 6)
            raise KeyboardInterrupt
    run = dl.load_run(tmp_path)
    assert run.meta["status"] == "stopped" and run.meta["steps"] == 6
    assert run.series("counter", "step_seen").index.tolist() == [0, 4]  # no measurement at 6
    events = run.events()
    assert "training stopped at step 6: KeyboardInterrupt" in events.message.iloc[-1]


def test_a_compiled_model_keeps_training_on_its_compiled_code(tmp_path):
    """The probes measure eagerly (compiled code has no double backward); training still runs the
    code compiled once, with no recompilation after a measurement."""
    compiles, runs = [], []
    torch._dynamo.reset()  # no compiled code cached by another test for UserNet.forward
    torch.manual_seed(0)
    model = UserNet()
    compiled = torch.compile(model, backend=counting_backend(compiles, runs))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with dl.Lens(compiled, nn.CrossEntropyLoss(), (x[:16], y[:16]), optimizer, run_dir=tmp_path,
                 probes=[dl.probes.Hessian(every=2), dl.probes.Coherence(every=2)], budget=None) as lens:
        for _ in range(6):
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(compiled(x), y)
            loss.backward()
            optimizer.step()
            lens.step(loss=loss)
    assert len(compiles) == 1 and len(runs) == 6
    run = dl.load_run(tmp_path)
    assert run.events().empty and len(run.series("hessian", "sharpness")) == 4


def test_a_probe_notes_what_it_learns_into_the_run_metadata_after_setup(tmp_path):
    class Noting(dl.Probe):
        name = "noting"

        def setup(self, ctx):
            self.note("found", ["a", "b"])

        def measure(self, ctx):
            if ctx.step == 2:
                self.note("fell_back_at", ctx.step)
            return {"value": float(ctx.step)}

    model, loss_fn, batch = tiny_problem()
    with dl.Lens(model, loss_fn, batch, run_dir=tmp_path, probes=[Noting(every=1)], basic=False, budget=None) as lens:
        lens.step()
        assert dl.load_run(tmp_path).meta["notes"] == {"noting": {"found": ["a", "b"]}}
        lens.step()
        lens.step()
    assert dl.load_run(tmp_path).meta["notes"] == {"noting": {"found": ["a", "b"], "fell_back_at": 2}}
