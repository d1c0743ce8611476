"""SSD in Triton: the chunked algorithm of `aotlib.ssd.ssd_chunked` as GPU kernels, with backward.

Same function, same signature as `ssd_chunked`; the math per chunk c of Q steps (one head,
s_t = sum of dt*A over the chunk up to and including t, so every s_t <= 0):

    S_c     = sum_u exp(s_last - s_u) dt_u x_u B_u^T            chunk state   (P, N)
    H_{c+1} = exp(s_last) H_c + S_c,   H_0 = initial_state       state passing
    y_t     = sum_{u <= t} exp(s_t - s_u) (C_t . B_u) dt_u x_u    diagonal block
              + exp(s_t) H_c C_t + D x_t                         state to output

Forward, four kernels (the official code's five with C B^T fused into the output kernel):
`_chunk_cumsum_kernel` -> `_chunk_state_kernel` -> `_state_passing_kernel` ->
`_chunk_scan_kernel`. Backward recomputes the first three (only the inputs are saved),
runs `_chunk_state_kernel` and `_state_passing_kernel` again in reverse on dy to get the
gradient of every chunk's state, then `_chunk_scan_bwd_dx_kernel` (dx, dt and the decay
gradients) and `_chunk_scan_bwd_dbdc_kernel` (dB, dC). No atomics: partial sums over
tiles go to their own buffers and are reduced in PyTorch, so gradients are deterministic.

Numerics: every exponent is clamped to <= 0 before exp (the official kernels' NaN came
from exp of slightly positive cumsum differences), and the in-chunk exponents
s_t - s_u and s_last - s_u are summed over their own segment (`_decay_matrix`), never
taken as a difference of two cumulative sums, which loses ~3 digits in float32 when
dt*A is large; the decay gradients are likewise sums over their own ranges. All sums
accumulate in float32 whatever the input dtype; decays cross chunk boundaries only
through the (P, N) state, so long sequences cannot overflow. Offsets into the big
tensors are int64. Chunk sizes: powers of two up to 128 (one Q x Q tile on chip); every
chunk size computes the same function, so `aotlib.ssd.ssd(backend="auto")` runs a chunk
these kernels cannot tile (the 130m preset's 256) at `supported_chunk_size` of it.
Every launch is a flat 1-D grid (`_grid`), so no grid axis meets CUDA's 65,535 cap, and
runs under the device guard of its tensors (`_on_device_of`), as DDP's cuda:1 ranks need.

Where it runs. Triton 3.7 reads TRITON_INTERPRET when `triton` is imported (its own
`tl.cumsum`, `tl.sum` are built then), so one process is either all-compiled or
all-interpreted. On import, if there is no CUDA device and TRITON_INTERPRET is unset,
this module sets TRITON_INTERPRET=1 before importing triton: CPU tensors then run
through the interpreter (float32 only, slow; used by the tests). With a CUDA device the
kernels are compiled and want CUDA tensors; CPU tensors raise a ValueError that says to
set TRITON_INTERPRET=1 (or use `aotlib.ssd.ssd_chunked`). On GPU, float32, bfloat16 and
float16 inputs are accepted; dots use TF32, and 3xTF32 (float32 accuracy) for float16
inputs (`DOT_PRECISION`).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

if (
    "triton" not in sys.modules
    and "TRITON_INTERPRET" not in os.environ
    and not torch.cuda.is_available()
):
    # Must happen before `import triton`: see the module docstring.
    os.environ["TRITON_INTERPRET"] = "1"

import triton
import triton.language as tl

from aotlib.ssd_inputs import check_ssd_inputs

# Test hooks. NAN_FILL: allocate every kernel output filled with NaN, so an element a
# kernel forgot to write fails loudly. MAX_BLOCK: cap on the P and N tile widths (tests
# lower it to 16 so several tiles, masked edges and the N loop all run).
NAN_FILL: bool = False
MAX_BLOCK: int = 64
# Largest chunk: a (Q, Q) float32 tile must stay on chip.
MAX_CHUNK = 128
# tl.dot's input precision by input dtype; any other dtype: "tf32" (the interpreter is
# exact either way). TF32 keeps a 10-bit significand and rounds the float32 tiles the
# kernels compute (decay-weighted inputs, states, L o C B^T): beside bfloat16's own 7-bit
# inputs that is noise, but float16 inputs keep 10 bits, so TF32 doubles their error; the
# dA gradient, a sum over every step, reached 0.71 of its tolerance in an emulated TF32
# run (length 33, chunk 8, 2 groups). Float16 runs "tf32x3": each operand split into two
# TF32 parts, three tensor-core products, float32's accuracy to ~2^-21, at ~3x a TF32
# dot. Not "ieee" (exact float32 on the CUDA cores): compiled for sm_90 its chunk-state
# kernel spills 7-15 KB of registers per thread (ptxas -v: `gpu_check.py --compile-only
# --spills`). The models train in bfloat16 (autocast), on TF32.
DOT_PRECISION: dict[torch.dtype, str] = {torch.float16: "tf32x3"}


# ---------------------------------------------------------------------------
# Kernels. One flat grid axis: chunk c (fastest), tile, (batch, head) pair. Tiles are
# BLOCK_Q (the chunk, padded to >= 16 for tl.dot) by BLOCK_P (head dim) or BLOCK_N (state
# size); rows past the chunk or the sequence are masked to zero (dt = 0 there, so they
# decay nothing).
# ---------------------------------------------------------------------------


@triton.jit
def _decay_matrix(dA, offs_q):
    """L[t, u] = exp(sum_{u < k <= t} dA_k) for t >= u, else 0: (BLOCK_Q, BLOCK_Q).

    Each entry is summed over its own segment (a cumsum down a masked matrix), never as
    s_t - s_u: with dt*A ~ -100 per step that difference loses about 3 digits in float32.
    """
    after = offs_q[:, None] > offs_q[None, :]  # (k, u): step k comes after u
    seg = tl.cumsum(tl.where(after, dA[:, None], 0.0), axis=0)  # (t, u)
    causal = offs_q[:, None] >= offs_q[None, :]
    return tl.where(causal, tl.exp(tl.minimum(seg, 0.0)), 0.0)


@triton.jit
def _decay_to_end(dA, offs_q):
    """exp(sum_{k > u} dA_k): decay from step u to the chunk's end, (BLOCK_Q,) over u."""
    after = offs_q[:, None] > offs_q[None, :]
    return tl.exp(tl.minimum(tl.sum(tl.where(after, dA[:, None], 0.0), axis=0), 0.0))


