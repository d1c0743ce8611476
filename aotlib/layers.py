"""Pieces every language model is built from: the input check and `Dropout`.

The architectures (gpt.py, rnn.py, mamba2.py) import them from here, and `aotlib.models`
(which builds the architectures) re-exports them, so each import points one way:
models -> gpt/rnn/mamba2 -> layers -> model_config.
"""

from __future__ import annotations

import torch
from torch import nn

from aotlib.model_config import ModelConfig


def check_input(idx: torch.Tensor, cfg: ModelConfig) -> None:
    """Shared input check of every model: (B, T) integer ids, 1 <= T <= context."""
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must be a (B, T) integer tensor, got {idx.dtype} {tuple(idx.shape)}")
    if not 1 <= idx.shape[1] <= cfg.context:
        raise ValueError(
            f"input length T={idx.shape[1]} must be in [1, context={cfg.context}]"
            f" (idx {tuple(idx.shape)})"
        )


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean mask shaped like x, each entry True with probability 1 - p (to 2^-15).

    nn.Dropout draws one random number per element, ~10-15 ns each on a CPU, which for
    the CPU GPT costs about as much as all its matmuls. One 64-bit draw from the same
    generator (torch's default, so seeding and saved RNG states still apply) holds
    four 16-bit lanes; keeping 15 uniform bits of each gives four decisions per draw.
    """
    n = x.numel()
    bits = _random_bits(x, (n + 3) // 4)  # (ceil(n/4),) uniform on [0, 2^63)
    lanes = bits.view(torch.int16)[:n].view(x.shape) & 0x7FFF  # uniform on [0, 2^15)
    return lanes >= round(p * 32768)


# A custom op, so torch.compile treats the draw as one opaque random op (no graph break;
# the nondeterministic tag stops the compiler from recomputing it for the backward).
# It takes the tensor being dropped as an input, only so that two draws of the same size
# are never merged into one by common-subexpression elimination (tested).
@torch.library.custom_op(
    "aotlib::random_bits", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _random_bits(like: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, device=like.device).random_()


@_random_bits.register_fake
def _(like: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, device=like.device)


class Dropout(nn.Module):
    """nn.Dropout with `dropout_keep_mask`: same distribution (p rounded to 2^-15), faster."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # Multiplying by a float mask (not torch.where) makes backward a single product.
        scale = dropout_keep_mask(x, self.p) * (1.0 / (1.0 - self.p))  # float32: 0 or 1/(1-p)
        return x * scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
