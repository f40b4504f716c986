"""The model as a function: (model, loss_fn, batch) turned into pure functions of a parameter dict.

Everything above this layer (measurements, probes, the Lens) computes through
:class:`ModelFunction`, so this is where the "no side effects" promise is kept:

* parameters are read through ``detach()`` views and differentiated with ``torch.func`` or
  ``torch.autograd.grad`` on fresh leaves, never ``backward()``: a parameter's ``.grad`` is never
  written;
* buffers are passed to ``functional_call`` as copies, so BatchNorm running statistics never move;
* the methods run inside :func:`dynlens.isolation.isolated`, which puts the model in eval mode
  (or train mode on request), forks the random states and switches what would make second
  derivatives inexact or impossible, restoring all of it on exit.

The layer's other modules: :mod:`dynlens.batches` (a batch is ``(inputs, targets)``; the loss of
one example), :mod:`dynlens.parameters` (parameters by name, flat vectors, the module that owns a
parameter) and :mod:`dynlens.isolation`. Their names used across the project are re-exported
here, so ``from dynlens.functional import isolated, split_batch, flatten`` keeps working.

HVP means Hessian-vector product, GGN the generalised Gauss-Newton matrix J^T (d^2 loss/d f^2) J,
JVP/VJP Jacobian-vector and vector-Jacobian products of the model outputs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from dynlens.batches import (
    _example_dims,
    _unreduced,  # noqa: F401 - re-exported: tests/test_functional.py
    _unsqueeze,
    _widened,
    _widened_tree,
    batch_size,
    call_model,
    check_loss,
    example_losses,
    slice_examples,
    split_batch,
    to_device,
)
from dynlens.convgrad import fast_conv_second_order
from dynlens.distributed import gather_sizes, refuse_sharded, weighted_sum
from dynlens.isolation import (
    Mode,  # noqa: F401 - re-exported: the probes
    _seed_generators,
    _tf32,  # noqa: F401 - re-exported: dynlens.probes.hessian
    _weight_norm_composite,  # noqa: F401 - re-exported: benchmarks/second_derivatives.py
    isolated,
)
from dynlens.linalg.operator import gaussian_vector
from dynlens.parameters import (
    Params,
    flatten,
    model_device,
    trainable_parameters,
    unflatten,
    unwrap_model,
)

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


_FASTEST_HVP: dict[tuple, str] = {}

# The out-of-memory error of any device: torch.OutOfMemoryError from torch 2.5, before that the
# CUDA one (which the CPU's allocator does not raise).
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# what a device library says when its own allocation fails (not the caching allocator's
# OutOfMemoryError): the CUDA runtime's error, cuBLAS's and cuDNN's workspaces
_ALLOCATION_FAILED = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the device ran out of memory: the caching allocator's
    :data:`OutOfMemoryError`, or a runtime error of the CUDA runtime or of cuBLAS or cuDNN
    failing to allocate (``torch.AcceleratorError: CUDA error: out of memory``, raised where
    another process holds the rest of the GPU: a ViT-H/14 in the model zoo)."""
    if isinstance(err, OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _ALLOCATION_FAILED)


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for off CUDA): timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        group: a ``torch.distributed`` process group whose ranks each hold a shard of the batch
            (None: the batch is all here). Then :meth:`loss`, :meth:`grad`, :meth:`hvp` and
            :meth:`ggn_vp` are those of the whole batch, the shards concatenated in rank order:
            size-weighted sums over ranks of each shard's (``L = Σ_r (m_r/m) L_r``), the same
            value on every rank (every rank must call them together, with the same ``v``).
            ``size`` stays this shard's m_r; ``total_size`` is m. Per-example methods, outputs,
            JVP/VJP and :meth:`curvature_products` stay this shard's; see
            :mod:`dynlens.distributed` for the failure contract. Construction is a collective.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        batch: Any,
        params: Sequence[str] | None = None,
        seed: int = 0,
        group: Any = None,
    ) -> None:
        self.model = model = unwrap_model(model)
        refuse_sharded(model, "dynlens's functional view of the model (loss, gradients, curvature, "
                              "per-example gradients, NTK)")
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
        self.group = group
        self.shard_sizes = [self.size] if group is None else gather_sizes(self.size, group)
        self.total_size = sum(self.shard_sizes)
        # this shard's weight in the whole batch's mean
        self.share = self.size / self.total_size if self.total_size else 1.0

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
        """L(p): the mean loss over the batch (a scalar tensor); with a ``group``, over the whole
        batch (every rank's shard), not differentiable."""
        value = self._local_loss(p)
        return value if self.group is None else weighted_sum(value.detach(), self.share, self.group)

    def _local_loss(self, p: Params | None = None) -> Tensor:
        """The mean loss over this rank's examples (differentiable)."""
        return self._loss_of(self.outputs(p), self.targets)

    def _reduced(self, values: Params) -> Params:
        """A parameter-shaped dict of this shard's mean-loss derivatives as the whole batch's."""
        if self.group is None:
            return values
        return self.as_params(weighted_sum(flatten(values), self.share, self.group))

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
        return self.outputs_and_activation_bytes(examples)[1]

    def outputs_and_activation_bytes(self, examples: int = 1) -> tuple[Any, int]:
        """The model's outputs on the first ``examples`` examples (detached) and
        :meth:`activation_bytes`, from the one forward pass that counts them: for a caller that
        needs both (the outputs' size and a memory plan), one pass instead of two."""
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
            outputs = self.outputs(leaves, inputs)
            self._loss_of(outputs, targets)
        return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, outputs), total[0]

    # -- first order ----------------------------------------------------------------------

    def grad(self, p: Params | None = None) -> Params:
        """The gradient of the mean loss, a parameter-shaped dict (with a ``group``: the whole
        batch's, one all-reduce). Cost: one backward pass."""
        p = self._p(p)
        leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
        with torch.enable_grad():
            value = self._local_loss(leaves)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return self._reduced({n: torch.zeros_like(t) if g is None else g
                              for (n, t), g in zip(leaves.items(), grads)})

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
        dual numbers, about 3 gradients; nothing is kept between calls. With a ``group``: the
        whole batch's H v (every rank passes the same ``v``)."""
        return self._reduced(self._local_hvp(v, p))

    def _local_hvp(self, v: Params, p: Params | None = None) -> Params:
        return jvp(grad(self._local_loss), (self._p(p),), (v,))[1]

    def ggn_vp(self, v: Params, p: Params | None = None) -> Params:
        """G v = Jᵀ (∇²_f loss) J v, the generalised Gauss-Newton product (PSD for convex losses).
        Cost: one forward with a JVP, a Hessian-vector product in output space, one VJP. With a
        ``group``: the whole batch's (every rank passes the same ``v``)."""
        return self._reduced(self._local_ggn_vp(v, p))

    def _local_ggn_vp(self, v: Params, p: Params | None = None) -> Params:
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
        single = self.curvature_products("hessian", method)[0]
        if self.group is None:
            return single
        return lambda v: weighted_sum(single(v), self.share, self.group)

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

        With a ``group`` these are this rank's shard's products and gradient, not reduced
        (:func:`dynlens.measures.hessian.curvature_operator` reduces them).
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
            value = self._local_loss(leaves)
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
                return flatten(self._local_ggn_vp(self.as_params(vector)))
        elif method == "forward_over_reverse":
            def single(vector: Tensor) -> Tensor:
                return flatten(self._local_hvp(self.as_params(vector)))
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
