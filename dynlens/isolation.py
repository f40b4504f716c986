"""Measurement isolation: what :func:`isolated` switches while a measurement runs, and restores.

A measurement leaves no trace on training (the first of the Lens's promises, README), and it must compute exact
second derivatives on any model the user trains. Inside :func:`isolated` the model is in eval
mode (or train mode with a fixed dropout seed), the random states are forked, and torch's
settings and functions that would make a measurement inexact or impossible are switched, each
by its own small context manager below:

* compiled modules run eagerly (:func:`_eager`: compiled code has no double backward);
* activation checkpoints run as plain calls (:func:`_checkpoints_run_directly`);
* weight normalisation is computed from elementary operations (:func:`_weight_norm_composite`:
  the fused kernel's second derivative is wrong);
* hardsigmoid and embedding bags are computed as composite operations
  (:func:`dynlens.composites.composite_layers`: their kernels have no double backward);
* recurrent layers on CUDA run PyTorch's own kernels (:func:`_native_recurrent_kernels`: cuDNN's
  have no double backward and no backward in eval mode);
* autocast is off (:func:`_full_precision`) and so is TF32, so products are exact to float32;
* scaled-dot-product attention uses its math kernel (:func:`_sdpa_math_kernel`: the fused ones
  have no second derivative).

Every change goes through :func:`_attributes_set`, which restores the original on exit, also
when the body raises.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from dynlens.composites import composite_layers
from dynlens.parameters import model_device

Mode = Literal["eval", "train"]

__all__ = ["Mode", "isolated"]


@contextlib.contextmanager
def _attributes_set(changes: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """``setattr(owner, name, value)`` for each change inside, every original value restored on
    exit (also when the body raises): how a measurement switches torch's settings and functions."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def _precision_settings() -> list[Any]:
    """The objects with an ``fp32_precision`` setting (torch >= 2.9), each parent before its
    children; none on older torch."""
    b = torch.backends
    owners = [b, b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
              b.mkldnn, getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None),
              getattr(b.mkldnn, "rnn", None)]
    return [o for o in owners if o is not None and hasattr(o, "fp32_precision")]


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS's and cuDNN's ``allow_tf32`` set to ``enabled`` inside; on exit both restored, and
    every ``fp32_precision`` setting too: from torch 2.9 assigning ``allow_tf32`` writes
    "ieee" or "tf32" over a precision that was "none" (follow the generic setting), so
    restoring the boolean alone left ``torch.backends.cuda.matmul.fp32_precision`` changed
    after every measurement."""
    saved = [(owner, owner.fp32_precision) for owner in _precision_settings()]
    try:
        with _attributes_set([(torch.backends.cudnn, "allow_tf32", enabled),
                              (torch.backends.cuda.matmul, "allow_tf32", enabled)]):
            yield
    finally:
        for owner, precision in saved:
            if owner.fp32_precision != precision:
                owner.fp32_precision = precision


def _eager(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Run compiled modules inside ``model`` eagerly (their compiled code has no double backward).

    torch >= 2.6: ``torch.compiler.set_stance("force_eager")``, which covers submodules wrapped by
    ``torch.compile`` and modules compiled in place (``module.compile()``). Before 2.6 only the
    in-place kind can be switched off (its ``_compiled_call_impl``, restored on exit); a submodule
    wrapped by ``torch.compile`` still runs compiled there. Nothing is switched (and dynamo is
    not imported) when no compiler was used in the process.
    """
    if "torch._dynamo" not in sys.modules:
        # nothing in this process was compiled (torch.compile imports dynamo), and importing it
        # for set_stance costs seconds: a model that is not compiled touches no compile machinery
        return contextlib.nullcontext()
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("force_eager")
    return _attributes_set([(m, "_compiled_call_impl", None) for m in model.modules()
                            if getattr(m, "_compiled_call_impl", None) is not None])


