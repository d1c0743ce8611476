"""The Mamba-2 block and language model, built on the SSD layer (`aotlib.ssd.ssd`).

One Mamba-2 block (Dao and Gu 2024, Sec. 7 "parallel" Mamba block), on u (b, l, d):

    z, xBC, dt = in_proj(u)                  one projection makes every input in parallel
    x, B, C    = SiLU(causal depthwise conv1d(xBC))   short local mixing, kernel 4
    dt         = softplus(dt + dt_bias)      > 0, one step size per head
    A          = -exp(A_log)                 < 0, one decay rate per head
    y          = SSD(x, dt, A, B, C) + D x   sequence mixing (x in heads of size P)
    out        = out_proj(RMSNorm(y * SiLU(z)))   gate, then normalise (groupwise)

Unlike Mamba-1, B, C and dt come from the block input, not from x, so the whole input
side is one matmul; the extra normalisation after the gate stabilises larger models.

The LM stacks n_layer blocks with pre-norm residuals, x + block(RMSNorm(x)), between a
token embedding and an LM head tied to it, with a final RMSNorm. Init follows the paper's
description of the official models: dt log-uniform in [1e-3, 1e-1] (stored through the
inverse of softplus in dt_bias), A uniform in [1, 16], D = 1, N(0, 0.02) embedding,
output projections scaled by 1/sqrt(n_layer).

Which SSD algorithm runs is `Mamba2Block.ssd_backend` ("auto": Triton on CUDA, chunked
PyTorch on CPU; "scan" is the step-by-step reference); all give the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aotlib.layers import Dropout, check_input
from aotlib.model_config import ModelConfig
from aotlib.ssd import ssd

D_CONV = 4  # width of the short causal convolution (the paper's default)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt init range; floor keeps log/inverse finite
A_INIT_RANGE = (1.0, 16.0)


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with `z`, the gated form RMSNorm(x * SiLU(z)) over groups."""

    def __init__(self, d: int, group_size: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size = group_size or d
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if z is not None:
            x = x * F.silu(z.float())
        # With ngroups > 1, each group of heads is normalised on its own, so the layer
        # does not mix statistics across groups (keeps tensor-parallel splits exact).
        xg = x.unflatten(-1, (-1, self.group_size))  # (..., g, d / g)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight).to(dtype)


class Mamba2Block(nn.Module):
    """The Mamba-2 mixer: (b, l, d_model) -> (b, l, d_model), causal in l."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_inner = cfg.expand * cfg.d_model
        self.d_inner = d_inner
        self.nheads = cfg.n_heads_ssm
        self.d_bc = cfg.ngroups * cfg.d_state  # width of B (and of C)
        self.ssd_backend = "auto"

        # Order of the projection's outputs: z, x, B, C, dt.
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner + 2 * self.d_bc + self.nheads, bias=False)
        conv_dim = d_inner + 2 * self.d_bc
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, D_CONV, groups=conv_dim, padding=D_CONV - 1, bias=True
        )
        h = self.nheads
        # dt = exp(U[log dt_min, log dt_max]); store softplus^-1(dt) = dt + log(1 - exp(-dt)).
        dt = torch.exp(torch.rand(h) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # (h,)
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(*A_INIT_RANGE)))  # (h,)
        self.D = nn.Parameter(torch.ones(h))  # (h,)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # as the official models; a trainer may honour it
        self.norm = RMSNorm(d_inner, group_size=d_inner // cfg.ngroups)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, l, _ = u.shape
        cfg, h = self.cfg, self.nheads
        zxbcdt = self.in_proj(u)  # (b, l, 2 di + 2 g n + h)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * self.d_bc, h], dim=-1)
        # Depthwise conv over time; padding D_CONV-1 on both sides, keep the first l
        # outputs so position t sees only t-3..t (causal).
        xBC = self.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2)  # (b, l, di + 2gn)
        xBC = F.silu(xBC)
        x, B, C = xBC.split([self.d_inner, self.d_bc, self.d_bc], dim=-1)
        x = x.unflatten(-1, (h, cfg.head_dim))  # (b, l, h, p)
        B = B.unflatten(-1, (cfg.ngroups, cfg.d_state))  # (b, l, g, n)
        C = C.unflatten(-1, (cfg.ngroups, cfg.d_state))  # (b, l, g, n)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        y = ssd(x, dt, A, B, C, cfg.chunk_size, D=self.D, backend=self.ssd_backend)
        y = y.flatten(-2)  # (b, l, di)
        return self.out_proj(self.norm(y, z))  # (b, l, d)


class Mamba2LM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "mamba2":
            raise ValueError(f"Mamba2LM needs cfg.arch == 'mamba2', got {cfg.arch!r}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.norms = nn.ModuleList(RMSNorm(cfg.d_model) for _ in range(cfg.n_layer))
        self.blocks = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as the official Mamba LMs

        nn.init.normal_(self.wte.weight, std=0.02)
        with torch.no_grad():
            # Each block adds to the residual stream; scale its output projection so the
            # stream's variance at init does not grow with depth (GPT-2's argument).
            for blk in self.blocks:
                blk.out_proj.weight /= math.sqrt(cfg.n_layer)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight]

    def set_ssd_backend(self, backend: str) -> None:
        """Run every block's SSD with `backend` ("auto", "chunked", "scan", ...)."""
        for blk in self.blocks:
            blk.ssd_backend = backend

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final-RMSNorm output, (B, T) -> (B, T, d): logits = lm_head(this)."""
        check_input(idx, self.cfg)
        x = self.drop(self.wte(idx))  # (B, T, d)
        for norm, blk in zip(self.norms, self.blocks):
            x = x + self.drop(blk(norm(x)))  # (B, T, d)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))  # (B, T, V)
