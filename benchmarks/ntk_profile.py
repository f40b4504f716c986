"""Where an NTK measurement's time goes (issue #12): one warmed-up ``ntk_of`` call under
``torch.profiler``, its operators sorted by device time (self), and the structured products'
layer routes, chunk and whether the factors were kept.

    python benchmarks/ntk_profile.py --device cuda --model resnet18 --n 64 --kernel trace full
    python benchmarks/ntk_profile.py --model resnet18 --tiny --n 16          # CPU check

The models are those of ``benchmarks/ntk.py`` (``build``). Prints, for each kernel: the wall time
of the profiled call and of an unprofiled one, the routes and chunk the structured products
took, the device's busy time (its kernels' time summed: the wall time less it is time the device
waited for the host), the top operators (``--rows``) by self device time (self CPU time on the
CPU), with ``--phases`` the wall time of one more call spent in each of ``ntk_of``'s steps
(``PHASES``, each timed with the device synchronised at its start and end, children included),
and with ``--gaps`` (CUDA) the device's idle time in one more profiled call, by the innermost
step the host was in when each idle stretch began, and with ``--host`` the host's time in one
more call under ``cProfile`` by function (on a GPU, where kernels run asynchronously, the time
the host takes to issue the work, and any wait for the device).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(__file__))

from ntk import build  # noqa: E402

from dynlens.measures import ntk as ntk_module  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ntk_of's steps that --phases times (functions of dynlens.measures.ntk, and ModelFunction's)
PHASES = ("_default_memory", "_flat_outputs", "_structured_layers", "_checked_layers", "_broadcasts",
          "outputs_and_activation_bytes", "_by_jacobians", "_by_structure", "_factors", "_output_gradients",
          "_full_by_positions", "_positions_block", "_contract", "_jacobians")


def _patched(wrap: Any) -> list[tuple[Any, str, Any]]:
    """Each of ``PHASES`` (and ``ntk_of``) replaced by ``wrap(name, function)``; returns what to
    put back (:func:`_restored`)."""
    originals: list[tuple[Any, str, Any]] = []
    for name in (*PHASES, "ntk_of"):
        owner = ntk_module.ModelFunction if name == "outputs_and_activation_bytes" else ntk_module
        if hasattr(owner, name):
            originals.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrap(name, getattr(owner, name)))
    return originals


def _restored(originals: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in originals:
        setattr(owner, name, original)


def _phases(run: Any, device: str) -> dict[str, list[float]]:
    """Seconds and calls of each of ``PHASES`` in one call of ``run``, and the whole call's."""
    spent: dict[str, list[float]] = {}

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                _sync(device)
                entry = spent.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1
        return wrapper

    originals = _patched(timed)
    try:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        spent["(whole call)"] = [time.perf_counter() - start, 1]
    finally:
        _restored(originals)
    return spent


def _idle(run: Any) -> tuple[float, dict[str, float]]:
    """The device's idle time during one profiled call of ``run`` (CUDA): in all, and by the
    innermost of ``PHASES`` (or ``ntk_of``) the host was in when each idle stretch began."""
    def labelled(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"phase:{name}"):
                return function(*args, **kwargs)
        return wrapper

    originals = _patched(labelled)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    finally:
        _restored(originals)
    return _idle_by_phase(prof.events())


def _idle_by_phase(events: Any) -> tuple[float, dict[str, float]]:
    """:func:`_idle` from a profile's events."""
    labels = [(e.time_range.start, e.time_range.end, e.name[len("phase:"):]) for e in events
              if e.name.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU]
    # the device's work: its kernels, copies and fills, not the labels' spans that the profiler
    # draws on the device's timeline too
    busy = sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("phase:"))
    call = [(start, end) for start, end, name in labels if name == "ntk_of"]
    if not call or not busy:
        return 0.0, {}
    begin, end = call[0][0], max(call[0][1], max(stop for _, stop in busy))
    by_phase: dict[str, float] = {}
    cursor = begin
    for start, stop in [*busy, (end, end)]:
        if start > cursor:
            inside = [(s, name) for s, e, name in labels if s <= cursor < e]
            phase = max(inside)[1] if inside else "(outside)"
            by_phase[phase] = by_phase.get(phase, 0.0) + (start - cursor) / 1e6
        cursor = max(cursor, stop)
    return sum(by_phase.values()), by_phase


def _host(run: Any, device: str, rows: int) -> str:
    """One call of ``run`` under ``cProfile``: its wall time, then the functions by their own
    host time and by their time with callees (``rows`` each)."""
    profiler = cProfile.Profile()
    _sync(device)
    start = time.perf_counter()
    profiler.enable()
    run()
    _sync(device)
    profiler.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return f"host profile: {wall:.4f} s wall (under cProfile)\n" + text.getvalue()


