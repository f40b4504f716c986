"""Hessian spectra: extreme eigenvalues (sharpness), trace and spectral density, matrix-free.

H = ∇²L is the Hessian of the mean loss on the batch with respect
to the chosen parameters; ``curvature="ggn"`` measures the generalised Gauss-Newton matrix
G = Jᵀ (∇²_f loss) J instead (PSD for convex losses). HVP = Hessian-vector product.

- :func:`hessian_eigenvalues`: the k extreme eigenvalues by Lanczos with full
  reorthogonalisation (:func:`dynlens.linalg.lanczos_eigsh`), stopping when every wanted Ritz
  pair has residual ‖Hv − λv‖ ≤ tol·|λ|. Options: Adam's preconditioned sharpness
  λ_max(P^{-1/2} H P^{-1/2}) (Cohen et al. 2022), the gradient's share in the top-k subspace
  ‖P_k ḡ‖²/‖ḡ‖² (Gur-Ari et al. 2018), the batch-size dependence (Granziol et al. 2022).
- :func:`hessian_trace`: tr(H) by Hutch++ (Meyer et al. 2021) or Hutchinson (1989).
- :func:`hessian_density`: the spectral density by stochastic Lanczos quadrature (Lin, Saad &
  Yang 2016; Ghorbani et al. 2019).

Cost: the HVPs reuse the first-order graph, built once per batch (one backward pass with
``create_graph=True``, about 1 gradient); each product is then one backward pass through it
(about 2–2.5 gradients on a CPU), so a Lanczos run of m steps costs about 1 + 2.2m gradients
(benchmarks/RESULTS.md) and holds the first-order graph
(roughly twice a training step's activations) plus m vectors of P entries. Trace and density
take their products in batches of columns (``is_grads_batched``), which is faster on small
models. ``hvp="forward_over_reverse"`` keeps no graph and costs about 3 gradients a product;
the default ``hvp="auto"`` times one product of each kind once per model and batch and takes
the faster (on an H100 a ResNet-18's reused graph costs 4.8 gradients a product, because cuDNN
runs a term of the convolutions' double backward with a slow kernel; forward-over-reverse 3.1).
Bounded memory: ``chunk_size`` computes every product as the exact sum over sub-batches, holding
the activations of one sub-batch at a time (:func:`curvature_operator`), and
:func:`hessian_eigenvalues`'s ``memory`` keeps a Lanczos basis that would not fit on the device
in host memory.

Every measurement runs inside :func:`dynlens.functional.isolated`: the model's training flags,
``.grad``, buffers and the torch/CUDA/Python/NumPy random states are as before, and attention
uses the math kernel of scaled-dot-product attention (the fused ones have no second derivative).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dynlens.convgrad import fast_conv_second_order
from dynlens.cudagraphs import GraphCache
from dynlens.distributed import lockstep, refuse_sharded, weighted_sum
from dynlens.functional import (
    ModelFunction,
    OutOfMemoryError,
    _widened,
    batch_size,
    flatten,
    isolated,
    slice_examples,
    split_batch,
    trainable_parameters,
    unflatten,
    unwrap_model,
)
from dynlens.linalg import (
    LinearOperator,
    SpectralDensity,
    gaussian_vector,
    hutch_plus_plus,
    hutchinson,
    lanczos_eigsh,
    slq,
)
from dynlens.parameters import layer_of

__all__ = [
    "Eigen",
    "Estimate",
    "SpectralDensity",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_density",
    "curvature_operator",
    "start_vector",
    "warm_start_vector",
    "adam_preconditioner",
    "step_scales",
    "layer_blocks",
]

Curvature = Literal["hessian", "ggn"]
Method = Literal["auto", "reuse", "forward_over_reverse"]
ParamSpec = Sequence[str] | Literal["per_layer"] | None
Preconditioner = Tensor | Mapping[str, Tensor] | torch.optim.Optimizer | None


@dataclass(frozen=True)
class Eigen:
    """Extreme eigenvalues of the curvature matrix (Hessian, GGN, or preconditioned Hessian).

    Fields:
        values: float64 CPU tensor, descending. ``which="top"``: the k largest; ``"bottom"``:
            the k smallest (``values[-1]`` is λ_min); ``"both"``: the k largest then the k
            smallest (2k values, overlapping when 2k > P). Units of the loss per parameter².
        residuals: float64 CPU tensor, same order: the estimate of ‖Hv − λv‖ of each unit Ritz
            vector (absolute; divide by |λ| for the relative residual).
        vectors: (P, len(values)) unit eigenvectors on the model's device (flat, in parameter
            order), or None unless ``return_vectors=True``.
        which: the ``which`` asked for.
        matvecs: Hessian-vector products used (all sub-batches together with ``batch_size``).
        iterations: Lanczos steps of the (last) run.
        converged: every run met the tolerance.
        elapsed: wall-clock seconds, the graph building included.
        gradient_overlap: ‖P_k ḡ‖²/‖ḡ‖², the share of the squared gradient norm in the span of
            the returned eigenvectors (None unless asked for).
        batch_values: with ``batch_size=b``: (number of sub-batches, len(values)) float64, the
            values of each sub-batch of b examples; ``values`` is then their mean.
        curvature: "hessian" or "ggn"; "preconditioned" when a preconditioner was given.
        num_params: P, the dimension of the operator.
    """

    values: Tensor
    residuals: Tensor
    vectors: Tensor | None
    which: str
    matvecs: int
    iterations: int
    converged: bool
    elapsed: float
    gradient_overlap: float | None = None
    batch_values: Tensor | None = None
    curvature: str = "hessian"
    num_params: int = 0

    @property
    def relative_residuals(self) -> Tensor:
        """residuals / |values| (the quantity the stopping rule compares with ``tol``)."""
        return self.residuals / self.values.abs().clamp_min(torch.finfo(torch.float64).tiny)

    @property
    def max(self) -> float:
        """The largest eigenvalue found (the sharpness λ_max for ``which`` "top" or "both")."""
        return float(self.values[0])

    @property
    def min(self) -> float:
        """The smallest eigenvalue found (λ_min for ``which`` "bottom" or "both")."""
        return float(self.values[-1])


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate of tr(H).

    Fields:
        value: the estimate of the trace (float).
        stderr: its standard error (see :class:`dynlens.linalg.TraceEstimate`).
        samples: the HVP budget asked for.
        matvecs: HVPs used.
        elapsed: wall-clock seconds, the graph building included.
        method: "hutch++" or "hutchinson".
    """

    value: float
    stderr: float
    samples: int
    matvecs: int
    elapsed: float
    method: str = "hutch++"