@triton.jit
def _program_ids(nchunks, ntiles):
    """(chunk, tile, batch x head) of this program in the flat grid, chunk fastest.

    Every launch is one grid axis (see `_grid`): CUDA allows 2^31 - 1 programs on axis 0
    but only 65,535 on axes 1 and 2, which batch x heads or the number of chunks can pass.
    """
    pid = tl.program_id(0)
    rest = pid // nchunks
    return (pid % nchunks).to(tl.int64), rest % ntiles, rest // ntiles


@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr,
    A_ptr,
    dA_cumsum_ptr,
    seqlen,
    nheads,
    chunk_size,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    BLOCK_Q: tl.constexpr,
):
    """s_t = cumsum of dt*A within the chunk; dA_cumsum (b, h, c, Q). Tile: (BLOCK_Q,)."""
    pid_c, _, pid_bh = _program_ids(tl.cdiv(seqlen, chunk_size), 1)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    row = (offs_q < chunk_size) & (t < seqlen)
    dt = tl.load(
        dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, mask=row, other=0.0
    ).to(tl.float32)
    a = tl.load(A_ptr + h).to(tl.float32)
    s = tl.cumsum(dt * a, axis=0)
    out = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + pid_c * stride_cs_c + offs_q
    tl.store(out, s, mask=offs_q < chunk_size)


