"""Small models, training loops and the fake-run writer shared by the tests (import as
``from helpers import ...``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import dynlens as dl
from dynlens.store import RunWriter

LAYERS = ["0", "2", "4"]
BASIC_PROBES = ["train", "grad_norm", "param_norm", "update_size", "distance_from_init"]


@pytest.fixture(autouse=True)
def single_thread():
    """Small float64 models run fastest on one thread, and steadily on a busy shared CPU.

    An autouse fixture: a test module that imports it runs each of its tests on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn_dropout_cnn(seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm and Dropout (the model of the no-side-effects test)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def image_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, lens=None,
          batch_size: int = 16, seed: int = 0) -> None:
    """A seeded training loop: shuffled mini-batches, cross-entropy, optional lens.step."""
    x, y = data
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        for idx in torch.randperm(len(y)).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            if lens is not None:
                lens.step(loss=loss)
            step += 1
            if step == steps:
                return


class Checkpointed(nn.Module):
    """An MLP whose middle block runs under activation checkpointing (``use_reentrant``: True,
    False, or None for no checkpointing, the oracle's model)."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 10)
        self.block = nn.Sequential(nn.Linear(10, 10), nn.Tanh())
        self.head = nn.Linear(10, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        if self.use_reentrant is not None:
            h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        else:
            h = self.block(h)
        return self.head(h)


class UserNet(nn.Module):
    """Linear, tanh, linear, defined in user code: dynamo compiles its frames (it leaves
    torch.nn's own, such as nn.Sequential's, to run eagerly)."""

    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def counting_backend(compiles: list[int], runs: list[int]):
    """A torch.compile backend that runs the captured graph as it is, appending to ``compiles``
    at each compilation and to ``runs`` at each call of compiled code."""
    def backend(graph_module, example_inputs):
        compiles.append(1)

        def run(*args):
            runs.append(1)
            return graph_module.forward(*args)
        return run
    return backend


def tiny_problem(seed: int = 0):
    """A two-layer ReLU network on 32 Gaussian examples of 3 classes: (model, loss_fn, batch)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return model, nn.CrossEntropyLoss(), (x, y)


def sgd_steps(model, loss_fn, batch, optimizer, lens, steps: int) -> None:
    """``steps`` full-batch optimizer steps on ``batch``, each followed by ``lens.step(loss=...)``
    (no Lens: ``lens=None``)."""
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if lens is not None:
            lens.step(loss=loss)


