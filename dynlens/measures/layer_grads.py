"""Per-example gradients of common layers from one batched forward and backward pass.

For a layer z = f(a; w) applied to each example on its own, the gradient of example i's loss
ℓ_i with respect to w depends only on the layer's input a_i and the gradient δ_i = ∂ℓ_i/∂z_i at
its output. One batched forward records a_i (forward hooks) and one backward of Σ ℓ_i gives every
δ_i, so each example's gradient follows without a pass per example (Goodfellow 2015, "Efficient
per-example gradient computations"; Dangel et al. 2020, BackPACK; Rochette et al. 2019 for
convolutions):

* ``nn.Linear`` on (n, in) inputs: g_i = δ_i a_iᵀ, kept factored (:class:`Outer`, never formed);
  on (n, ..., in) inputs: g_i = Σ_t δ_it a_itᵀ over the positions t (one batched product);
* ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding given as numbers): the weight's g_i is the weight
  gradient of example i's convolution alone, for all examples at once: one grouped convolution
  with the examples folded into the channels, or the input patches and one batched product
  (``CONV_RULE``); the bias's Σ over positions of δ_i;
* ``nn.BatchNorm1d/2d/3d`` using running statistics (eval mode): the weight's g_i is
  Σ over positions of δ_i · x̂_i (x̂ the normalised input), the bias's Σ of δ_i.

Which layers qualify is decided by :func:`hookable_layers`; whether the batched forward really
evaluates each example on its own (no layer mixing examples) is the caller's to check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dynlens.convgrad import weight_gradient

__all__ = ["Outer", "BiasOf", "HookedLayer", "LayerMemory", "hookable_layers"]


@dataclass
class Outer:
    """The per-example gradients g_i = δ_i a_iᵀ of a linear layer's weight, kept factored (never
    formed): δ_i = ∂ℓ_i/∂z_i the gradient at the layer's output, a_i its input (both in the
    layer's dtype)."""

    delta: Tensor  # (n, out)
    inputs: Tensor  # (n, in)
    bias: bool = False  # the layer has a bias, whose gradients δ_i the pair products include


@dataclass
class BiasOf:
    """The per-example gradients δ_i of a factored linear layer's bias: the δ of its weight's
    :class:`Outer`, whose products with other examples (Gram matrix, class norms) already include
    the bias, as weight and bias together have the gradient δ_i [a_i; 1]ᵀ."""

    delta: Tensor  # (n, out), shared with the weight's Outer: never modified


Rep = Tensor | Outer | BiasOf
Kind = Literal["linear", "conv", "batchnorm"]