# ----------------------------------------------------------------------------- operators


def layer_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The trainable parameter names grouped by the module that owns them (``"0.weight"`` and
    ``"0.bias"`` form layer ``"0"``), in ``named_parameters`` order; tied weights count once."""
    blocks: dict[str, list[str]] = {}
    for name in trainable_parameters(unwrap_model(model)):
        blocks.setdefault(layer_of(name), []).append(name)
    return blocks


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module,
                        names: Sequence[str] | None = None) -> dict[str, Tensor] | None:
    """Adam's diagonal preconditioner P = (1 − β₁ᵗ)·(√v̂_t + ε), v̂_t = v_t/(1 − β₂ᵗ), by parameter name.

    Read from the optimizer's own state (``exp_avg_sq``, ``step``) and hyperparameters, so that
    Adam's update is η P⁻¹ m_t (Cohen et al. 2022, "Adaptive gradient methods at the edge of
    stability"). Works for Adam and AdamW, with AMSGrad (v_t is then the running maximum
    ``max_exp_avg_sq``, as in Adam's update), and any optimizer with the same state keys.
    Parameters without state (never stepped) are left out; None before the first step (no
    state at all).
    """
    by_param = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    wanted = set(names) if names is not None else None
    result: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        for p in group["params"]:
            name = by_param.get(id(p))
            if name is None or (wanted is not None and name not in wanted):
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:  # not stepped yet (no gradient so far): Adam never moved it
                continue
            step = float(state["step"])
            # AMSGrad divides by the running maximum of the second moment
            second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            v_hat = _widened(second.detach()) / (1 - beta2**step)  # a half-precision state in float32
            result[name] = (1 - beta1**step) * (v_hat.sqrt() + eps)
    return result or None


def step_scales(optimizer: torch.optim.Optimizer, model: nn.Module,
                names: Sequence[str]) -> dict[str, Tensor] | None:
    """S, the optimizer's step on each entry relative to a step of group 0's learning rate η₀.

    SGD: S = η_g/η₀ for a parameter in group g; Adam/AdamW: S = (η_g/η₀)·P⁻¹ with Adam's own P
    (:func:`adam_preconditioner`). S is 0 where the optimizer moves nothing: parameters it does
    not hold, and under Adam those without state yet. The update is then η₀·S·(the direction of
    group 0's rule), so its stability is set by λ_max(S^{1/2} H S^{1/2}) = λ_max(SH) against
    group 0's threshold (Cohen et al. 2022 for Adam). Returns None where S would be 1 everywhere
    (SGD with one learning rate for every named parameter: λ_max(H) itself), and for Adam
    before its first step.
    """
    model = unwrap_model(model)
    lr0 = float(optimizer.param_groups[0]["lr"])
    params = dict(model.named_parameters())
    by_param = {id(p): n for n, p in params.items()}
    rate: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in by_param:
                rate[by_param[id(p)]] = float(group["lr"]) / lr0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        precond = adam_preconditioner(optimizer, model, names)
        if precond is None:
            return None
        return {n: rate.get(n, 0.0) / precond[n] if n in precond else torch.zeros_like(params[n])
                for n in names}
    if all(rate.get(n) == 1.0 for n in names):
        return None
    return {n: torch.full_like(params[n], rate.get(n, 0.0)) for n in names}


def _flat_preconditioner(preconditioner: Preconditioner, fn: ModelFunction) -> Tensor | None:
    if preconditioner is None:
        return None
    if isinstance(preconditioner, torch.optim.Optimizer):
        found = adam_preconditioner(preconditioner, fn.model, list(fn.params))
        if found is None:
            raise ValueError(
                "the optimizer has no second-moment state yet (exp_avg_sq): take a step first, "
                "or pass preconditioner= the diagonal P as a tensor"
            )
        missing = [n for n in fn.params if n not in found]
        if missing:
            raise ValueError(
                f"Adam has no state for the parameters {missing} (it does not hold them, or has not "
                "stepped them yet): pass params= the ones it moves"
            )
        preconditioner = found
    if isinstance(preconditioner, Mapping):
        missing = [n for n in fn.params if n not in preconditioner]
        if missing:
            raise ValueError(f"the preconditioner has no entry for the parameters {missing}")
        flat = flatten([preconditioner[n] for n in fn.params])
    else:
        flat = preconditioner.reshape(-1)
    if flat.numel() != fn.num_params:
        raise ValueError(f"the preconditioner has {flat.numel()} entries; the parameters have {fn.num_params}")
    flat = flat.to(device=fn.device, dtype=next(iter(fn.params.values())).dtype)
    if not bool((flat > 0).all()):
        raise ValueError("the diagonal preconditioner must be positive everywhere")
    return flat


def curvature_operator(
    fn: ModelFunction,
    curvature: Curvature = "hessian",
    hvp: Method = "auto",
    preconditioner: Preconditioner = None,
    max_columns: int = 16,
    *,
    chunk_size: int | None = None,
) -> tuple[LinearOperator, Tensor]:
    """The curvature matrix of ``fn`` as a :class:`LinearOperator`, and the flat gradient ḡ.

    With a diagonal ``preconditioner`` P the operator is P^{-1/2} C P^{-1/2}, whose eigenvalues are
    those of P⁻¹C. Call inside :func:`isolated`. Building it costs one backward pass (with
    ``create_graph`` for ``hvp="reuse"``).

    Sub-batched products: with ``chunk_size`` smaller than the batch's m examples, every product
    and the gradient are the example-weighted sums over consecutive sub-batches s of at most
    ``chunk_size`` examples, C v = Σ_s (m_s/m) C_s v and ḡ = Σ_s (m_s/m) ḡ_s, C_s the curvature of
    the mean loss over sub-batch s. That is C itself (to rounding) for a loss that is the mean of
    per-example losses; a loss that averages over counted targets (ignored targets, unequal counts
    per example) is weighted by examples, not by counted targets, so C then differs from the
    whole batch's. Activation memory is then that of ``chunk_size`` examples instead of m, and
    each product costs the same passes over the m examples as one whole-batch product. Products
    run forward-over-reverse on each sub-batch (``hvp="auto"`` included; Hessian products fall
    back to the reused graph if a layer has no forward-mode derivative), keeping no graph between
    products; ``hvp="reuse"`` builds each sub-batch's first-order graph anew for every call and
    frees it before the next sub-batch (one extra backward pass per sub-batch and call, shared by
    the columns of a ``matmat``). Train mode: dropout masks are drawn per sub-batch, so they
    differ from the whole batch's (each set is an equally valid draw); a BatchNorm layer
    normalising with batch statistics couples the examples, and is refused. The operator's
    ``matvecs`` counts one product per vector, however many sub-batches it takes.

    Distributed (``fn.group`` set): every product and the gradient are all-reduced,
    C v = Σ_r (m_r/m) C_r v over the ranks' shards, so every rank holds the whole batch's
    operator and gets the same vectors back (every rank must apply it to the same vectors).
    A model whose parameters FSDP2 shards is refused.

    Raises:
        ValueError: ``chunk_size`` < 1, or below m with BatchNorm using batch statistics; a
            non-finite loss or gradient; a loss that is not twice differentiable.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of examples or None, got {chunk_size}")
    refuse_sharded(fn.model, "a curvature measurement (Hessian-vector products)")
    if chunk_size is not None and chunk_size < fn.size:
        matvec, matmat, gradient = _sub_batched_products(fn, curvature, hvp, max_columns, chunk_size)
    else:
        matvec, matmat, gradient = fn.curvature_products(curvature, hvp, max_columns)
    if fn.group is not None:
        # the whole batch's operator: each product (and the gradient) the size-weighted sum of
        # every rank's shard's, one all-reduce each; every rank then runs the same iteration
        matvec, matmat, gradient = _reduced_products(fn, matvec, matmat, gradient)
    scale = _flat_preconditioner(preconditioner, fn)
    if scale is not None:
        scale = scale.rsqrt()
        inner_mv, inner_mm = matvec, matmat

        def matvec(v: Tensor) -> Tensor:
            return scale * inner_mv(scale * v)

        def matmat(v: Tensor) -> Tensor:
            return scale[:, None] * inner_mm(scale[:, None] * v)

    return LinearOperator(
        matvec=matvec, size=fn.num_params, dtype=gradient.dtype, device=gradient.device, matmat=matmat
    ), gradient


def _reduced_products(fn: ModelFunction, matvec: Callable[[Tensor], Tensor], matmat: Callable[[Tensor], Tensor],
                      gradient: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor]:
    """This shard's products and gradient as the whole batch's (:func:`curvature_operator`)."""
    share, group = fn.share, fn.group

    def reduced_matvec(v: Tensor) -> Tensor:
        return weighted_sum(matvec(v), share, group)

    def reduced_matmat(v: Tensor) -> Tensor:
        return weighted_sum(matmat(v), share, group)

    return reduced_matvec, reduced_matmat, weighted_sum(gradient, share, group)


def _batch_statistics_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that normalise with the statistics of the batch (train mode,
    or no running statistics): they make each example's loss depend on the others."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (module.training or module.running_mean is None)]


def _sub_batch_function(fn: ModelFunction, start: int, stop: int) -> ModelFunction:
    """``fn`` restricted to examples ``start:stop``."""
    sub = ModelFunction(fn.model, fn.loss_fn,
                        (slice_examples(fn.inputs, start, stop), slice_examples(fn.targets, start, stop)),
                        params=list(fn.params), seed=fn.seed)
    # the same tensors as fn: a half-precision model's float32 copy and the buffer copies are
    # then held once, not once per sub-batch
    sub.params, sub.fixed, sub.buffers = fn.params, fn.fixed, fn.buffers
    return sub


def _rebuilt_graph_product(sub: ModelFunction, max_columns: int, vectors: Tensor) -> Tensor:
    """H_s v (or H_s V) through a first-order graph of sub-batch s built for this call alone: it
    is freed on return, so that one sub-batch's graph is alive at a time."""
    single, block, _ = sub.curvature_products("hessian", "reuse", max_columns)
    return single(vectors) if vectors.dim() == 1 else block(vectors)


# Off: on an H200 the recorded graphs' memory stayed allocated after the measurement that
# recorded them (tensors allocated in the warm-up and the recording, 0.38 GiB for a small CNN on
# 256 images; benchmarks/lens_memory_trace.py), which a memory budget cannot allow. A sub-batched
# product then runs eagerly, launch-bound (44 ms for 32 images of a ResNet-18).
GRAPHED_SUB_BATCHES = False


class _GraphedProducts:
    """Hessian-vector products of sub-batches replayed from CUDA graphs.

    A product of one sub-batch through a first-order graph built for it (forward, backward with
    ``create_graph``, double backward) launches a few thousand small kernels, and on a GPU that
    launching, not the arithmetic, sets its time: a ResNet-18 on 32 images took 40 ms, a
    GPT-2-sized decoder on one sequence of 512 tokens 90 ms (H200), with the device mostly idle.
    Every sub-batch of a split probe batch has the same shape (the last one may be smaller), so
    the kernels of one product are recorded once (:class:`dynlens.cudagraphs.GraphCache`: at the
    second sub-batch of a shape, after a warm-up in which any host synchronisation raises) and
    replayed with the next sub-batch and vector copied in. The graphs live as long as this
    object, i.e. one measurement's operator: their memory (one product's) goes back to the
    allocator with it. Tensor inputs and targets, eval mode and CUDA only; anything else, or a
    model that cannot be recorded, runs eagerly (``None`` from :meth:`product`).
    """

    def __init__(self, fn: ModelFunction) -> None:
        self.fn = fn
        self.cache = GraphCache(capacity=2)
        self.enabled = (GRAPHED_SUB_BATCHES and fn.device.type == "cuda" and not fn.model.training
                        and isinstance(fn.inputs, Tensor) and isinstance(fn.targets, Tensor))

    def product(self, sub: ModelFunction, vector: Tensor) -> Tensor | None:
        """H_s v from a replayed graph (the graph's own output tensor: read it before the next
        call), or None where it runs eagerly."""
        if not self.enabled or vector.dim() != 1:
            return None
        key = (tuple(sub.inputs.shape), tuple(sub.targets.shape), sub.targets.dtype)
        inputs = [sub.inputs, sub.targets, vector]
        replayed = self.cache.replay(key, inputs)
        if replayed is None and self.cache.saw(key):
            replayed = self.cache.record(key, inputs, self._body)
        return None if replayed is None else replayed[0]

    def _body(self, statics: list[Tensor]) -> tuple[Tensor, None]:
        inputs, targets, vector = statics
        fn = self.fn
        leaf_list = [t.detach().requires_grad_(True) for t in fn.params.values()]
        leaves = dict(zip(fn.params, leaf_list, strict=True))
        with torch.enable_grad(), fast_conv_second_order():
            value = fn._loss_of(fn.outputs(leaves, inputs), targets)
            grads = torch.autograd.grad(value, leaf_list, create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            parts = list(unflatten(vector, fn.params).values())
            products = torch.autograd.grad([grads[i] for i in used], leaf_list, [parts[i] for i in used],
                                           allow_unused=True)
        return flatten([torch.zeros_like(t) if h is None else h
                        for t, h in zip(leaf_list, products, strict=True)]), None


def _sub_batched_products(
    fn: ModelFunction, curvature: Curvature, hvp: Method, max_columns: int, chunk_size: int
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor]:
    """``(matvec, matmat, gradient)`` as sums over sub-batches (see :func:`curvature_operator`)."""
    coupled = _batch_statistics_layers(fn.model)
    if coupled:
        raise ValueError(
            f"chunk_size={chunk_size} splits the batch of {fn.size} examples, but the BatchNorm layers "
            f"{coupled} normalise with the statistics of the whole batch (train mode, or no running "
            "statistics), so its curvature is not a sum over sub-batches; measure in mode='eval' "
            f"(running statistics), or pass chunk_size=None or at least {fn.size}"
        )
    if hvp not in ("auto", "reuse", "forward_over_reverse"):
        raise ValueError(f"hvp must be 'auto', 'reuse' or 'forward_over_reverse', got {hvp!r}")
    subs = [_sub_batch_function(fn, start, min(start + chunk_size, fn.size))
            for start in range(0, fn.size, chunk_size)]
    weights = [sub.size / fn.size for sub in subs]
    # forward-over-reverse products keep no graph; building them costs one backward pass each
    # (for the gradient and the checks of a finite, twice differentiable loss)
    products: list[tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = []
    gradient: Tensor | None = None
    for weight, sub in zip(weights, subs, strict=True):
        single, block, sub_gradient = sub.curvature_products(curvature, "forward_over_reverse", max_columns)
        products.append((single, block))
        gradient = sub_gradient.mul_(weight) if gradient is None else gradient.add_(sub_gradient, alpha=weight)
        del sub_gradient
    assert gradient is not None
    method = [hvp if curvature == "hessian" else "forward_over_reverse"]

    graphed = _GraphedProducts(fn)

    def summed(vectors: Tensor, rebuild: bool) -> Tensor:
        total: Tensor | None = None
        for weight, sub, (single, block) in zip(weights, subs, products, strict=True):
            # replayed where it can be (CUDA, eval mode, one vector), whichever method computes
            # eagerly: a product of a sub-batch is launch-bound (44 ms for 32 images of a
            # ResNet-18 on an H200, whatever the method), and the graph's product through a
            # first-order graph built for it takes the memory the sub-batch size was planned for
            part = graphed.product(sub, vectors)
            if part is None and rebuild:
                part = _rebuilt_graph_product(sub, max_columns, vectors)
            elif part is None:
                part = single(vectors) if vectors.dim() == 1 else block(vectors)
            # out of place first: a replayed part is the graph's own tensor
            total = part * weight if total is None else total.add_(part, alpha=weight)
        assert total is not None
        return total

    def product(vectors: Tensor) -> Tensor:
        if method[0] != "auto":
            return summed(vectors, rebuild=method[0] == "reuse")
        try:
            out = summed(vectors, rebuild=False)
        except OutOfMemoryError:
            raise
        except RuntimeError:  # a backward formula without forward-mode derivative (mse_loss in torch 2.13)
            method[0] = "reuse"
            return summed(vectors, rebuild=True)
        method[0] = "forward_over_reverse"
        return out

    return product, product, gradient


# ----------------------------------------------------------------------------- helpers


def _check_options(mode: str, curvature: str, hvp: str) -> None:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    if hvp not in ("auto", "reuse", "forward_over_reverse"):
        raise ValueError(f"hvp must be 'auto', 'reuse' or 'forward_over_reverse', got {hvp!r}")


def _per_layer(model: nn.Module, params: ParamSpec, measure: Callable[[list[str] | None], Any]) -> Any:
    if isinstance(params, str):
        if params != "per_layer":
            raise ValueError(f"params must be a list of parameter names or 'per_layer', got {params!r}")
        return {layer: measure(names) for layer, names in layer_blocks(model).items()}
    return measure(None if params is None else list(params))


def start_vector(op: LinearOperator, gradient: Tensor, generator: torch.Generator) -> Tensor:
    """A Lanczos start vector for the top eigenvalues: the unit gradient plus a unit Gaussian
    vector from ``generator``, so that no eigenvector is missing from the Krylov space. During
    training the gradient lies mostly in the top eigenspace (Gur-Ari et al. 2018), and on an H100
    ResNet-18 after 20 SGD steps the top 5 took 15 products from it against 24 to 28 from Gaussian
    starts (``benchmarks/lanczos_start.py``); at random initialisation it is as good as a Gaussian
    start. A zero gradient leaves the Gaussian vector."""
    noise = gaussian_vector(op.size, generator, op.dtype, op.device)
    start = noise / torch.linalg.vector_norm(noise)
    norm = torch.linalg.vector_norm(gradient)
    if bool(norm > 0):
        start = start + gradient.to(device=op.device, dtype=op.dtype) / norm
    return start


# the Gaussian part of a warm start, relative to its unit warm direction
_WARM_START_NOISE = 1e-3


def warm_start_vector(op: LinearOperator, previous: Tensor, generator: torch.Generator) -> Tensor:
    """A Lanczos start vector from earlier eigenvectors (a warm start): the columns of
    ``previous`` summed and normalised, plus a Gaussian vector from ``generator`` of norm 1e-3.

    ``previous`` is a flat vector (P,) or a block (P, j) of eigenvectors, for instance
    ``Eigen.vectors`` of a measurement a few training steps earlier. The top eigenvectors move
    little over a few steps, so the sum has a large component on each of the new top j and
    Lanczos meets the tolerance in few products. The sum alone spans only the old directions,
    though: an eigenvector that has since risen into the top (eigenvalues crossing) would be
    missing from the Krylov space, entering only through rounding errors, and Lanczos would
    return the next one in its place. The Gaussian part gives every eigenvector a nonzero
    component while keeping the start within 1e-3 of the warm direction. That component is small
    (about 1e-3/√P), so a new top eigenvector is found at a tight tolerance; at a loose one (1e-2)
    the run may stop before it has grown, as from any start (``hessian_eigenvalues``'s ``tol``).

    Raises:
        ValueError: ``previous`` is not of shape (P,) or (P, j), or its columns sum to zero or to
            a non-finite vector.
    """
    size = op.size
    if previous.dim() not in (1, 2) or previous.shape[0] != size or previous.numel() == 0:
        raise ValueError(
            f"start must be a flat start vector of shape ({size},) or a block of earlier "
            f"eigenvectors of shape ({size}, j), one row per parameter measured; got a tensor of "
            f"shape {tuple(previous.shape)}"
        )
    direction = previous.reshape(size, -1).to(device=op.device, dtype=op.dtype).sum(dim=1)
    norm = torch.linalg.vector_norm(direction)
    if not bool(torch.isfinite(norm)) or not bool(norm > 0):
        raise ValueError(f"the start vector's columns sum to a vector of norm {float(norm)}; pass "
                         "nonzero, finite vectors (or start='auto')")
    noise = gaussian_vector(size, generator, op.dtype, op.device)
    return direction / norm + noise * (_WARM_START_NOISE / torch.linalg.vector_norm(noise))


def _eigen_from_lanczos(fn: ModelFunction, op: LinearOperator, gradient: Tensor, k: int, which: str,
                        tol: float, max_iters: int | None, seed: int, return_vectors: bool,
                        gradient_overlap: bool, start: str | Tensor = "auto", memory: int | None = None,
                        ) -> tuple[Tensor, Tensor, Tensor | None, int, bool, float | None]:
    if k > op.size:
        raise ValueError(
            f"k={k} eigenvalues were asked of a Hessian of {op.size} parameters; k must be at most "
            f"the number of parameters ({op.size})"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(start, Tensor):
        v0: Tensor | None = warm_start_vector(op, start, generator)
    else:
        if start == "auto":
            start = "gradient" if which == "top" else "random"
        v0 = start_vector(op, gradient, generator) if start == "gradient" else None
    result = lanczos_eigsh(op, k=k, which=which, tol=tol, max_iters=max_iters, generator=generator,
                           v0=v0, return_vectors=return_vectors or gradient_overlap, memory=memory)
    values, residuals, vectors = result.values, result.residuals, result.vectors
    if which == "bottom":
        values, residuals = values.flip(0), residuals.flip(0)
        vectors = None if vectors is None else vectors.flip(1)
    elif which == "both":
        half = len(values) // 2
        order = torch.cat([torch.arange(half), torch.arange(len(values) - 1, half - 1, -1)])
        values, residuals = values[order], residuals[order]
        vectors = None if vectors is None else vectors[:, order.to(vectors.device)]
    overlap = None
    if gradient_overlap:
        assert vectors is not None
        top = vectors if which != "both" else vectors[:, : len(values) // 2]
        norm2 = float(gradient.double().pow(2).sum())
        overlap = float((top.T.double() @ gradient.double()).pow(2).sum()) / norm2 if norm2 > 0 else 0.0
    return (values, residuals, vectors if return_vectors else None, result.iterations,
            result.converged, overlap)


# ----------------------------------------------------------------------------- measurements


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    k: int = 1,
    which: Literal["top", "bottom", "both"] = "top",
    tol: float = 1e-4,
    *,
    max_iters: int | None = None,
    curvature: Curvature = "hessian",
    params: ParamSpec = None,
    batch_size: int | None = None,
    mode: Literal["eval", "train"] = "eval",
    hvp: Method = "auto",
    return_vectors: bool = False,
    gradient_overlap: bool = False,
    preconditioner: Preconditioner = None,
    start: Literal["auto", "random", "gradient"] | Tensor = "auto",
    seed: int = 0,
    chunk_size: int | None = None,
    memory: int | None = None,
    group: Any = None,
) -> Eigen | dict[str, Eigen]:
    """The k extreme eigenvalues of the Hessian of the mean loss on ``batch``.

    Lanczos with full reorthogonalisation from the gradient plus a Gaussian vector (seeded with
    ``seed``; a Gaussian vector alone for the bottom of the spectrum, see ``start``),
    stopping when every wanted Ritz pair has residual ‖Hv − λv‖ ≤ tol·max(|λ|, ε) (and after at
    least k + max(k, 3) steps); eigenvalue errors are then about tol²·|λ|·|λ|/gap, far below tol.

    Args:
        model, loss_fn, batch: the model, ``loss_fn(outputs, targets)`` (mean loss) and
            ``(inputs, targets)``.
        k: how many eigenvalues (of each end for ``which="both"``); 1 ≤ k ≤ P.
        which: "top" (largest algebraic; values[0] is the sharpness λ_max), "bottom" (smallest,
            most negative), "both".
        tol: relative residual tolerance. 1e-4 gives eigenvalues to about 1e-7 relative error.
            A loose tolerance (1e-2 or more) saves products but, for eigenvalues in a tight
            cluster, can stop before one of them has entered the Krylov space and return the
            next one in its place (measured from Gaussian starts on a ResNet-18, errors up to 7%:
            benchmarks/RESULTS.md); at the default no such miss was seen there.
        max_iters: most Lanczos steps (HVPs); default max(100, 4k + 20), at most P.
        curvature: "hessian" or "ggn".
        params: parameter names to restrict to (a diagonal block of H), or "per_layer": one
            result per layer (module), returned as a dict by layer name.
        batch_size: b < m: the mean over the ⌊m/b⌋ disjoint sub-batches of size b of their
            eigenvalues (Granziol et al. 2022); each sub-batch's values are in ``batch_values``.
        mode: "eval" (BatchNorm running statistics, no dropout) or "train" (batch statistics,
            dropout with a fixed seed); nothing is updated either way.
        hvp: "auto" (the faster of the two below, timed once per model and batch), "reuse"
            (the first-order graph built once, ~2 gradients a product on a CPU) or
            "forward_over_reverse" (no stored graph, ~3 gradients a product).
        return_vectors: return the unit eigenvectors (P × len(values), on the model's device).
        gradient_overlap: compute ‖P_k ḡ‖²/‖ḡ‖² for the top-k eigenvectors (Gur-Ari et al. 2018).
        preconditioner: a positive diagonal P (flat tensor, dict by name, or an Adam/AdamW
            optimizer whose state gives Adam's P): eigenvalues of P^{-1/2} H P^{-1/2}, i.e. of P⁻¹H.
        start: Lanczos's start vector: "gradient" (the unit gradient plus a unit Gaussian vector,
            :func:`start_vector`: during training the gradient lies mostly in the top
            eigenspace, Gur-Ari et al. 2018), "random" (a Gaussian vector), "auto" (the
            default): "gradient" for ``which="top"``, else "random"; or a tensor, for a warm
            start: a flat vector (P,) or a block (P, j) of earlier eigenvectors (``vectors`` of
            an earlier result with ``return_vectors=True``), whose columns are summed and
            normalised, plus a Gaussian part of relative norm 1e-3 so that no eigenvector is
            missing from the Krylov space (:func:`warm_start_vector`). Not with
            ``params="per_layer"`` (one operator per layer).
        seed: seeds the start vector and, in train mode, dropout.
        chunk_size: compute every product (and the gradient) as the example-weighted sum over
            sub-batches of at most ``chunk_size`` examples, one sub-batch at a time, so that
            activation memory is that of ``chunk_size`` examples, not of the whole batch. Exact
            (to rounding) for a loss that is the mean of per-example losses; unlike
            ``batch_size`` it does not change what is measured. Products then run
            forward-over-reverse (``hvp="reuse"``: each sub-batch's graph is rebuilt for every
            product). Refused in train mode for a model with BatchNorm, which couples the
            examples. See :func:`curvature_operator`.
        memory: bytes the Lanczos basis may take on the model's device (None: no limit); a
            basis that would not fit lives in host memory instead, with the products still on
            the device (:func:`dynlens.linalg.lanczos_eigsh`).
        group: a ``torch.distributed`` process group (None: not distributed). Each rank passes
            its shard of the batch and every rank gets the eigenvalues of the whole batch's
            Hessian (the shards concatenated in rank order): every product is the size-weighted
            all-reduce of the shards' (:func:`curvature_operator`), and every rank runs the same
            Lanczos iteration from the same seeded start. All ranks must call it together with
            the same arguments; a failure on one rank raises on all
            (:class:`dynlens.distributed.PeerFailed` on the others). Not with ``batch_size``.

    Cost: ``matvecs`` HVPs plus one backward pass per (sub-)batch (with ``chunk_size``: the
    same passes over the examples, in sub-batches; with ``hvp="reuse"`` one more backward pass
    per sub-batch and product); memory for the first-order graph (with ``chunk_size``, the
    activations of one sub-batch at a time) and about ``iterations`` vectors of P entries for
    the Lanczos basis (within ``memory`` on the device, else in host memory) plus
    ``len(values)`` for ``return_vectors``. A model with float16 or bfloat16
    parameters is measured in float32 at its own weights (:class:`~dynlens.functional.ModelFunction`),
    so the vectors are float32 and cost 4 bytes an entry.

    Returns:
        :class:`Eigen` (or a dict of them by layer for ``params="per_layer"``).

    Raises:
        ValueError: k > P, a non-finite loss or gradient, a loss that is not twice
            differentiable, or an unknown option.
    """
    _check_options(mode, curvature, hvp)
    model = unwrap_model(model)
    if isinstance(start, Tensor):
        if isinstance(params, str):
            raise ValueError(
                "a tensor start (a warm start) is a vector of one operator's parameters, but "
                "params='per_layer' measures one operator per layer; pass start='auto' there"
            )
    elif start not in ("auto", "random", "gradient"):
        raise ValueError(
            f"start must be 'auto', 'random', 'gradient' or a tensor (a start vector (P,) or earlier "
            f"eigenvectors (P, j)), got {start!r}"
        )
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both', got {which!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if group is not None and batch_size is not None:
        raise ValueError(
            "batch_size= (the mean over sub-batches) is not defined over a batch split across "
            "ranks; pass group=None and measure each rank's sub-batches alone, or batch_size=None"
        )

    def measure(names: list[str] | None) -> Eigen:
        began = time.perf_counter()
        with lockstep(group), isolated(model, mode, seed):
            sub_batches = _sub_batches(batch, batch_size)
            rows, all_residuals, matvecs, converged = [], [], 0, True
            vectors, overlap, iterations, size = None, None, 0, 0
            for sub in sub_batches:
                fn = ModelFunction(model, loss_fn, sub, params=names, seed=seed, group=group)
                op, gradient = curvature_operator(fn, curvature, hvp, preconditioner, chunk_size=chunk_size)
                values, residuals, vectors, iterations, ok, overlap = _eigen_from_lanczos(
                    fn, op, gradient, k, which, tol, max_iters, seed, return_vectors, gradient_overlap,
                    start, memory)
                rows.append(values)
                all_residuals.append(residuals)
                matvecs += op.matvecs
                converged = converged and ok
                size = op.size
                del op
        stacked = torch.stack(rows)
        return Eigen(
            values=stacked.mean(0),
            residuals=torch.stack(all_residuals).max(0).values,
            vectors=vectors if batch_size is None else None,
            which=which,
            matvecs=matvecs,
            iterations=iterations,
            converged=converged,
            elapsed=time.perf_counter() - began,
            gradient_overlap=overlap if batch_size is None else None,
            batch_values=stacked if batch_size is not None else None,
            curvature="preconditioned" if preconditioner is not None else curvature,
            num_params=size,
        )

    return _per_layer(model, params, measure)


def _sub_batches(batch: Any, size: int | None) -> list[Any]:
    if size is None:
        return [batch]
    inputs, targets = split_batch(batch)
    m = batch_size(inputs)
    if not 1 <= size <= m:
        raise ValueError(f"batch_size must be between 1 and the batch's {m} examples, got {size}")
    return [
        (slice_examples(inputs, start, start + size), slice_examples(targets, start, start + size))
        for start in range(0, m - size + 1, size)
    ]


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    samples: int = 64,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    curvature: Curvature = "hessian",
    params: ParamSpec = None,
    mode: Literal["eval", "train"] = "eval",
    hvp: Method = "auto",
    preconditioner: Preconditioner = None,
    max_columns: int = 16,
    seed: int = 0,
    chunk_size: int | None = None,
    group: Any = None,
) -> Estimate | dict[str, Estimate]:
    """tr(H) of the mean loss on ``batch`` by Hutch++ (default) or Hutchinson, Rademacher probes.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends a third of ``samples`` on a sketch of
    the top of the spectrum, a third on its exact trace and the rest on Hutchinson's estimate of
    the remainder; its error decays as 1/samples instead of 1/√samples when the spectrum decays.
    The products go ``max_columns`` at a time through one batched backward pass.

    Args: as :func:`hessian_eigenvalues`; ``samples`` ≥ 4 (≥ 2 for Hutchinson) is the HVP budget,
    ``seed`` seeds the probe vectors. ``params="per_layer"`` gives one estimate per layer.
    ``chunk_size``: every product as the sum over sub-batches of at most that many examples
    (exact; activation memory of one sub-batch; see :func:`curvature_operator`).
    ``group``: a ``torch.distributed`` process group (None: not distributed): each rank passes
    its shard and every rank gets tr(H) of the whole batch's Hessian; the products are
    all-reduced and every rank draws the same Rademacher vectors (the same ``seed``), so the
    estimate equals the single-process one on the whole batch with that seed.

    Cost: ``samples`` HVPs and one backward pass (with ``chunk_size``, in sub-batches, and with
    ``hvp="reuse"`` one more backward pass per sub-batch and block of ``max_columns`` products).

    Returns:
        :class:`Estimate` (value, stderr), or a dict of them by layer.
    """
    _check_options(mode, curvature, hvp)
    model = unwrap_model(model)
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")

    def measure(names: list[str] | None) -> Estimate:
        start = time.perf_counter()
        with lockstep(group), isolated(model, mode, seed):
            fn = ModelFunction(model, loss_fn, batch, params=names, seed=seed, group=group)
            op, _ = curvature_operator(fn, curvature, hvp, preconditioner, max_columns, chunk_size=chunk_size)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            estimator = hutch_plus_plus if method == "hutch++" else hutchinson
            result = estimator(op, samples=samples, generator=generator)
        return Estimate(value=result.value, stderr=result.stderr, samples=samples, matvecs=result.matvecs,
                        elapsed=time.perf_counter() - start, method=method)

    return _per_layer(model, params, measure)


def hessian_density(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: Any,
    runs: int = 8,
    iters: int = 80,
    *,
    curvature: Curvature = "hessian",
    params: ParamSpec = None,
    mode: Literal["eval", "train"] = "eval",
    hvp: Method = "auto",
    preconditioner: Preconditioner = None,
    max_columns: int = 16,
    seed: int = 0,
    chunk_size: int | None = None,
    group: Any = None,
) -> SpectralDensity | dict[str, SpectralDensity]:
    """The spectral density of H by stochastic Lanczos quadrature (SLQ).

    ``runs`` Lanczos runs of ``iters`` steps from normalised Rademacher vectors, in lockstep (one
    batched product of ``runs`` columns a step): nodes are the Ritz values, weights the squared
    first components of the tridiagonal eigenvectors over ``runs`` (Lin, Saad & Yang 2016;
    Ghorbani, Krishnan & Xiao 2019). Outliers are the nodes beyond the bulk (Papyan 2019).

    Args: as :func:`hessian_eigenvalues`; ``seed`` seeds the start vectors. ``chunk_size``: every
    product as the sum over sub-batches of at most that many examples (exact; activation memory
    of one sub-batch; see :func:`curvature_operator`). ``group``: a ``torch.distributed`` process
    group (None: not distributed): each rank passes its shard and every rank gets the density of
    the whole batch's Hessian (all-reduced products, the same seeded start vectors on every rank).

    Cost: at most runs·iters HVPs and one backward pass (with ``chunk_size``, in sub-batches);
    memory for runs·iters vectors of P.

    Returns:
        :class:`dynlens.linalg.SpectralDensity` (nodes, weights summing to 1, matvecs, elapsed),
        or a dict of them by layer.
    """
    _check_options(mode, curvature, hvp)
    model = unwrap_model(model)

    def measure(names: list[str] | None) -> SpectralDensity:
        start = time.perf_counter()
        with lockstep(group), isolated(model, mode, seed):
            fn = ModelFunction(model, loss_fn, batch, params=names, seed=seed, group=group)
            op, _ = curvature_operator(fn, curvature, hvp, preconditioner, max(max_columns, runs),
                                       chunk_size=chunk_size)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            result = slq(op, runs=runs, iters=min(iters, op.size), generator=generator)
        return SpectralDensity(nodes=result.nodes, weights=result.weights, runs=result.runs,
                               iters=result.iters, matvecs=result.matvecs,
                               elapsed=time.perf_counter() - start)

    return _per_layer(model, params, measure)