@triton.jit
def _chunk_state_kernel(
    u_ptr,
    v_ptr,
    dt_ptr,
    A_ptr,
    dA_cumsum_ptr,
    states_ptr,
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    chunk_size,
    stride_u_b,
    stride_u_l,
    stride_u_h,
    stride_u_p,
    stride_v_b,
    stride_v_l,
    stride_v_g,
    stride_v_n,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    stride_st_b,
    stride_st_c,
    stride_st_h,
    stride_st_p,
    stride_st_n,
    FROM_END: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """states[b, c, h] (P, N) = sum_t w_t u_t v_t^T over the chunk. Tile: (BLOCK_P, BLOCK_N).

    Forward (FROM_END): u = x, v = B, w_t = dt_t exp(s_last - s_t): the chunk's own state
    (the exponent summed over (t, end] directly, see `_decay_matrix`).
    Backward: u = dy, v = C, w_t = exp(s_t): the gradient the chunk's outputs send to
    the state entering it.
    """
    num_n = tl.cdiv(dstate, BLOCK_N)
    ntiles = tl.cdiv(headdim, BLOCK_P) * num_n
    pid_c, pid_pn, pid_bh = _program_ids(tl.cdiv(seqlen, chunk_size), ntiles)
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = (pid_pn // num_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    row = (offs_q < chunk_size) & (t < seqlen)

    if FROM_END:
        dt = tl.load(
            dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, mask=row, other=0.0
        ).to(tl.float32)
        w = dt * _decay_to_end(dt * tl.load(A_ptr + h).to(tl.float32), offs_q)
    else:
        cs = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + pid_c * stride_cs_c
        s = tl.load(cs + offs_q, mask=offs_q < chunk_size, other=0.0)
        w = tl.exp(tl.minimum(s, 0.0))
    u = tl.load(
        u_ptr
        + b * stride_u_b
        + t[:, None] * stride_u_l
        + h * stride_u_h
        + offs_p[None, :] * stride_u_p,
        mask=row[:, None] & (offs_p[None, :] < headdim),
        other=0.0,
    ).to(tl.float32)  # (BLOCK_Q, BLOCK_P)
    v = tl.load(
        v_ptr
        + b * stride_v_b
        + t[:, None] * stride_v_l
        + g * stride_v_g
        + offs_n[None, :] * stride_v_n,
        mask=row[:, None] & (offs_n[None, :] < dstate),
        other=0.0,
    ).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
    acc = tl.dot(tl.trans(u * w[:, None]), v, input_precision=DOT)  # (BLOCK_P, BLOCK_N)
    out = (
        states_ptr
        + b * stride_st_b
        + pid_c * stride_st_c
        + h * stride_st_h
        + offs_p[:, None] * stride_st_p
        + offs_n[None, :] * stride_st_n
    )
    tl.store(out, acc, mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


@triton.jit
def _state_passing_kernel(
    states_ptr,
    dA_cumsum_ptr,
    carry_in_ptr,
    carry_out_ptr,
    nchunks,
    nheads,
    state_size,
    chunk_size,
    stride_st_b,
    stride_st_c,
    stride_st_h,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    stride_carry_b,
    stride_carry_h,
    last_st_offset,
    last_cs_offset,
    HAS_CARRY_IN: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The sequential scan over chunks, in place, on a (BLOCK,) slice of the flat (P*N) state.

    Forward: on entry states[c] = S_c; on exit states[c] = H_c, the state entering chunk
    c; carry_in = initial state (or 0), carry_out = final state.
    REVERSE (backward): on entry states[c] = G_c, the gradient from chunk c's outputs; on
    exit states[c] = dH_{c+1}, the gradient of the state leaving chunk c;
    carry_in = gradient of the final state (or 0), carry_out = gradient of the initial one.
    """
    _, pid_blk, pid_bh = _program_ids(1, tl.cdiv(state_size, BLOCK))
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    carry_off = b * stride_carry_b + h * stride_carry_h + offs
    if HAS_CARRY_IN:
        state = tl.load(carry_in_ptr + carry_off, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    # Walk the chunks by stepping pointers (64-bit), so c * stride never overflows int32.
    st = states_ptr + b * stride_st_b + h * stride_st_h + offs
    cs = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + chunk_size - 1
    if REVERSE:
        st += last_st_offset  # (nchunks - 1) * stride, computed on the host
        cs += last_cs_offset
        step_st = -stride_st_c
        step_cs = -stride_cs_c
    else:
        step_st = stride_st_c
        step_cs = stride_cs_c
    for _ in range(nchunks):
        here = tl.load(st, mask=mask, other=0.0)
        tl.store(st, state, mask=mask)
        decay = tl.exp(tl.minimum(tl.load(cs), 0.0))
        state = decay * state + here
        st += step_st
        cs += step_cs
    tl.store(carry_out_ptr + carry_off, state, mask=mask)


@triton.jit
def _chunk_scan_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    dA_cumsum_ptr,
    states_ptr,
    y_ptr,
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    chunk_size,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_bc_b,
    stride_bc_l,
    stride_bc_g,
    stride_bc_n,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    stride_st_b,
    stride_st_c,
    stride_st_h,
    stride_st_p,
    stride_st_n,
    HAS_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """Outputs of one chunk: y = (L o C B^T diag(dt)) x + exp(s) C H_c^T + D x.

    Tile: y (BLOCK_Q, BLOCK_P); C B^T (BLOCK_Q, BLOCK_Q) and C H_c^T (BLOCK_Q, BLOCK_P)
    are accumulated over the state in BLOCK_N slices. C B^T is recomputed per head
    rather than shared across a group: one kernel fewer, a little more arithmetic.
    """
    pid_c, pid_p, pid_bh = _program_ids(tl.cdiv(seqlen, chunk_size), tl.cdiv(headdim, BLOCK_P))
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    row = (offs_q < chunk_size) & (t < seqlen)
    col_p = offs_p < headdim

    cs = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + pid_c * stride_cs_c
    s = tl.load(cs + offs_q, mask=offs_q < chunk_size, other=0.0)
    dt = tl.load(
        dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, mask=row, other=0.0
    ).to(tl.float32)

    bc_rows = b * stride_bc_b + t[:, None] * stride_bc_l + g * stride_bc_g
    st = states_ptr + b * stride_st_b + pid_c * stride_st_c + h * stride_st_h
    cb = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    ch = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_n = offs_n < dstate
        mask_qn = row[:, None] & col_n[None, :]
        c_tile = tl.load(C_ptr + bc_rows + offs_n[None, :] * stride_bc_n, mask=mask_qn, other=0.0)
        b_tile = tl.load(B_ptr + bc_rows + offs_n[None, :] * stride_bc_n, mask=mask_qn, other=0.0)
        h_tile = tl.load(
            st + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n,
            mask=col_p[:, None] & col_n[None, :],
            other=0.0,
        )  # (BLOCK_P, BLOCK_N)
        c_tile = c_tile.to(tl.float32)
        cb = tl.dot(c_tile, tl.trans(b_tile.to(tl.float32)), cb, input_precision=DOT)
        ch = tl.dot(c_tile, tl.trans(h_tile), ch, input_precision=DOT)

    decay = _decay_matrix(dt * tl.load(A_ptr + h).to(tl.float32), offs_q)
    m = cb * decay * dt[None, :]  # (BLOCK_Q, BLOCK_Q): y_t <- x_u
    x_tile = tl.load(
        x_ptr
        + b * stride_x_b
        + t[:, None] * stride_x_l
        + h * stride_x_h
        + offs_p[None, :] * stride_x_p,
        mask=row[:, None] & col_p[None, :],
        other=0.0,
    ).to(tl.float32)
    y = tl.dot(m, x_tile, input_precision=DOT) + tl.exp(tl.minimum(s, 0.0))[:, None] * ch
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x_tile
    out = y_ptr + b * stride_x_b + t[:, None] * stride_x_l + h * stride_x_h
    out += offs_p[None, :] * stride_x_p
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=row[:, None] & col_p[None, :])


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    dA_cumsum_ptr,
    states_ptr,
    dstates_ptr,
    dx_ptr,
    ddt_part_ptr,
    d_dA_part_ptr,
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    chunk_size,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_bc_b,
    stride_bc_l,
    stride_bc_g,
    stride_bc_n,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    stride_st_b,
    stride_st_c,
    stride_st_h,
    stride_st_p,
    stride_st_n,
    stride_part_b,
    stride_part_h,
    stride_part_c,
    stride_part_tile,
    HAS_D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """dx for one chunk and P tile, plus this tile's share of the dt and decay gradients.

    With M = L o C B^T (no dt), e_u = exp(s_last - s_u) and dS = dH_{c+1}:
      r_u  = (M^T dy)_u + e_u dS B_u          dx_u = dt_u r_u + D dy_u
      ddt_u (direct) = x_u . r_u              d_dA_u = gradient w.r.t. dA_u = dt_u A
    and dt's full gradient is ddt + A d_dA (PyTorch, after summing the P tiles).
    Tiles: dx, r (BLOCK_Q, BLOCK_P); C B^T, dy x^T (BLOCK_Q, BLOCK_Q); the state products
    C H^T, B dS^T (BLOCK_Q, BLOCK_P) accumulate over BLOCK_N slices. Partial sums are
    written per P tile to ddt_part, d_dA_part (b, h, c, tiles, Q): no atomics.
    """
    pid_c, pid_p, pid_bh = _program_ids(tl.cdiv(seqlen, chunk_size), tl.cdiv(headdim, BLOCK_P))
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    row = (offs_q < chunk_size) & (t < seqlen)
    col_p = offs_p < headdim
    mask_qp = row[:, None] & col_p[None, :]

    cs = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + pid_c * stride_cs_c
    s = tl.load(cs + offs_q, mask=offs_q < chunk_size, other=0.0)
    s_last = tl.load(cs + chunk_size - 1)
    dt = tl.load(
        dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, mask=row, other=0.0
    ).to(tl.float32)
    xy_off = b * stride_x_b + t[:, None] * stride_x_l + h * stride_x_h
    xy_off += offs_p[None, :] * stride_x_p
    x_tile = tl.load(x_ptr + xy_off, mask=mask_qp, other=0.0).to(tl.float32)
    dy_tile = tl.load(dy_ptr + xy_off, mask=mask_qp, other=0.0).to(tl.float32)

    bc_rows = b * stride_bc_b + t[:, None] * stride_bc_l + g * stride_bc_g
    st_off = b * stride_st_b + pid_c * stride_st_c + h * stride_st_h
    cb = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    ch = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)  # C_t H_c^T
    bds = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)  # B_u dS^T
    h_ds = tl.zeros((BLOCK_P,), dtype=tl.float32)  # <H_c, dS> over this P tile
    for n0 in range(0, dstate, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_n = offs_n < dstate
        mask_qn = row[:, None] & col_n[None, :]
        c_tile = tl.load(C_ptr + bc_rows + offs_n[None, :] * stride_bc_n, mask=mask_qn, other=0.0)
        b_tile = tl.load(B_ptr + bc_rows + offs_n[None, :] * stride_bc_n, mask=mask_qn, other=0.0)
        c_tile = c_tile.to(tl.float32)
        b_tile = b_tile.to(tl.float32)
        pn_off = st_off + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n
        mask_pn = col_p[:, None] & col_n[None, :]
        h_tile = tl.load(states_ptr + pn_off, mask=mask_pn, other=0.0)  # (BLOCK_P, BLOCK_N)
        ds_tile = tl.load(dstates_ptr + pn_off, mask=mask_pn, other=0.0)
        cb = tl.dot(c_tile, tl.trans(b_tile), cb, input_precision=DOT)
        ch = tl.dot(c_tile, tl.trans(h_tile), ch, input_precision=DOT)
        bds = tl.dot(b_tile, tl.trans(ds_tile), bds, input_precision=DOT)
        h_ds += tl.sum(h_tile * ds_tile, axis=1)

    dA = dt * tl.load(A_ptr + h).to(tl.float32)
    m = cb * _decay_matrix(dA, offs_q)
    e_last = _decay_to_end(dA, offs_q)
    r = (
        tl.dot(tl.trans(m), dy_tile, input_precision=DOT) + e_last[:, None] * bds
    )  # (BLOCK_Q, BLOCK_P)
    dx = dt[:, None] * r
    if HAS_D:
        dx += tl.load(D_ptr + h).to(tl.float32) * dy_tile
    tl.store(dx_ptr + xy_off, dx.to(dx_ptr.dtype.element_ty), mask=mask_qp)

    ddt = tl.sum(x_tile * r, axis=1)  # (BLOCK_Q,)
    # Gradient w.r.t. each step's dA_k = dt_k A, from the four places decays enter.
    # Every term is a sum over its own index range (no difference of long sums).
    after = offs_q[:, None] > offs_q[None, :]  # (k, u): k after u
    # 1. diagonal block: exponent seg[t, u] = sum_{u < k <= t} dA_k, with gradient z[t, u]
    z = (
        m * dt[None, :] * tl.dot(dy_tile, tl.trans(x_tile), input_precision=DOT)
    )  # (BLOCK_Q, BLOCK_Q)
    d_dA = tl.sum(tl.where(after, tl.cumsum(z, axis=0, reverse=True), 0.0), axis=1)
    # 2. chunk state: exponent sum_{k > u} dA_k, with gradient k_u
    k_u = dt * e_last * tl.sum(x_tile * bds, axis=1)
    d_dA += tl.sum(tl.where(after, k_u[None, :], 0.0), axis=1)
    # 3. state to output: exponent s_t = sum_{k <= t} dA_k
    from_state = tl.exp(tl.minimum(s, 0.0)) * tl.sum(dy_tile * ch, axis=1)
    d_dA += tl.cumsum(from_state, axis=0, reverse=True)
    # 4. state passing: H_{c+1} = exp(s_last) H_c + S_c, s_last sums every step
    d_dA += tl.exp(tl.minimum(s_last, 0.0)) * tl.sum(h_ds, axis=0)

    part = b * stride_part_b + h * stride_part_h + pid_c * stride_part_c
    part += pid_p * stride_part_tile + offs_q
    tl.store(ddt_part_ptr + part, ddt, mask=offs_q < chunk_size)
    tl.store(d_dA_part_ptr + part, d_dA, mask=offs_q < chunk_size)


@triton.jit
def _chunk_scan_bwd_dbdc_kernel(
    x_ptr,
    dy_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    dA_cumsum_ptr,
    states_ptr,
    dstates_ptr,
    dB_ptr,
    dC_ptr,
    seqlen,
    nheads,
    heads_per_group,
    headdim,
    dstate,
    chunk_size,
    stride_x_b,
    stride_x_l,
    stride_x_h,
    stride_x_p,
    stride_dt_b,
    stride_dt_l,
    stride_dt_h,
    stride_bc_b,
    stride_bc_l,
    stride_bc_g,
    stride_bc_n,
    stride_cs_b,
    stride_cs_h,
    stride_cs_c,
    stride_st_b,
    stride_st_c,
    stride_st_h,
    stride_st_p,
    stride_st_n,
    stride_dbc_b,
    stride_dbc_l,
    stride_dbc_h,
    stride_dbc_n,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
):
    """dB and dC of one head (summed over a group's heads in PyTorch), one chunk, N tile.

    With W[t, u] = L[t, u] dt_u (dy_t . x_u) (causal), e_u = exp(s_last - s_u):
      dB_u = sum_t W[t, u] C_t + e_u dt_u dS^T x_u
      dC_t = sum_u W[t, u] B_u + exp(s_t) H_c^T dy_t
    Tiles: dB, dC (BLOCK_Q, BLOCK_N); W (BLOCK_Q, BLOCK_Q) from dy x^T accumulated over
    BLOCK_P slices, as are the state products (x dS, dy H: (BLOCK_Q, BLOCK_N)).
    """
    pid_c, pid_n, pid_bh = _program_ids(tl.cdiv(seqlen, chunk_size), tl.cdiv(dstate, BLOCK_N))
    b = (pid_bh // nheads).to(tl.int64)
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    t = pid_c * chunk_size + offs_q
    row = (offs_q < chunk_size) & (t < seqlen)
    col_n = offs_n < dstate

    cs = dA_cumsum_ptr + b * stride_cs_b + h * stride_cs_h + pid_c * stride_cs_c
    s = tl.load(cs + offs_q, mask=offs_q < chunk_size, other=0.0)
    dt = tl.load(
        dt_ptr + b * stride_dt_b + t * stride_dt_l + h * stride_dt_h, mask=row, other=0.0
    ).to(tl.float32)
    dA = dt * tl.load(A_ptr + h).to(tl.float32)
    e_last = _decay_to_end(dA, offs_q)

    st_off = b * stride_st_b + pid_c * stride_st_c + h * stride_st_h
    dyx = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=tl.float32)
    x_ds = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    dy_h = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, headdim, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        col_p = offs_p < headdim
        xy_off = b * stride_x_b + t[:, None] * stride_x_l + h * stride_x_h
        xy_off += offs_p[None, :] * stride_x_p
        mask_qp = row[:, None] & col_p[None, :]
        x_tile = tl.load(x_ptr + xy_off, mask=mask_qp, other=0.0).to(tl.float32)
        dy_tile = tl.load(dy_ptr + xy_off, mask=mask_qp, other=0.0).to(tl.float32)
        pn_off = st_off + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n
        mask_pn = col_p[:, None] & col_n[None, :]
        h_tile = tl.load(states_ptr + pn_off, mask=mask_pn, other=0.0)  # (BLOCK_P, BLOCK_N)
        ds_tile = tl.load(dstates_ptr + pn_off, mask=mask_pn, other=0.0)
        dyx = tl.dot(dy_tile, tl.trans(x_tile), dyx, input_precision=DOT)
        x_ds = tl.dot(x_tile, ds_tile, x_ds, input_precision=DOT)
        dy_h = tl.dot(dy_tile, h_tile, dy_h, input_precision=DOT)

    w = _decay_matrix(dA, offs_q) * dt[None, :] * dyx  # (BLOCK_Q, BLOCK_Q)
    bc_off = b * stride_bc_b + t[:, None] * stride_bc_l + g * stride_bc_g
    bc_off += offs_n[None, :] * stride_bc_n
    mask_qn = row[:, None] & col_n[None, :]
    c_tile = tl.load(C_ptr + bc_off, mask=mask_qn, other=0.0).to(tl.float32)
    b_tile = tl.load(B_ptr + bc_off, mask=mask_qn, other=0.0).to(tl.float32)
    db = tl.dot(tl.trans(w), c_tile, input_precision=DOT) + (dt * e_last)[:, None] * x_ds
    dc = tl.dot(w, b_tile, input_precision=DOT) + tl.exp(tl.minimum(s, 0.0))[:, None] * dy_h
    out = b * stride_dbc_b + t[:, None] * stride_dbc_l + h * stride_dbc_h
    out += offs_n[None, :] * stride_dbc_n
    tl.store(dB_ptr + out, db, mask=mask_qn)
    tl.store(dC_ptr + out, dc, mask=mask_qn)


# True when the kernels above run under Triton's interpreter (numpy, on the CPU).
INTERPRETED: bool = not isinstance(_chunk_cumsum_kernel, triton.runtime.JITFunction)
# Triton's own tl.cumsum, tl.sum were built when triton was first imported; if that
# happened before this module, in the other mode, no kernel can run (`ssd_triton` says so).
_SAME_MODE_AS_TRITON: bool = type(tl.cumsum) is type(_chunk_cumsum_kernel)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer every element of which a kernel must write (NaN-filled under NAN_FILL)."""
    if NAN_FILL:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _Tiles(NamedTuple):
    BLOCK_Q: int
    BLOCK_P: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


def _tiles(Q: int, p: int, n: int, kind: str) -> _Tiles:
    """Tile shapes and launch options for one kernel kind: "state", "scan" or "bwd".

    Chosen so that no kernel needs more than ~113 KB of shared memory when compiled for
    sm_90 (sizes from triton.compile without a GPU; H100 allows 227 KB, A100 163 KB):
    the (Q, Q) tiles grow with the chunk, so P and N tiles shrink for Q = 128. Float16's
    3xTF32 dots need more: 160 KB (sm_90) and 128 KB (sm_80) at Q = 128.
    """
    bq = max(16, Q)  # tl.dot needs every dimension >= 16
    if kind == "state" or bq <= 64:
        cap_p, cap_n, stages = 64, (32 if kind == "bwd" else 64), 2
    else:
        cap_p, cap_n, stages = 32, 32, 1
    warps = 8 if bq >= 64 and kind != "state" else 4
    bp = max(16, min(triton.next_power_of_2(p), cap_p, MAX_BLOCK))
    bn = max(16, min(triton.next_power_of_2(n), cap_n, MAX_BLOCK))
    return _Tiles(bq, bp, bn, warps, stages)


def _grid(*sizes: int) -> tuple[int]:
    """One flat grid axis of prod(sizes) programs, the first size fastest (`_program_ids`).

    CUDA caps grid axes 1 and 2 at 65,535 programs, axis 0 at 2^31 - 1: batch x heads
    (e.g. 1024 sequences x 64 heads) or the number of chunks (128K steps at chunk 1) can
    pass the small cap, so no launch uses axes 1 or 2.
    """
    total = math.prod(sizes)
    if total > 2**31 - 1:
        raise ValueError(f"{' x '.join(map(str, sizes))} = {total} programs: over CUDA's 2^31 - 1")
    return (total,)


def _dot_precision(*tensors: Tensor) -> str:
    """tl.dot's input precision for these inputs (`DOT_PRECISION`, else "tf32")."""
    found = [DOT_PRECISION[t.dtype] for t in tensors if t.dtype in DOT_PRECISION]
    return found[0] if found else "tf32"


def _chunk_cumsum(dt: Tensor, A: Tensor, Q: int, nchunks: int) -> Tensor:
    b, l, h = dt.shape
    dA_cumsum = _new((b, h, nchunks, Q), torch.float32, dt.device)
    _chunk_cumsum_kernel[_grid(nchunks, b * h)](
        dt, A, dA_cumsum, l, h, Q, *dt.stride(), *dA_cumsum.stride()[:3], BLOCK_Q=max(16, Q)
    )
    return dA_cumsum


def _chunk_state(
    u: Tensor,
    v: Tensor,
    dt: Tensor,
    A: Tensor,
    dA_cumsum: Tensor,
    nheads_per_group: int,
    from_end: bool,
    dot: str,
) -> Tensor:
    """(b, c, h, p, n) float32: forward chunk states, or (from_end=False) their gradients."""
    b, l, h, p = u.shape
    n = v.shape[-1]
    nchunks, Q = dA_cumsum.shape[2:]
    states = _new((b, nchunks, h, p, n), torch.float32, u.device)
    tiles = _tiles(Q, p, n, "state")
    grid = _grid(nchunks, triton.cdiv(p, tiles.BLOCK_P) * triton.cdiv(n, tiles.BLOCK_N), b * h)
    _chunk_state_kernel[grid](
        u, v, dt, A, dA_cumsum, states,
        l, h, nheads_per_group, p, n, Q,
        *u.stride(), *v.stride(), *dt.stride(), *dA_cumsum.stride()[:3], *states.stride(),
        FROM_END=from_end, DOT=dot, **tiles._asdict(),
    )  # fmt: skip
    return states


def _state_passing(
    states: Tensor, dA_cumsum: Tensor, carry_in: Tensor | None, reverse: bool
) -> Tensor:
    """Scan `states` in place (see the kernel); returns the carry out (b, h, p, n) float32."""
    b, nchunks, h, p, n = states.shape
    carry_out = _new((b, h, p, n), torch.float32, states.device)
    if carry_in is not None:
        carry_in = carry_in.contiguous()
    block = max(16, min(triton.next_power_of_2(p * n), 1024))
    grid = _grid(triton.cdiv(p * n, block), b * h)
    _state_passing_kernel[grid](
        states, dA_cumsum, carry_out if carry_in is None else carry_in, carry_out,
        nchunks, h, p * n, dA_cumsum.shape[-1],
        *states.stride()[:3], *dA_cumsum.stride()[:3], *carry_out.stride()[:2],
        (nchunks - 1) * states.stride(1), (nchunks - 1) * dA_cumsum.stride(2),
        HAS_CARRY_IN=carry_in is not None, REVERSE=reverse, BLOCK=block,
    )  # fmt: skip
    return carry_out


def _forward_states(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, initial_state: Tensor | None, Q: int
) -> tuple[Tensor, Tensor, Tensor]:
    """dA_cumsum (b, h, c, Q), entering states H_c (b, c, h, p, n), final state (b, h, p, n)."""
    b, l, h, p = x.shape
    nchunks = max(1, triton.cdiv(l, Q))
    dA_cumsum = _chunk_cumsum(dt, A, Q, nchunks)
    dot = _dot_precision(x, B)
    states = _chunk_state(x, B, dt, A, dA_cumsum, h // B.shape[2], from_end=True, dot=dot)
    final = _state_passing(states, dA_cumsum, initial_state, reverse=False)
    return dA_cumsum, states, final


def _ssd_fwd(x, dt, A, B, C, D, initial_state, Q):
    b, l, h, p = x.shape
    n = B.shape[-1]
    dA_cumsum, states, final = _forward_states(x, dt, A, B, initial_state, Q)
    nchunks = dA_cumsum.shape[2]
    y = _new(x.shape, x.dtype, x.device)
    tiles = _tiles(Q, p, n, "scan")
    _chunk_scan_kernel[_grid(nchunks, triton.cdiv(p, tiles.BLOCK_P), b * h)](
        x, dt, A, B, C, x if D is None else D, dA_cumsum, states, y,
        l, h, h // B.shape[2], p, n, Q,
        *x.stride(), *dt.stride(), *B.stride(), *dA_cumsum.stride()[:3], *states.stride(),
        HAS_D=D is not None, DOT=_dot_precision(x, B, C), **tiles._asdict(),
    )  # fmt: skip
    return y, final


def _ssd_bwd(x, dt, A, B, C, D, initial_state, Q, dy, dfinal):
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    hg = h // g
    dA_cumsum, states, _ = _forward_states(x, dt, A, B, initial_state, Q)
    nchunks = dA_cumsum.shape[2]
    dot = _dot_precision(x, B, C, dy)
    # Gradient of each chunk's entering state from its own outputs, then scanned backward:
    # afterwards dstates[c] = dH_{c+1}, and the carry out is the initial state's gradient.
    dstates = _chunk_state(dy, C, dt, A, dA_cumsum, hg, from_end=False, dot=dot)
    dinit = _state_passing(dstates, dA_cumsum, dfinal, reverse=True)

    tiles = _tiles(Q, p, n, "bwd")
    ptiles = triton.cdiv(p, tiles.BLOCK_P)
    dx = _new(x.shape, x.dtype, x.device)
    ddt_part = _new((b, h, nchunks, ptiles, Q), torch.float32, x.device)
    d_dA_part = _new((b, h, nchunks, ptiles, Q), torch.float32, x.device)
    _chunk_scan_bwd_dx_kernel[_grid(nchunks, ptiles, b * h)](
        x, dy, dt, A, B, C, x if D is None else D, dA_cumsum, states, dstates,
        dx, ddt_part, d_dA_part,
        l, h, hg, p, n, Q,
        *x.stride(), *dt.stride(), *B.stride(), *dA_cumsum.stride()[:3], *states.stride(),
        *ddt_part.stride()[:4],
        HAS_D=D is not None, DOT=dot, **tiles._asdict(),
    )  # fmt: skip
    dB_heads = _new((b, l, h, n), torch.float32, x.device)
    dC_heads = _new((b, l, h, n), torch.float32, x.device)
    _chunk_scan_bwd_dbdc_kernel[_grid(nchunks, triton.cdiv(n, tiles.BLOCK_N), b * h)](
        x, dy, dt, A, B, C, dA_cumsum, states, dstates, dB_heads, dC_heads,
        l, h, hg, p, n, Q,
        *x.stride(), *dt.stride(), *B.stride(), *dA_cumsum.stride()[:3], *states.stride(),
        *dB_heads.stride(),
        DOT=dot, **tiles._asdict(),
    )  # fmt: skip

    # Cheap reductions in PyTorch (deterministic, unlike atomics in the kernels).
    d_dA = d_dA_part.sum(3).reshape(b, h, nchunks * Q)[..., :l].transpose(1, 2)  # (b, l, h)
    dt32 = dt.float()
    ddt = ddt_part.sum(3).reshape(b, h, nchunks * Q)[..., :l].transpose(1, 2)  # (b, l, h)
    ddt = ddt + d_dA * A.float()
    dA = (d_dA * dt32).sum((0, 1))  # (h,)
    dB = dB_heads.view(b, l, g, hg, n).sum(3)  # (b, l, g, n)
    dC = dC_heads.view(b, l, g, hg, n).sum(3)
    dD = None if D is None else (dy.float() * x.float()).sum((0, 1, 3))  # (h,)
    return dx, ddt, dA, dB, dC, dD, dinit


class _SSDTriton(torch.autograd.Function):
    """Autograd wrapper: saves only the inputs, the backward recomputes the states."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        y, final = _ssd_fwd(x, dt, A, B, C, D, initial_state, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, final.to(x.dtype)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        with _on_device_of(x):
            grads = _ssd_bwd(x, dt, A, B, C, D, initial_state, ctx.chunk_size, dy, dfinal)
        dx, ddt, dA, dB, dC, dD, dinit = grads
        dinit = None if initial_state is None else dinit.to(initial_state.dtype)
        dD = None if D is None else dD.to(D.dtype)
        return (
            dx,
            ddt.to(dt.dtype),
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD,
            dinit,
            None,
        )


_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supported_chunk_size(chunk_size: int) -> int:
    """The chunk these kernels run in place of `chunk_size`: the largest power of two
    <= min(chunk_size, MAX_CHUNK). The chunked algorithm's result does not depend on the
    chunk (chunks only split the work), so this changes rounding, not the function."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return min(MAX_CHUNK, 1 << (chunk_size.bit_length() - 1))


def _on_device_of(x: Tensor):
    """A context in which kernels launch on x's GPU (a no-op on the CPU).

    Triton launches on the current CUDA device, not the tensors' one: under DDP a rank
    whose tensors live on cuda:1 while cuda:0 is current would pass foreign addresses.
    """
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _check_backend(tensors: list[Tensor], chunk_size: int) -> None:
    """Errors the shared input checks can't know about: chunk size, device, dtype, mode."""
    x = tensors[0]
    if not _SAME_MODE_AS_TRITON:
        raise RuntimeError(
            "triton was imported before aotlib.ssd_triton with a different TRITON_INTERPRET "
            "setting; import aotlib.ssd_triton first, or set TRITON_INTERPRET=1 (CPU) / "
            "unset it (CUDA) before anything imports triton"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
        raise ValueError(
            f"chunk_size must be a power of two <= {MAX_CHUNK} for the Triton kernels (a "
            f"chunk is one Q x Q tile), got {chunk_size}; use e.g. 64, or "
            f"aotlib.ssd.ssd_chunked for any chunk size"
        )
    if INTERPRETED:
        dtypes = {t.dtype for t in tensors}
        if dtypes != {torch.float32}:
            raise ValueError(
                f"the Triton interpreter (TRITON_INTERPRET=1) supports float32 only, got "
                f"{sorted(map(str, dtypes))}"
            )
        return
    if not x.is_cuda:
        raise ValueError(
            f"compiled Triton kernels need CUDA tensors, got x on {x.device}; run with "
            f"TRITON_INTERPRET=1 (set before triton is imported) for the CPU interpreter, "
            f"or use aotlib.ssd.ssd_chunked"
        )
    bad = {str(t.dtype) for t in tensors if t.dtype not in _GPU_DTYPES}
    if bad:
        raise ValueError(f"inputs must be float32, bfloat16 or float16, got {sorted(bad)}")


def ssd_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD with Triton kernels, differentiable in every input; see `ssd_chunked`.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or None,
    initial_state (b, h, p, n) or None. Any length l; chunk_size a power of two <= MAX_CHUNK
    (`supported_chunk_size` gives the one to use for any other).
    Returns y (b, l, h, p) in x's dtype, and the final state (b, h, p, n) if asked.
    """
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    given = [t for t in (x, dt, A, B, C, D, initial_state) if t is not None]
    _check_backend(given, chunk_size)
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    D = None if D is None else D.contiguous()
    initial_state = None if initial_state is None else initial_state.contiguous()
    with _on_device_of(x):
        y, final = _SSDTriton.apply(x, dt, A, B, C, D, initial_state, chunk_size)
    return (y, final) if return_final_state else y