class _RunDirectly:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction``: runs the function as is."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _no_checkpoint(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for ``torch.utils.checkpoint._checkpoint_without_reentrant_generator``, whose
    caller runs the function between two steps of it: here, steps that do nothing."""
    yield


def _checkpoints_run_directly() -> contextlib.AbstractContextManager[Any]:
    """Run the blocks of activation checkpointing (``torch.utils.checkpoint.checkpoint``) as
    plain calls. The reentrant kind (``use_reentrant=True``, torch's default before 2.4) refuses
    ``torch.autograd.grad``, with which every measurement differentiates, and has no second
    derivative; the non-reentrant kind recomputes its block in the backward pass, where the layer
    hooks of the per-example gradients are gone. Checkpointing saves memory without changing a
    value, and a measurement on a probe batch needs no saving. ``checkpoint`` looks both names up
    when it is called, so calls through a name imported earlier are covered; both are restored
    on exit."""
    module = torch.utils.checkpoint
    stand_ins = {"CheckpointFunction": _RunDirectly, "_checkpoint_without_reentrant_generator": _no_checkpoint}
    return _attributes_set([(module, name, stand_in) for name, stand_in in stand_ins.items()
                            if hasattr(module, name)])


def _composite_weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` from elementary operations: g·v/‖v‖ (the norm over every dimension
    but ``dim``), the formula of its own non-fused branch."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _weight_norm_composite() -> contextlib.AbstractContextManager[Any]:
    """Weight normalisation from elementary operations inside a measurement.

    The fused kernel (``_weight_norm_interface``) behind ``torch._weight_norm``, which both
    ``torch.nn.utils.parametrizations.weight_norm`` and the older ``torch.nn.utils.weight_norm``
    call, has a wrong second derivative: its double backward holds the saved norms constant, and
    Hessian-vector products through it were off by 30 to 50% (torch 2.3, 2.11 and 2.13, against
    finite differences of the gradient; tests/test_functional.py). It has no forward-mode
    derivative either. The composite formula has the same values and exact derivatives of every
    order. Both names are swapped (the older hook imported its own) and restored on exit."""
    import torch.nn.utils.weight_norm  # noqa: F401 - the module, for the name it imported

    owners = [torch, sys.modules.get("torch.nn.utils.weight_norm")]
    return _attributes_set([(owner, "_weight_norm", _composite_weight_norm) for owner in owners
                            if hasattr(owner, "_weight_norm")])


def _native_recurrent_kernels(model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """cuDNN off for a CUDA model with recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``).

    cuDNN's RNN backward runs only in training mode ("cudnn RNN backward can only be called in
    training mode"), so a measurement in eval mode could not even take a gradient, and it has no
    double backward. PyTorch's native kernels have both (Hessian-vector products within 3e-9 of
    finite differences on an H100: ``benchmarks/second_derivatives.py``). The flag is global, so
    the model's convolutions run without cuDNN too during the measurement; restored on exit."""
    recurrent = device.type == "cuda" and any(isinstance(m, nn.RNNBase) for m in model.modules())
    return _attributes_set([(torch.backends.cudnn, "enabled", False)] if recurrent else [])


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off on the CPU and the model's device: a measurement taken inside the user's
    ``torch.autocast`` block would run its matrix products in 16 bits (eigenvalues 1e-3 off while
    Lanczos reported residuals of 1e-5)."""
    with contextlib.ExitStack() as stack:
        for kind in dict.fromkeys(("cpu", device.type)):
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def _sdpa_math_kernel() -> contextlib.AbstractContextManager[Any]:
    """Select the math kernel of scaled-dot-product attention (fused kernels have no 2nd derivative)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no selector; its default kernels are then used
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _seed_generators(device: torch.device, seed: int) -> None:
    """Seed the torch CPU generator and that of ``device`` (dropout draws from them)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


@contextlib.contextmanager
def isolated(model: nn.Module, mode: Mode = "eval", seed: int = 0) -> Iterator[None]:
    """Run a measurement on ``model`` with no trace left behind.

    Inside: every module is in ``mode`` ("eval": BatchNorm uses running statistics and dropout is
    off; "train": batch statistics and dropout with the fixed ``seed``), the torch CPU and CUDA
    generators are seeded with ``seed``, attention uses the math kernel, compiled modules run
    eagerly (:func:`_eager`), activation checkpoints run as plain calls
    (:func:`_checkpoints_run_directly`), weight normalisation is computed from elementary
    operations (:func:`_weight_norm_composite`: the fused kernel's second derivative is wrong),
    hardsigmoid and embedding bags likewise (:func:`dynlens.composites.composite_layers`: their
    kernels have no double backward),
    recurrent layers on CUDA run PyTorch's own kernels (:func:`_native_recurrent_kernels`),
    autocast is off (:func:`_full_precision`), and TF32 is off (cuDNN convolutions use it by
    default; its ~1e-3 relative error would bound every eigenvalue's accuracy). On exit the
    modules' ``training`` flags, the TF32 and cuDNN settings, the compiler's stance, the
    checkpoint and weight-norm functions and the torch, CUDA, Python ``random`` and NumPy random
    states are restored exactly, also when the body raises. The settings and functions are
    process-wide: another thread training at the same moment would see them (the values are the
    same, the rounding and speed may differ).
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda, enabled=True):
            _seed_generators(device, seed)
            model.train(mode == "train")
            # TF32 (cuDNN's default for convolutions) carries ~1e-3 relative error into every
            # product: no eigensolver converges below it. Measurements run in full float32.
            no_tf32 = _tf32(False)
            with no_tf32, _sdpa_math_kernel(), _eager(model), _checkpoints_run_directly(), \
                    _weight_norm_composite(), composite_layers(), _native_recurrent_kernels(model, device), \
                    _full_precision(device):
                yield
    finally:
        for module, flag in flags:
            module.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)
