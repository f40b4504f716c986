"""Empirical NTK (issue #12): each implementation, the automatic choice, and the torch.func NTK
tutorial's two methods as the baseline, on an MLP, a ResNet-18 and the 124M decoder.

    python benchmarks/ntk.py                                   # CPU: the MLP (3×2048) at n=64
    python benchmarks/ntk.py --model mlp resnet18 decoder --n 4 8 --width 256 --tiny --repeat 1
    python benchmarks/ntk.py --device cuda --model mlp resnet18 decoder --n 64 256 \\
        --out $OUT/ntk_h100.json                               # one H100: about 5 minutes
    for m in structured auto jacobian ntk_vector tutorial_jacobian tutorial_products; do
        python benchmarks/ntk.py --device cuda --model resnet18 --n 64 256 --methods $m \\
            --save-kernels /tmp/k --out r18_$m.json; done       # one method a process
    python benchmarks/ntk.py --merge r18_*.json --save-kernels /tmp/k --out resnet18.json

One method a process (``--methods``, then ``--merge``) where a method can spoil the process: on
an H200 the tutorial's NTK-vector products (``vmap`` of ``vjp``/``jvp``) on the ResNet-18 at
n = 64 end in "CUDA error: an illegal memory access", after which no CUDA call of the process
works; all methods in one process then lost the whole case. ``--merge`` takes each method from
the file that ran it and, from the saved kernels, each one's difference to the first method's.

Models (eval mode; ``benchmarks/models.py`` for the last two, as the reference jobs of
``benchmarks/overhead_gpu.py``):

- ``mlp``: 32-2048-2048-2048-10 with ReLU (the paper's table; ``--width``), Gaussian inputs;
- ``resnet18``: ResNet-18 for 32×32 images, 10 classes (``--tiny``: width 8);
- ``decoder``: the GPT-2-sized decoder (124M; ``--tiny``: vocabulary 500, width 64, 2 layers) on
  random sequences of ``--seq-len`` tokens, its outputs reduced as the NTK probe reduces them:
  the probe's own wrapper (``dynlens.probes.ntk.NTK._model``: the last position's logits,
  projected on 32 fixed Gaussian directions); with ``--positions K`` > 1 a small wrapper here
  hands the probe's wrapper the last K positions' logits, flattened, so those K·vocabulary
  outputs are projected on the 32 directions.

For each model, n (inputs, the kernel of the set with itself) and kernel (``trace``, ``full``):
the median wall time (CUDA synchronised around each call) of ``ntk_of`` with
``implementation="structured"``, ``"jacobian"``, ``"ntk_vector"`` and ``"auto"`` (and what it
chose), and of the tutorial's Jacobian contraction (``vmap(jacrev)`` then ``einsum``) and
NTK-vector products (``vmap`` of ``vjp`` and ``jvp`` over the whole identity basis), run in the
settings ``ntk_of`` computes in (``dynlens.functional.isolated``: TF32 off, the math kernel of
attention, whose fused kernels have no forward-mode derivative); on CUDA
the peak memory each allocated beyond what was in use (``torch.cuda.reset_peak_memory_stats``
before, ``max_memory_allocated`` after); the relative difference ‖K − K_ref‖/‖K_ref‖ of each
kernel to the first one computed, and the largest. ``memory`` given to our methods: ``ntk_of``'s
default (None: a 1 GiB chunking guide, NTK-vector products allowed) unless ``--memory-gib``;
recorded in the JSON. The methods are timed one after another, so a method runs after the
others' allocations and the GPU's clocks vary between them: "auto/fastest ours" from those
medians came out 0.85–1.50 on an H200 (0.59 on this VM's CPU) for an auto that had chosen that
very method. ``--pairs`` (11) then times auto and our fastest method in alternating pairs,
where both take under ``--single`` s: "alternating" is the ratio of those medians, what the
choice itself costs.

Bounded run time: one call is interrupted after ``--max-seconds`` (recorded "timed out"); the
first call is a warm-up unless it took more than ``--single`` seconds, in which case it is the
only one; a method that ran out of memory or time, or whose time scaled by (n/n_prev)² is
predicted above twice ``--max-seconds``, is skipped at a larger n with the reason; one that timed
out on the trace kernel is skipped on the full kernel of the same n; on the CPU the tutorial's
methods are skipped where their n·O·P numbers exceed 80% of the host's available memory (a
process past it is killed, not refused). Out of memory is caught,
recorded as "out of memory", and the cache emptied. Every case is printed (JSON, flushed) as it
ends, the JSON file rewritten, and a markdown table printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import types
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402

from dynlens.budget import MemoryBudgetTooSmall  # noqa: E402
from dynlens.functional import isolated  # noqa: E402
from dynlens.linalg.operator import available_host_memory  # noqa: E402
from dynlens.measures.ntk import ntk_of  # noqa: E402
from dynlens.probes.ntk import NTK as NTKProbe  # noqa: E402

OURS = ("structured", "jacobian", "ntk_vector", "auto")
TUTORIAL = ("tutorial_jacobian", "tutorial_products")
METHODS = OURS + TUTORIAL


def mlp(width: int = 2048) -> nn.Module:
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class _LastPositions(nn.Module):
    """The decoder's logits at its last ``k`` positions, flattened to (batch, k·vocabulary): the
    NTK probe's wrapper then projects all of them on its Gaussian directions (the probe itself
    reads only the last position)."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[:, -self.k:].flatten(1)


