"""The chunked SSD's training path: a forward that keeps the chunk states, and its backward
written out chunk by chunk, so that training is mostly matmuls too.

Autograd through `aotlib.ssd_chunks`' four steps records dozens of small ops per call and
replays their backward one by one, each with its own temporaries. `ChunkedSSD` instead
runs the blocked forward (`_chunked_in_blocks`, keeping the state entering each chunk,
which is as large as x when N = Q) and a backward that walks the same blocks in reverse:
per block, the adjoints of the four steps, in the order they are needed.

Notation per chunk of Q steps, head h, group g(h) (sums over the group's heads where B or
C are shared). cs_t = dA_1 + ... + dA_t (dA = dt A) within the chunk, and the decays

    F_t = exp(cs_t)              from the chunk's start through t     `from_start` (Q, h)
    W   = exp(cs_Q)              over the whole chunk                 `whole` (h,)
    E_s = exp(cs_Q - cs_s)       from s to the chunk's end            `decay_to_end` (Q, h)
    L[t, s] = exp(cs_t - cs_s)   s <= t (the decay matrix without dt) (h, Q, Q)

Forward (xd = dt x, (Q, h, p); S_k the state entering chunk k, (h, p, n)):

    1. diagonal_blocks   Y_diag = (L o C B^T) xd + D x           per head (Q, Q) @ (Q, p)
    2. chunk_state       s_k    = sum_s E_s xd_s B_s^T            (p, n)
    3. state_passing     S_{k+1} = W S_k + s_k                    a loop over chunks
    4. state_to_output   Y = Y_diag + F_t S_k C_t                 (Q, n) @ (n, p)

Backward, given dY (Q, h, p) and dS_c (the final state's gradient); G_{k+1} is the
gradient reaching S_{k+1}, the state leaving chunk k:

    4*. dC_t += F_t S_k^T dY_t        dF_t = <dY_t, S_k C_t>       (Q, h p) @ (h p, n)
        and S_k receives sum_t F_t dY_t C_t^T  ("dstates", (n, Q) @ (Q, h p))
    3*. G_k = W_k G_{k+1} + dstates_k  (reverse loop)   dW_k = <G_{k+1}, S_k>, dS_0 = G_0
    2*. dxd_s += E_s G_{k+1} B_s       dE_s = <xd_s, G_{k+1} B_s>  (Q, n) @ (n, h p)
        dB_s += G_{k+1}^T (E_s xd_s)                               (Q, h p) @ (h p, n)
    1*. P = L o tril(C B^T):   dxd += P^T dY,  dP = dY xd^T         per head, (Q, Q) x (Q, p)
        d(C B^T) = tril(sum_h dP o L)  ->  dC += d(CB) B,  dB += d(CB)^T C
        Z = dP o P (= L o dL): the gradient reaching L's exponents
        dD = sum <dY, x>,   dx = dt dxd + D dY,   d dt (direct) = <x, dxd>

Every decay is exp of a sum of some dA_k, so its gradient reaches the dA_k it sums as
decay * d(decay). Through cs (each decay is exp(cs_a - cs_b)):

    dcs_t = F_t dF_t + sum_s Z[t, s] - sum_u Z[u, t] - E_t dE_t
    dcs_Q += W dW + sum_s E_s dE_s
    d dA_k = sum_{t >= k} dcs_t   (a reverse cumulative sum, within the chunk)
    d dt += A d dA,   dA (the parameter) = sum dt d dA

The forward never forms cs_t - cs_s (a difference of two long sums, see
`aotlib.ssd_chunks`); the backward's sums stay within one chunk and add gradients, which
need no such care. Work: about twice the forward's matmuls (the usual 2x), plus passes
over (Q, Q) and (Q, p) tensors per head. Memory: the saved inputs, the chunk states
((b, c+1, h, p, n), x's size when N = Q), and one block's temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aotlib.ssd_chunks import (
    ChunkDecays,
    _chunked_in_blocks,
    _sub_chunk_length,
    block_plan,
    blocks,
    chunk_decays,
    chunks_of,
    decay_matrix,
    flat_decays,
)


class ChunkedSSD(torch.autograd.Function):
    """y, final state = SSD(x, dt, A, B, C, D, S0) with the chunked backward above.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or None, S0 the
    initial state in the chunk-state layout (b, g, n, hg*p), all of one dtype. Returns y
    (b, l, h, p) and the final state (b, g, n, hg*p).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, chunk_size: int):
        b, l, h, p = x.shape
        Q = chunk_size
        c = -(-l // Q)
        g, n = B.shape[2:]
        dt_c = torch.nn.functional.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h)
        dec = chunk_decays(dt_c, A, _sub_chunk_length(Q))  # small: (b, c, h, ...)
        states = x.new_empty(b, c + 1, g, n, S0.shape[-1])  # entering each chunk, then last
        y, S = _chunked_in_blocks(x, dec, B, C, D, S0, states=states)
        ctx.save_for_backward(x, A, B, C, D, states)
        ctx.dec = dec  # an intermediate: small next to x
        return y, S

    @staticmethod
    def backward(ctx, dy: Tensor, dS: Tensor):
        x, A, B, C, D, states = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dS0 = chunked_backward(x, A, B, C, D, ctx.dec, states, dy, dS)
        return dx, ddt, dA, dB, dC, dD, dS0, None


