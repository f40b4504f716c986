"""Per-example gradient sources for gradient coherence: layer hooks, ``vmap`` and the loop.

:class:`_Gradients` gives the per-example gradients g_i = ∇ℓ_i of any range of examples of a
batch, one representation per parameter tensor, as a stream of groups that the accumulation
(:mod:`dynlens.measures._coherence_accumulation`) reduces and frees one by one:

* layer hooks (:mod:`dynlens.measures.layer_grads`): one batched forward and one backward give
  the per-example gradients of Linear, Conv and BatchNorm layers, the weights of linear layers
  kept factored (g_i = δ_i a_iᵀ), checked against examples evaluated alone;
* ``torch.func.vmap`` of ``grad`` (:meth:`dynlens.functional.ModelFunction.per_example_grads_of`)
  for the other parameters, or for all of them;
* a loop of one backward pass per example when ``vmap`` cannot run the model
  (``fallback="loop"``), or :class:`VmapUnsupportedError` naming the layer (``fallback="error"``).

The statistics themselves are in :mod:`dynlens.measures.coherence`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from dynlens.batches import _example_dims, batch_size, example_losses, slice_examples
from dynlens.functional import ModelFunction, OutOfMemoryError
from dynlens.measures.layer_grads import HookedLayer, Rep, hookable_layers
from dynlens.parameters import failing_module

__all__ = ["Fallback", "VmapUnsupportedError"]

Fallback = Literal["loop", "error"]

# Layer hooks are used only when the hooked layers hold at least this share of the parameters:
# otherwise the vmap pass for the rest dominates and the batched pass would only add to it.
HOOKED_SHARE = 0.5
# The factored path's batched forward is checked against this many examples of each chunk (evenly
# spaced), each evaluated alone by vmap.
CHECKED_EXAMPLES = 4


class VmapUnsupportedError(RuntimeError):
    """``torch.func.vmap`` cannot compute the per-example gradients of this model."""



class _NotFactorable(Exception):
    """The hooked layers' per-example gradients cannot be taken from one batched pass (the vmap
    path is used)."""


def _restricted(fn: ModelFunction, params: Sequence[str] | None = None, batch: tuple[Any, Any] | None = None,
                size: int | None = None) -> ModelFunction:
    """``fn`` differentiating only ``params`` (the others held fixed), or on the examples
    ``batch`` (``size`` of them): a shallow copy sharing every tensor. A new ModelFunction would
    copy the buffers again, and for a half-precision model widen every parameter again."""
    new = copy.copy(fn)
    if params is not None:
        new.params = {n: fn.params[n] for n in params}
        new.fixed = {**fn.fixed, **{n: t for n, t in fn.params.items() if n not in new.params}}
    if batch is not None:
        new.inputs, new.targets = batch
        new.size = size
    return new


Group = list[tuple[int, Rep]]  # (index of the parameter in fn.params, its per-example gradients)


class _Gradients:
    """Per-example gradients of any example range, one representation per parameter tensor: an
    (n, P_k) matrix in the parameters' dtype (by vmap, the loop, or a layer's hook rule), or for
    the weights of linear layers on (batch, features) inputs the factors of g_i = δ_i a_iᵀ
    (:class:`Outer`; their biases :class:`BiasOf`). A chunk comes as a stream of groups, one per
    hooked layer and then one for the parameters taken by vmap, so that the consumer can reduce
    and free each before the next is formed: at most one hooked layer's gradients exist at a time.

    The examples are taken in batch order, or in ``order`` (a device index of the batch) when it
    is set: coherence sorts them by class when per-class sums must be carried across chunks.

    The hooked path (:mod:`dynlens.measures.layer_grads`) is checked without waiting on the
    device: each chunk's batched per-example losses of a few examples are compared with those
    examples evaluated alone, and the comparisons are and-ed into one device flag that
    :meth:`verified` reads once, after the last chunk."""

    def __init__(self, fn: ModelFunction, fallback: Fallback, hooks: bool | Literal["auto"] = True) -> None:
        self.fn = fn
        self.chunk_size = 64
        self.agrees: Tensor | None = None  # device bool: every checked chunk matched the reference
        self.fallback = fallback
        self.method = "vmap"
        self.notes: list[str] = []
        self.order: Tensor | None = None
        self.index = {name: k for k, name in enumerate(fn.params)}
        self.layers: list[HookedLayer] = hookable_layers(fn.model, fn.params) if hooks is not False else []
        hooked = sum(fn.params[p].numel() for layer in self.layers for p in layer.params)
        if hooked < HOOKED_SHARE * fn.num_params:
            self.layers = []  # the vmap pass dominates; a batched pass on top would only add
        self.rest: ModelFunction | None = None
        if self.layers:
            taken = {p for layer in self.layers for p in layer.params}
            rest = [n for n in fn.params if n not in taken]
            if rest:
                self.rest = _restricted(fn, rest)

    @property
    def hooked(self) -> bool:
        return bool(self.layers)

    @property
    def description(self) -> str:
        if not self.layers:
            return self.method
        return "hooks" + (f" + {self.method}" if self.rest is not None else "")

    def bytes_per_example(self) -> int:
        """An estimate of one example's per-example gradients, for the chunk size's speed rule:
        P_k entries in the parameters' dtype per parameter by vmap; for a hooked layer its input,
        output gradient and representation (:meth:`HookedLayer.bytes_per_example`)."""
        taken = {p for layer in self.layers for p in layer.params}
        total = sum(t.numel() * t.element_size() for n, t in self.fn.params.items() if n not in taken)
        total += sum(layer.bytes_per_example() for layer in self.layers)
        return max(total, 1)

    def drop_hooks(self, why: str | None = None) -> None:
        """Take every parameter's gradients by vmap from now on (with a note saying ``why``)."""
        if why is not None:
            self.notes.append(f"layer hooks not used ({why}); all gradients by vmap")
        self.layers, self.rest, self.agrees = [], None, None

    def pairs_prefer_vmap(self, chunk: int, m: int, stiffness: bool) -> bool:
        """Whether ``hooks="auto"`` should take vmap instead: on GPUs, for stiffness over a batch
        split into chunks, when the model has convolutions. Stiffness visits every pair of chunks,
        each visit a new pass, and the hooks' chunks (their estimate counts the patches) are
        smaller; on an H100 a ResNet-18 took 102 against 56 ms (width 16, m = 256) and 247
        against 159 (width 64, m = 64), while the hooks won without stiffness (42 against 55, 68
        against 71) and for small CNNs whose batch is one chunk (c32: 3.7 against 4.5 ms with
        stiffness, replayed; benchmarks/RESULTS.md). On the CPU the hooks won everywhere."""
        return (stiffness and chunk < m and self.fn.device.type != "cpu"
                and any(layer.kind == "conv" for layer in self.layers))

    def verified(self) -> bool:
        """Whether every factored chunk's batched losses matched the examples evaluated alone
        (one device-to-host read)."""
        return self.agrees is None or bool(self.agrees)

    def _examples(self, start: int, stop: int) -> tuple[Any, Any]:
        """Inputs and targets of examples start:stop (views), or of those positions of ``order``."""
        fn = self.fn
        if self.order is None:
            return slice_examples(fn.inputs, start, stop), slice_examples(fn.targets, start, stop)
        index = self.order[start:stop]

        def take(t: Any) -> Any:
            return t.index_select(0, index) if isinstance(t, Tensor) and t.dim() > 0 else t

        return tree_map(take, fn.inputs), tree_map(take, fn.targets)

    def _reference_losses(self, x: Any, y: Any, step: int) -> Tensor:
        """ℓ_i of the checked examples 0, step, 2·step, ... of the chunk (x, y), each evaluated
        alone (vmap): the batched forward must match them. A layer that mixes examples changes
        every example's loss; Python control flow on tensor values, which the batched forward
        would take for the whole batch, makes vmap fail."""
        fn = self.fn
        n = batch_size(x)
        x, y = slice_examples(x, 0, n, step), slice_examples(y, 0, n, step)
        try:
            alone = torch.func.vmap(fn._example_loss, in_dims=(None, _example_dims(x), _example_dims(y)),
                                    randomness="different")
            return alone(fn.params, x, y).detach()
        except OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - the dense path reports or works around it
            raise _NotFactorable(f"{type(err).__name__} evaluating examples alone") from err

    def chunk(self, start: int, stop: int) -> Iterator[Group]:
        """The chunk's per-example gradients as a stream of groups (see the class); the hooked
        path raises :class:`_NotFactorable` when the hooked layers' gradients cannot be taken from
        one batched pass (the caller drops the hooks and starts over)."""
        x, y = self._examples(start, stop)
        if self.layers:
            return self._hooked(x, y, stop - start)
        return iter([self._dense(self.fn, x, y, stop - start)])

    def _dense(self, fn: ModelFunction, x: Any, y: Any, n: int) -> Group:
        fn = _restricted(fn, batch=(x, y), size=n)
        if self.method != "loop":
            try:
                grads = fn.per_example_grads_of(0, n)
            except OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any vmap failure is reported or worked around
                self._vmap_failed(err)
                grads = fn.per_example_grads_loop(0, n)
        else:
            grads = fn.per_example_grads_loop(0, n)
        return [(self.index[name], grads.pop(name).reshape(n, -1)) for name in list(grads)]

    def _hooked(self, x: Any, y: Any, n: int) -> Iterator[Group]:
        """One batched forward with hooks on the layers, the per-example losses
        (:func:`dynlens.functional.example_losses`), one backward to the layers' outputs: their
        inputs and δ_i, from which each layer's rule gives its per-example gradients, one layer
        at a time. Then the check against examples evaluated alone, and the other parameters'
        gradients by vmap (a pass of its own, after this one's tensors are freed)."""
        fn = self.fn
        records: dict[str, list[tuple[Tensor, Tensor] | None]] = {layer.name: [] for layer in self.layers}

        def recorder(layer: HookedLayer) -> Callable[..., Tensor | None]:
            def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
                saved = layer.saved(args, output, n)
                if saved is None:
                    records[layer.name].append(None)
                    return None
                z = output if output.requires_grad else output.detach().requires_grad_(True)
                records[layer.name].append((saved, z))
                versions[layer.name] = z._version
                return z

            return hook

        versions: dict[str, int] = {}
        handles = [layer.module.register_forward_hook(recorder(layer)) for layer in self.layers]
        try:
            with torch.enable_grad():
                out = fn.outputs(None, x)
        except RuntimeError as err:
            if "in-place" not in str(err):
                raise
            # a layer's output, taken as a leaf to read its gradient, modified in place by the next
            # operation (AlexNet's ReLU(inplace=True) after its first convolution)
            raise _NotFactorable(f"a hooked layer's output is modified in place: {err}") from err
        finally:
            for handle in handles:
                handle.remove()
        for layer in self.layers:
            calls = records[layer.name]
            if len(calls) != 1 or calls[0] is None:
                raise _NotFactorable(f"layer {layer.name!r} is called {len(calls)} times or not on a "
                                     "batched input")
            if calls[0][1]._version != versions[layer.name]:
                # its gradient would be the modified tensor's (after the ReLU), not the layer's
                raise _NotFactorable(f"layer {layer.name!r}'s output is modified in place by the "
                                     "operation after it")
        if not (isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == n
                and isinstance(y, Tensor) and y.dim() > 0 and y.shape[0] == n):
            raise _NotFactorable("outputs and targets are not tensors with a batch dimension")

        with torch.enable_grad():
            losses = example_losses(fn.loss_fn, out, y)
        del out
        saved: list[Tensor | None] = [records[layer.name][0][0] for layer in self.layers]
        outputs = [records[layer.name][0][1] for layer in self.layers]
        records.clear()
        with torch.enable_grad():
            deltas: list[Tensor | None] = list(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
        deltas = [torch.zeros_like(z) if d is None else d.detach() for z, d in zip(outputs, deltas, strict=True)]
        losses = losses.detach()
        del outputs
        for k, layer in enumerate(self.layers):
            reps = layer.gradients(saved[k], deltas[k], n)
            saved[k] = deltas[k] = None
            yield [(self.index[name], reps.pop(name)) for name in list(reps)]
        # the check last, when this pass's tensors are freed: its forward then adds to nothing
        step = -(-n // CHECKED_EXAMPLES)
        reference = self._reference_losses(x, y, step)
        # rounding differs between a batch and one example: 1e-10 in float64, 1e-4 in float32,
        # 8 units of the last place in 16-bit types (a layer mixing examples changes far more)
        tolerance = 1e-10 if losses.dtype == torch.float64 else max(1e-4, 8 * torch.finfo(losses.dtype).eps)
        agrees = torch.isclose(losses[::step], reference, rtol=tolerance, atol=tolerance).all()
        self.agrees = agrees if self.agrees is None else self.agrees & agrees
        if self.rest is not None:
            yield self._dense(self.rest, x, y, n)

    def _vmap_failed(self, err: BaseException) -> None:
        where = failing_module(self.fn.model, err)
        what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        place = f" in layer {where}" if where else ""
        if self.fallback == "error":
            raise VmapUnsupportedError(
                f"per-example gradients by torch.func.vmap failed{place}: {what}. vmap cannot run "
                "in-place operations on batched tensors (e.g. x.add_(...), ReLU(inplace=True)) or "
                "Python control flow that depends on tensor values (if x.sum() > 0). Rewrite that "
                "layer out-of-place / with torch.where, or pass fallback='loop' (one backward pass "
                "per example: same numbers, slower)"
            ) from err
        self.method = "loop"
        note = (f"vmap failed{place} ({what}); per-example gradients computed by a loop of one "
                "backward pass per example")
        self.notes.append(note)
        warnings.warn(f"dynlens: {note}", RuntimeWarning, stacklevel=4)

