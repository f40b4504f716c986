"""dynlens under DistributedDataParallel: the 124M decoder on two GPUs (NCCL).

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_gpu.py --out ddp_gpu.json
    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_gpu.py --steps 2500 --bracket --skip equality,writes --out ddp_overhead.json
    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_gpu.py --steps 4000 --interleave 100 --skip equality,writes --out ddp_pairs.json
    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_gpu.py --device cpu --tiny --out ddp_cpu.json
    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_gpu.py --steps 600 --bracket --step-times \
        --variants created,created:hessian,created+empty,basic --skip equality,writes --out ddp_variants.json

Three checks, in one job (the decoder of ``benchmarks/models.py``, 124M parameters, tied
embeddings; ``--tiny``: a 2-layer decoder with a 500-token vocabulary, for a CPU run with gloo):

(a) Equality: a probe batch of ``--probe-sequences`` sequences of ``--probe-length`` tokens, split
    across the ranks (rank r holds its contiguous share). λ_max (``dl.hessian_eigenvalues``), the
    trace (``dl.hessian_trace``, the same seeded Rademacher vectors on every rank) and the
    m-coherence (``dl.gradient_coherence``) with ``group=`` the DDP group, against rank 0 measuring
    the whole batch alone (``group=None``; the other ranks wait at a barrier). All in float32;
    the relative differences are reported and compared with 1e-4.
(b) Only rank 0 writes: a ``dl.Lens`` over the DDP model with ``probes="default"`` for a few
    steps; each rank reports its writer, rank 0 counts duplicated records in the run database
    (none expected) and lists the run directory.
(c) Overhead: ``--steps`` DDP training steps (bf16 autocast on CUDA, AdamW, ``--batch``
    sequences of ``--length`` tokens per rank) without the Lens, then the same steps from the
    same initial state with ``Lens(probes="default")`` at the default budget, each timed end to
    end with the device synchronised (the Lens's creation, with its step-0 measurements, and
    ``close()`` included; rank 0's clock, the ranks being in step through DDP). Reports the
    ratio with/without and ``lens.costs()``. ``--warmup`` untimed steps come first (CUDA, NCCL
    and kernel initialisation would otherwise be charged to the run without dynlens);
    ``--bracket`` times the run without dynlens again afterwards and takes the mean of the two.
    ``meetings`` counts the ranks' agreements on which probes run (a broadcast and a sync each).
    ``--step-times`` also times every step on the device's timeline (a CUDA event after each,
    read at the end: no sync) and splits the extra time into steps where dynlens charged
    nothing (an excess there is a cost its account does not see), steps where it measured, and
    the Lens's creation and close() (:func:`step_split`).
    ``--interleave K`` measures (c) by pairs instead (:func:`interleaved`): the two runs as two
    copies of the job in one process, alternating segments of K steps, so that both see the
    same drift of the machine.
    ``--variants`` then times other Lenses, each followed by a run without dynlens, and records
    every rank's host time per training step and in ``lens.step()`` (a host-bound job puts its
    host's time on the device's timeline): the basic probes only, or a Lens created and closed
    before the first step (with every default probe, one of them, or the allocator's cache
    emptied after ``close()``): what the first measurements leave behind in the process.

Writes JSON to ``--out`` (rank 0). On two H100s the default settings take about 4 minutes
(the step-0 measurements of the default probes on the decoder are most of the Lens's share).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

import dynlens as dl  # noqa: E402
import dynlens.lens  # noqa: E402

TOLERANCE = 1e-4


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where rank 0 writes the JSON results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer decoder, vocabulary 500 (CPU checks)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each timed run (c)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and training step")
    parser.add_argument("--length", type=int, default=512, help="tokens per training sequence")
    parser.add_argument("--probe-sequences", type=int, default=8, help="probe batch (all ranks together)")
    parser.add_argument("--probe-length", type=int, default=256, help="tokens per probe sequence")
    parser.add_argument("--lens-steps", type=int, default=4, help="steps of the writing check (b)")
    parser.add_argument("--trace-samples", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed DDP steps before the timed runs (CUDA and NCCL initialisation, kernel selection)")
    parser.add_argument("--bracket", action="store_true",
                        help="time the run without dynlens again after the one with it; the baseline is their mean")
    parser.add_argument("--step-times", action="store_true",
                        help="time every step of the timed runs on the device's timeline (CUDA events, no sync) "
                             "and split the overhead into steps where dynlens charged time and steps where it did not")
    parser.add_argument("--variants", default="",
                        help="comma-separated Lens variants timed after the main comparison, each followed by a run "
                             "without dynlens (with --step-times: where a per-step excess comes from): 'basic' "
                             "(the basic probes only), 'created' (a Lens with the default probes, created and "
                             "closed before the first step: what its creation leaves behind), 'default'; "
                             "'created:NAME' the same with the one default probe NAME (e.g. created:hessian), "
                             "'created+empty' with torch.cuda.empty_cache() after close()")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="the overhead by pairs instead (interleaved): the job without and with dynlens as two "
                             "copies in one process, alternating segments of K steps (--steps each)")
    parser.add_argument("--pair-lens", choices=("default", "basic", "created"), default="default",
                        help="with --interleave, B's Lens: the default probes, the basic ones only, or the "
                             "default probes created and closed before B's first segment (what the step-0 "
                             "measurements leave behind)")
    parser.add_argument("--null-chunks", type=int, default=6,
                        help="with --interleave: pairs of segments before the Lens exists (both copies without it)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: equality,writes,overhead")
    args = parser.parse_args()
    if args.tiny:
        args.length, args.probe_length = min(args.length, 32), min(args.probe_length, 32)
    return args


def build(args: argparse.Namespace, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if args.tiny:
        return models.gpt2(vocab=500, context=64, width=64, layers=2, heads=2).to(device)
    return models.gpt2().to(device)


def vocab(args: argparse.Namespace) -> int:
    return 500 if args.tiny else 50257


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch[0].shape[0]
    lo, hi = round(rank * n / world), round((rank + 1) * n / world)
    return batch[0][lo:hi], batch[1][lo:hi]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def equality(args: argparse.Namespace, model: torch.nn.Module, group: Any, rank: int, world: int,
             device: torch.device) -> dict[str, Any]:
    """(a): the split batch's λ_max, trace and m-coherence against rank 0's whole-batch values."""
    loss_fn = models.language_model_loss
    whole = models.token_batch(args.probe_sequences, args.probe_length, vocab(args), seed=100)
    whole = (whole[0].to(device), whole[1].to(device))
    mine = shard(whole, rank, world)

    def measure(batch: Any, g: Any) -> dict[str, float]:
        found: dict[str, float] = {}
        sync(device)
        began = time.perf_counter()
        eig = dl.hessian_eigenvalues(model, loss_fn, batch, k=1, group=g)
        sync(device)
        found["lambda_max"], found["lambda_max_seconds"] = eig.max, time.perf_counter() - began
        found["lambda_max_products"] = float(eig.matvecs)
        began = time.perf_counter()
        # 4 columns a batched product: 16 would hold 16 sequences' activations per product
        found["trace"] = dl.hessian_trace(model, loss_fn, batch, samples=args.trace_samples, seed=1,
                                          max_columns=4, group=g).value
        sync(device)
        found["trace_seconds"] = time.perf_counter() - began
        began = time.perf_counter()
        coherence = dl.gradient_coherence(model, loss_fn, batch, stiffness=False, classes=False, group=g)
        sync(device)
        found["m_coherence"], found["coherence_seconds"] = coherence.m_coherence, time.perf_counter() - began
        return found

    split = measure(mine, group)
    result: dict[str, Any] = {"split": split, "examples_per_rank": int(mine[0].shape[0])}
    if rank == 0:
        alone = measure(whole, None)
        result["whole_on_rank_0"] = alone
        result["relative_difference"] = {k: relative(split[k], alone[k]) for k in ("lambda_max", "trace", "m_coherence")}
        result["passed"] = all(v <= TOLERANCE for v in result["relative_difference"].values())
    dist.barrier(group)
    return result


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, device: torch.device) -> torch.Tensor:
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = models.language_model_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def data(args: argparse.Namespace, rank: int, device: torch.device, count: int = 4) -> list[Any]:
    batches = [models.token_batch(args.batch, args.length, vocab(args), seed=1000 * rank + i) for i in range(count)]
    return [(x.to(device), y.to(device)) for x, y in batches]


@contextlib.contextmanager
def counting_meetings() -> Iterator[list[int]]:
    """Count the ranks' meetings to agree on which probes run (a broadcast and a device sync
    each) while inside: the count is the yielded list's one element."""
    meetings = [0]
    agree = dynlens.lens.agree_plan

    def counted(*a: Any, **k: Any) -> Any:
        meetings[0] += 1
        return agree(*a, **k)

    dynlens.lens.agree_plan = counted
    try:
        yield meetings
    finally:
        dynlens.lens.agree_plan = agree