def clean_loss(steps: int, seed: int = 0) -> np.ndarray:
    """A smoothly decaying loss with a little noise, for steps 1..steps."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, steps + 1)
    return 2.3 * np.exp(-s / (steps / 3)) + 0.05 + 0.01 * rng.standard_normal(steps) ** 2


def write_run(path: Path | str, steps: int = 400, *, loss: np.ndarray | None = None,
              grad_norm: np.ndarray | None = None, basic: bool = True,
              measurements: Mapping[str, Mapping[int, Mapping[str, Any]]] | None = None,
              name: str = "synthetic", config: dict[str, Any] | None = None,
              model_class: str = "MLP", optimizer: str = "SGD", lr: float = 0.1,
              layers: Sequence[str] = LAYERS,
              events: Sequence[tuple[int, str, str, str, str | None]] = (),
              costs: dict[str, Any] | None = None, status: str = "finished", seed: int = 0) -> Path:
    """Write a fake run as the Lens records one (for rule and report tests); return its path.

    * train/loss (``loss``, length ``steps``; default :func:`clean_loss`) and train/lr (``lr``)
      at steps 1..steps, in the step log;
    * with ``basic``, every basic probe at every step 0..steps: totals (grad_norm from
      ``grad_norm``, length ``steps + 1``; default about 1) and per_layer arrays, one entry per
      layer of ``layers``;
    * ``measurements``: any other probe's records, ``{probe: {step: {name: value}}}``, a number
      stored as a scalar and an array as an array (as the Lens stores a probe's values);
    * ``events``: (step, level, probe, message, traceback);
    * the metadata a Lens writes (name, config, model, optimizer with learning rate ``lr``,
      layers, probes, versions, start, status), and ``costs`` when given.

    One commit per step, as the Lens commits.
    """
    rng = np.random.default_rng(seed)
    loss = clean_loss(steps, seed) if loss is None else np.asarray(loss, dtype=float)
    if grad_norm is None:
        grad_norm = 1.0 + 0.05 * rng.standard_normal(steps + 1)
    measurements = measurements or {}
    probes = (BASIC_PROBES if basic else ["train"]) + list(measurements)
    writer = RunWriter(path, overwrite=True)
    writer.set_meta({
        "name": name, "config": config if config is not None else {"lr": lr, "batch": 32},
        "model": {"class": model_class, "parameters": 1234, "trainable_parameters": 1234,
                  "tensors": [{"name": f"{layer}.weight", "shape": [4, 4], "dtype": "float32",
                               "trainable": True} for layer in layers],
                  "buffers": 0, "device": "cpu", "text": f"{model_class}(\n  (0): Linear()\n)"},
        "optimizer": {"class": optimizer, "defaults": {"lr": lr}, "param_groups": 1},
        "layers": list(layers),
        "probes": [{"name": p, "class": p.title(), "schedule": "every 1", "mode": "eval"}
                   for p in probes],
        "versions": {"dynlens": dl.__version__}, "started": "2025-01-01T00:00:00+00:00",
        "status": status, **({"costs": costs} if costs is not None else {}),
    })
    at_steps = sorted({*range(steps + 1), *(s for by_step in measurements.values() for s in by_step)})
    for step in at_steps:
        if 1 <= step <= steps:
            writer.step_scalar(step, "train", "loss", loss[step - 1])
            writer.step_scalar(step, "train", "lr", lr)
        if basic and step <= steps:
            _write_basic_probes(writer, step, float(grad_norm[step]), len(layers))
        for probe, by_step in measurements.items():
            for key, value in by_step.get(step, {}).items():
                if isinstance(value, np.ndarray):
                    writer.array(step, probe, key, value)
                else:
                    writer.scalar(step, probe, key, float(value))
        for e_step, level, probe, message, traceback in events:
            if e_step == step:
                writer.event(step, level, probe, message, traceback)
        writer.commit()
    writer.close()
    return Path(path)


def _write_basic_probes(writer: RunWriter, step: int, g: float, layers: int) -> None:
    """One measurement of every basic probe at ``step``: gradient norm ``g``, a parameter norm
    growing from 10 by 0.001 a step, updates of 0.1 g, a steadily growing distance."""
    shares = np.resize([0.5, 0.7], layers)
    param = 10.0 + 0.001 * (step + 1)
    update = 0.1 * g if step else 0.0
    writer.scalar(step, "grad_norm", "total", g)
    writer.array(step, "grad_norm", "per_layer", g * shares)
    writer.scalar(step, "param_norm", "total", param)
    writer.array(step, "param_norm", "per_layer", param * shares)
    writer.scalar(step, "update_size", "total", update)
    writer.scalar(step, "update_size", "relative", update / param)
    writer.array(step, "update_size", "per_layer", update * shares)
    writer.scalar(step, "distance_from_init", "absolute", 0.01 * step)
    writer.scalar(step, "distance_from_init", "relative", 0.001 * step)
    writer.array(step, "distance_from_init", "per_layer", 0.001 * step * shares)


def hessian_run(path: Path | str, sharpness: Sequence[float], threshold: float = 4.0,
                lambda_min: Sequence[float] | None = None, optimizer: str = "SGD", every: int = 10,
                density: bool = False) -> dl.Run:
    """Write and open a run whose Hessian probe measured ``sharpness`` at steps 0, every, 2 every, ...
    against the stability threshold ``threshold`` (an optimizer at learning rate 2/threshold):
    the ratio, the trace (10 λ_max, stderr 0.5), ``lambda_min`` when given, and with ``density``
    a spectral density of a bulk near 0 and two outliers (λ_max and λ_max/2). An Adam optimizer
    also records the sharpness as the preconditioned one."""
    rng = np.random.default_rng(0)
    records: dict[int, dict[str, Any]] = {}
    for i, value in enumerate(sharpness):
        values: dict[str, Any] = {"sharpness": value, "threshold": threshold,
                                  "sharpness_ratio": value / threshold, "trace": 10 * value,
                                  "trace_stderr": 0.5}
        if optimizer.startswith("Adam"):
            values["preconditioned_sharpness"] = value
        if lambda_min is not None:
            values["lambda_min"] = lambda_min[i]
        if density:
            values["density_nodes"] = np.concatenate([rng.normal(0, 0.05, 40), [value, value / 2]])
            values["density_weights"] = np.concatenate([np.full(40, 0.999 / 40), [0.0005, 0.0005]])
        records[i * every] = values
    return dl.load_run(write_run(path, every * (len(sharpness) - 1), basic=False, optimizer=optimizer,
                                 lr=2 / threshold, measurements={"hessian": records}))


def sharpening_then_eos() -> list[float]:
    """27 sharpness values against a threshold of 4: a rise from 1 to 3.5, then hovering at the
    edge of stability (within 4% of 4)."""
    rise = list(np.linspace(1.0, 3.5, 12))
    hover = [4.0 * (1 + 0.04 * np.sin(i)) for i in range(15)]
    return rise + hover


def dense_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:  # noqa: ANN001
    """The oracle: the full Hessian of ``loss_fn(model(x), y)`` over every parameter (in
    ``named_parameters()`` order, flattened) by ``torch.autograd.functional.hessian`` and
    ``torch.func.functional_call``, symmetrised; independent of dynlens's own products."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            pieces[name] = vector[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return loss_fn(torch.func.functional_call(model, pieces, (batch[0],)), batch[1])

    matrix = torch.autograd.functional.hessian(loss, flat)
    return (matrix + matrix.T) / 2


def kernel_from_jacobians(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """The NTK of two sets from their per-example Jacobians (n, O, P), contracted explicitly, in
    the layout of ``mode`` ("full", "trace" or "diagonal": then ``b`` is ignored): the oracle of
    the NTK tests."""
    if mode == "full":
        return torch.einsum("iap,jbp->ijab", a, b)
    if mode == "trace":
        return torch.einsum("iap,jap->ij", a, b)
    return (a * a).sum(2)


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """‖value − expected‖ / ‖expected‖."""
    return float((value - expected).norm() / expected.norm())


def precision_settings() -> dict[str, Any]:
    """The TF32 settings, listed here independently of dynlens: cuBLAS's and cuDNN's
    ``allow_tf32`` and, on torch >= 2.9, every ``fp32_precision`` (assigning ``allow_tf32``
    writes them)."""
    b = torch.backends
    owners = {"generic": b, "cuda.matmul": b.cuda.matmul, "cudnn": b.cudnn, "cudnn.conv": getattr(b.cudnn, "conv", None),
              "cudnn.rnn": getattr(b.cudnn, "rnn", None), "mkldnn": b.mkldnn,
              "mkldnn.matmul": getattr(b.mkldnn, "matmul", None), "mkldnn.conv": getattr(b.mkldnn, "conv", None)}
    settings: dict[str, Any] = {f"{name}.fp32_precision": owner.fp32_precision for name, owner in owners.items()
                                if owner is not None and hasattr(owner, "fp32_precision")}
    settings.update({"cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32, "cudnn.allow_tf32": b.cudnn.allow_tf32})
    return settings


def process_settings() -> dict[str, Any]:
    """torch's process-wide settings that a measurement switches or could leave switched: the
    precision settings (``allow_tf32`` and, on torch >= 2.9, every ``fp32_precision``), the
    attention kernels allowed, cuDNN's flags, threads, determinism, grad, anomaly and inference
    modes, autocast, the matmul precision, the default dtype, the stacks of torch-function and
    dispatch modes, and the global module hooks. The no-side-effects tests compare them before
    a Lens and after its ``close()``."""
    import torch.nn.modules.module as module_globals

    b = torch.backends
    settings: dict[str, Any] = precision_settings()
    settings.update({
        "cudnn.enabled": b.cudnn.enabled, "cudnn.benchmark": b.cudnn.benchmark,
        "cudnn.deterministic": b.cudnn.deterministic,
        "sdp": [getattr(b.cuda, f)() for f in ("flash_sdp_enabled", "mem_efficient_sdp_enabled",
                                               "math_sdp_enabled", "cudnn_sdp_enabled") if hasattr(b.cuda, f)],
        "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad": torch.is_grad_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "inference": torch.is_inference_mode_enabled(), "autocast": torch.is_autocast_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(), "default_dtype": torch.get_default_dtype(),
        "function_modes": torch._C._len_torch_function_stack(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "module_hooks": {name: len(value) for name, value in vars(module_globals).items()
                         if name.startswith("_global_") and isinstance(value, dict)},
    })
    return settings


def peak_bytes(call: Any) -> tuple[Any, int]:
    """(call(), the most bytes it held allocated at once beyond what was allocated before it):
    the running sum of every CPU allocation and free (with its size, in time order) that the
    profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return out, peak


class OperatorCalls(TorchDispatchMode):
    """Counts the calls of one ATen operator (``torch.ops.aten.copy_.default``) that reach the
    kernels inside it, as ``count``."""

    def __init__(self, operator: Any) -> None:
        super().__init__()
        self.operator = operator
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN201
        if func is self.operator:
            self.count += 1
        return func(*args, **(kwargs or {}))
