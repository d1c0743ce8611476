"""A nanoGPT-style causal transformer: the Arrows-of-Time paper's main model.

Pre-LayerNorm blocks (attention, then a 4x GELU MLP), learned position embeddings,
dropout on embeddings, attention weights and both residual branches, a final LayerNorm
and an LM head tied to the token embedding. Attention is F.scaled_dot_product_attention
(flash attention on CPU too) except when training with dropout, where the weights are
materialised so that `aotlib.layers.Dropout` can drop them. Init as in GPT-2/nanoGPT: N(0, 0.02)
everywhere, residual output projections scaled by 1/sqrt(2 n_layer) so the residual
stream's variance does not grow with depth.

The paper's own GPT unties the LM head; see `aotlib.models` for how counts compare.

`GPT(cfg, short_conv=k)` puts a causal depthwise convolution of width k in front of each
attention layer (on the normalised input of q, k and v), as zoology's attention baseline
for associative recall does (aotlib.mqar): it lets a 2-layer model see the previous token
at every position, the shift that recall needs. The default, 0, is the plain GPT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aotlib.layers import Dropout, check_input, dropout_keep_mask
from aotlib.model_config import ModelConfig


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax attention (no dropout), the reference for the SDPA fast path.

    q, k, v: (B, nh, T, hs) -> (B, nh, T, hs).
    """
    T = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
    return att @ v  # (B, nh, T, hs)


class ShortCausalConv(nn.Module):
    """Depthwise causal conv over time: out_t = bias + sum_j w_j x_{t-(k-1-j)}, x_{<0} = 0."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, width, groups=d, padding=width - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        y = self.conv(x.transpose(1, 2))  # (B, C, T + width - 1): padded on both sides
        return y[..., :T].transpose(1, 2)  # (B, T, C): the first T outputs are the causal ones


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, short_conv: int = 0) -> None:
        super().__init__()
        self.conv = ShortCausalConv(cfg.d_model, short_conv) if short_conv else None
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = Dropout(cfg.dropout)
        self.use_reference = False  # True: plain attention instead of SDPA (tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if self.conv is not None:
            x = self.conv(x)  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.use_reference:
            y = causal_attention_reference(q, k, v)
        elif self.training and self.dropout > 0:
            # SDPA's own dropout draws one random number per weight (slow on CPU) and
            # falls back to this same materialised form anyway.
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            future = torch.full((T, T), float("-inf"), device=x.device).triu(1)  # (T, T)
            att = (att + future).softmax(dim=-1)  # an add needs no work in backward
            scale = dropout_keep_mask(att, self.dropout) * (1.0 / (1.0 - self.dropout))
            y = (att * scale.to(att.dtype)) @ v  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) inside


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, short_conv: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, short_conv)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, short_conv: int = 0) -> None:
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs cfg.arch == 'gpt', got {cfg.arch!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, short_conv) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Tying saves vocab x d parameters, the largest table of a small model.
        self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # the two residual projections of each block
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight, self.wpe.weight]

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm output, (B, T) -> (B, T, C): logits = lm_head(this)."""
        check_input(idx, self.cfg)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)  # (B, T, C)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))  # (B, T, V)
