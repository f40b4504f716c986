"""The largest attention logit per layer, captured during a forward pass, against q·kᵀ/√d
recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlens.measures.attention_logits import attention_logit_max, capture_attention_logits


def _manual_multihead(module: nn.MultiheadAttention, x: torch.Tensor, allowed: torch.Tensor | None = None) -> float:
    e, h = module.embed_dim, module.num_heads
    q = x @ module.in_proj_weight[:e].T + module.in_proj_bias[:e]
    k = x @ module.in_proj_weight[e:2 * e].T + module.in_proj_bias[e:2 * e]
    n, length, _ = x.shape
    q = q.reshape(n, length, h, e // h).transpose(1, 2)
    k = k.reshape(n, length, h, e // h).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(e // h)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    return float(logits.max())


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_logits_match_a_manual_recomputation(need_weights):
    torch.manual_seed(0)
    model = nn.Sequential()
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8) * 3
    with capture_attention_logits(attention) as found:
        attention(x, x, x, need_weights=need_weights)
    assert found == {"": pytest.approx(_manual_multihead(attention, x), rel=1e-5)}
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -2:] = True  # the last two keys are padding
    with capture_attention_logits(attention) as found:
        attention(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    allowed = (~padding)[:, None, None, :].expand(3, 2, 5, 5)
    assert found[""] == pytest.approx(_manual_multihead(attention, x, allowed), rel=1e-5)
    assert not attention._forward_hooks and not attention._forward_pre_hooks  # hooks removed
    del model


class Block(nn.Module):
    """Hand-written causal attention through F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(q[:, None], k[:, None], k[:, None], is_causal=True)[:, 0]


def test_sdpa_calls_are_captured_per_module_with_their_causal_mask_and_the_function_is_restored():
    torch.manual_seed(1)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(2, 7, 6) * 4
    original = F.scaled_dot_product_attention
    with capture_attention_logits(model) as found:
        model(x)
    assert F.scaled_dot_product_attention is original
    hidden = x
    for index, block in enumerate(model):
        q, k = block.qk(hidden).chunk(2, dim=-1)
        logits = (q @ k.transpose(-2, -1) / math.sqrt(6)).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -math.inf)
        assert found[str(index)] == pytest.approx(float(logits.max()), rel=1e-5)
        hidden = block(hidden)
    assert attention_logit_max(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.zeros(2, 2, dtype=torch.bool)) != \
        attention_logit_max(torch.ones(1, 2, 3), torch.ones(1, 2, 3))  # nothing allowed: NaN


def test_a_small_hugging_face_model_built_from_its_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    with capture_attention_logits(model) as found:
        model(ids)
    assert len(found) == 2 and all(math.isfinite(v) for v in found.values())
