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

import ctypes
import math

import torch
import torch.nn.functional as F
from torch import nn

from aotlib import native
from aotlib.layers import Dropout, check_input
from aotlib.model_config import ModelConfig
from aotlib.ssd import ssd, ssd_chunked

D_CONV = 4  # width of the short causal convolution (the paper's default)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt init range; floor keeps log/inverse finite
A_INIT_RANGE = (1.0, 16.0)


class CausalConvSiLU(torch.autograd.Function):
    """SiLU(causal depthwise conv1d(x)) over time, in the (b, l, c) layout the projection
    makes, with its backward written out: the same numbers as nn.Conv1d (padding k-1, the
    first l outputs) then F.silu. The output comes as one contiguous tensor per group of
    channels in `sizes` (the block's x, B and C): a split of one output would hand the SSD
    strided views, and its backward would copy their gradients together (`cat`) again;
    here each SiLU writes its own output and each SiLU backward its slice of one gradient.

    out_t = SiLU(bias + sum_j w_j x_{t-(k-1-j)}), x_{<0} = 0; one multiply-add per tap
    over the time-shifted input, in the order nn.Conv1d sums them. On CPU, nn.Conv1d wants
    (b, c, l) and a contiguous input (a transposed copy of a slice of the projection), and
    its depthwise backward and the SiLU backward on its transposed output were together
    about a fifth of a Mamba-2 training step here (profiled); this is a few passes over x.
    Backward: with da = dout SiLU'(a), dx_t = sum_j w_j da_{t+k-1-j},
    dw_j = sum_{b,t} da_t x_{t-(k-1-j)}, dbias = sum_{b,t} da_t.

    Float32 on the CPU and at Mamba-2's width 4, both directions run as one pass of a C
    kernel (`aotlib/mamba2_cpu.c`, through `aotlib.native`), which reads x in place and
    recomputes the pre-activation in the backward: forward + backward in 0.54-0.61x the
    time of the torch form below (`python -m aotlib.bench native`), which stays as the
    reference and runs everywhere else.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sizes):  # x (b, l, c), weight (c, k), bias (c,)
        if sum(sizes) != x.shape[-1]:
            raise ValueError(f"sizes {sizes} do not add up to the {x.shape[-1]} channels")
        lib = _native_kernel(x, weight, bias)
        if lib is not None:
            return _native_forward(ctx, lib, x, weight, bias, sizes)
        ctx.lib = None
        l, k = x.shape[1], weight.shape[1]
        # Contiguous operands: x is a slice of the projection's output and weight[:, j]
        # is strided; the taps' multiply-adds on them ran at half speed (measured).
        x = x.contiguous()
        w = weight.t().contiguous()  # (k, c): tap j's weights, contiguous
        a = x.new_empty(x.shape).copy_(bias)  # (b, l, c), the pre-activation (a new tensor:
        # expand(...).contiguous() would hand back bias itself at b = l = 1)
        for j in range(k):
            s = k - 1 - j  # tap j reads x_{t-s}
            if s < l:
                a[:, s:].addcmul_(x[:, : l - s], w[j])
        ctx.save_for_backward(x, w, a)
        ctx.sizes = sizes
        return tuple(F.silu(part) for part in a.split(sizes, dim=-1))  # each contiguous

    @staticmethod
    def backward(ctx, *douts):
        if ctx.lib is not None:
            return _native_backward(ctx, *douts)
        x, w, a = ctx.saved_tensors
        b, l, c = x.shape
        k = w.shape[0]
        da = torch.empty_like(a)  # (b, l, c)
        for dout, a_part, da_part in zip(douts, a.split(ctx.sizes, -1), da.split(ctx.sizes, -1)):
            torch.ops.aten.silu_backward.grad_input(dout, a_part, grad_input=da_part)
        dx = torch.mul(da, w[k - 1])  # tap k-1 reads x_t itself: it covers every t
        dw = torch.zeros_like(w)  # (k, c)
        flat = da.new_empty(da.numel())  # one buffer for the products of every tap
        for j in range(k):
            s = k - 1 - j
            if s < l:
                if s:
                    dx[:, : l - s].addcmul_(da[:, s:], w[j])
                # summed as (b (l-s), c) rows of a contiguous buffer: 2-4x faster than a
                # strided out= or a sum over (0, 1) of a fresh product (measured)
                prod = flat[: b * (l - s) * c].view(b, l - s, c)
                torch.mul(da[:, s:], x[:, : l - s], out=prod)
                dw[j] = prod.view(-1, c).sum(0)
        return dx, dw.t(), da.view(-1, c).sum(0), None


def _native_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """`mamba2_cpu.c`'s conv where it applies: Mamba-2's width 4, contiguous channels, and
    what `native.kernels_for` asks; else None."""
    if weight.shape[1] != 4 or x.stride(-1) != 1 or not bias.is_contiguous():
        return None
    return native.kernels_for("mamba2_cpu", x, weight, bias)


def _native_forward(ctx, lib, x, weight, bias, sizes):
    """CausalConvSiLU.forward by the C kernel: one pass over x, one output per group."""
    b, l, c = x.shape
    w = weight.t().contiguous()  # (4, c)
    outs = [x.new_empty(b, l, s) for s in sizes]  # each contiguous
    widths = (ctypes.c_int64 * len(sizes))(*sizes)
    ptrs = (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])
    status = lib.causal_conv_silu_forward(
        x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), bias.data_ptr(),
        b, l, c, len(sizes), widths, ptrs,
    )  # fmt: skip
    native.check(status, "causal_conv_silu_forward")
    ctx.save_for_backward(x, w, bias)
    ctx.lib, ctx.sizes = lib, sizes
    return tuple(outs)


def _native_backward(ctx, *douts):
    """CausalConvSiLU.backward by the C kernel: a_t recomputed from x, one pass."""
    x, w, bias = ctx.saved_tensors
    b, l, c = x.shape
    douts = [d.contiguous() for d in douts]
    dx = x.new_empty(b, l, c)
    dw = torch.zeros(w.shape, dtype=torch.float64)  # summed in double, returned as float
    dbias = torch.zeros(c, dtype=torch.float64)
    widths = (ctypes.c_int64 * len(ctx.sizes))(*ctx.sizes)
    ptrs = (ctypes.c_void_p * len(douts))(*[d.data_ptr() for d in douts])
    status = ctx.lib.causal_conv_silu_backward(
        x.data_ptr(), x.stride(0), x.stride(1), w.data_ptr(), bias.data_ptr(),
        b, l, c, len(douts), widths, ptrs, dx.data_ptr(), dw.data_ptr(), dbias.data_ptr(),
    )  # fmt: skip
    native.check(status, "causal_conv_silu_backward")
    return dx, dw.to(x.dtype).t(), dbias.to(bias.dtype), None


def causal_conv_silu(
    x: torch.Tensor, conv: nn.Conv1d, sizes: list[int] | None = None
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """SiLU(conv(x)) causal in time for x (b, l, c) and a depthwise `conv` with padding
    k-1: (b, l, c), or with `sizes` (summing to c) one contiguous (b, l, size) per group of
    channels, as `.split(sizes, -1)` of it would give (but not as views)."""
    parts = CausalConvSiLU.apply(x, conv.weight.squeeze(1), conv.bias, sizes or [x.shape[-1]])
    return parts if sizes is not None else parts[0]


class GatedRMSNorm(torch.autograd.Function):
    """RMSNorm(x * SiLU(z)) over groups of `group_size` channels, times weight (z None:
    RMSNorm(x), no gate), with its backward written out: the same function as `RMSNorm`'s
    plain form (the gate, then the norm of each group), in fewer passes over the (b, l, d)
    tensors than autograd's replay of its seven ops (about 15% less time here, measured).

    With xs = x SiLU(z), r = 1 / sqrt(mean_group(xs^2) + eps), n = xs r, out = n w:
    dn = dout w, dxs = r (dn - n mean_group(dn n)), dw = sum_rows dout n,
    dx = dxs SiLU(z), dz = dxs x SiLU'(z).

    Float32 on the CPU, each direction is one pass of a C kernel (`aotlib/mamba2_cpu.c`),
    which keeps only r and recomputes the gate and n in the backward: forward + backward in
    0.43-0.54x the time of the torch form below (`python -m aotlib.bench native`; 0.51-0.63x
    without the gate), the reference, which runs everywhere else.
    """

    @staticmethod
    def forward(ctx, x, z, weight, group_size: int, eps: float):
        if x.shape[-1] % group_size:
            raise ValueError(f"{x.shape[-1]} channels do not split into groups of {group_size}")
        lib = native.kernels_for("mamba2_cpu", x, weight, *([] if z is None else [z]))
        ctx.lib = lib
        if lib is not None:
            x, z = x.contiguous(), None if z is None else z.contiguous()
            weight = weight.contiguous()
            d = x.shape[-1]
            out = torch.empty_like(x)
            r = x.new_empty(*x.shape[:-1], d // group_size)  # (..., G)
            status = lib.gated_rms_norm_forward(
                x.data_ptr(), native.ptr(z), weight.data_ptr(), x.numel() // d, d, group_size,
                eps, out.data_ptr(), r.data_ptr(),
            )  # fmt: skip
            native.check(status, "gated_rms_norm_forward")
            ctx.save_for_backward(x, z, weight, r)
            ctx.group_size = group_size
            return out
        gz = None if z is None else F.silu(z)
        xs = (x.clone() if z is None else x * gz).unflatten(-1, (-1, group_size))  # (..., G, gs)
        r = torch.rsqrt(xs.square().mean(-1, keepdim=True) + eps)  # (..., G, 1)
        n = xs.mul_(r)  # normalised, in place of xs
        ctx.save_for_backward(x, z, gz, n, r, weight)
        return n.flatten(-2) * weight

    @staticmethod
    def backward(ctx, dout):
        if ctx.lib is not None:  # one pass, the gate and the norm recomputed from x and z
            x, z, weight, r = ctx.saved_tensors
            d = x.shape[-1]
            dout = dout.contiguous()
            dx, dz = torch.empty_like(x), None if z is None else torch.empty_like(z)
            dw = torch.zeros(d, dtype=torch.float64)
            status = ctx.lib.gated_rms_norm_backward(
                x.data_ptr(), native.ptr(z), weight.data_ptr(), x.numel() // d, d,
                ctx.group_size, r.data_ptr(), dout.data_ptr(), dx.data_ptr(), native.ptr(dz),
                dw.data_ptr(),
            )  # fmt: skip
            native.check(status, "gated_rms_norm_backward")
            return dx, dz, dw.to(weight.dtype), None, None
        x, z, gz, n, r, weight = ctx.saved_tensors
        dw = (dout * n.flatten(-2)).flatten(0, -2).sum(0)  # (d,)
        dn = (dout * weight).unflatten(-1, n.shape[-2:])  # (..., G, gs)
        dot = (dn * n).mean(-1, keepdim=True)  # (..., G, 1)
        dxs = dn.sub_(n * dot).mul_(r).flatten(-2)  # (..., d)
        if z is None:
            return dxs, None, dw, None, None
        dx = dxs * gz
        dz = torch.ops.aten.silu_backward(dxs.mul_(x), z)
        return dx, dz, dw, None, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with `z`, the gated form RMSNorm(x * SiLU(z)) over groups.
    Both run as `GatedRMSNorm` (z None: no gate); `fused = False` runs them as plain ops,
    the reference. Computed in at least float32 whatever the input's dtype, returned in
    it."""

    def __init__(self, d: int, group_size: int | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size = group_size or d
        self.eps = eps
        self.fused = True

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        if self.fused:
            z = None if z is None else z.to(x.dtype)
            return GatedRMSNorm.apply(x, z, self.weight, self.group_size, self.eps).to(dtype)
        if z is not None:
            x = x * F.silu(z.to(x.dtype))
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
        # The chunked path's backward: "chunked" (written out, aotlib.ssd_grad) or
        # "autograd" through its steps (the training path before it; benchmarks' A/B).
        self.ssd_backward = "chunked"
        # "taps": `causal_conv_silu`; "conv1d": nn.Conv1d then F.silu (the plain form).
        self.conv_form = "taps"

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
        # Depthwise conv over time, causal: position t sees only t-3..t (nn.Conv1d's
        # weights, padding D_CONV-1 and the first l outputs), then SiLU.
        sizes = [self.d_inner, self.d_bc, self.d_bc]
        if self.conv_form == "taps":
            x, B, C = causal_conv_silu(xBC, self.conv1d, sizes)  # (b, l, di), 2x (b, l, gn)
        else:
            xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2))
            x, B, C = xBC.split(sizes, dim=-1)
        x = x.unflatten(-1, (h, cfg.head_dim))  # (b, l, h, p)
        B = B.unflatten(-1, (cfg.ngroups, cfg.d_state))  # (b, l, g, n)
        C = C.unflatten(-1, (cfg.ngroups, cfg.d_state))  # (b, l, g, n)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        if self.ssd_backward == "autograd" and self.ssd_backend in ("auto", "chunked"):
            y = ssd_chunked(x, dt, A, B, C, cfg.chunk_size, D=self.D, backward="autograd")
        else:
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
