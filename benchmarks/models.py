"""Benchmark models shared by the benchmarks and tests, built from ``torch.nn`` only.

- :func:`mlp`: a fully connected network with tanh activations.
- :func:`small_cnn`: two convolutions with BatchNorm, a pooled linear head.
- :func:`resnet18`: ResNet-18 for 32×32 inputs (He et al. 2016, CIFAR variant: 3×3 stem, no
  max-pool), 11.2M parameters for 10 classes.
- :func:`gpt2`: a GPT-2-sized causal decoder (Radford et al. 2019; 12 layers, width 768, 12
  heads, 50257-token vocabulary, 1024 positions, input and output embeddings tied: 124M
  parameters), pre-LayerNorm blocks with ``scaled_dot_product_attention``.

Each ``*_batch`` function returns a random ``(inputs, targets)`` batch for its model, drawn from
a local generator (never the global RNG), and each model has a matching loss function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "mlp",
    "small_cnn",
    "resnet18",
    "gpt2",
    "classification_batch",
    "image_batch",
    "token_batch",
    "language_model_loss",
]


def mlp(in_features: int = 16, hidden: int = 32, out_features: int = 4, depth: int = 2) -> nn.Sequential:
    """``depth`` hidden tanh layers of width ``hidden`` and a linear output layer."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 3, channels: int = 8, num_classes: int = 10, batchnorm: bool = True) -> nn.Sequential:
    """conv-BN-ReLU, conv-BN-ReLU (stride 2), global average pool, linear. Any input size ≥ 4."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        norm(2 * channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, num_classes),
    )


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) for 28×28 single-channel images, with ReLU and max pooling:
    conv 5×5 (6), pool, conv 5×5 (16), pool, linear 256-120-84-10 (44,426 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images: 3×3 stem, four stages of two basic blocks, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet18:
    """ResNet-18 (CIFAR variant); ``width`` 64 is the standard one, smaller widths for CPU tests."""
    return ResNet18(num_classes, width)


class _DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """A causal decoder of the GPT-2 shape; ``forward(tokens (B, T)) -> logits (B, T, vocab)``."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([_DecoderBlock(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2(vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12, heads: int = 12) -> GPT2:
    """GPT-2 small by default (124M parameters with tied embeddings); shrink for CPU tests."""
    return GPT2(vocab, context, width, layers, heads)


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over all positions: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def classification_batch(
    n: int, in_features: int, num_classes: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """n Gaussian inputs of ``in_features`` and uniformly random class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=g, dtype=dtype), torch.randint(0, num_classes, (n,), generator=g)


def image_batch(
    n: int, size: int = 32, channels: int = 3, num_classes: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """n Gaussian images (n, channels, size, size) and random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    return x, torch.randint(0, num_classes, (n,), generator=g)


def token_batch(n: int, length: int, vocab: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n random token sequences of ``length`` and their next tokens (shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