def timed_run(args: argparse.Namespace, device: torch.device, rank: int, world: int, steps: int,
              with_lens: bool | str, run_dir: str) -> dict[str, Any]:
    """DDP training for ``steps`` steps from the seed-0 state, without the Lens (False), with the
    default probes (True or "default"), the basic ones ("basic"), or a Lens of the default probes
    created and closed before the first step ("created"; "created:NAME" with the default probe
    NAME alone, "created+empty" with the allocator's cache emptied after close())."""
    variant = "default" if with_lens is True else with_lens or None
    model = build(args, device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-4, weight_decay=0.1)
    batches = data(args, rank, device)
    probe = shard(models.token_batch(args.probe_sequences, args.probe_length, vocab(args), seed=100), rank, world)
    probe = (probe[0].to(device), probe[1].to(device))
    dist.barrier()
    sync(device)
    counting = contextlib.ExitStack()
    meetings = counting.enter_context(counting_meetings())
    start = time.perf_counter()
    lens = None
    if variant is not None:
        chosen: Any = None if variant == "basic" else "default"
        if variant.startswith("created:"):  # one default probe alone
            name = variant.removeprefix("created:")
            chosen = [p for p in dl.probes.default() if p.name == name]
            if not chosen:
                raise SystemExit(f"no default probe is called {name!r}: {[p.name for p in dl.probes.default()]}")
        lens = dl.Lens(ddp, models.language_model_loss, probe, optimizer=optimizer, run_dir=run_dir,
                       probes=chosen, overwrite=True)
    created = lens if variant is not None and variant.startswith("created") else None
    if created is not None:
        created.close()
        lens = None
        if variant == "created+empty" and device.type == "cuda":
            torch.cuda.empty_cache()
    # --step-times: an event after each step on the training's stream (the host's clock on the
    # CPU), and dynlens's account (probes + its own time) at each step's end
    events: list[Any] = []
    charged: list[float] = []
    timing = args.step_times
    host_train: list[float] = []  # the host's time in each training step and lens.step() call
    host_lens: list[float] = []
    collections = [0, 0.0]  # the garbage collector's runs and its seconds during the steps
    gc_began = [0.0]

    def gc_watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_began[0] = time.perf_counter()
        else:
            collections[0] += 1
            collections[1] += time.perf_counter() - gc_began[0]

    def mark() -> None:
        if device.type == "cuda":
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        else:
            events.append(time.perf_counter())

    def account(lens: Any) -> float:
        return lens.budget.probe_seconds + lens.budget.lens_seconds if lens is not None else 0.0

    if timing:
        mark()
        charged.append(account(lens))  # the Lens's creation (step 0) is before the first step's mark
        gc.callbacks.append(gc_watch)
    for step in range(steps):
        began = time.perf_counter()
        loss = train_step(ddp, optimizer, batches[step % len(batches)], device)
        stepped = time.perf_counter()
        if lens is not None:
            lens.step(loss=loss)
        if timing:
            host_train.append(stepped - began)
            host_lens.append(time.perf_counter() - stepped)
            mark()
            charged.append(account(lens))
    if timing:
        gc.callbacks.remove(gc_watch)
    if lens is not None:
        lens.close()
    sync(device)
    seconds = time.perf_counter() - start
    counting.close()
    lens = lens or created
    result: dict[str, Any] = {"seconds": seconds, "steps": steps, "variant": variant}
    if timing:
        # every rank's host medians (ms): a host that cannot keep ahead of its GPU puts its own
        # time, and the Lens's, on the device's timeline
        mine = {"train_ms_median": 1000 * statistics.median(host_train),
                "lens_ms_median": 1000 * statistics.median(host_lens) if lens is not None else None,
                "lens_ms_total": 1000 * sum(host_lens), "gc_runs": collections[0],
                "gc_ms": 1000 * collections[1]}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        result["host"] = every
        result["step_ms"] = [a.elapsed_time(b) if device.type == "cuda" else 1000 * (b - a)
                             for a, b in zip(events, events[1:])]
        result["charged_ms"] = [1000 * (b - a) for a, b in zip(charged, charged[1:])]
    if lens is not None:
        result["meetings"] = meetings[0]
        result["writer"] = type(lens.writer).__name__
        result["disabled"] = lens.disabled
        if rank == 0:
            result["costs"] = json.loads(lens.costs().to_json(orient="records"))
    del lens, ddp, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return result


