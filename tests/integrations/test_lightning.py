"""The Lightning callback: a tiny module trained a few steps on the CPU gives a run with the
expected probes and steps (one per optimizer step under gradient accumulation, each with the
mean loss of its batches); the report; an exception closes the run; bad arguments; rank != 0."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from helpers import single_thread  # noqa: F401 - autouse: one thread

import dynlens as dl

pl = pytest.importorskip(
    "lightning.pytorch",
    reason="the Lightning callback needs `pip install dynlens[lightning]` (the lightning package)",
)

from dynlens.integrations.lightning import DynlensCallback  # noqa: E402

# Lightning's own use of a deprecated torch pytree name
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:DeprecationWarning", "ignore:.*LeafSpec:FutureWarning")


class Tiny(pl.LightningModule):
    """A two-layer classifier that keeps the loss of every training batch."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.batch_losses: list[float] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("planted failure")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.batch_losses.append(loss.item())
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoForward(Tiny):
    forward = pl.LightningModule.forward


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return x, y


def _fit(module: pl.LightningModule, callback: DynlensCallback, batches: int = 8,
         accumulate: int = 1) -> pl.Trainer:
    x, y = _data(8 * batches)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, loader)
    return trainer


def _probe_batch():
    x, y = _data()
    return x[:16], y[:16]


def test_accumulated_steps_losses_and_probes(tmp_path: Path) -> None:
    module = Tiny()
    callback = DynlensCallback(probe_batch=_probe_batch(), loss_fn=F.cross_entropy,
                               run_dir=tmp_path / "run", name="tiny", config={"lr": 0.1},
                               probes=[dl.probes.Hessian(every=2, lambda_min=False, trace=False)], budget=None)
    trainer = _fit(module, callback, batches=8, accumulate=2)
    assert trainer.global_step == 4
    assert callback.lens is not None and callback.lens.closed and callback.report_path is None

    run = dl.load_run(tmp_path / "run")
    assert run.last_step == 4
    assert run.name == "tiny" and run.config == {"lr": 0.1}
    assert run.meta["status"] == "finished"
    assert {"hessian", "param_norm", "train"} <= set(run.probes())
    assert sorted(run.scalars("hessian", "sharpness").step) == [0, 2, 4]
    loss = run.series("train", "loss")
    assert list(loss.index) == [1, 2, 3, 4]
    # each step's loss: the mean over its two batches
    expected = torch.tensor(module.batch_losses).reshape(4, 2).mean(dim=1)
    torch.testing.assert_close(torch.tensor(loss.to_numpy(), dtype=torch.float32), expected)
    assert list(run.series("train", "lr").index) == [1, 2, 3, 4]
    assert run.series("train", "lr").eq(0.1).all()
    assert run.events().empty


def test_one_step_per_batch_without_accumulation(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run",
                               budget=None)
    _fit(Tiny(), callback, batches=3)
    run = dl.load_run(tmp_path / "run")
    assert run.last_step == 3
    assert list(run.series("train", "loss").index) == [1, 2, 3]


def test_report(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run",
                               budget=None, report=True)
    _fit(Tiny(), callback, batches=2)
    assert callback.report_path == str(tmp_path / "run" / "report.html")
    assert "<html" in Path(callback.report_path).read_text(encoding="utf-8").lower()


def test_exception_closes_the_run(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run",
                               budget=None)
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(Tiny(fail_at=2), callback, batches=4)
    assert callback.lens is not None and callback.lens.closed
    run = dl.load_run(tmp_path / "run")
    assert run.meta["status"] == "stopped"
    assert run.last_step == 2
    assert run.events().message.str.contains("planted failure").any()


def test_module_without_forward(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run")
    with pytest.raises(TypeError, match="defines no forward"):
        _fit(NoForward(), callback, batches=1)


def test_one_callback_one_fit(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run")
    _fit(Tiny(), callback, batches=1)
    with pytest.raises(RuntimeError, match="one callback records one fit"):
        _fit(Tiny(), callback, batches=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"probe_batch": torch.zeros(4, 4)}, TypeError, "must be a pair"),
    ({"loss_fn": None}, TypeError, "loss_fn"),
    ({"probes": "all"}, ValueError, "'default' or None"),
    ({"probes": [object()]}, TypeError, "dl.Probe instances"),
    ({"budget": -1}, ValueError, "budget"),
    ({"report": "yes"}, TypeError, "report"),
    ({"model": torch.nn.Linear(1, 1)}, TypeError, "come from|the model the trainer trains"),
    ({"optimiser": None}, TypeError, "unknown keyword"),
])
def test_bad_arguments(kwargs, error, match) -> None:
    arguments = {"probe_batch": _probe_batch(), "loss_fn": F.cross_entropy, **kwargs}
    with pytest.raises(error, match=match):
        DynlensCallback(**arguments)


def test_lens_keywords_pass_through(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run",
                               basic=False, probes=[dl.probes.Hessian(every=10)], budget=None)
    _fit(Tiny(), callback, batches=2)
    probes = dl.load_run(tmp_path / "run").probes()
    assert "hessian" in probes and "param_norm" not in probes


def test_other_ranks_do_nothing(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_batch(), F.cross_entropy, run_dir=tmp_path / "run")
    trainer = SimpleNamespace(is_global_zero=False, global_step=0, optimizers=[],
                              accumulate_grad_batches=1)
    module = Tiny()
    callback.on_train_start(trainer, module)
    callback.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, None, 0)
    callback.on_train_end(trainer, module)
    assert callback.lens is None
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_under_ddp_every_rank_measures_its_shard_and_the_run_holds_the_whole_batchs_values(tmp_path: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Lightning's ranks read every CUDA generator (isolate_rng), which a forked process
        # cannot once its parent has initialised CUDA; "ddp_spawn" aborted ranks on CI (below)
        pytest.skip("forked DDP ranks cannot touch CUDA after this process initialised it: run this test alone")
    x, y = _data(16)
    callback = DynlensCallback((x, y), F.cross_entropy, run_dir=tmp_path / "run", basic=False, budget=None,
                               probes=[dl.probes.Hessian(every=2, lambda_min=False, trace=False, tol=1e-6)])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(64)), batch_size=8)
    # forked ranks leave by os._exit, without the interpreter's finalisation, where Gloo's threads
    # can abort a rank after its work is done (SIGABRT on CI with "ddp_spawn", as in
    # tests/distributed, whose ranks now leave the same way)
    trainer = pl.Trainer(max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         devices=2, strategy="ddp_fork")
    trainer.fit(Tiny(), loader)
    run = dl.load_run(tmp_path / "run")
    # step 0: the initial module, the whole probe batch (each rank held 8 of the 16 examples)
    whole = dl.hessian_eigenvalues(Tiny(), F.cross_entropy, (x, y), tol=1e-8).max
    half = dl.hessian_eigenvalues(Tiny(), F.cross_entropy, (x[:8], y[:8]), tol=1e-8).max
    assert run.series("hessian", "sharpness")[0] == pytest.approx(whole, rel=1e-4)
    assert abs(whole - half) > 1e-3 * whole  # the shards alone would have measured another value
    assert run.last_step == 2
