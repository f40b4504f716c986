"""The largest attention logit of each attention layer during one forward pass (Wortsman et al.
2023, "Small-scale proxies for large-scale Transformer training instabilities": attention logits
z_ij = ⟨q_i, k_j⟩/√d_h growing without bound precede divergence; qk-layernorm is the remedy).

Fused attention kernels never form the logits, so they are recomputed from q and k where they
are visible:

- every call of ``F.scaled_dot_product_attention`` (hand-written attention, Hugging Face's
  "sdpa" implementation, ``nn.MultiheadAttention`` without weights): the wrapper computes
  q kᵀ·scale (default 1/√d) with the call's causal or boolean/additive mask, takes the maximum
  over allowed positions, and calls the original;
- ``nn.MultiheadAttention``: a forward hook recomputes q and k from the module's inputs and its
  input projection (key padding and attention masks applied), whichever path its forward took.

Each maximum is attributed to the innermost module running when it was computed (its name in
``model.named_modules()``); a module that attends several times keeps its largest. Everything
installed is removed on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["capture_attention_logits", "attention_logit_max"]


def attention_logit_max(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None) -> float:
    """max over allowed (i, j) of q_i·k_j·scale for q (..., L, E) and k (..., S, E): ``scale``
    defaults to 1/√E; ``is_causal`` allows j ≤ i; a boolean ``attn_mask`` allows True entries,
    a float one is added (as ``F.scaled_dot_product_attention`` does). NaN when nothing is
    allowed."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        logits = (q.float() @ k.float().transpose(-2, -1)) * scale
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device)
        if is_causal:
            allowed = torch.ones_like(allowed).tril()
        allowed = allowed.expand_as(logits)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                allowed = allowed & attn_mask.expand_as(logits)
            else:
                logits = logits + attn_mask.float().expand_as(logits)
                allowed = allowed & torch.isfinite(attn_mask).expand_as(logits)
        values = logits.masked_fill(~allowed, -math.inf)
        best = float(values.max()) if values.numel() else math.nan
    return best if math.isfinite(best) else math.nan


class _Capture:
    """The maxima found so far, by module name, and the stack of running modules."""

    def __init__(self) -> None:
        self.maxima: dict[str, float] = {}
        self.stack: list[tuple[str, nn.Module]] = []

    def note(self, name: str, value: float) -> None:
        if not math.isnan(value):
            self.maxima[name] = max(value, self.maxima.get(name, -math.inf))


def _multihead_qk(module: nn.MultiheadAttention, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """q and k of ``nn.MultiheadAttention`` as (batch, heads, length, head_dim) from its inputs."""
    if module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    embed, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed:2 * embed]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:embed], module.in_proj_bias[embed:2 * embed]
    q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)  # (L, N, E), (S, N, E)
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.expand(1, k.shape[1], -1)])
    unbatched = q.dim() == 2
    if unbatched:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    head_dim = embed // heads

    def split(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, head_dim).permute(1, 2, 0, 3)

    return split(q), split(k)


def _additive(mask: Tensor) -> Tensor:
    """An ``nn.MultiheadAttention`` mask as an additive float mask (a boolean True masks out)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, -math.inf)
    return mask.float()


def _multihead_mask(module: nn.MultiheadAttention, args: tuple, kwargs: dict, length: int, source: int,
                    batch: int) -> Tensor | None:
    """The additive mask of an ``nn.MultiheadAttention`` call as (batch, heads, L, S), or None."""
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal"]
    given = dict(zip(names, args, strict=False)) | kwargs
    total: Tensor | None = None
    mask, padding = given.get("attn_mask"), given.get("key_padding_mask")
    if mask is not None:
        total = _additive(mask)
        if total.dim() == 3:
            total = total.reshape(batch, module.num_heads, length, total.shape[-1])
    elif given.get("is_causal"):
        total = torch.zeros(length, source).masked_fill(~torch.ones(length, source, dtype=torch.bool).tril(), -math.inf)
    if padding is not None:
        keys = _additive(padding).reshape(batch, 1, 1, -1)
        total = keys if total is None else total + keys
    return total


@contextlib.contextmanager
def capture_attention_logits(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, record the largest attention logit of each attention layer of ``model``
    (module docstring) into the dict it yields, ``{module name: max logit}``; hooks and the
    wrapped function are removed on exit."""
    capture = _Capture()
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def enter(module: nn.Module, _args: Any) -> None:
        capture.stack.append((names.get(module, ""), module))

    def leave(module: nn.Module, _args: Any, _output: Any) -> None:
        if capture.stack and capture.stack[-1][1] is module:
            capture.stack.pop()

    def multihead(module: nn.MultiheadAttention, args: tuple, kwargs: dict, _output: Any) -> None:
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        with torch.no_grad():
            q, k = _multihead_qk(module, query, key)
            mask = _multihead_mask(module, args, kwargs, q.shape[-2], k.shape[-2], q.shape[0])
            if mask is not None:
                mask = mask.to(q.device)
                if mask.shape[-1] != k.shape[-2]:  # bias_k adds a key every query may attend to
                    pad = torch.zeros((*mask.shape[:-1], k.shape[-2] - mask.shape[-1]), device=q.device)
                    mask = torch.cat([mask, pad], dim=-1)
            capture.note(names.get(module, ""), attention_logit_max(q, k, mask))

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(multihead, with_kwargs=True))
    original = F.scaled_dot_product_attention

    def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
             is_causal: bool = False, scale: float | None = None, **kwargs: Any) -> Tensor:
        inside = capture.stack[-1] if capture.stack else ("", model)
        if not isinstance(inside[1], nn.MultiheadAttention):  # its hook measures it, masks and all
            k = key
            if kwargs.get("enable_gqa") and key.shape[-3] != query.shape[-3]:
                k = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            capture.note(inside[0], attention_logit_max(query, k, attn_mask, is_causal, scale))
        extra = {"scale": scale} if scale is not None else {}
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        **extra, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield capture.maxima
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()