def build(name: str, args: argparse.Namespace, device: str) -> tuple[nn.Module, Any, str]:
    """(model in eval mode on ``device``, a function n -> inputs, a description)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = mlp(args.width)
        inputs = lambda n: models.classification_batch(n, 32, 10)[0]  # noqa: E731
        what = f"MLP 32-{args.width}x3-10 (ReLU)"
    elif name == "resnet18":
        model = models.resnet18(num_classes=10, width=8 if args.tiny else 64)
        inputs = lambda n: models.image_batch(n)[0]  # noqa: E731
        what = f"ResNet-18 (CIFAR, width {8 if args.tiny else 64}, 10 classes), 32x32 images"
    elif name == "decoder":
        vocab = 500 if args.tiny else 50257
        decoder = (models.gpt2(vocab=500, context=64, width=64, layers=2, heads=2) if args.tiny
                   else models.gpt2())
        base: nn.Module = decoder if args.positions == 1 else _LastPositions(decoder, args.positions)
        inputs = lambda n: models.token_batch(n, args.seq_len, vocab)[0]  # noqa: E731
        # the NTK probe's own reduction: its wrapper, built as it builds it (max_outputs 32, seed 0)
        probe = NTKProbe(max_outputs=32)
        model = probe._model(types.SimpleNamespace(model=base.to(device).eval()), inputs(1).to(device))
        what = (f"GPT-2 decoder ({'tiny' if args.tiny else '124M'}), {args.seq_len} tokens, last "
                f"{args.positions} position(s): {probe.notes.get('projection', 'not projected')} "
                "(the NTK probe's wrapper)")
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    params = sum(p.numel() for p in model.parameters())
    return model, inputs, f"{what}; {params:,} parameters"


# ----------------------------------------------------------------------------- the tutorial's methods


def tutorial_jacobian(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The torch.func tutorial's first method: per-example Jacobians, then einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    if mode == "trace":
        return sum(torch.einsum("Naf,Maf->NM", j, j) for j in jac)
    return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in jac)


def tutorial_products(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The tutorial's second method: NTK-vector products (vjp then jvp over the identity)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict) -> torch.Tensor:
        return functional_call(model, p, (x,))

    _, pullback = vjp(f, params)
    outputs = f(params)

    def column(v: torch.Tensor) -> torch.Tensor:
        (cotangent,) = pullback(v)
        return jvp(f, (params,), (cotangent,))[1]

    basis = torch.eye(outputs.numel(), dtype=outputs.dtype, device=outputs.device)
    basis = basis.view(outputs.numel(), *outputs.shape)
    full = vmap(column)(basis).reshape(*outputs.shape, *outputs.shape).permute(0, 2, 1, 3)
    return full.diagonal(dim1=2, dim2=3).sum(-1) if mode == "trace" else full


# ----------------------------------------------------------------------------- timing


class _TimedOut(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _TimedOut


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(fn: Any, device: str, repeat: int, limit: float, single: float) -> dict[str, Any]:
    """Run ``fn`` (a warm-up, then ``repeat`` timed calls; one call only if it took more than
    ``single`` s), each interrupted after ``limit`` s. Returns seconds (median), runs, peak MiB,
    the last result (``out``) or a status ("out of memory", "timed out: > X s", an error)."""
    cuda = device.startswith("cuda")
    _release(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times: list[float] = []
    out: Any = None
    status: str | None = None
    signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(1 + repeat):
            out = None
            _sync(device)
            signal.setitimer(signal.ITIMER_REAL, limit)
            began = time.perf_counter()
            out = fn()
            _sync(device)
            elapsed = time.perf_counter() - began
            signal.setitimer(signal.ITIMER_REAL, 0)
            if i == 0 and elapsed <= single:
                continue  # the warm-up
            times.append(elapsed)
            if i == 0:
                break  # long enough to time once
    except torch.OutOfMemoryError:
        status = "out of memory"
    except _TimedOut:
        status = f"timed out: > {limit:g} s"
    except MemoryBudgetTooSmall as e:
        status = f"memory budget too small: {e}"
    except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
        status = f"error: {type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if status is not None:
        out = None
    _release(device)
    result: dict[str, Any] = {"seconds": statistics.median(times) if status is None else status,
                              "runs": len(times), "out": out}
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def _skip_reason(previous: tuple[int, Any] | None, n: int, limit: float) -> str | None:
    """Why a method is skipped at n given its result at a smaller n, or None."""
    if previous is None:
        return None
    n0, seconds = previous
    if seconds == "out of memory":
        return f"skipped: out of memory at n={n0}"
    if isinstance(seconds, str) and seconds.startswith("timed out"):
        return f"skipped: n={n0} took {seconds.removeprefix('timed out: ')} (timed out)"
    if isinstance(seconds, str):
        return f"skipped: failed at n={n0}"
    predicted = seconds * (n / n0) ** 2
    if seconds > limit or predicted > 2 * limit:
        return f"skipped: n={n0} took {seconds:.3g} s (~{predicted:.3g} s predicted at n={n})"
    return None


def _host_too_small(model: nn.Module, x: torch.Tensor, device: str) -> str | None:
    """Why the tutorial's methods are not tried on the CPU at this n, or None: both hold n·O·P
    numbers at once (the per-example Jacobians, or the parameter cotangents of the n·O basis
    vectors), and past the host's available memory a CPU process is not refused but killed."""
    if device != "cpu":
        return None  # a GPU refuses an allocation with an error, which measure() records
    available = available_host_memory()
    with torch.no_grad():
        outputs = model(x[:1]).numel()
    need = x.shape[0] * outputs * sum(p.numel() for p in model.parameters()) * x.element_size()
    if available and need > 0.8 * available:
        return f"skipped: needs {need / 1e9:.1f} GB at once, {available / 1e9:.1f} GB available"
    return None


