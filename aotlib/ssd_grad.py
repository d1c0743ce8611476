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
((b, c, h, p, n), x's size when N = Q), and one block's temporaries.

On the CPU in float32 the (Q x Q) work per chunk and head (P = L o tril(C B^T), and from
dP: d(C B^T) and the sums of Z), the per-step dot products (F dF, E dE, <x, d xd>, dD,
with dx) and the exponents' gradient carried on to dt and A run as C kernels
(`aotlib/ssd_cpu.c`, through `aotlib.native`), one pass each over what the torch forms
below pass over four to six times; the torch forms are their references and run
elsewhere (CUDA, float64, no compiler, `AOTLIB_NATIVE=0`).

Known zeros are skipped where a block allows it: with no initial state the states
entering the first chunks are 0 (so are 4*'s products with them, and 3*'s gradient
reaching them is not needed), and with the final state unused the gradient leaving the
last chunks is 0 (so are 2*'s products with it). Many short sequences run in column
blocks (one chunk of each of several sequences, `aotlib.ssd_chunks.block_plan`), where
each such skip is a whole batched matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from aotlib import native
from aotlib.ssd_chunks import (
    ChunkDecays,
    _chunked_in_blocks,
    _matmul,
    _scratch,
    _sub_chunk_length,
    block_plan,
    block_rows,
    blocks,
    chunk_decays,
    chunks_of,
    decay_matrix,
    enters_at_zero,
    flat_decays,
    masked_decay,
    masked_decay_backward,
    new_output,
    ssd_kernels,
)


class ChunkedSSD(torch.autograd.Function):
    """y, final state = SSD(x, dt, A, B, C, D, S0) with the chunked backward above.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,) or None, S0 the
    initial state in the chunk-state layout (b, g, n, hg*p) or None (zero, no gradient),
    all of one dtype. Returns y (b, l, h, p) and the final state (b, g, n, hg*p), or None
    without `final_state` (then the matmuls that would only feed it are skipped).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, chunk_size: int, final_state: bool):
        b, l, h, p = x.shape
        Q = chunk_size
        c = -(-l // Q)
        g, n = B.shape[2:]
        dt_c = torch.nn.functional.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h)
        dec = chunk_decays(dt_c, A, _sub_chunk_length(Q))  # small: (b, c, h, ...)
        states = new_output(x, b, c, g, n, (h // g) * p)  # the state entering each chunk
        y, S = _chunked_in_blocks(x, dec, B, C, D, S0, states=states, final_state=final_state)
        ctx.save_for_backward(x, A, B, C, D, states)
        ctx.dec = dec  # an intermediate: small next to x
        ctx.zero_start = S0 is None
        return y, S

    @staticmethod
    def backward(ctx, dy: Tensor, dS: Tensor | None):
        x, A, B, C, D, states = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dS0 = chunked_backward(
            x, A, B, C, D, ctx.dec, states, dy, dS, ctx.zero_start
        )
        return dx, ddt, dA, dB, dC, dD, dS0, None, None


# torch.compile runs it as it is (a graph break): its blocks write into reused buffers
# through views that the compiler's tracing does not support.
@torch.compiler.disable
def chunked_ssd_function(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    S0: Tensor | None,
    chunk_size: int,
    final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """`ChunkedSSD.apply`: y (b, l, h, p) and the final state (b, g, n, hg*p), or None
    without `final_state`. S0 None is a zero initial state."""
    return ChunkedSSD.apply(x, dt, A, B, C, D, S0, chunk_size, final_state)


def chunked_backward(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dec: ChunkDecays,
    states: Tensor,
    dy: Tensor,
    dS: Tensor | None,
    zero_start: bool = False,
) -> tuple[Tensor, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dS0) of the chunked SSD (see the module
    docstring), block by block in reverse: the forward's blocks (`block_plan`), last
    first, carrying the gradient of the state backwards from block to block. `states`
    (b, c, g, n, hg*p) holds the state entering each chunk, from the forward. dS None: the
    final state gets no gradient; `zero_start`: the initial state was zero and gets none
    (dS0 is None). A column block then skips what is known to be 0 (`_block_backward`).
    The temporaries live in reused buffers (`_scratch`), as in the forward."""
    b, l, h, p = x.shape
    c, Q, (nI, R) = dec.dt.shape[1], dec.dt.shape[-1], dec.into.shape[-2:]
    g, n = B.shape[2:]
    hgp = (h // g) * p
    m, k = block_plan(b, c, h, Q, p, n)
    K = m * k
    dx = new_output(x, b, l, h, p)
    dB, dC = new_output(B, b, l, g, n), new_output(C, b, l, g, n)  # 33 MB each at 64K
    ddt = dec.dt.new_empty(b, c, h, Q)  # dec's layout (padded), reordered at the end
    ddt_rows = ddt.view(b * c, h, Q)  # a block's are `block_rows` of it
    dA = torch.zeros(h, dtype=torch.float64)  # summed over blocks in double
    dD = None if D is None else torch.zeros(h, dtype=torch.float64)
    dS0 = None if zero_start else x.new_empty(b, g, n, hgp)
    bufs = Buffers(
        *_scratch(
            x,
            *[(K, Q, h, p)] * 4,  # fdy, tm, tmp, dx_b
            *[(K, h, Q, p)] * 2,  # dxd_h, dy_h
            *[(K, h, Q, Q)] * 3,  # L, P, dP
            *[(K, g, Q, Q)] * 2,  # CB, dCB
            *[(K, g, n, hgp)] * 3,  # dstates, G_next, tmp_state
            *[(K, g, Q, n)] * 2,  # dB_b, dC_b
            (K, g, n, Q),  # B_t
            (K, h, nI, nI, R),  # decay_matrix's work: U^T, V, the diagonal blocks' sums
            (K, h, nI, nI, R),
            (K, h, nI, R, R),
        )
    )
    bufs.V.zero_()  # 0 off its block diagonal (the buffer is shared with the forward)
    flat = flat_decays(dec)  # (b c, ...)
    lib = ssd_kernels(x, flat)  # the (Q x Q) tiles' C kernels, or None: torch forms
    G_out = dS  # gradient of the state leaving the current block (None: 0)
    for i0, i1, k0, k1 in reversed(blocks(b, c, m, k)):
        kb, t0, t1 = k1 - k0, k0 * Q, min(k1 * Q, l)
        mb, T = i1 - i0, t1 - t0
        if k1 == c:
            G_out = None if dS is None else dS[i0:i1]
        if G_out is None and kb > 1:  # known 0 for the last chunk only: not skippable
            G_out = x.new_zeros(mb, g, n, hgp)
        first = k0 == 0 and zero_start  # the state entering these sequences gets no gradient
        blk = (i0, i1, t0, t1, kb, Q)
        ragged = T < kb * Q
        x_b = chunks_of(x, *blk).flatten(0, 1)  # (Kb, Q, h, p)
        dy_b = chunks_of(dy, *blk).flatten(0, 1)
        B_b = chunks_of(B, *blk).flatten(0, 1)  # (Kb, Q, g, n)
        C_b = chunks_of(C, *blk).flatten(0, 1)
        Kb = mb * kb
        d = flat.block(i0, i1, k0, k1, c)  # (Kb, ...)
        whole = dec.whole[i0:i1, k0:k1]  # (mb, kb, h)
        zero_in = enters_at_zero(k0, kb, zero_start)  # unwritten by the forward
        S_ent = None if zero_in else states[i0:i1, k0:k1]  # (mb, kb, g, n, hg*p)
        out = None if ragged else dx[i0:i1, t0:t1].unflatten(1, (kb, Q)).flatten(0, 1)  # a view
        sums = Sums(ddt_rows[block_rows(i0, i1, k0, k1, c)], dA, dD)  # ddt (Kb, h, Q): a view
        G_out, dx_b, dB_b, dC_b = _block_backward(
            x_b, dy_b, B_b, C_b, A, D, d, whole, S_ent, G_out, not first,
            bufs if Kb == K else bufs.cut(Kb), out, sums, lib,
        )  # fmt: skip
        if ragged:
            dx[i0:i1, t0:t1] = dx_b.unflatten(0, (mb, kb)).flatten(1, 2)[:, :T]
        dB[i0:i1, t0:t1] = dB_b.transpose(1, 2).unflatten(0, (mb, kb)).flatten(1, 2)[:, :T]
        dC[i0:i1, t0:t1] = dC_b.transpose(1, 2).unflatten(0, (mb, kb)).flatten(1, 2)[:, :T]
        if k0 == 0 and dS0 is not None:
            dS0[i0:i1] = G_out
    ddt = ddt.transpose(-1, -2).reshape(b, c * Q, h)[:, :l]  # (b, l, h)
    dA, dD = dA.to(A.dtype), None if dD is None else dD.to(D.dtype)
    return dx, ddt, dA, dB, dC, dD, dS0


class Sums(NamedTuple):
    """Where a block's backward puts dt's gradient, (K, h, Q) (a view of the whole), and
    adds A's and D's, (h,) in double (D's None without D)."""

    ddt: Tensor
    dA: Tensor
    dD: Tensor | None


class Buffers(NamedTuple):
    """The backward's temporaries for one block of K chunks (see `chunked_backward`)."""

    fdy: Tensor
    tm: Tensor
    tmp: Tensor
    dx: Tensor
    dxd_h: Tensor
    dy_h: Tensor
    L: Tensor
    P: Tensor
    dP: Tensor
    CB: Tensor
    dCB: Tensor
    dstates: Tensor
    G_next: Tensor
    tmp_state: Tensor
    dB: Tensor
    dC: Tensor
    B_t: Tensor
    U_t: Tensor
    V: Tensor
    sums: Tensor

    def cut(self, K: int) -> Buffers:
        """The first K chunks of each buffer (a block may be smaller than the largest)."""
        return Buffers(*(t[:K] for t in self))


def _block_backward(
    x: Tensor,
    dy: Tensor,
    B: Tensor,
    C: Tensor,
    A: Tensor,
    D: Tensor | None,
    d: ChunkDecays,
    whole: Tensor,
    S_ent: Tensor | None,
    G_out: Tensor | None,
    need_G_in: bool,
    buf: Buffers,
    dx_out: Tensor | None,
    sums: Sums,
    lib=None,
) -> tuple[Tensor | None, ...]:
    """One block's adjoints. x, dy (K, Q, h, p) for the block's K = m k chunks (m
    sequences of k); B, C (K, Q, g, n); d its decays (K, ...); whole (m, k, h); S_ent
    (m, k, g, n, hg*p) the states entering its chunks; G_out (m, g, n, hg*p) the
    gradient of the state leaving it; dx_out (K, Q, h, p) where dx goes, if given; sums
    where ddt goes (K, h, Q) and dA and dD are added (`Sums`); lib the C kernels
    (`ssd_kernels`), or None for the torch forms. Returns the gradient of the state
    entering the block (None unless `need_G_in`), then dx, dB and dC (K, g, Q, n).

    A column block (k = 1) may have S_ent None (all 0: a first column, no initial state)
    or G_out None (no gradient: a last column, final state unused); then the products
    with them, and what only they feed, are skipped: of the state terms' seven matmuls,
    the first column skips three (S C, dC's F dY S^T, and the C^T F dY that feeds only
    dS0) and the last two (G B, dB's E xd G^T)."""
    K, Q, h, p = x.shape
    g, n = B.shape[-2:]
    m, k = whole.shape[:2]
    hg = h // g
    hgp = hg * p
    if k > 1 and (S_ent is None or G_out is None):
        raise ValueError("only a column block (one chunk per sequence) skips zero states")
    F_t = d.from_start.unsqueeze(-1)  # (K, Q, h, 1)
    E_s = d.decay_to_end.unsqueeze(-1)  # (K, Q, h, 1)
    dt_q = d.dt.transpose(-1, -2).unsqueeze(-1)  # (K, Q, h, 1)
    C_c = C.transpose(1, 2)  # (K, g, Q, n)
    B_c = B.transpose(1, 2)  # (K, g, Q, n)
    B_t = buf.B_t.copy_(B.permute(0, 2, 3, 1))  # (K, g, n, Q)

    def by_group(t: Tensor) -> Tensor:  # (K, Q, h, p) -> (K, g, Q, hg*p)
        return t.view(K, Q, g, hgp).transpose(1, 2)

    # (a view: a block is contiguous in `states`, or one chunk of each sequence)
    S_ent = None if S_ent is None else S_ent.reshape(K, g, n, hgp)

    # the per-(step, head) dot products by C kernels where x and dY have their (h, p)
    # contiguous (`_row_dots`, `_input_grads`); else torch's multiplies and sums
    rows = lib if x.stride()[-2:] == (p, 1) and dy.stride()[-2:] == (p, 1) else None

    # 4* and 3*: what reaches the entering states, then the reverse state passing
    fdy = None
    if S_ent is not None or need_G_in:
        fdy = torch.mul(dy, F_t, out=buf.fdy)  # (K, Q, h, p)
    W = whole.reshape(m, k, g, 1, hg, 1)  # broadcast over (n, p)
    G_in = None
    if k == 1:  # the gradient leaving each chunk is G_out itself
        G_next = G_out  # (K, g, n, hg*p) or None
        if need_G_in:  # (a fresh tensor where it is G_in itself: buffers are reused)
            ds = _matmul(
                C_c.transpose(-1, -2), by_group(fdy), None if G_out is None else buf.dstates
            )
            G_in = ds if G_out is None else torch.addcmul(
                ds.view(m, g, n, hg, p), W[:, 0], G_out.view(m, g, n, hg, p)
            ).view(m, g, n, hgp)  # fmt: skip
    else:
        dstates = _matmul(C_c.transpose(-1, -2), by_group(fdy), buf.dstates)
        G_next = buf.G_next.view(m, k, g, n, hg, p)  # gradient of the state leaving chunk j
        ds = dstates.view(m, k, g, n, hg, p)
        G_next[:, k - 1] = G_out.view(m, g, n, hg, p)
        G_in = G_out.new_empty(m, g, n, hg, p)
        for j in reversed(range(k)):
            torch.addcmul(ds[:, j], W[:, j], G_next[:, j], out=G_next[:, j - 1] if j else G_in)
        G_next, G_in = buf.G_next, G_in.view(m, g, n, hgp)  # (K, g, n, hg*p)

    # 4*: C and F (0 where the entering states are)
    dW = FdF = dC = None
    if S_ent is not None:
        if G_next is not None:
            dW = torch.mul(G_next, S_ent, out=buf.tmp_state).view(K, g, n, hg, p).sum(-1).sum(2)
        _matmul_into(C_c, S_ent, by_group(buf.tm))  # S_k C_t, time-major (K, Q, h, p)
        if rows is not None:  # F_t dF_t, (K, h, Q)
            FdF = _row_dots(rows, dy, buf.tm, d.from_start)
        else:
            dF = torch.mul(dy, buf.tm, out=buf.tmp).sum(-1)  # (K, Q, h)
            FdF = (F_t.squeeze(-1) * dF).transpose(-1, -2)
        dC = _matmul(by_group(fdy), S_ent.transpose(-1, -2), buf.dC)  # (K, g, Q, n)

    # 2*: xd = dt x and E, then B (0 where the leaving states' gradients are)
    EdE = dxd = dB = None
    if G_next is not None:
        _matmul_into(B_c, G_next, by_group(buf.tm))  # V_s = G_{k+1} B_s, time-major
        if rows is not None:  # E_s dE_s (K, h, Q), and d xd = E_s V_s in place
            EdE = _row_dots(rows, x, buf.tm, d.decay_to_end, d.dt, scale_b=True)
            dxd = buf.tm
        else:
            dE = torch.mul(x, buf.tm, out=buf.tmp).sum(-1) * dt_q.squeeze(-1)  # (K, Q, h)
            EdE = (E_s.squeeze(-1) * dE).transpose(-1, -2)
            dxd = buf.tm.mul_(E_s)  # (K, Q, h, p): d xd from the chunk state
        u = torch.mul(x, d.to_end.unsqueeze(-1), out=buf.tmp)  # E_s xd_s, the forward's
        dB = _matmul(by_group(u), G_next.transpose(-1, -2), buf.dB)  # (K, g, Q, n)

    # 1*: the diagonal blocks
    CB = _matmul(C_c, B_t, buf.CB)  # (K, g, Q, Q)
    if lib is not None:  # P = L o tril(C B^T) in one pass (L is not kept)
        P = masked_decay(lib, d, CB, None, buf.P, with_dt=False)
    else:
        CB.tril_()
        L = decay_matrix(d.without_dt(), out=buf.L, work=(buf.U_t, buf.V, buf.sums))
        Lg = L.view(K, g, hg, Q, Q)  # L itself: dt = 1 where it multiplies
        P = torch.mul(Lg, CB.unsqueeze(2), out=buf.P.view(Lg.shape)).view(K, h, Q, Q)
    # heads first, so that each product is one batched matmul over (chunk, head): a loop
    # of per-chunk matmuls reading the time-major x and dy in place was twice as slow at
    # Q = 32 (measured); the copies are one pass over x and dy each
    xd_h = torch.mul(x.transpose(1, 2), dt_q.transpose(1, 2), out=buf.tmp.view(K, h, Q, p))
    dy_h = buf.dy_h.copy_(dy.transpose(1, 2))  # (K, h, Q, p)
    _matmul(P.transpose(-1, -2), dy_h, buf.dxd_h)  # P^T dY
    _matmul(dy_h, xd_h.transpose(-1, -2), buf.dP)  # dY xd^T
    if rows is None:  # (the kernel adds the two parts of d xd as it reads them)
        if dxd is None:
            dxd = buf.tm.copy_(buf.dxd_h.transpose(1, 2))  # (K, Q, h, p)
        else:
            dxd.add_(buf.dxd_h.transpose(1, 2))
    # d(C B^T), and Z = dP o P = L o dL, the gradient reaching L's exponents, as dcs
    if lib is not None:
        dCB, dcs = masked_decay_backward(lib, d, CB, buf.dP, buf.dCB, x.new_empty(K, h, Q))
    else:
        dPL = buf.dP.mul_(L).view(K, g, hg, Q, Q)
        dCB = torch.sum(dPL, 2, out=buf.dCB).tril_()  # (K, g, Q, Q)
        Z = torch.mul(dPL, CB.unsqueeze(2), out=buf.P.view(dPL.shape)).view(K, h, Q, Q)
        dcs = Z.sum(-1) - Z.sum(-2)  # (K, h, Q)
    dC = _add_matmul(dC, dCB, B_c, buf.dC)  # (K, g, Q, n)
    dB = _add_matmul(dB, dCB.transpose(-1, -2), C_c, buf.dB)

    # dt and A through the exponents cs, and dx
    WdW = None if dW is None else whole.reshape(K, h) * dW.reshape(K, h)
    dx = buf.dx if dx_out is None else dx_out
    if rows is not None:  # dx = dt d xd + D dY, <x, d xd>, dD in one pass; then dt and A
        ddt_direct = _input_grads(rows, x, dy, dxd, buf.dxd_h, d.dt, D, dx, sums.dD)
        _exponent_grads(rows, dcs, FdF, EdE, WdW, d.dt, A, ddt_direct, sums)
        return G_in, dx, dB, dC
    if FdF is not None:
        dcs += FdF
    if EdE is not None:
        dcs -= EdE
        dcs[..., -1] += EdE.sum(-1)
    if WdW is not None:
        dcs[..., -1] += WdW
    ddA = dcs.flip(-1).cumsum(-1).flip(-1)  # (K, h, Q): sum over t >= k
    sums.dA.add_((d.dt * ddA).sum((0, 2)))
    ddt = torch.mul(x, dxd, out=buf.tmp).sum(-1).transpose(-1, -2) + A[:, None] * ddA
    sums.ddt.copy_(ddt)
    dx = torch.mul(dxd, dt_q, out=dx)
    if D is not None:
        dx.addcmul_(dy, D[:, None])
        sums.dD.add_(torch.mul(dy, x, out=buf.tmp).sum((0, 1, 3)))
    return G_in, dx, dB, dC


def _row_dots(
    lib, a: Tensor, b: Tensor, w: Tensor, w2: Tensor | None = None, scale_b: bool = False
) -> Tensor:
    """w_t (w2_t) <a_t, b_t> for every step and head of a block, (K, h, Q), by the C kernel
    (`ssd_cpu.c`'s `ssd_row_dots`); with `scale_b`, b is then scaled by w in place. a (K,
    Q, h, p) with its (h, p) contiguous, b (K, Q, h, p) contiguous, w (K, Q, h) and w2 (K,
    h, Q) a block's decays (one chunk stride: see `ssd_kernels`)."""
    K, Q, h, p = b.shape
    out = b.new_empty(K, h, Q)
    native.check(
        lib.ssd_row_dots(
            a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), w.data_ptr(),
            native.ptr(w2), w.stride(0), int(scale_b), K, Q, h, p, out.data_ptr(),
        ),
        "ssd_row_dots",
    )  # fmt: skip
    return out


def _input_grads(
    lib, x: Tensor, dy: Tensor, dxd: Tensor | None, dxd_h: Tensor, dt: Tensor,
    D: Tensor | None, dx: Tensor, dD: Tensor | None,
) -> Tensor:  # fmt: skip
    """A block's last pass by the C kernel (`ssd_cpu.c`'s `ssd_input_grads`): with d xd =
    dxd (time-major, the state part; None: 0) + dxd_h^T (heads first, the diagonal
    blocks'), dx = dt d xd + D dY written into dx and sum <dY, x> added into dD (h,),
    float64 (None without D); returns <x, d xd> (K, h, Q)."""
    K, Q, h, p = x.shape
    ddt = x.new_empty(K, h, Q)
    D = None if D is None else D.contiguous()  # held for the call
    native.check(
        lib.ssd_input_grads(
            x.data_ptr(), x.stride(0), x.stride(1), dy.data_ptr(), dy.stride(0), dy.stride(1),
            native.ptr(dxd), dxd_h.data_ptr(), dt.data_ptr(), dt.stride(0),
            native.ptr(D), K, Q, h, p, dx.data_ptr(),
            dx.stride(0), dx.stride(1), ddt.data_ptr(), native.ptr(dD),
        ),
        "ssd_input_grads",
    )  # fmt: skip
    return ddt


def _exponent_grads(
    lib, dcs: Tensor, FdF: Tensor | None, EdE: Tensor | None, WdW: Tensor | None,
    dt: Tensor, A: Tensor, ddt_direct: Tensor, sums: Sums,
) -> None:  # fmt: skip
    """dt's and A's gradients through the exponents, by the C kernel (`ssd_cpu.c`'s
    `ssd_exponent_grads`): ddA = the reverse cumulative sum of dcs + F dF - E dE (+ the
    chunk's sum of E dE and W dW on its last step), written as ddt = ddt_direct + A ddA
    into sums.ddt, and sum dt ddA added into sums.dA. All (K, h, Q) but W dW (K, h) and
    A (h,); dt and sums.ddt a block's rows, the rest contiguous."""
    K, h, Q = dcs.shape
    A = A.contiguous()  # held for the call
    native.check(
        lib.ssd_exponent_grads(
            dcs.data_ptr(), native.ptr(FdF), native.ptr(EdE), native.ptr(WdW), dt.data_ptr(),
            dt.stride(0), A.data_ptr(), ddt_direct.data_ptr(), K, h, Q, sums.ddt.data_ptr(),
            sums.ddt.stride(0), sums.dA.data_ptr(),
        ),
        "ssd_exponent_grads",
    )  # fmt: skip


def _add_matmul(acc: Tensor | None, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """acc + a @ b written into out (acc None: 0), one batched matmul over (chunk, group)."""
    if acc is None:
        return _matmul(a, b, out)
    flat = out.flatten(0, 1)
    return torch.baddbmm(acc.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1), out=flat).view(
        out.shape
    )


def _matmul_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written into out, which is a strided view of a time-major buffer when g > 1."""
    if out.is_contiguous():
        return _matmul(a, b, out)
    return out.copy_(a @ b)
