"""The model as a function: (model, loss_fn, batch) turned into pure functions of a parameter dict.

Everything above this layer (measurements, probes, the Lens) computes through here, so this is
where the "no side effects" promise is kept:

* parameters are read through ``detach()`` views and differentiated with ``torch.func`` or
  ``torch.autograd.grad`` on fresh leaves, never ``backward()``: a parameter's ``.grad`` is never
  written;
* buffers are passed to ``functional_call`` as copies, so BatchNorm running statistics never move;
* :func:`isolated` puts the model in eval mode (or train mode on request) and restores every
  module's ``training`` flag, forks the torch CPU/CUDA, Python and NumPy random states (dropout in
  ``mode="train"`` uses a fixed seed), and selects the math kernel of scaled-dot-product attention,
  the only one with second derivatives.

A batch is ``(inputs, targets)``: ``inputs`` is a Tensor (``model(x)``), a tuple (``model(*x)``) or a
dict (``model(**x)``). ``loss_fn(outputs, targets)`` returns the mean loss; the loss of one example
is ``loss_fn`` applied to a batch of one, vectorised with ``vmap``.

HVP means Hessian-vector product, GGN the generalised Gauss-Newton matrix J^T (d^2 loss/d f^2) J,
JVP/VJP Jacobian-vector and vector-Jacobian products of the model outputs.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from dynlens.convgrad import fast_conv_second_order
from dynlens.linalg.operator import gaussian_vector

Params = dict[str, Tensor]
Mode = Literal["eval", "train"]

__all__ = [
    "ModelFunction",
    "check_loss",
    "example_losses",
    "isolated",
    "split_batch",
    "call_model",
    "batch_size",
    "to_device",
    "flatten",
    "unflatten",
    "trainable_parameters",
    "model_device",
    "unwrap_model",
]


# ----------------------------------------------------------------------------- batches


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of a batch, with an error that says what a batch must be."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a pair (inputs, targets); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ". Pass probe_batch=(x, y) where model(x) gives the outputs and loss_fn(outputs, y) the loss."
    )


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` on ``inputs`` by the convention of DESIGN.md: Tensor, tuple or dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    """Number of examples in ``inputs``: the leading dimension of its first tensor."""
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError(
            "the batch inputs hold no tensor with a batch dimension; pass tensors whose first "
            "dimension indexes the examples"
        )
    return int(leaves[0].shape[0])


def to_device(tree: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other leaves stay as they are."""
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, tree)


_HALF = (torch.float16, torch.bfloat16)