def _kernel(method: str, model: nn.Module, x: Any, mode: str, memory: int | None) -> Any:
    if method in OURS:
        return ntk_of(model, x, mode=mode, implementation=method, memory=memory)
    # in the settings ntk_of computes in (dynlens.functional.isolated): TF32 off, the math kernel of
    # scaled-dot-product attention (the fused ones have no forward-mode derivative), eval mode
    with isolated(model, "eval"):
        return (tutorial_jacobian if method == "tutorial_jacobian" else tutorial_products)(model, x, mode)


def run_case(model: nn.Module, x: Any, mode: str, args: argparse.Namespace, skip: dict[str, str],
             where: str = "") -> dict[str, Any]:
    """Every method not in ``skip`` on one case; with ``--save-kernels``, each kernel computed is
    saved as ``<dir>/<where>_<method>.pt`` (for ``--merge``)."""
    memory = None if args.memory_gib is None else int(args.memory_gib * 2**30)
    row: dict[str, Any] = {}
    reference: torch.Tensor | None = None
    for method in METHODS:
        if method in skip:
            row[method] = {"seconds": skip[method]}
            continue
        got = measure(lambda m=method: _kernel(m, model, x, mode, memory), args.device, args.repeat,
                      args.max_seconds, args.single)
        out = got.pop("out")
        if out is not None:
            if method in OURS:
                got["chose" if method == "auto" else "used"] = out.implementation
                out = out.kernel
            out = out.detach().float()
            if args.save_kernels:
                torch.save(out.cpu(), os.path.join(args.save_kernels, f"{where}_{method}.pt"))
            if reference is None:
                reference, got["relative_difference"] = out, 0.0
            else:
                got["relative_difference"] = float((out - reference).norm() / reference.norm())
        row[method] = got
        del out
    del reference
    summarise(row)
    seconds = {m: row[m]["seconds"] for m in METHODS}
    ours = [seconds[m] for m in OURS[:3] if isinstance(seconds[m], float)]
    auto = seconds["auto"]
    if ours and isinstance(auto, float) and args.pairs and max(auto, min(ours)) <= args.single:
        # the methods are timed one after another, each after the others' allocations: on an
        # H200 the MLP's auto came out 0.85-1.50x the structured products it had chosen; timed
        # in alternation the ratio is what the choice itself costs
        fastest = min((m for m in OURS[:3] if isinstance(seconds[m], float)), key=lambda m: seconds[m])
        row["alternating"] = alternating(model, x, mode, memory, fastest, args)
    return row