def chunked_ssd_function(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    S0: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """`ChunkedSSD.apply`: y (b, l, h, p) and the final state (b, g, n, hg*p)."""
    return ChunkedSSD.apply(x, dt, A, B, C, D, S0, chunk_size)


def chunked_backward(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dec: ChunkDecays,
    states: Tensor,
    dy: Tensor,
    dS: Tensor,
) -> tuple[Tensor, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dS0) of the chunked SSD (see the module
    docstring), block by block in reverse: the forward's blocks (`block_plan`), last
    first, carrying the gradient of the state backwards from block to block."""
    b, l, h, p = x.shape
    c, Q = dec.dt.shape[1], dec.dt.shape[-1]
    g, n = B.shape[2:]
    m, k = block_plan(b, c, h, Q, p, n)
    plain = dec.without_dt()  # decay_matrix(plain) = L, without dt
    dx = x.new_empty(b, l, h, p)
    dB, dC = B.new_empty(b, l, g, n), C.new_empty(b, l, g, n)
    ddt = dec.dt.new_empty(b, c, h, Q)  # dec's layout (padded), reordered at the end
    dA = A.new_zeros(A.shape)
    dD = None if D is None else D.new_zeros(D.shape)
    dS0 = torch.empty_like(dS)
    G_in = dS  # gradient of the state leaving the current block
    for i0, i1, k0, k1 in reversed(blocks(b, c, m, k)):
        kb, t0, t1 = k1 - k0, k0 * Q, min(k1 * Q, l)
        if k1 == c:
            G_in = dS[i0:i1]
        xb = chunks_of(x, i0, i1, t0, t1, kb, Q)  # (mb, kb, Q, h, p)
        dyb = chunks_of(dy, i0, i1, t0, t1, kb, Q)  # (mb, kb, Q, h, p)
        Bb = chunks_of(B, i0, i1, t0, t1, kb, Q)  # (mb, kb, Q, g, n)
        Cb = chunks_of(C, i0, i1, t0, t1, kb, Q)  # (mb, kb, Q, g, n)
        d = dec.block(slice(i0, i1), k0, k1)  # (mb, kb, ...)
        S_ent = states[i0:i1, k0:k1]  # (mb, kb, g, n, hg*p)
        grads = _block_backward(xb, dyb, Bb, Cb, A, D, d, plain.block(slice(i0, i1), k0, k1),
                                S_ent, G_in)  # fmt: skip
        dxb, ddtb, dAb, dBb, dCb, dDb, G_in = grads
        T = t1 - t0
        dx[i0:i1, t0:t1] = dxb.flatten(1, 2)[:, :T]
        dB[i0:i1, t0:t1] = dBb.flatten(1, 2)[:, :T]
        dC[i0:i1, t0:t1] = dCb.flatten(1, 2)[:, :T]
        ddt[i0:i1, k0:k1] = ddtb
        dA += dAb
        if dD is not None:
            dD += dDb
        if k0 == 0:
            dS0[i0:i1] = G_in
    ddt = ddt.transpose(-1, -2).reshape(b, c * Q, h)[:, :l]  # (b, l, h)
    return dx, ddt, dA, dB, dC, dD, dS0


def _block_backward(
    x: Tensor,
    dy: Tensor,
    B: Tensor,
    C: Tensor,
    A: Tensor,
    D: Tensor | None,
    d: ChunkDecays,
    plain: ChunkDecays,
    S_ent: Tensor,
    G_out: Tensor,
) -> tuple[Tensor, ...]:
    """One block's adjoints. x, dy (m, k, Q, h, p); B, C (m, k, Q, g, n); d and plain the
    block's decays with and without dt; S_ent (m, k, g, n, hg*p) the states entering its
    chunks; G_out (m, g, n, hg*p) the gradient of the state leaving it. Returns dx, ddt
    (m, k, h, Q), dA, dB, dC (m, k, Q, g, n), dD and the gradient of the entering state."""
    m, k, Q, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    hgp = hg * p
    F_t = d.from_start  # (m, k, Q, h)
    E_s = d.decay_to_end  # (m, k, Q, h)
    dt_q = d.dt.transpose(-1, -2)  # (m, k, Q, h)
    C_c = C.transpose(2, 3)  # (m, k, g, Q, n)
    B_c = B.transpose(2, 3)  # (m, k, g, Q, n)

    def by_group(t: Tensor) -> Tensor:  # (m, k, Q, h, p) -> (m, k, g, Q, hg*p)
        return t.reshape(m, k, Q, g, hgp).transpose(2, 3)

    def by_time(t: Tensor) -> Tensor:  # (m, k, g, Q, hg*p) -> (m, k, Q, h, p)
        return t.transpose(2, 3).reshape(m, k, Q, h, p)

    # 4* and 3*: what reaches the entering states, then the reverse state passing
    Fdy = dy * F_t.unsqueeze(-1)  # (m, k, Q, h, p)
    dstates = C_c.transpose(-1, -2) @ by_group(Fdy)  # (m, k, g, n, hg*p)
    G = dy.new_empty(m, k + 1, g, n, hgp)  # G[:, j]: gradient of the state entering chunk j
    G[:, k] = G_out
    W = d.whole.reshape(m, k, g, 1, hg, 1)  # broadcast over (n, p)
    for j in reversed(range(k)):
        G_j = torch.addcmul(dstates[:, j].view(m, g, n, hg, p), W[:, j],
                            G[:, j + 1].view(m, g, n, hg, p))  # fmt: skip
        G[:, j] = G_j.view(m, g, n, hgp)
    G_next = G[:, 1:]  # (m, k, g, n, hg*p): gradient of the state leaving each chunk
    dW = (G_next * S_ent).view(m, k, g, n, hg, p).sum((3, 5)).reshape(m, k, h)

    # 4*: C and F
    dF = (dy * by_time(C_c @ S_ent)).sum(-1)  # (m, k, Q, h)
    dC = by_group(Fdy) @ S_ent.transpose(-1, -2)  # (m, k, g, Q, n)

    # 2*: xd = dt x and E, then B
    V = by_time(B_c @ G_next)  # (m, k, Q, h, p): G_{k+1} B_s
    dxd = V * E_s.unsqueeze(-1)  # (m, k, Q, h, p)
    dE = (x * V).sum(-1) * dt_q  # (m, k, Q, h): <xd_s, G B_s>
    u = x * d.to_end.unsqueeze(-1)  # E_s xd_s, the forward's weighted x
    dB = by_group(u) @ G_next.transpose(-1, -2)  # (m, k, g, Q, n)

    # 1*: the diagonal blocks
    CB = (C_c @ B_c.transpose(-1, -2)).tril_()  # (m, k, g, Q, Q)
    L = decay_matrix(flat_decays(plain)).view(m, k, g, hg, Q, Q)  # without dt
    P = L * CB.unsqueeze(3)  # (m, k, g, hg, Q, Q)
    dy_h = dy.transpose(2, 3).reshape(m, k, g, hg, Q, p)  # heads first
    xd_h = (x * dt_q.unsqueeze(-1)).transpose(2, 3).reshape(m, k, g, hg, Q, p)
    dxd = dxd + (P.transpose(-1, -2) @ dy_h).view(m, k, h, Q, p).transpose(2, 3)
    dP = dy_h @ xd_h.transpose(-1, -2)  # (m, k, g, hg, Q, Q)
    dPL = dP * L
    dCB = dPL.sum(3).tril_()  # (m, k, g, Q, Q)
    dC = dC + dCB @ B_c
    dB = dB + dCB.transpose(-1, -2) @ C_c
    Z = (dPL * CB.unsqueeze(3)).view(m, k, h, Q, Q)  # L o dL

    # dt and A through the exponents cs
    EdE = (E_s * dE).transpose(-1, -2)  # (m, k, h, Q)
    dcs = (F_t * dF).transpose(-1, -2) + Z.sum(-1) - Z.sum(-2) - EdE  # (m, k, h, Q)
    dcs[..., -1] += d.whole * dW + EdE.sum(-1)
    ddA = dcs.flip(-1).cumsum(-1).flip(-1)  # sum over t >= k
    ddt = (x * dxd).sum(-1).transpose(-1, -2) + A[:, None] * ddA  # (m, k, h, Q)
    dA = (d.dt * ddA).sum((0, 1, 3))
    dx = dxd * dt_q.unsqueeze(-1)
    dD = None
    if D is not None:
        dx = dx + dy * D[:, None]
        dD = (dy * x).sum((0, 1, 2, 4))
    return dx, ddt, dA, by_time_n(dB), by_time_n(dC), dD, G[:, 0]


def by_time_n(t: Tensor) -> Tensor:
    """(m, k, g, Q, n) -> (m, k, Q, g, n)."""
    return t.transpose(2, 3)