def _widened(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a half-precision float tensor (a copy), else ``t`` itself."""
    return t.float() if t.dtype in _HALF else t


def _widened_tree(tree: Any) -> Any:
    return tree_map(lambda x: _widened(x) if isinstance(x, Tensor) else x, tree)


def slice_examples(tree: Any, start: int, stop: int, step: int = 1) -> Any:
    """Examples ``start:stop:step`` of every tensor leaf with a leading batch dimension."""
    return tree_map(lambda x: x[start:stop:step] if isinstance(x, Tensor) and x.dim() > 0 else x, tree)


def _example_dims(tree: Any) -> Any:
    """``vmap`` in_dims for a batch: 0 for tensors with a batch dimension, None elsewhere."""
    return tree_map(lambda x: 0 if isinstance(x, Tensor) and x.dim() > 0 else None, tree)


def _unsqueeze(tree: Any) -> Any:
    return tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, tree)


def check_loss(value: Any) -> Tensor:
    """Return ``value`` if it is a scalar tensor, else raise an error saying what loss_fn must return."""
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn returned shape {shape}; dynlens needs the mean loss (a scalar) — pass "
            "nn.CrossEntropyLoss() with its default reduction, or a function that returns .mean()"
        )
    return value


# Loss modules whose reduction="none" gives each example's loss elementwise: with the mean (sum)
# reduction, the loss of one example alone is the mean (sum) of its elements.
_ELEMENTWISE_LOSSES: dict[type, Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.MSELoss: lambda f, o, t: F.mse_loss(o, t, reduction="none"),
    nn.L1Loss: lambda f, o, t: F.l1_loss(o, t, reduction="none"),
    nn.SmoothL1Loss: lambda f, o, t: F.smooth_l1_loss(o, t, reduction="none", beta=f.beta),
    nn.HuberLoss: lambda f, o, t: F.huber_loss(o, t, reduction="none", delta=f.delta),
    nn.BCEWithLogitsLoss: lambda f, o, t: F.binary_cross_entropy_with_logits(o, t, reduction="none",
                                                                            pos_weight=f.pos_weight),
    nn.BCELoss: lambda f, o, t: F.binary_cross_entropy(o, t, reduction="none"),
}


def _unreduced(loss_fn: Callable[..., Any], outputs: Tensor, targets: Tensor) -> Tensor | None:
    """Each example's loss from one call of ``loss_fn``'s unreduced form, for the torch loss
    modules whose unreduced values give it exactly; None for anything else."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum") or getattr(loss_fn, "weight", None) is not None:
        return None
    kind = type(loss_fn)
    if kind in (nn.CrossEntropyLoss, nn.NLLLoss) and outputs.dim() == 2:
        if targets.dim() == 1 and not targets.is_floating_point():
            if kind is nn.CrossEntropyLoss:
                values = F.cross_entropy(outputs, targets, reduction="none", ignore_index=loss_fn.ignore_index,
                                         label_smoothing=loss_fn.label_smoothing)
            else:
                values = F.nll_loss(outputs, targets, reduction="none", ignore_index=loss_fn.ignore_index)
            if reduction == "mean":  # an example alone whose target is ignored: the mean of nothing
                values = values.masked_fill(targets == loss_fn.ignore_index, math.nan)
            return values
        if kind is nn.CrossEntropyLoss and targets.shape == outputs.shape:  # class probabilities
            return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=loss_fn.label_smoothing)
        return None
    if kind in _ELEMENTWISE_LOSSES and targets.shape == outputs.shape:
        values = _ELEMENTWISE_LOSSES[kind](loss_fn, outputs, targets).reshape(outputs.shape[0], -1)
        return values.mean(dim=1) if reduction == "mean" else values.sum(dim=1)
    return None


def example_losses(loss_fn: Callable[..., Any], outputs: Tensor, targets: Any) -> Tensor:
    """(ℓ_1, ..., ℓ_n): ``loss_fn`` of each example alone, from batched ``outputs`` (n, ...) and
    ``targets``. The torch loss modules with the mean or sum reduction and no class weights
    (cross-entropy, NLL, MSE, L1, smooth L1, Huber, binary cross-entropy) are evaluated once
    unreduced; any other ``loss_fn`` by ``vmap`` over the examples (each a batch of one)."""
    if isinstance(targets, Tensor) and targets.dim() > 0 and targets.shape[0] == outputs.shape[0]:
        values = _unreduced(loss_fn, outputs, targets)
        if values is not None:
            return values

    def one(o: Tensor, t: Any) -> Tensor:
        return check_loss(loss_fn(o.unsqueeze(0), _unsqueeze(t)))

    return vmap(one, in_dims=(0, _example_dims(targets)))(outputs, targets)


# ----------------------------------------------------------------------------- parameters


def trainable_parameters(model: nn.Module) -> Params:
    """The model's trainable parameters by name (shared weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (a dict's values in order, or a sequence) into one flat vector."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat vector into a dict shaped like ``like`` (views into ``vector``)."""
    out: Params = {}
    offset = 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[offset : offset + n].view_as(t)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries; the parameters have {offset}")
    return out


# ----------------------------------------------------------------------------- isolation


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers that run it differently from its own ``forward``.

    Strips ``torch.compile``'s ``OptimizedModule`` (compiled code has no double backward),
    ``nn.DataParallel`` (which scatters the inputs over replicas that do not see the parameters a
    measurement substitutes) and ``DistributedDataParallel`` (whose forward synchronises buffers
    across ranks), at any depth of nesting. The module returned holds the very same parameters and
    buffers, so measuring it measures the model; its parameter names are those of the user's own
    module, without the wrappers' ``_orig_mod.`` and ``module.`` prefixes.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


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


