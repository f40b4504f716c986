"""Where the Hessian probe's first try at a Lens's creation spends its time, before and after
its deadline (FIRST_SECONDS, 1 s at step 0).

    python benchmarks/hessian_first_try.py --device cuda --out hessian_first_try.json

On two H200s under DDP (``ddp_gpu.py --interleave``, sixteenth session) the 124M decoder's first
Hessian try took 2.74 s against its 1-s deadline. This runs one rank's share of that job on one
device (AdamW, bf16 autocast training, a probe batch of ``--probe-sequences`` sequences of 256
tokens, the Lens's default memory budget) with a Lens of the Hessian probe alone, and records a
timeline: the start of the measurement, the chunking it chose (sub-batch size and the Lanczos
basis's memory), every deadline check (seconds from the start, products done) and the end.
``--small``: a 2-layer decoder on the CPU, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402
import dynlens.measures.stability as stability  # noqa: E402
from dynlens.probes import Context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--probe-sequences", type=int, default=4, help="one rank's share of ddp_gpu.py's 8")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the Lens's memory_budget in GiB (default: its own, half the training's peak)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    vocab, length, probe_length = (500, 32, 32) if args.small else (50257, 512, 256)
    torch.manual_seed(0)
    model = (models.gpt2(vocab=500, context=64, width=64, layers=2, heads=2) if args.small
             else models.gpt2()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    batch = tuple(t.to(device) for t in models.token_batch(8, length, vocab, seed=0))
    probe_batch = tuple(t.to(device) for t in models.token_batch(args.probe_sequences, probe_length, vocab, seed=100))
    for _ in range(args.warmup):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = models.language_model_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    timeline: list[dict[str, Any]] = []
    began = [0.0]

    def note(event: str, **extra: Any) -> None:
        timeline.append({"t": time.perf_counter() - began[0], "event": event, **extra})

    chunking = stability.chunking

    def spied_chunking(*a: Any, **k: Any) -> Any:
        out = chunking(*a, **k)
        note("chunking", chunk=out[0], basis_memory=out[1])
        return out

    stability.chunking = spied_chunking
    check_time = Context.check_time
    products = [0]

    def spied_check(self: Context) -> None:
        note("check", products=products[0], deadline=self.deadline - began[0])
        products[0] += 1
        check_time(self)

    Context.check_time = spied_check
    measure = dl.probes.Hessian.measure

    def spied_measure(self: dl.probes.Hessian, ctx: Context) -> Any:
        began[0] = time.perf_counter()  # the Lens's clock is time.perf_counter
        note("measure", memory=ctx.memory, allowance=ctx.allowance)
        try:
            values = measure(self, ctx)
        except BaseException as err:
            note("raised", error=type(err).__name__)
            raise
        note("finished", hvps=values.get("hvps"))
        return values

    dl.probes.Hessian.measure = spied_measure
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        lens = dl.Lens(model, models.language_model_loss, probe_batch, optimizer=optimizer, run_dir=run_dir,
                       probes=[dl.probes.Hessian()], overwrite=True,
                       memory_budget=None if args.memory_gib is None else int(args.memory_gib * 2**30))
        creation = time.perf_counter() - start
        lens.close()
    report = {"device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "arguments": vars(args), "creation_s": creation, "timeline": timeline}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