@dataclass(frozen=True)
class HookedLayer:
    """One layer whose per-example gradients come from its input and output gradient.

    Attributes:
        name: the module's name in the model.
        module: the module.
        kind: "linear", "conv" or "batchnorm".
        weight: the weight's parameter name, or None if it is not measured.
        bias: the bias's parameter name, or None.
    """

    name: str
    module: nn.Module
    kind: Kind
    weight: str | None
    bias: str | None

    @property
    def params(self) -> list[str]:
        """The measured parameter names of this layer."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def saved(self, args: tuple, output: Any, n: int) -> Tensor | None:
        """What the backward rule needs from the forward call (the input, or for BatchNorm the
        normalised input), or None if this call is not one this rule handles."""
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return None
        x = args[0]
        if x.dim() < 2 or x.shape[0] != n or output.shape[0] != n:
            return None
        module = self.module
        if self.kind == "conv":
            if x.dim() != module.weight.dim():  # unbatched input
                return None
            return x.detach()
        if self.kind == "batchnorm":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = module.running_mean.reshape(shape)
            scale = torch.rsqrt(module.running_var.reshape(shape) + module.eps)
            return ((x.detach() - mean) * scale).to(x.dtype)
        return x.detach()

    def gradients(self, saved: Tensor, delta: Tensor, n: int) -> dict[str, Rep]:
        """{parameter name: its per-example gradients} from the saved input and δ (16-bit ones
        in float32: the statistics sum over examples and parameters)."""
        if delta.dtype in (torch.float16, torch.bfloat16):
            delta, saved = delta.float(), saved.float()
        out: dict[str, Rep] = {}
        if self.kind == "linear":
            if saved.dim() == 2:
                if self.weight is not None:
                    out[self.weight] = Outer(delta, saved, bias=self.bias is not None)
                if self.bias is not None:
                    out[self.bias] = BiasOf(delta) if self.weight is not None else delta
                return out
            d = delta.reshape(n, -1, delta.shape[-1])
            if self.weight is not None:
                a = saved.reshape(n, -1, saved.shape[-1])
                out[self.weight] = torch.bmm(d.transpose(1, 2), a).reshape(n, -1)
            if self.bias is not None:
                out[self.bias] = d.sum(dim=1)
            return out
        positions = tuple(range(2, delta.dim()))
        if self.kind == "batchnorm":
            if self.weight is not None:
                out[self.weight] = (delta * saved).sum(dim=positions)
            if self.bias is not None:
                out[self.bias] = delta.sum(dim=positions)
            return out
        if self.weight is not None:
            out[self.weight] = _conv_weight_grads(self.module, saved, delta, n)
        if self.bias is not None:
            out[self.bias] = delta.sum(dim=positions)
        return out

    def bytes_per_example(self) -> int:
        """An estimate of one example's memory on this path: its input, output gradient and
        representation (for convolutions the unfolded patches), in the weight's dtype."""
        module = self.module
        size = module.weight.element_size() if getattr(module, "weight", None) is not None else 4
        if self.kind == "linear":
            return (module.in_features + module.out_features) * 2 * size
        if self.kind == "batchnorm":
            return 4 * module.num_features * size
        # a convolution: the weight's gradient plus a rough input and output gradient size
        return (module.weight.numel() + (module.in_channels + module.out_channels) * 1024) * size

    def memory(self, inputs: tuple[int, ...], outputs: tuple[int, ...], itemsize: int,
               device: torch.device) -> LayerMemory:
        """Bytes per example of this layer's rule on ``device`` (:class:`LayerMemory`), from the
        shapes of one example's input and output (batch dimension included), entries of
        ``itemsize`` bytes."""
        n_in, n_out = math.prod(inputs[1:]), math.prod(outputs[1:])
        module = self.module
        params = sum(getattr(module, attr).numel() for attr, name in (("weight", self.weight), ("bias", self.bias))
                     if name is not None)
        if self.kind == "batchnorm":
            return LayerMemory((n_out + n_in) * itemsize, 0, (params + n_out) * itemsize, params * itemsize)
        if self.kind == "linear" and len(inputs) == 2:
            return LayerMemory(n_out * itemsize, n_in * itemsize, 0, (n_in + n_out) * itemsize)
        working = params
        if self.kind == "conv" and self.weight is not None:
            if _conv_rule(module, device) == "grouped":
                # measured on the CPU (oneDNN): the weight gradients three times over, in blocked
                # layouts and reordered, besides copies of the folded input and output gradient
                working += 2 * module.weight.numel() + n_in + n_out
            else:  # the patches, and the input padded
                padded = math.prod(size + 2 * pad for size, pad in zip(inputs[2:], module.padding, strict=True))
                working += (module.in_channels * math.prod(module.kernel_size) * math.prod(outputs[2:])
                            + inputs[1] * padded)
        return LayerMemory(n_out * itemsize, n_in * itemsize, working * itemsize, params * itemsize)


@dataclass(frozen=True)
class LayerMemory:
    """Bytes per example that a hooked layer's rule holds (:meth:`HookedLayer.memory`).

    Attributes:
        held: from the backward pass until the layer's turn, beyond the activations: its output
            gradient δ_i (and BatchNorm's normalised input x̂_i, made in the forward pass).
        saved: its input, an activation the rule keeps after the backward pass has freed the
            others (none for BatchNorm, which keeps x̂_i instead).
        working: while its gradients are formed and reduced: the dense per-example gradients and
            a convolution's patches (the unfold rule's copy; the grouped rule's kernel is counted
            alike) or BatchNorm's δ_i x̂_i; nothing for a factored linear layer.
        kept: its representation, what a chunk held for stiffness keeps: the dense gradients, or a
            factored layer's input and output gradient.
    """

    held: int
    saved: int
    working: int
    kept: int