_FASTEST_HVP: dict[tuple, str] = {}

# The out-of-memory error of any device: torch.OutOfMemoryError from torch 2.5, before that the
# CUDA one (which the CPU's allocator does not raise).
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_generators(device: torch.device, seed: int) -> None:
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
            no_tf32 = _attributes_set([(torch.backends.cudnn, "allow_tf32", False),
                                       (torch.backends.cuda.matmul, "allow_tf32", False)])
            with no_tf32, _sdpa_math_kernel(), _eager(model), _checkpoints_run_directly(), \
                    _weight_norm_composite(), _native_recurrent_kernels(model, device), _full_precision(device):
                yield
    finally:
        for module, flag in flags:
            module.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)


# ----------------------------------------------------------------------------- the function


class ModelFunction:
    """``(model, loss_fn, batch)`` as pure functions of a parameter dict.

    Parameters are those of ``model`` that require grad (or the subset named in ``params``); the
    others and all buffers are held fixed, buffers as copies. Every method takes an optional
    parameter dict ``p`` (default: the model's current values) and returns tensors on the model's
    device; none of them writes to the model. Call the methods inside :func:`isolated` (the
    measurements do) so that mode, RNG and attention kernel are those of a measurement.

    Half precision: a float16 or bfloat16 parameter, buffer, input or target is computed in
    float32, at the same values (a float32 copy; the model keeps its own tensors). Products of
    half-precision arithmetic carry ~1e-2 relative error, which no eigensolver or trace estimate
    can get below, and a half-precision Krylov basis cannot stay orthogonal. The cost is a float32
    copy of those tensors and float32 activations.

    Args:
        model: any ``nn.Module``; wrappers are stripped (:func:`unwrap_model`), so parameter
            names are those of the module inside a ``torch.compile`` or data-parallel wrapper.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss, a scalar.
        batch: ``(inputs, targets)``, moved to the model's device.
        params: names of the parameters to differentiate (default: all trainable ones).
        seed: in train mode, every evaluation reseeds the torch generators of the model's device
            with it, so dropout draws the same masks each time (call inside :func:`isolated`,
            which restores the generators afterwards).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        batch: Any,
        params: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model = unwrap_model(model)
        self.seed = seed
        self.loss_fn = loss_fn
        trainable = trainable_parameters(model)
        if not trainable:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (none has requires_grad=True); "
                "dynlens measures the training of parameters, so unfreeze at least one"
            )
        if params is not None:
            unknown = [n for n in params if n not in trainable]
            if unknown:
                raise ValueError(
                    f"unknown or frozen parameter names {unknown}; choose from {list(trainable)}"
                )
            chosen = list(params)
        else:
            chosen = list(trainable)
        self.device = model_device(model)
        self.params: Params = {n: _widened(trainable[n].detach()) for n in chosen}
        self.fixed: Params = {
            n: _widened(p.detach()) for n, p in model.named_parameters() if n not in self.params
        }
        self.buffers: Params = {n: _widened(b.detach()).clone() for n, b in model.named_buffers()}
        inputs, targets = split_batch(batch)
        self.inputs = _widened_tree(to_device(inputs, self.device))
        self.targets = _widened_tree(to_device(targets, self.device))
        self.size = batch_size(self.inputs)

    # -- helpers ------------------------------------------------------------------------

    @property
    def num_params(self) -> int:
        """P, the number of differentiated parameters (entries, not tensors)."""
        return sum(p.numel() for p in self.params.values())

    def vector(self, p: Params | None = None) -> Tensor:
        """The parameters as one flat vector (a copy)."""
        return flatten(self.params if p is None else p)

    def as_params(self, vector: Tensor) -> Params:
        """A flat vector split into a parameter-shaped dict (views)."""
        return unflatten(vector, self.params)

    def _p(self, p: Params | None) -> Params:
        return self.params if p is None else p

    def outputs(self, p: Params | None = None, inputs: Any = None) -> Any:
        """f(x; p): the model outputs on ``inputs`` (default: the batch inputs)."""
        # In train mode BatchNorm updates its running statistics in place; torch.func forbids
        # mutating a captured tensor, so each call gets its own copies (buffers are small).
        buffers = self.buffers
        if self.model.training:
            buffers = {n: b.clone() for n, b in self.buffers.items()}
            # the same dropout masks in every evaluation, so that the function is deterministic
            _seed_generators(self.device, self.seed)
        state = (self._p(p), self.fixed, buffers)
        x = self.inputs if inputs is None else inputs
        if isinstance(x, Mapping):
            return functional_call(self.model, state, (), dict(x))
        args = x if isinstance(x, tuple) else (x,)
        return functional_call(self.model, state, args)

    def _loss_of(self, outputs: Any, targets: Any) -> Tensor:
        return check_loss(self.loss_fn(outputs, targets))

    def loss(self, p: Params | None = None) -> Tensor:
        """L(p): the mean loss over the batch (a scalar tensor)."""
        return self._loss_of(self.outputs(p), self.targets)

    def _example_loss(self, p: Params, x: Any, y: Any) -> Tensor:
        return self._loss_of(self.outputs(p, _unsqueeze(x)), _unsqueeze(y))

    def per_example_losses(self, p: Params | None = None, chunk_size: int | None = 256) -> Tensor:
        """(l_1, ..., l_m): loss_fn applied to each example alone (vmap), shape (m,)."""
        fn = vmap(
            self._example_loss,
            in_dims=(None, _example_dims(self.inputs), _example_dims(self.targets)),
            chunk_size=chunk_size,
            randomness="different",
        )
        return fn(self._p(p), self.inputs, self.targets)

    def activation_bytes(self, examples: int = 1) -> int:
        """Bytes the autograd graph saves for a gradient of the loss on the first ``examples``
        examples: the activations a backward pass keeps, counted once per storage, parameters
        and buffers left out. One forward pass, nothing kept. Memory models multiply it (a
        Hessian-vector product through the first-order graph holds about 3–4 times it per
        example; ``benchmarks/RESULTS.md``)."""
        examples = min(examples, self.size)
        # the model's own tensors and the batch are held anyway (a slice of the batch shares
        # the whole batch's storage)
        held = [*self.params.values(), *self.fixed.values(), *self.buffers.values(),
                *(t for t in (self.inputs, self.targets) if isinstance(t, Tensor))]
        owned = {t.untyped_storage().data_ptr() for t in held}
        seen: set[int] = set()
        total = [0]

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in owned and key not in seen:
                seen.add(key)
                total[0] += storage.nbytes()
            # a detached alias: returning the tensor itself would tie the graph into a
            # reference cycle that kept one example's activations alive after every call
            return t.detach()

        leaves = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
        inputs = slice_examples(self.inputs, 0, examples)
        targets = slice_examples(self.targets, 0, examples)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self._loss_of(self.outputs(leaves, inputs), targets)
        return total[0]

    # -- first order ----------------------------------------------------------------------

    def grad(self, p: Params | None = None) -> Params:
        """The gradient of the mean loss, a parameter-shaped dict. Cost: one backward pass."""
        p = self._p(p)
        leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        with torch.enable_grad():
            value = self.loss(leaves)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}

    def per_example_grads(self, chunk_size: int = 64, p: Params | None = None) -> Iterator[tuple[int, Params]]:
        """Yield ``(start, grads)`` for consecutive chunks of examples.

        ``grads[name]`` has shape (chunk, *param.shape): the gradient of l_i for each example of
        the chunk (``vmap`` of ``grad``). Peak memory grows with ``chunk_size``, not with m.
        """
        for start in range(0, self.size, chunk_size):
            yield start, self.per_example_grads_of(start, min(start + chunk_size, self.size), p)

    def jvp(self, v: Params, p: Params | None = None) -> Any:
        """J v: the directional derivative of the outputs along ``v`` (same structure as outputs)."""
        return jvp(self.outputs, (self._p(p),), (v,))[1]

    def vjp(self, u: Any, p: Params | None = None) -> Params:
        """Jᵀ u: the outputs' vector-Jacobian product with a cotangent ``u`` shaped like the outputs."""
        _, pullback = vjp(self.outputs, self._p(p))
        return pullback(u)[0]

    # -- second order ---------------------------------------------------------------------

    def hvp(self, v: Params, p: Params | None = None) -> Params:
        """H v by forward-over-reverse (``jvp`` of ``grad``): one forward and backward pass with
        dual numbers, about 3 gradients; nothing is kept between calls."""
        return jvp(grad(self.loss), (self._p(p),), (v,))[1]

    def ggn_vp(self, v: Params, p: Params | None = None) -> Params:
        """G v = Jᵀ (∇²_f loss) J v, the generalised Gauss-Newton product (PSD for convex losses).
        Cost: one forward with a JVP, a Hessian-vector product in output space, one VJP."""
        p = self._p(p)
        out, pullback = vjp(self.outputs, p)
        jv = jvp(self.outputs, (p,), (v,))[1]
        targets = self.targets

        def output_grad(z: Any) -> Any:
            return grad(lambda zz: self._loss_of(zz, targets))(z)

        h_jv = jvp(output_grad, (out,), (jv,))[1]
        return pullback(h_jv)[0]

    def hvp_operator(self, method: Literal["auto", "reuse", "forward_over_reverse"] = "auto") -> Callable[[Tensor], Tensor]:
        """Return a matvec ``v -> H v`` over flat vectors at the current parameters.

        ``"reuse"`` builds the gradient's graph once (``create_graph=True``) and differentiates it
        again for every product, as PyHessian does: each product then costs one backward pass
        through that graph (about 2 gradients on the CPU) at the price of keeping the first-order
        graph in memory. ``"forward_over_reverse"`` keeps nothing and costs about 3 gradients per
        product. ``"auto"`` takes whichever is faster here (:meth:`fastest_hvp_method`).
        """
        return self.curvature_products("hessian", method)[0]

    # --- curvature operators ---
    # Batched curvature products for the Hessian measurements (dynlens.measures.hessian).

    def fastest_hvp_method(self) -> Literal["reuse", "forward_over_reverse"]:
        """The faster Hessian-vector product for this model, device and batch, timed once.

        Which one wins depends on the layers and the device: on the CPU the reused graph costs
        about 2 gradients a product and forward-over-reverse 3 to 4; on an H100 a ResNet-18's
        reused graph costs 2.2 against 3.1 by forward-over-reverse (4.8 with PyTorch's own double
        backward of convolutions, whose weight term cuDNN runs with a slow implicit-GEMM kernel;
        :mod:`dynlens.convgrad` avoids it), a transformer's 2.5 against 3.6. Times two products of
        each kind (the first as a warm-up) and remembers the answer for this (model, device,
        parameter count, batch size, mode); a method that fails here (forward-mode rules missing
        in torch) is not chosen.
        """
        key = (id(self.model), type(self.model).__name__, str(self.device), self.num_params,
               self.size, self.model.training)
        choice = _FASTEST_HVP.get(key)
        if choice is None:
            times = {}
            vector = gaussian_vector(self.num_params, torch.Generator().manual_seed(0),
                                     next(iter(self.params.values())).dtype, self.device)
            for method in ("reuse", "forward_over_reverse"):
                single = self.curvature_products("hessian", method)[0]
                try:
                    single(vector)
                except RuntimeError:
                    # some backward formulas have no forward-mode derivative in some torch
                    # versions (e.g. mse_loss in 2.13: "ZeroTensors are immutable")
                    if method == "reuse":
                        raise
                    continue
                _synchronize(self.device)
                start = time.perf_counter()
                single(vector)
                _synchronize(self.device)
                times[method] = time.perf_counter() - start
                del single
            choice = min(times, key=times.__getitem__)
            _FASTEST_HVP[key] = choice
        return choice  # type: ignore[return-value]

    @staticmethod
    def _once_differentiable_functions(value: Tensor) -> list[str]:
        """Names of the custom autograd Functions in ``value``'s graph whose backward is
        ``@once_differentiable`` (autograd would treat their second derivative as zero without error)."""
        found: list[str] = []
        seen: set[int] = set()
        stack = [value.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            forward_cls = getattr(node, "_forward_cls", None)
            backward = getattr(forward_cls, "backward", None)
            code = getattr(backward, "__code__", None)
            if (hasattr(backward, "__wrapped__") and code is not None and code.co_name == "wrapper"
                    and code.co_filename.replace("\\", "/").endswith("autograd/function.py")):
                found.append(forward_cls.__name__)
            stack.extend(child for child, _ in node.next_functions)
        return sorted(set(found))

    def curvature_products(
        self,
        curvature: Literal["hessian", "ggn"] = "hessian",
        method: Literal["auto", "reuse", "forward_over_reverse"] = "reuse",
        max_columns: int = 16,
    ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor]:
        """Return ``(matvec, matmat, gradient)`` of the curvature matrix at the current parameters.

        ``matvec(v)`` is C v for a flat ``v`` (P,); ``matmat(V)`` is C V for ``V`` (P, b), computed
        ``max_columns`` columns at a time as one batched product where autograd allows it
        (``is_grads_batched=True`` for the reused graph, ``vmap`` otherwise), else column by
        column; ``gradient`` is the flat gradient ḡ (P,). C is the Hessian, or the GGN
        (``curvature="ggn"``, always by ``torch.func``: one JVP, an output-space HVP, one VJP).

        ``method="reuse"`` builds the gradient's graph once (one backward pass with
        ``create_graph=True``, convolutions routed by :func:`dynlens.convgrad.fast_conv_second_order`
        so that their second derivatives use the first-order kernels) and differentiates it for
        every product (about 2 gradients each, holding the first-order graph in memory);
        ``"forward_over_reverse"`` keeps nothing and costs about 3 gradients a product; ``"auto"``
        the faster of the two (:meth:`fastest_hvp_method`). Raises ValueError if the loss is not
        finite or not twice differentiable.
        """
        if method == "auto":
            method = self.fastest_hvp_method() if curvature == "hessian" else "forward_over_reverse"
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if method not in ("reuse", "forward_over_reverse"):
            raise ValueError(f"method must be 'auto', 'reuse' or 'forward_over_reverse', got {method!r}")
        leaf_list = [t.detach().requires_grad_(True) for t in self.params.values()]
        leaves = dict(zip(self.params, leaf_list, strict=True))
        keep_graph = curvature == "hessian" and method == "reuse"
        # PyTorch's double backward of a convolution runs one term with a slow cuDNN kernel; the
        # reused graph records convolutions whose derivatives use the first-order kernels instead
        routing = fast_conv_second_order() if keep_graph else contextlib.nullcontext()
        with torch.enable_grad(), routing:
            value = self.loss(leaves)
            if not bool(torch.isfinite(value.detach())):
                raise ValueError(
                    f"the loss on the batch is {float(value.detach())}; curvature is undefined at a non-finite "
                    "loss — check the inputs, the learning rate and the loss function"
                )
            if value.grad_fn is None:
                raise ValueError(
                    "the loss does not depend differentiably on the parameters (it has no autograd "
                    "graph: argmax, rounding, detach or no_grad inside loss_fn or the model?); "
                    "Hessian measurements need a twice differentiable loss"
                )
            once = self._once_differentiable_functions(value)
            if once:
                raise ValueError(
                    f"the loss is not twice differentiable: {', '.join(once)} marked its backward "
                    "@once_differentiable, so second derivatives through it would silently be zero; "
                    "give it a differentiable backward (or a torch.func-compatible jvp)"
                )
            grads = torch.autograd.grad(value, leaf_list, create_graph=keep_graph, allow_unused=True)
        gradient = flatten([torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaf_list, grads, strict=True)])
        if not bool(torch.isfinite(gradient).all()):
            raise ValueError("the gradient holds non-finite entries; curvature is undefined there")

        if curvature == "ggn":
            def single(vector: Tensor) -> Tensor:
                return flatten(self.ggn_vp(self.as_params(vector)))
        elif method == "forward_over_reverse":
            def single(vector: Tensor) -> Tensor:
                return flatten(self.hvp(self.as_params(vector)))
        else:
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

            def backward(vectors: list[Tensor], batched: bool) -> Tensor:
                with torch.enable_grad():
                    try:
                        hv = torch.autograd.grad(
                            [grads[i] for i in used], leaf_list, [vectors[i] for i in used],
                            retain_graph=True, allow_unused=True, is_grads_batched=batched,
                        )
                    except RuntimeError as err:
                        if "torch.compile" in str(err) and "double backward" in str(err):
                            raise ValueError(
                                f"{err}: a submodule wrapped by torch.compile runs compiled code, which "
                                "has no second derivatives, and torch < 2.6 cannot switch it to eager for "
                                "a measurement; measure the uncompiled module (it shares the "
                                "parameters), compile the whole model instead (that wrapper is stripped), "
                                "or use torch >= 2.6"
                            ) from err
                        if "differentiate" in str(err) or "does not require grad" in str(err):
                            raise ValueError(
                                f"the loss is not twice differentiable through this model ({err}); "
                                "Hessian measurements need second derivatives of every operation"
                            ) from err
                        raise
                shape = (vectors[0].shape[0],) if batched else ()
                return torch.cat([
                    (torch.zeros(shape + t.shape, dtype=t.dtype, device=t.device) if h is None else h)
                    .reshape(*shape, -1)
                    for t, h in zip(leaf_list, hv, strict=True)
                ], dim=-1)

            def single(vector: Tensor) -> Tensor:
                if not used:
                    return torch.zeros_like(vector)
                return backward(list(unflatten(vector, self.params).values()), batched=False)

            def batched_reuse(block: Tensor) -> Tensor:
                rows = block.T.contiguous()
                parts, offset = [], 0
                for t in self.params.values():
                    parts.append(rows[:, offset : offset + t.numel()].reshape(-1, *t.shape))
                    offset += t.numel()
                return backward(parts, batched=True).T

        batched_fn: list[Callable[[Tensor], Tensor] | None] = [None]
        if curvature == "hessian" and method == "reuse":
            batched_fn[0] = batched_reuse if used else None
        else:
            batched_fn[0] = lambda block: vmap(single, in_dims=1, out_dims=1)(block)

        def matmat(block: Tensor) -> Tensor:
            out = []
            for start in range(0, block.shape[1], max_columns):
                chunk = block[:, start : start + max_columns]
                fn = batched_fn[0]
                if fn is not None and chunk.shape[1] > 1:
                    try:
                        out.append(fn(chunk))
                        continue
                    except (RuntimeError, NotImplementedError):  # a layer without a batching rule
                        batched_fn[0] = None
                out.append(torch.stack([single(chunk[:, i]) for i in range(chunk.shape[1])], dim=1))
            return torch.cat(out, dim=1)

        return single, matmat, gradient

    # --- per-example statistics ---------------------------------------------------------

    def per_example_grads_of(self, start: int, stop: int, p: Params | None = None) -> Params:
        """Per-example gradients of examples ``start:stop`` by ``vmap`` of ``grad``: a dict of
        (stop − start, *param.shape) tensors. Peak memory grows with ``stop − start``."""
        fn = vmap(
            grad(self._example_loss),
            in_dims=(None, _example_dims(self.inputs), _example_dims(self.targets)),
            randomness="different",
        )
        x = slice_examples(self.inputs, start, stop)
        y = slice_examples(self.targets, start, stop)
        return fn(self._p(p), x, y)

    def per_example_grads_loop(self, start: int, stop: int, p: Params | None = None) -> Params:
        """The same as :meth:`per_example_grads_of`, one example at a time with
        ``torch.autograd.grad`` on fresh leaves (``.grad`` is never written): the slower path for
        models ``vmap`` cannot run (in-place ops on batched tensors, data-dependent control flow).
        Cost: one forward and backward pass per example."""
        p = self._p(p)
        leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        rows: list[list[Tensor]] = []
        with torch.enable_grad():
            for i in range(start, stop):
                x = slice_examples(self.inputs, i, i + 1)
                y = slice_examples(self.targets, i, i + 1)
                value = self._loss_of(self.outputs(leaves, x), y)
                grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                rows.append([torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads, strict=True)])
        return {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(leaves)}