def quiet_segments(a_times: list[float], b_times: list[float], charged: list[tuple[float, float]]) -> dict[str, Any]:
    """B's excess over A in the segments where no measurement ran (only lens.step()'s own time
    charged) and in those where one did, less what dynlens charged: where the uncharged time is."""
    if len(charged) != len(b_times):
        return {}
    out: dict[str, Any] = {}
    for name, pick in (("quiet", lambda m: m == 0.0), ("measuring", lambda m: m > 0.0)):
        rows = [(a, b, m + own) for a, b, (m, own) in zip(a_times, b_times, charged, strict=True) if pick(m)]
        if rows:
            a, b, c = (sum(r[i] for r in rows) for i in range(3))
            out[f"{name}_segments"] = {"count": len(rows), "seconds_without": a, "seconds_with": b,
                                       "charged": c, "ratio": b / a, "uncharged_ratio": (b - c) / a}
    return out


def interleaved(args: argparse.Namespace, device: torch.device, rank: int, world: int, steps: int,
                chunk: int, run_dir: str) -> dict[str, Any]:
    """(c) by pairs: two DDP copies of the job from the same seed-0 state in one process, A
    without dynlens and B with ``Lens(probes="default")``, trained in alternating segments of
    ``chunk`` steps (A then B, then B then A, ...), each segment timed between device
    synchronisations. Both see the same drift of the machine, which between separate runs of
    this host-bound job reached 30% (RESULTS.md), so their ratio measures dynlens and not the
    minute it ran in. The Lens's clock leaves out A's segments (its budget is a share of its own
    training's time, as in a run alone). ``--null-chunks`` pairs of segments before the Lens
    exists, both copies without it, give the method's own spread. The Lens's creation (its
    step-0 measurements) and ``close()`` are timed and added to B.

    ``--pair-lens`` bisects a cost on the quiet steps: "basic" gives B the basic probes only,
    "created" closes B's Lens of the default probes before B's first segment.

    What this cannot see: a slowdown the Lens leaves on the whole process (both copies would
    pay it); the bracketed separate runs remain the check for that."""
    def job() -> tuple[Any, Any]:
        model = build(args, device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return ddp, torch.optim.AdamW(ddp.parameters(), lr=3e-4, weight_decay=0.1)

    (plain, plain_opt), (watched, watched_opt) = job(), job()
    batches = data(args, rank, device)
    probe = shard(models.token_batch(args.probe_sequences, args.probe_length, vocab(args), seed=100), rank, world)
    probe = (probe[0].to(device), probe[1].to(device))
    done = {"A": 0, "B": 0}
    paused = [0.0]  # A's time, left out of the Lens's clock
    # the host's seconds in the training steps of each copy and in lens.step() (with the Lens)
    in_training, in_lens = {"A": 0.0, "B": 0.0}, [0.0]
    # per B segment: the seconds dynlens charged itself in it (measurements, and lens.step()'s own)
    charged: list[tuple[float, float]] = []
    lens: Any = None

    def segment(which: str, count: int) -> float:
        model, optimizer = (plain, plain_opt) if which == "A" else (watched, watched_opt)
        sync(device)
        began = time.perf_counter()
        watching = which == "B" and lens is not None
        before = (lens.budget.probe_seconds, lens.budget.lens_seconds) if watching else (0.0, 0.0)
        for _ in range(count):
            stepping = time.perf_counter()
            loss = train_step(model, optimizer, batches[done[which] % len(batches)], device)
            done[which] += 1
            if watching:
                stepped = time.perf_counter()
                lens.step(loss=loss)
                in_lens[0] += time.perf_counter() - stepped
                in_training[which] += stepped - stepping
            else:
                in_training[which] += time.perf_counter() - stepping
        sync(device)
        seconds = time.perf_counter() - began
        if which == "A":
            paused[0] += seconds
        elif watching:
            charged.append((lens.budget.probe_seconds - before[0], lens.budget.lens_seconds - before[1]))
        return seconds

    for _ in range(args.warmup):
        segment("A", 1)
        segment("B", 1)
    null = []
    for c in range(args.null_chunks):
        order = ("A", "B") if c % 2 == 0 else ("B", "A")
        times = {w: segment(w, chunk) for w in order}
        null.append(times["B"] / times["A"])
    dist.barrier()
    with counting_meetings() as meetings:
        sync(device)
        began = time.perf_counter()
        lens = dl.Lens(watched, models.language_model_loss, probe, optimizer=watched_opt, run_dir=run_dir,
                       probes=None if args.pair_lens == "basic" else "default", overwrite=True)
        sync(device)
        creation = time.perf_counter() - began
        # from here A's segments are left out of the Lens's clock (the same reading as its own now)
        before = paused[0]
        lens.budget.clock = lambda: time.perf_counter() - (paused[0] - before)
        made, closing = lens, 0.0
        if args.pair_lens == "created":  # closed before B trains: what its creation leaves behind
            began = time.perf_counter()
            lens.close()
            sync(device)
            closing, lens = time.perf_counter() - began, None
        in_training.update(A=0.0, B=0.0)
        charged.clear()
        a_times, b_times = [], []
        for c in range(steps // chunk):
            order = ("A", "B") if c % 2 == 0 else ("B", "A")
            times = {w: segment(w, chunk) for w in order}
            a_times.append(times["A"])
            b_times.append(times["B"])
        if lens is not None:
            began = time.perf_counter()
            lens.close()
            sync(device)
            closing = time.perf_counter() - began
        lens = made
    ratios = sorted(b / a for a, b in zip(a_times, b_times))
    a_total, b_total = sum(a_times), sum(b_times)
    result: dict[str, Any] = {
        "steps": len(a_times) * chunk, "chunk": chunk, "lens": args.pair_lens, "seconds_without": a_total,
        "seconds_with_steps": b_total, "creation_s": creation, "close_s": closing,
        "seconds_with": b_total + creation + closing,
        "ratio": (b_total + creation + closing) / a_total, "ratio_steps": b_total / a_total,
        "chunk_ratio_quantiles_10_50_90": [ratios[int(q * (len(ratios) - 1))] for q in (0.1, 0.5, 0.9)],
        "null_ratios": null, "null_ratio": statistics.median(null) if null else None,
        "chunk_seconds": {"A": a_times, "B": b_times}, "meetings": meetings[0],
        # this rank's host time (a host-bound job's steps are its host's): the training steps
        # of each copy, and lens.step() with its measurements
        "host_training_s": dict(in_training), "host_lens_step_s": in_lens[0],
        # B's segments: [measurements' seconds, lens.step()'s own] charged in each (with a Lens)
        "charged_by_segment": charged, **quiet_segments(a_times, b_times, charged),
        "disabled": lens.disabled, "lens_clock_s": lens.budget.elapsed(),  # ≈ B's segments + creation
    }
    if rank == 0:
        result["costs"] = json.loads(lens.costs().to_json(orient="records"))
    lens = plain = watched = plain_opt = watched_opt = None  # the segments' closure holds them
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return result


def step_split(lensed: dict[str, Any], plain: dict[str, Any], extra: float) -> dict[str, Any]:
    """Where the run with dynlens spent its extra time, from per-step device times: the steps in
    which dynlens charged under 1 ms (``quiet``: its measurements and own time account for
    nothing there, so their excess over the plain run's median step is unaccounted cost spread
    over training) and the others (``charged``: their excess less what dynlens charged is what
    its account misses around its measurements); the rest of ``extra`` (wall seconds) is the
    Lens's creation and close()."""
    with_ms, charged = lensed["step_ms"], lensed["charged_ms"]
    median = statistics.median(plain["step_ms"])
    quiet = [t for t, c in zip(with_ms, charged) if c < 1.0]
    busy = [(t, c) for t, c in zip(with_ms, charged) if c >= 1.0]

    def quantiles(values: list[float]) -> list[float]:
        ordered = sorted(values)
        return [round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) for q in (0.5, 0.9, 0.99, 1.0)]

    return {
        "plain_ms_quantiles_50_90_99_max": quantiles(plain["step_ms"]),
        "with_quiet_ms_quantiles_50_90_99_max": quantiles(quiet),
        "quiet_steps": len(quiet), "charged_steps": len(busy),
        "quiet_excess_s": sum(t - median for t in quiet) / 1000,
        "charged_steps_excess_s": sum(t - median for t, _ in busy) / 1000,
        "charged_s": sum(c for _, c in busy) / 1000,
        "steps_total_s": {"plain": sum(plain["step_ms"]) / 1000, "with": sum(with_ms) / 1000},
        "extra_wall_s": extra,
    }


def writes(args: argparse.Namespace, device: torch.device, rank: int, world: int, run_dir: str) -> dict[str, Any]:
    """(b): a short Lens run; rank 0 checks its database for duplicates."""
    result = timed_run(args, device, rank, world, args.lens_steps, True, run_dir)
    writers: list[Any] = [None] * world
    dist.all_gather_object(writers, result["writer"])
    out: dict[str, Any] = {"writers": writers, "disabled": result["disabled"]}
    if rank == 0:
        run = dl.load_run(run_dir)
        scalars = run.scalars()
        events = run.events()
        out.update(
            records=int(len(scalars)),
            duplicated_records=int(scalars.duplicated(["step", "probe", "name"]).sum()),
            probes_recorded=sorted(set(scalars["probe"])),
            errors=[str(m) for m in events[events["level"] == "error"]["message"]],
            run_dir_files=sorted(os.listdir(run_dir)),
            status=run.meta.get("status"),
        )
        out["passed"] = (writers == ["RunWriter"] + ["NullWriter"] * (world - 1) and out["duplicated_records"] == 0
                         and out["status"] == "finished")
    return out


def save(results: dict[str, Any], path: str, rank: int) -> None:
    """Write the results as JSON (rank 0 only)."""
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


def main() -> None:
    args = parse()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {
        "world_size": world, "backend": backend, "tiny": args.tiny, "arguments": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dynlens": dl.__version__,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    began = time.perf_counter()
    if "equality" not in skip:
        model = build(args, device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        results["equality"] = equality(args, model, getattr(ddp, "process_group", None) or dist.group.WORLD,
                                       rank, world, device)
        del ddp, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    root = tempfile.mkdtemp(prefix="ddp_gpu_") if rank == 0 else ""
    shared: list[Any] = [root]
    dist.broadcast_object_list(shared, src=0)
    root = shared[0]
    if "writes" not in skip:
        results["writes"] = writes(args, device, rank, world, os.path.join(root, "writes"))
    if "overhead" not in skip and args.interleave:
        results["interleaved"] = interleaved(args, device, rank, world, args.steps, args.interleave,
                                             os.path.join(root, "interleaved"))
        save(results, args.out, rank)
    elif "overhead" not in skip:
        if args.warmup:
            timed_run(args, device, rank, world, args.warmup, False, "")
        plain = timed_run(args, device, rank, world, args.steps, False, "")
        lensed = timed_run(args, device, rank, world, args.steps, True, os.path.join(root, "overhead"))
        plains = [plain["seconds"]]
        if args.bracket:
            plains.append(timed_run(args, device, rank, world, args.steps, False, "")["seconds"])
        baseline = statistics.mean(plains)
        results["overhead"] = {
            "steps": args.steps, "warmup_steps": args.warmup, "seconds_without": baseline,
            "seconds_without_runs": plains, "seconds_with": lensed["seconds"],
            "ratio": lensed["seconds"] / baseline, "step_seconds_without": baseline / args.steps,
            "costs": lensed.get("costs"), "disabled": lensed["disabled"], "meetings": lensed["meetings"],
        }
        if "step_ms" in lensed:
            results["overhead"]["step_times"] = step_split(lensed, plain, results["overhead"]["seconds_with"] - baseline)
            results["overhead"]["host"] = {"with": lensed["host"], "without": plain["host"]}
        variants: list[dict[str, Any]] = []
        save(results, args.out, rank)  # kept if a time limit stops the variants
        for variant in filter(None, args.variants.split(",")):
            tried = timed_run(args, device, rank, world, args.steps, variant,
                              os.path.join(root, variant.replace(":", "_").replace("+", "_")))
            after = timed_run(args, device, rank, world, args.steps, False, "")
            entry = {"variant": variant, "seconds": tried["seconds"], "seconds_without_after": after["seconds"],
                     "ratio": tried["seconds"] / after["seconds"], "costs": tried.get("costs")}
            if "step_ms" in tried:
                entry["step_times"] = step_split(tried, after, tried["seconds"] - after["seconds"])
                entry["host"] = {"with": tried["host"], "without": after["host"]}
            variants.append(entry)
            results["overhead"]["variants"] = variants
            save(results, args.out, rank)
    results["total_seconds"] = time.perf_counter() - began
    save(results, args.out, rank)
    if rank == 0:
        summary = {k: results[k].get("passed") for k in ("equality", "writes") if k in results}
        if "overhead" in results:
            summary["overhead_ratio"] = round(results["overhead"]["ratio"], 4)
        if "interleaved" in results:
            found = results["interleaved"]
            summary.update(interleaved_ratio=round(found["ratio"], 4), steps_ratio=round(found["ratio_steps"], 4),
                           null_ratio=found["null_ratio"] and round(found["null_ratio"], 4))
        print(json.dumps({"summary": summary, "out": args.out, "seconds": round(results["total_seconds"], 1)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