def _busy(events: Any, cuda: bool) -> float:
    """Seconds the device was busy: its kernels' times summed (on the CPU, 0)."""
    if not cuda:
        return 0.0
    total = 0.0
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return total / 1e6


def _plan(model: torch.nn.Module, x: Any, mode: str, memory: int | None) -> dict[str, Any]:
    """The routes, chunk and factor keeping ``ntk_of`` takes, by spying on ``_by_structure``."""
    seen: dict[str, Any] = {}
    original = ntk_module._by_structure

    def spy(*args: Any, **kwargs: Any) -> Any:
        routes, chunk, keep, room = args[6], args[7], args[9], args[10] if len(args) > 10 else 0
        seen.update(chunk=chunk, keep=keep, room_bytes=room * 4, routes=dict(routes),
                    jacobian_layers=sum(r == "jacobians" for r in routes.values()), layers=len(routes))
        return original(*args, **kwargs)

    ntk_module._by_structure = spy
    try:
        ntk_module.ntk_of(model, x, mode=mode, implementation="structured", memory=memory)
    finally:
        ntk_module._by_structure = original
    return seen


def case_arguments(description: str) -> argparse.ArgumentParser:
    """A parser of the cases these NTK experiments run: device, model (``ntk.build``'s options),
    n and kernel."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18", choices=["mlp", "resnet18", "decoder"])
    parser.add_argument("--n", type=int, nargs="+", default=[64])
    parser.add_argument("--kernel", nargs="+", default=["trace"], choices=["trace", "full"])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--positions", type=int, default=1)
    return parser


def rotation_case(description: str, extra: list[tuple[tuple[str, ...], dict[str, Any]]] = ()
                  ) -> tuple[argparse.Namespace, torch.nn.Module, Any]:
    """An experiment that times arms in rotation: its arguments (:func:`case_arguments`,
    ``--pairs``, the rounds, and ``extra``, each ``(names, keywords)`` of ``add_argument``), its
    model (described on stdout) and its inputs' maker."""
    parser = case_arguments(description)
    parser.add_argument("--pairs", type=int, default=5)
    for names, keywords in extra:
        parser.add_argument(*names, **keywords)
    args = parser.parse_args()
    model, inputs, what = build(args.model, args, args.device)
    print(what, flush=True)
    return args, model, inputs


def main() -> None:
    parser = case_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--implementation", default="structured")
    parser.add_argument("--memory-gib", type=float, default=None)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="group the operators by their inputs' shapes")
    parser.add_argument("--phases", action="store_true", help="time ntk_of's steps (PHASES) in one more call")
    parser.add_argument("--gaps", action="store_true",
                        help="the device's idle time in one more call, by the step the host was in (CUDA)")
    parser.add_argument("--host", action="store_true", help="the host's time by function in one more call (cProfile)")
    args = parser.parse_args()
    memory = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    model, inputs, what = build(args.model, args, args.device)
    print(what, flush=True)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for n in args.n:
        x = inputs(n).to(args.device)
        for mode in args.kernel:
            run = lambda x=x, mode=mode: ntk_module.ntk_of(  # noqa: E731
                model, x, mode=mode, implementation=args.implementation, memory=memory)
            run()
            _sync(args.device)
            start = time.perf_counter()
            run()
            _sync(args.device)
            plain = time.perf_counter() - start
            plan = _plan(model, x, mode, memory) if args.implementation == "structured" else {}
            with profile(activities=activities, record_shapes=args.shapes) as prof:
                start = time.perf_counter()
                run()
                _sync(args.device)
                profiled = time.perf_counter() - start
            averages = prof.key_averages(group_by_input_shape=args.shapes)
            print(json.dumps({"n": n, "kernel": mode, "implementation": args.implementation,
                              "seconds": round(plain, 4), "profiled_seconds": round(profiled, 4),
                              "device_busy_seconds": round(_busy(prof.events(), cuda), 4),
                              **{k: v for k, v in plan.items() if k != "routes"}}), flush=True)
            if plan:
                print("routes:", json.dumps(plan["routes"]), flush=True)
            if args.phases:
                for name, (seconds, calls) in _phases(run, args.device).items():
                    print(f"phase {name:22s} {seconds:9.4f} s  {calls:4d} calls", flush=True)
            if args.gaps and cuda:
                idle, by_phase = _idle(run)
                print(f"idle {idle:.4f} s:", json.dumps({k: round(v, 4) for k, v in
                                                         sorted(by_phase.items(), key=lambda kv: -kv[1])}), flush=True)
            if args.host:
                print(_host(run, args.device, args.rows), flush=True)
            print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60,
                                 max_shapes_column_width=120), flush=True)


if __name__ == "__main__":
    main()