# How a convolution's per-example weight gradients are computed: "grouped" (one grouped
# convolution, the batch folded into the channels) or "unfold" (the input patches as a strided
# view, then one batched product). "auto": on GPUs the patches (cuDNN's grouped convolutions with
# one group per example were slower than vmap, benchmarks/RESULTS.md); on the CPU the grouped
# convolution, except for layers with at most PATCH_CHANNELS input channels per group, where
# the patches are few and oneDNN's grouped kernel is slow (LeNet-5's 1→6 5×5: 1.7 against 2.2 ms
# on one core, 1.1 against 1.5 on two; a 32→32 3×3: 48 against 7.3 ms).
CONV_RULE = "auto"
PATCH_CHANNELS = 3


def _conv_rule(module: nn.Module, device: torch.device) -> str:
    """The rule ``CONV_RULE`` resolves to for this convolution on ``device``."""
    if CONV_RULE != "auto":
        return CONV_RULE
    few = module.in_channels // module.groups <= PATCH_CHANNELS
    return "unfold" if device.type != "cpu" or few else "grouped"


def _conv_weight_grads(module: nn.Module, x: Tensor, delta: Tensor, n: int) -> Tensor:
    """(n, weight.numel()): each example's weight gradient of a Conv1d/Conv2d (see ``CONV_RULE``)."""
    if _conv_rule(module, x.device) == "grouped":
        return _grouped_weight_grads(module, x, delta, n)
    return _unfolded_weight_grads(module, x, delta, n)


def _grouped_weight_grads(module: nn.Module, x: Tensor, delta: Tensor, n: int) -> Tensor:
    """The weight gradient of one grouped convolution whose groups are the (example, group)
    pairs: the batch folded into the channels, (1, n·C, ...) inputs and (1, n·O, ...) output
    gradients, n·groups groups. One kernel call."""
    weight = module.weight
    folded_x = x.reshape(1, n * x.shape[1], *x.shape[2:])
    folded_delta = delta.reshape(1, n * delta.shape[1], *delta.shape[2:])
    shape = (n * weight.shape[0], *weight.shape[1:])
    placeholder = weight.new_empty(shape)  # only its shape is read
    geometry = (list(module.stride), list(module.padding), list(module.dilation), n * module.groups)
    return weight_gradient(folded_delta, folded_x, placeholder, geometry).reshape(n, -1)


def _unfolded_weight_grads(module: nn.Module, x: Tensor, delta: Tensor, n: int) -> Tensor:
    """Σ over output positions of δ times the input patch there, per group: the patches as a
    strided view of the padded input ((n, C, k..., L) copied once: ``F.unfold`` was 2 to 8 times
    slower on the CPU), then one batched product."""
    spatial = x.dim() - 2
    padding = [p for p in reversed(module.padding) for _ in range(2)]
    patches = F.pad(x, padding) if any(padding) else x
    for d, (k, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation, strict=True)):
        # (n, C, positions..., k...): dim 2 + d becomes the output positions, a window dim is appended
        patches = patches.unfold(2 + d, dilation * (k - 1) + 1, stride)[..., ::dilation]
    # (n, C, L..., k...) -> (n, C, k..., L...)
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    groups, positions = module.groups, delta[0, 0].numel()
    p = patches.permute(order).reshape(n * groups, -1, positions)
    d = delta.reshape(n * groups, -1, positions)
    return torch.bmm(d, p.transpose(1, 2)).reshape(n, -1)


def _kind(module: nn.Module) -> Kind | None:
    if type(module) is nn.Linear:
        return "linear"
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv"
        return None
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if not module.training and module.track_running_stats and module.running_mean is not None \
                and module.affine:
            return "batchnorm"
    return None


def hookable_layers(model: nn.Module, params: dict[str, Tensor]) -> list[HookedLayer]:
    """The layers of ``model`` whose measured parameters (names in ``params``) can be taken from
    hooks: Linear, Conv1d/Conv2d with numeric zero padding, BatchNorm on running statistics (eval
    mode), each owning its parameters alone (no weight tying). Empty in train mode."""
    if model.training:
        return []
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        names = {}
        for attr in ("weight", "bias"):
            p = module._parameters.get(attr)
            full = f"{name}.{attr}" if name else attr
            if p is not None and owners.get(id(p)) != 1:
                names = None
                break
            names[attr] = full if p is not None and full in params else None
        if names and (names["weight"] or names["bias"]):
            layers.append(HookedLayer(name, module, kind, names["weight"], names["bias"]))
    return layers