def summarise(row: dict[str, Any]) -> None:
    """A case's figures across its methods, into ``row``: the largest relative difference, auto
    over our fastest method, the faster tutorial method over auto."""
    differences = [row[m]["relative_difference"] for m in METHODS if "relative_difference" in row[m]]
    row["max_relative_difference"] = max(differences) if differences else None
    seconds = {m: row[m]["seconds"] for m in METHODS}
    ours = [seconds[m] for m in OURS[:3] if isinstance(seconds[m], float)]
    theirs = [seconds[m] for m in TUTORIAL if isinstance(seconds[m], float)]
    auto = seconds["auto"]
    row["auto_over_our_fastest"] = auto / min(ours) if ours and isinstance(auto, float) else None
    row["faster_tutorial_over_auto"] = min(theirs) / auto if theirs and isinstance(auto, float) else None


NOT_CHOSEN = "skipped: not in --methods"


def merge(paths: list[str], kernels: str | None) -> dict[str, Any]:
    """One result from runs of ``--methods`` subsets (one method a process: on an H200 a CUDA
    illegal memory access stopped the ResNet-18's case when every method ran in one process):
    each case's methods from the file that ran them, its other fields from the first file. With
    the directory the runs saved their kernels in, each kernel's relative difference is taken
    again against the first method's (in ``METHODS`` order) of the same case."""
    runs = [json.load(open(path)) for path in paths]
    merged = {k: v for k, v in runs[0].items() if k != "cases"}
    merged["merged_from"] = paths
    cases: dict[tuple[Any, ...], dict[str, Any]] = {}
    for run in runs:
        for case in run["cases"]:
            key = (case["model"], case["n"], case["kernel"])
            into = cases.setdefault(key, {k: case[k] for k in ("model", "n", "kernel")})
            for method in METHODS:
                if method not in into or into[method]["seconds"] == NOT_CHOSEN:
                    into[method] = case[method]
            if "alternating" in case:
                into["alternating"] = case["alternating"]
    for (model, n, kernel), case in cases.items():
        if kernels:
            reference = None
            for method in METHODS:
                case[method].pop("relative_difference", None)
                path = os.path.join(kernels, f"{model}_n{n}_{kernel}_{method}.pt")
                if not isinstance(case[method]["seconds"], float) or not os.path.exists(path):
                    continue
                out = torch.load(path)
                if reference is None:
                    reference = out
                case[method]["relative_difference"] = float((out - reference).norm() / reference.norm())
        summarise(case)
    merged["cases"] = list(cases.values())
    return merged


def alternating(model: nn.Module, x: Any, mode: str, memory: int | None, fastest: str,
                args: argparse.Namespace) -> dict[str, Any]:
    """auto against our fastest method, timed in ``args.pairs`` alternating pairs: the medians,
    and their ratio."""
    times: dict[str, list[float]] = {"auto": [], fastest: []}
    for i in range(args.pairs + 1):
        for method in (("auto", fastest) if i % 2 else (fastest, "auto")):
            _sync(args.device)
            began = time.perf_counter()
            _kernel(method, model, x, mode, memory)
            _sync(args.device)
            if i:  # the first pair warms up
                times[method].append(time.perf_counter() - began)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"against": fastest, "pairs": args.pairs, "seconds": medians,
            "auto_over_fastest": medians["auto"] / medians[fastest]}


# ----------------------------------------------------------------------------- report


def _cell(v: dict[str, Any]) -> str:
    s = v["seconds"]
    if isinstance(s, float):
        text = f"{s:.3g} s"
    elif s == "out of memory":
        text = "OOM"
    elif s.startswith("timed out"):
        text = "timed out"
    elif s.startswith("skipped"):
        text = "skip (" + s.removeprefix("skipped: ").split(" (")[0] + ")"
    else:
        text = s.split(":")[0]
    if "peak_mib" in v:
        text += f", {v['peak_mib']:.0f} MiB"
    return text


