"""One rank of a Hugging Face Trainer run under torchrun (2 CPU processes, gloo), with the
dynlens callback: ``python -m torch.distributed.run --nproc_per_node=2 hf_ddp_worker.py OUT``.
Rank 0 writes ``OUT/result.json`` with the run's step-0 sharpness and the whole probe batch's.
Also the tiny model and token batches test_hf.py trains on."""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers

import dynlens as dl
from dynlens.integrations.hf import DynlensCallback, labelled_probe_batch, model_loss

VOCAB, LENGTH = 50, 8


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    """A one-layer GPT-2 built from a config (no download), seeded."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def token_ids(n: int, seed: int) -> torch.Tensor:
    """``n`` sequences of ``LENGTH`` random token ids, seeded."""
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def main(out: str) -> None:
    torch.set_num_threads(1)
    ids = token_ids(8, 2)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    callback = DynlensCallback(probe_batch=probe, run_dir=os.path.join(out, "run"), basic=False, budget=None,
                               probes=[dl.probes.Hessian(every=2, lambda_min=False, trace=False, tol=1e-6)])
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=2, num_train_epochs=1,
        learning_rate=1e-3, use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0)
    data = [{"input_ids": t, "labels": t.clone()} for t in token_ids(8, 1)]
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    if args.process_index == 0:
        run = dl.load_run(os.path.join(out, "run"))
        whole = dl.hessian_eigenvalues(tiny_gpt2(), model_loss, labelled_probe_batch(probe), tol=1e-8).max
        half = dl.hessian_eigenvalues(tiny_gpt2(), model_loss, labelled_probe_batch(
            {k: v[:4] for k, v in probe.items()}), tol=1e-8).max
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"sharpness": run.series("hessian", "sharpness").to_dict(), "whole": whole, "half": half,
                       "last_step": run.last_step, "group": callback.lens.group is not None}, f)


if __name__ == "__main__":
    main(sys.argv[1])
