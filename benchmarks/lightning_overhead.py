"""Overhead of the Lightning callback (issue #15): the same Lightning run with and without
``DynlensCallback(probes="default")`` at the default budget (5% of wall time), on the CPU.

The MLP 784-512-512-10 (batch 128, SGD with momentum) trains ``--steps`` steps on synthetic data
made here (a pool of 16 batches, cycled), from the same seed each run; ``trainer.fit``'s wall time
is measured, the callback's Lens creation (its step-0 measurements) and ``close()`` included.
Runs alternate in pairs (without → with, then with → without, ...) in one process, so that the
machine's drift hits both alike; the result is the ratio of the medians.

    python benchmarks/lightning_overhead.py [--steps 2000] [--pairs 3] [--threads 1]
                                            [--out benchmarks/results/lightning_overhead_cpu.json]
    python benchmarks/lightning_overhead.py --loop plain ...   # the same in a hand-written loop
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import dynlens as dl
from dynlens.integrations.lightning import DynlensCallback

BATCH, POOL = 128, 16


class MLP(pl.LightningModule):
    """MLP 784-512-512-10 with SGD (lr 0.05, momentum 0.9)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Batches(torch.utils.data.Dataset):
    """``steps`` batches cycled from a pool of pre-made ones (the loader adds no collation)."""

    def __init__(self, steps: int) -> None:
        g = torch.Generator().manual_seed(0)
        teacher = torch.randn(784, 10, generator=g)
        self.pool = []
        for _ in range(POOL):
            x = torch.randn(BATCH, 784, generator=g)
            self.pool.append((x, (x @ teacher).argmax(dim=1)))
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i % POOL]


def fit(steps: int, data: Batches, callback: DynlensCallback | None) -> float:
    """Seconds of one ``trainer.fit`` of ``steps`` steps from the same start."""
    torch.manual_seed(0)
    module = MLP()
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    trainer = pl.Trainer(max_steps=steps, max_epochs=1, callbacks=[callback] if callback else [],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    assert trainer.global_step == steps
    return seconds


def fit_plain(steps: int, data: Batches, run_dir: Path | None) -> float:
    """Seconds of the same training as :func:`fit` in a hand-written loop, with
    ``dl.Lens(probes="default")`` stepped after each ``optimizer.step()`` when ``run_dir`` is given
    (its creation and ``close()`` timed too): what the callback's overhead is compared with."""
    torch.manual_seed(0)
    module = MLP()
    optimizer = module.configure_optimizers()
    start = time.perf_counter()
    lens = (dl.Lens(module, F.cross_entropy, data.pool[0], optimizer=optimizer, run_dir=run_dir,
                    probes="default") if run_dir is not None else None)
    for i in range(steps):
        x, y = data[i]
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        if lens is not None:
            lens.step(loss=loss.detach())
    if lens is not None:
        lens.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--loop", choices=["lightning", "plain"], default="lightning",
                        help="plain: the same comparison in a hand-written loop with dl.Lens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core VM, 2 threads thrash under load)")
    parser.add_argument("--out", type=Path, default=None, help="write the raw numbers here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = Batches(args.steps)
    if args.loop == "lightning":
        fit(50, Batches(50), None)  # warm-up: imports, allocator, Lightning's first-run set-up
    else:
        fit_plain(50, Batches(50), None)
    without: list[float] = []
    with_lens: list[float] = []
    costs = None
    lens_info: dict[str, object] = {}
    lens_seconds: list[float] = []  # the Lens's own time outside measurements, each run
    probe_seconds: list[float] = []  # the measurements' time, each run
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            order = ["none", "dynlens"] if pair % 2 == 0 else ["dynlens", "none"]
            for kind in order:
                run_dir = Path(tmp) / f"run{pair}"
                if kind == "none":
                    without.append(fit(args.steps, data, None) if args.loop == "lightning"
                                   else fit_plain(args.steps, data, None))
                else:
                    if args.loop == "lightning":
                        callback = DynlensCallback(probe_batch=data.pool[0], loss_fn=F.cross_entropy,
                                                   run_dir=run_dir, probes="default")
                        with_lens.append(fit(args.steps, data, callback))
                    else:
                        with_lens.append(fit_plain(args.steps, data, run_dir))
                    run = dl.load_run(run_dir)
                    costs = run.costs()
                    own = costs[costs.probe == "lens"].seconds
                    lens_seconds.append(float(own.iloc[0]) if len(own) else float("nan"))
                    probe_seconds.append(float(costs[costs.probe != "lens"].seconds.sum()))
                    lens_info = {"last_step": run.last_step, "loss_steps": len(run.series("train", "loss"))}
                    run.close()
                print(f"pair {pair} {kind:8s} {(without if kind == 'none' else with_lens)[-1]:.2f} s",
                      flush=True)

    base, probed = statistics.median(without), statistics.median(with_lens)
    result = {
        "command": "python benchmarks/lightning_overhead.py "
                   f"--loop {args.loop} --steps {args.steps} --pairs {args.pairs} --threads {args.threads}",
        "loop": args.loop,
        "model": "MLP 784-512-512-10, batch 128, SGD momentum 0.9",
        "steps": args.steps,
        "seconds_without": without,
        "seconds_with": with_lens,
        "median_without": base,
        "median_with": probed,
        "ratio": probed / base,
        "step_ms_without": 1000 * base / args.steps,
        "lens_own_seconds": lens_seconds,
        "probe_seconds": probe_seconds,
        "run": lens_info,
        "costs_last_run": json.loads(costs.to_json(orient="records")) if costs is not None else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": lightning.__version__, "threads": torch.get_num_threads()},
    }
    what = "DynlensCallback" if args.loop == "lightning" else "dl.Lens"
    print(f"{args.loop}: median without {base:.2f} s, with {what}(probes='default') {probed:.2f} s: "
          f"ratio {probed / base:.3f} ({100 * (probed / base - 1):+.1f}%)")
    if costs is not None:
        print(costs.to_string())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