def table(cases: list[dict[str, Any]]) -> str:
    head = ["model", "n", "kernel", *METHODS, "auto chose", "auto/fastest ours", "alternating",
            "fastest tutorial/auto", "max rel. diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        ratio = lambda r: "–" if r is None else f"{r:.2f}"  # noqa: E731
        diff = c["max_relative_difference"]
        lines.append("| " + " | ".join([c["model"], str(c["n"]), c["kernel"], *(_cell(c[m]) for m in METHODS),
                                        c["auto"].get("chose", "–"), ratio(c["auto_over_our_fastest"]),
                                        ratio(c.get("alternating", {}).get("auto_over_fastest")),
                                        ratio(c["faster_tutorial_over_auto"]),
                                        "–" if diff is None else f"{diff:.1e}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", nargs="+", default=["mlp"], choices=["mlp", "resnet18", "decoder"])
    parser.add_argument("--n", type=int, nargs="+", default=[64])
    parser.add_argument("--kernel", nargs="+", default=["trace", "full"], choices=["trace", "full"])
    parser.add_argument("--width", type=int, default=2048, help="the MLP's hidden width")
    parser.add_argument("--tiny", action="store_true", help="a small ResNet-18 (width 8) and decoder, for the CPU")
    parser.add_argument("--seq-len", type=int, default=16, help="the decoder's tokens per input")
    parser.add_argument("--positions", type=int, default=1, help="the decoder's last positions measured")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory= for our methods, GiB (default: ntk_of's default, None)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="one kernel's time limit")
    parser.add_argument("--single", type=float, default=3.0, help="time a kernel once when it takes longer")
    parser.add_argument("--pairs", type=int, default=11,
                        help="also time auto and our fastest method in this many alternating pairs (0: not)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="leave out the untimed calls of every method on a small MLP first")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="run only these (the others are recorded as not chosen; see --merge)")
    parser.add_argument("--save-kernels", default=None, help="save each kernel computed in this directory")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="merge these result files of --methods runs into --out (kernels from --save-kernels)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ntk.json"))
    args = parser.parse_args()
    if args.merge:
        merged = merge(args.merge, args.save_kernels)
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=1)
        print(table(merged["cases"]) + f"\n\nwritten {args.out}", flush=True)
        return
    if args.save_kernels:
        os.makedirs(args.save_kernels, exist_ok=True)
    cuda = args.device.startswith("cuda")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "memory": (f"memory={args.memory_gib} GiB" if args.memory_gib is not None
                   else "ntk_of's default: memory=None (1 GiB chunking guide, vector_products=True)"),
        "settings": "every method in dynlens.functional.isolated(model, 'eval'): TF32 off, SDPA math kernel",
        "max_seconds": args.max_seconds, "models": {}, "cases": [],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "cases"}), flush=True)
    # every method once on a small MLP, untimed: the lazy imports of torch.func (and CUDA's
    # start) happen here, where no time limit can interrupt them half-way
    # (--no-warm-up leaves it out; only the methods of --methods are warmed up)
    if args.warm_up:
        small, tiny_x = mlp(8).to(args.device).eval(), torch.randn(2, 32, device=args.device)
        for method in args.methods:
            for mode in args.kernel:
                _kernel(method, small, tiny_x, mode, None)
        del small, tiny_x
    for name in args.model:
        model, make_inputs, what = build(name, args, args.device)
        results["models"][name] = what
        print(json.dumps({"model": name, "description": what}), flush=True)
        previous: dict[tuple[str, str], tuple[int, Any]] = {}
        for n in sorted(args.n):
            x = make_inputs(n).to(args.device)
            timed_out_trace: dict[str, str] = {}  # method -> its status on the trace kernel
            for mode in args.kernel:
                skip = {m: NOT_CHOSEN for m in METHODS if m not in args.methods}
                for method in args.methods:
                    reason = _skip_reason(previous.get((mode, method)), n, args.max_seconds)
                    if reason is None and method in timed_out_trace:
                        reason = f"skipped: the trace kernel at n={n} timed out"
                    if reason is None and method in TUTORIAL:
                        reason = _host_too_small(model, x, args.device)
                    if reason is not None:
                        skip[method] = reason
                began = time.perf_counter()
                row = run_case(model, x, mode, args, skip, f"{name}_n{n}_{mode}")
                case = {"model": name, "n": n, "kernel": mode, **row, "wall_s": time.perf_counter() - began}
                for method in METHODS:
                    s = row[method]["seconds"]
                    if not (isinstance(s, str) and s.startswith("skipped")):
                        previous[(mode, method)] = (n, s)
                    elif method in timed_out_trace:
                        previous[(mode, method)] = (n, timed_out_trace[method])  # skipped at larger n too
                    if mode == "trace" and isinstance(s, str) and s.startswith("timed out"):
                        timed_out_trace[method] = s
                print(json.dumps(case), flush=True)
                results["cases"].append(case)
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
            del x
        del model
        _release(args.device)
    print("\n" + table(results["cases"]), flush=True)
    print(f"\nwritten {args.out}", flush=True)


if __name__ == "__main__":
    main()
