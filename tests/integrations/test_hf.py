"""The Hugging Face callback: a tiny GPT-2 built from a config (no downloads) trained a few steps
on the CPU gives a run with the expected probes and steps (one per optimizer step under gradient
accumulation, with the loss the Trainer trained on); the model's own loss and the causal-LM loss
of the logits; the report; bad arguments; rank != 0."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import single_thread  # noqa: F401 - autouse: one thread

import dynlens as dl

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it
transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face callback needs `pip install dynlens[hf]` (transformers)"
)
pytest.importorskip("accelerate", reason="the Hugging Face Trainer needs `pip install dynlens[hf]` (accelerate)")

from hf_ddp_worker import LENGTH  # noqa: E402 - the tiny model and batches, shared with the DDP run
from hf_ddp_worker import tiny_gpt2 as _model  # noqa: E402
from hf_ddp_worker import token_ids as _tokens  # noqa: E402

from dynlens.integrations.hf import (  # noqa: E402
    DynlensCallback,
    causal_lm_batch,
    causal_lm_loss,
    labelled_probe_batch,
    model_loss,
)


def _dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids, "labels": ids.clone()} for ids in _tokens(n, 1)]


def _probe_dict() -> dict[str, torch.Tensor]:
    ids = _tokens(8, 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _train(tmp_path: Path, callback: DynlensCallback, examples: int = 16, accumulate: int = 1):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulate, num_train_epochs=1, learning_rate=1e-3,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_dataset(examples),
                                   callbacks=[callback])
    return trainer, trainer.train()


def test_accumulated_steps_loss_and_probes(tmp_path: Path) -> None:
    # 16 examples, 2 a batch: 8 batches, accumulated 2 by 2: 4 optimizer steps
    callback = DynlensCallback(probe_batch=_probe_dict(), run_dir=tmp_path / "run",
                               probes=[dl.probes.Hessian(every=2, lambda_min=False, trace=False)],
                               budget=None)
    trainer, output = _train(tmp_path, callback, accumulate=2)
    assert trainer.state.global_step == 4
    assert callback.lens is not None and callback.lens.closed
    assert callback.lens.loss_fn is model_loss

    run = dl.load_run(tmp_path / "run")
    assert run.last_step == 4 and run.meta["status"] == "finished"
    assert {"hessian", "param_norm", "train"} <= set(run.probes())
    assert sorted(run.scalars("hessian", "sharpness").step) == [0, 2, 4]
    loss = run.series("train", "loss")
    assert list(loss.index) == [1, 2, 3, 4]
    assert list(run.series("train", "lr").index) == [1, 2, 3, 4]
    # the Trainer's own training loss is the mean of its steps' losses
    assert loss.mean() == pytest.approx(output.training_loss, rel=1e-5)
    assert run.events().empty


def test_causal_lm_loss_is_the_models_own() -> None:
    model = _model().eval()
    batch = _probe_dict()
    inputs, targets = causal_lm_batch(batch)
    assert "labels" not in inputs
    assert inputs["input_ids"].shape == targets.shape == (8, LENGTH - 1)
    assert inputs["attention_mask"].shape == (8, LENGTH - 1)
    torch.testing.assert_close(targets, batch["labels"][:, 1:])
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model(**inputs), targets), model(**batch).loss)
    # without labels, a causal LM's labels are its input_ids
    inputs2, targets2 = causal_lm_batch({"input_ids": batch["input_ids"]})
    torch.testing.assert_close(targets2, targets)


def test_causal_lm_loss_gives_softmax_collapse(tmp_path: Path) -> None:
    callback = DynlensCallback(probe_batch=causal_lm_batch(_probe_dict()), loss_fn=causal_lm_loss,
                               run_dir=tmp_path / "run", probes=[dl.probes.SoftmaxCollapse(every=2)],
                               budget=None)
    _train(tmp_path, callback, examples=8)
    run = dl.load_run(tmp_path / "run")
    assert sorted(run.scalars("softmax_collapse", "fraction").step) == [0, 2, 4]
    assert run.events().empty


def test_default_probes_leave_out_opposing_signals_only_with_the_models_own_loss() -> None:
    names = [p.name for p in DynlensCallback(_probe_dict(), probes="default").settings.probes]
    assert "opposing_signals" not in names and "hessian" in names
    with_logits = DynlensCallback(causal_lm_batch(_probe_dict()), causal_lm_loss, probes="default")
    assert with_logits.settings.probes == "default"  # every probe, the ledger too


def test_the_ledger_of_a_causal_lm_is_each_sequences_loss_from_the_logits() -> None:
    from dynlens.measures.opposing import ledger_entry

    model = _model().eval()
    inputs, targets = causal_lm_batch(_probe_dict())
    entry = ledger_entry(model, causal_lm_loss, (inputs, targets))
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = [causal_lm_loss(logits[i:i + 1], targets[i:i + 1]).item() for i in range(len(targets))]
    np.testing.assert_allclose(entry.loss, expected, rtol=1e-5)


def test_report(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_dict(), run_dir=tmp_path / "run", budget=None, report=True)
    _train(tmp_path, callback, examples=4)
    assert callback.report_path == str(tmp_path / "run" / "report.html")
    assert "<html" in Path(callback.report_path).read_text(encoding="utf-8").lower()


def test_labelled_probe_batch() -> None:
    batch = _probe_dict()
    inputs, targets = labelled_probe_batch(batch)
    assert targets is None and inputs["labels"] is batch["labels"]
    ids = batch["input_ids"]
    inputs, targets = labelled_probe_batch(({"input_ids": ids}, ids))
    assert targets is None and inputs["labels"] is ids


@pytest.mark.parametrize("kwargs, error, match", [
    ({"probe_batch": {"input_ids": torch.zeros(2, 3, dtype=torch.long)}}, ValueError, "no 'labels'"),
    ({"probe_batch": torch.zeros(2, 3)}, TypeError, "batch dict with 'labels'"),
    ({"probe_batch": ({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2, 3)}, torch.zeros(2, 3))},
     ValueError, "'labels' in inputs too"),
    ({"probes": [dl.probes.OpposingSignals()]}, ValueError, "OpposingSignals needs each example's loss"),
    ({"loss_fn": causal_lm_loss}, TypeError, "must be a pair"),
    ({"loss_fn": "mean"}, TypeError, "callable"),
    ({"optimizer": None}, TypeError, "the trainer's optimizer"),
    ({"overwrite_it": True}, TypeError, "unknown keyword"),
])
def test_bad_arguments(kwargs, error, match) -> None:
    arguments = {"probe_batch": _probe_dict(), **kwargs}
    with pytest.raises(error, match=match):
        DynlensCallback(**arguments)


def test_model_loss_without_labels() -> None:
    with torch.no_grad():
        outputs = _model().eval()(input_ids=_tokens(2, 3))
    with pytest.raises(ValueError, match="returned no loss"):
        model_loss(outputs, None)


def test_other_ranks_do_nothing(tmp_path: Path) -> None:
    callback = DynlensCallback(_probe_dict(), run_dir=tmp_path / "run")
    args = SimpleNamespace(process_index=1)
    state = SimpleNamespace(is_world_process_zero=False, global_step=0)
    model = _model()
    callback.on_train_begin(args, state, None, model=model, optimizer=None)
    callback.on_step_end(args, state, None, model=model)
    callback.on_train_end(args, state, None, model=model)
    assert callback.lens is None
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_under_torchrun_every_rank_measures_its_shard_and_the_run_holds_the_whole_batchs_values(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(worker), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["group"] and result["last_step"] == 2
    # step 0: the initial model on the whole probe batch, each rank holding 4 of its 8 sequences
    assert result["sharpness"]["0"] == pytest.approx(result["whole"], rel=1e-4)
    assert abs(result["whole"] - result["half"]) > 1e-3 * result["whole"]
