"""Structured state space duality (SSD): the Mamba-2 layer three ways, plus one dispatcher.

One SSD head is a linear recurrence with a scalar decay per step (Dao and Gu, 2024):

    a_t = exp(dt_t * A)                      A < 0 per head, dt_t > 0 (after softplus)
    H_t = a_t H_{t-1} + (dt_t x_t) B_t^T     H_t is (P, N)
    y_t = H_t C_t + D x_t

Unrolled, Y = M X with the masked "attention" matrix

    M = L o (C B^T) diag(dt),     L[j, i] = a_j ... a_{i+1}  (j >= i, else 0)

and L = exp(segsum(dt * A)). M is semiseparable: every block on or below the diagonal
has rank <= N. That gives three algorithms for the same function:

- `ssd_scan`: the recurrence, one step at a time (the plain reference);
- `ssd_quadratic`: materialise M and multiply (attention-like, O(T^2));
- `ssd_chunked`: split time into chunks of Q steps; quadratic inside a chunk, recurrent
  between chunks (the paper's 4 steps: `diagonal_blocks`, `chunk_state`,
  `state_passing`, `state_to_output`). O(T Q) work, almost all of it matmuls.

`ssd` is the public entry point: the Triton kernels (`aotlib.ssd_triton`) on CUDA, the
chunked PyTorch path elsewhere, the same way nanoGPT picks flash attention when present.

Layout follows the official mamba code: x (b, l, h, p), dt (b, l, h), A (h,),
B and C (b, l, g, n) with g groups shared by h // g heads each (head i uses group
i // (h // g)), D (h,), states (b, h, p, n).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Shared with aotlib.ssd_triton, which must not import this module back.
from aotlib.ssd_inputs import SSDDims as SSDDims
from aotlib.ssd_inputs import check_chunk_size as _check_chunk_size
from aotlib.ssd_inputs import check_ssd_inputs as check_ssd_inputs
from aotlib.ssd_inputs import shape_of as _shape

BACKENDS = ("auto", "chunked", "scan", "quadratic", "triton")


def _common_dtype(*tensors: Tensor | None) -> list[Tensor | None]:
    """All inputs in one dtype (matmuls do not promote): e.g. a float32 A with bf16 x."""
    dtype = x_dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    if all(t is None or t.dtype == x_dtype for t in tensors):
        return list(tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


def _heads_from_groups(t: Tensor, nheads: int) -> Tensor:
    """(b, l, g, n) -> (b, l, h, n): head i reads group i // (h // g), as in GQA."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


# ---------------------------------------------------------------------------
# segsum and the masked matrix M
# ---------------------------------------------------------------------------


def segsum(x: Tensor) -> Tensor:
    """Segment sums: (..., T) -> (..., T, T), out[..., j, i] = sum_{k=i+1..j} x[..., k].

    -inf above the diagonal, so exp(segsum(log a)) is the decay matrix L. Each entry is
    summed directly over its own segment (a masked cumulative sum down the columns);
    cumsum[j] - cumsum[i] would cancel two long sums and lose precision in float32.
    x must be finite.
    """
    T = x.shape[-1]
    ones = torch.ones(T, T, dtype=x.dtype, device=x.device)
    z = x.unsqueeze(-1) * ones.tril(-1)  # (..., k, i) = x_k [k > i]
    out = torch.cumsum(z, dim=-2)  # (..., j, i) = sum_{i < k <= j} x_k
    return out + torch.full_like(ones, float("-inf")).triu(1)


def _decay_matrix(dt: Tensor, A: Tensor) -> Tensor:
    """L = exp(segsum(dt A)): (b, l, h) -> (b, h, l, l)."""
    return torch.exp(segsum((dt * A).transpose(1, 2)))


def ssd_matrix(dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """The masked attention matrix M = L o (C B^T) diag(dt): (b, h, l, l), y = M x per head."""
    h = A.shape[0]
    if dt.dim() != 3 or B.dim() != 4 or C.shape != B.shape or dt.shape[:2] != B.shape[:2]:
        raise ValueError(
            f"expected dt (b, l, h), B and C (b, l, g, n), got dt={_shape(dt)}, "
            f"B={_shape(B)}, C={_shape(C)}"
        )
    if A.shape != (dt.shape[2],) or h % B.shape[2] != 0:
        raise ValueError(
            f"A must be (h,) with h=dt.shape[2] divisible by g=B.shape[2], got A={_shape(A)}, "
            f"dt={_shape(dt)}, B={_shape(B)}"
        )
    Bh = _heads_from_groups(B, h).transpose(1, 2)  # (b, h, l, n)
    Ch = _heads_from_groups(C, h).transpose(1, 2)  # (b, h, l, n)
    CB = Ch @ Bh.transpose(-1, -2)  # (b, h, l, l)
    return _decay_matrix(dt, A) * CB * dt.transpose(1, 2).unsqueeze(-2)  # dt_i on column i


# ---------------------------------------------------------------------------
# Form 1: the recurrence (plain reference)
# ---------------------------------------------------------------------------


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The SSD recurrence, one time step at a time: slow, obviously right."""
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, None, D, initial_state)
    x_dtype = x.dtype
    x, dt, A, B, C, D, initial_state = _common_dtype(x, dt, A, B, C, D, initial_state)
    Bh, Ch = _heads_from_groups(B, h), _heads_from_groups(C, h)  # (b, l, h, n)
    if initial_state is None:
        H = x.new_zeros(b, h, p, n)
    else:
        H = initial_state
    a = torch.exp(dt * A)  # (b, l, h)
    ys = []
    for t in range(l):
        u = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        H = a[:, t, :, None, None] * H + u
        ys.append((H @ Ch[:, t, :, :, None]).squeeze(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        y = y + x * D[:, None]
    y = y.to(x_dtype)  # in x's dtype whatever the others' (the state stays in the common one)
    return (y, H) if return_final_state else y


# ---------------------------------------------------------------------------
# Form 2: the quadratic (attention-like) form
# ---------------------------------------------------------------------------


def ssd_quadratic(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Y = M X with M materialised: O(l^2) time and memory, the 'attention' side of SSD."""
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, None, D, initial_state)
    x_dtype = x.dtype
    x, dt, A, B, C, D, initial_state = _common_dtype(x, dt, A, B, C, D, initial_state)
    Bh = _heads_from_groups(B, h).transpose(1, 2)  # (b, h, l, n)
    Ch = _heads_from_groups(C, h).transpose(1, 2)  # (b, h, l, n)
    L = _decay_matrix(dt, A)  # (b, h, l, l)
    dt_h = dt.transpose(1, 2)  # (b, h, l)
    M = L * (Ch @ Bh.transpose(-1, -2)) * dt_h.unsqueeze(-2)  # (b, h, l, l)
    xh = x.transpose(1, 2)  # (b, h, l, p)
    y = M @ xh  # (b, h, l, p)
    # Final state: row l-1 of L holds the decay from each step to the end.
    u = xh * (dt_h * L[..., -1, :]).unsqueeze(-1)  # (b, h, l, p)
    final = u.transpose(-1, -2) @ Bh  # (b, h, p, n)
    if initial_state is not None:
        # The carried-in state decays by a_1 ... a_t before it is read at step t; the
        # cumsum starts at step 1, so it is a sum over the segment itself.
        carry = torch.exp(torch.cumsum(dt_h * A[:, None], dim=-1))  # (b, h, l)
        H0 = initial_state
        y = y + carry.unsqueeze(-1) * (Ch @ H0.transpose(-1, -2))  # (b, h, l, p)
        final = final + carry[..., -1, None, None] * H0
    y = y.transpose(1, 2)  # (b, l, h, p)
    if D is not None:
        y = y + x * D[:, None]
    y = y.to(x_dtype)
    return (y, final) if return_final_state else y


# ---------------------------------------------------------------------------
# Form 3: the chunked algorithm (the paper's 4 steps)
#
# Time is split into c chunks of Q steps, and heads into g groups of hg = h // g, so the
# matmuls that share B or C across a group's heads see all hg heads as one matrix of
# width hg * p. Every decay is an exp of a sum of dt * A <= 0 taken over its own stretch of
# steps (a cumsum from the stretch's start, or a masked sum), never a difference of two
# longer sums: nothing overflows or cancels, however long the sequence.
#
# Inside a chunk the decay matrix L is itself semiseparable. Split the chunk into nI
# sub-chunks of R steps; for t in sub-chunk I and s in an earlier sub-chunk J,
#     L[t, s] = (decay from I's start through t) (decay over sub-chunks J+1 .. I-1)
#               (decay from s to J's end),
# so L off its diagonal (R x R) blocks is one small matmul U @ V of inner size nI, and only
# the diagonal blocks need segment sums. Building L then costs about one pass over it,
# instead of a (Q x Q) segment-sum matmul and an exp of every entry.
# ---------------------------------------------------------------------------


def _sub_chunk_length(Q: int) -> int:
    """R: the largest divisor of Q up to 2 sqrt(Q) (16 for Q = 64), which keeps both the
    rank-nI part (nI = Q / R) and the diagonal blocks (Q R entries) small."""
    return max(r for r in range(1, 2 * math.isqrt(Q) + 1) if Q % r == 0)


class ChunkDecays(NamedTuple):
    """What the chunked path needs from dt and A alone: (b, c, h, ...), small next to x.

    dt (..., Q); dA = dt A (..., Q), each <= 0; from_start (b, c, Q, h): decay from the
    chunk's start through step t (step 4, time before heads as in y); whole (b, c, h):
    decay over the whole chunk (step 3); to_end (b, c, Q, h): dt_s times the decay from s
    to the chunk's end (the chunk-state weights of step 2, row Q-1 of `decay_matrix`).
    With the chunk cut into nI sub-chunks of R steps: into (..., nI, R): decay from the
    sub-chunk's start through t; out_dt (..., nI, R): dt_s times the decay from s to the
    sub-chunk's end; between (..., nI, nI): decay over the whole sub-chunks strictly
    between J and I, 0 unless J < I (see `decay_matrix`).
    """

    dt: Tensor
    dA: Tensor
    from_start: Tensor
    whole: Tensor
    to_end: Tensor
    into: Tensor
    out_dt: Tensor
    between: Tensor

    def block(self, i: int | slice, k0: int, k1: int) -> ChunkDecays:
        """Batch element (or elements) i, chunks k0 .. k1 - 1 (views)."""
        return ChunkDecays(*(t[i, k0:k1] for t in self))


def chunk_decays(dt: Tensor, A: Tensor, R: int) -> ChunkDecays:
    """dt (b, c, Q, h) cut into chunks, A (h,) -> `ChunkDecays` with sub-chunks of R steps.

    Every decay is exp of a sum taken directly over its own steps (`_masked_sums`), or a
    product of such decays over adjacent stretches.
    """
    b, c, Q, h = dt.shape
    nI = Q // R
    dt = dt.permute(0, 1, 3, 2).contiguous()  # (b, c, h, Q)
    dA = dt * A[:, None]  # (b, c, h, Q)
    # inside each sub-chunk: over its start .. t, and over (s, its end]. (exp only ever
    # runs on contiguous tensors: on strided ones torch falls back to a scalar loop.)
    k, t = _steps(R, dt)
    sums = _masked_sums(dA.view(b, c, h, nI, R), torch.cat([k <= t, k > t], dim=1))
    total = sums[..., R - 1]  # (b, c, h, nI), each sub-chunk's sum
    sub = torch.exp(sums)  # (b, c, h, nI, 2R)
    into = sub[..., :R].contiguous()
    out_dt = sub[..., R:] * dt.view(b, c, h, nI, R)
    # over whole sub-chunks: those before I, those after J, those strictly between J and I
    K, I = _steps(nI, dt)  # (nI, 1), (1, nI)
    K3, I3, J3 = K.view(nI, 1, 1), I.view(1, nI, 1), I.view(1, 1, nI)
    between_mask = ((J3 < K3) & (K3 < I3)).view(nI, nI * nI)  # (K, (I, J))
    across = torch.exp(_masked_sums(total, torch.cat([K < I, K > I, between_mask], dim=1)))
    before, after_all = across[..., :nI], across[..., nI : 2 * nI]  # (b, c, h, nI)
    lower = (J3 < I3).view(nI, nI).to(dt.dtype)  # an empty sum for J >= I: no decay there
    between = across[..., 2 * nI :].reshape(b, c, h, nI, nI) * lower  # (..., I, J)
    # chunk start .. t and (s, chunk end]: the sub-chunk's part times the whole sub-chunks'
    from_start = (into * before.unsqueeze(-1)).reshape(b, c, h, Q)
    to_end = (out_dt * after_all.unsqueeze(-1)).reshape(b, c, h, Q)
    from_start = from_start.transpose(-1, -2).contiguous()  # (b, c, Q, h)
    to_end = to_end.transpose(-1, -2).contiguous()  # (b, c, Q, h)
    whole = from_start[:, :, -1]  # (b, c, h)
    return ChunkDecays(dt, dA, from_start, whole, to_end, into, out_dt, between)


def _steps(T: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Indices k (T, 1) and t (1, T) for building 0/1 masks [k ... t]."""
    r = torch.arange(T, device=like.device)
    return r[:, None], r[None, :]


def _masked_sums(x: Tensor, mask: Tensor, out: Tensor | None = None) -> Tensor:
    """out[..., j] = sum of x[..., k] over the k with mask[k, j]: (..., T) -> (..., M).

    One matmul with a 0/1 matrix, so each entry is summed directly over its own set of
    steps: no difference of two longer sums, which would cancel in float32.
    """
    *lead, T = x.shape
    mask = mask.to(x.dtype)
    if out is None:
        return (x.reshape(-1, T) @ mask).view(*lead, mask.shape[1])
    torch.mm(x.reshape(-1, T), mask, out=out.view(-1, mask.shape[1]))
    return out


def _sub_chunk_segsum(dA: Tensor, R: int, out: Tensor | None = None) -> Tensor:
    """Segment sums inside each sub-chunk of R steps: (..., Q) -> (..., Q/R, R, R).

    out[..., t, s] = dA_{s+1} + ... + dA_t for s <= t, 0 above the diagonal: one
    `_masked_sums` with the mask [s < k <= t] over (k, (t, s)).
    """
    *lead, Q = dA.shape
    k, t = _steps(R, dA)
    mask = (k.unsqueeze(-1) <= t.unsqueeze(-1)) & (k.unsqueeze(-1) > t)  # (k, t, s)
    out = None if out is None else out.view(*lead, Q // R, R * R)
    return _masked_sums(dA.view(*lead, Q // R, R), mask.view(R, R * R), out).view(
        *lead, Q // R, R, R
    )


def decay_matrix(
    dec: ChunkDecays, out: Tensor | None = None, work: tuple[Tensor, ...] | None = None
) -> Tensor:
    """L diag(dt) for each chunk and head, (..., h, Q, Q): dt_s exp(dA_{s+1} + ... + dA_t)
    at [t, s], s <= t. Above the diagonal it is 0 except inside the diagonal (R x R)
    blocks, which hold dt_s there: `diagonal_blocks` masks with the causal C B^T anyway,
    and masking this (h times larger) matrix as well would cost a pass over it.

    For t in sub-chunk I and s in an earlier sub-chunk J the entry factors as
    into_t between_IJ out_dt_s, so all of L but the diagonal blocks is U @ V with
    U[t, J] = into_t between_{I(t) J} and V[J, s] = out_dt_s [s in J]: a matmul of inner
    size nI. The diagonal blocks (0 in U @ V) are then written from segment sums.
    `out` (..., h, Q, Q) and `work` (three buffers: U^T and V (..., nI, nI, R), V with
    zeros off its block diagonal, and one like the diagonal blocks) keep the fast path
    free of allocations.
    """
    *lead, nI, R = dec.into.shape
    Q = nI * R
    # U is built transposed, U^T[J, I, t'] with t = I R + t': rows of R numbers, not nI
    if work is None:
        U_t = dec.into.unsqueeze(-3) * dec.between.transpose(-1, -2).unsqueeze(-1)
        eye = torch.eye(nI, dtype=dec.dt.dtype, device=dec.dt.device)
        V = dec.out_dt.unsqueeze(-3) * eye[:, :, None]  # (..., J, J, s)
        sums = None
    else:
        U_t, V, sums = work
        torch.mul(dec.into.unsqueeze(-3), dec.between.transpose(-1, -2).unsqueeze(-1), out=U_t)
        V.diagonal(dim1=-3, dim2=-2).copy_(dec.out_dt.transpose(-1, -2))
    U = U_t.reshape(*lead, nI, Q).transpose(-1, -2)  # (..., t, J)
    L = _matmul(U, V.view(*lead, nI, Q), out)  # (..., Q, Q)
    blocks = L.view(*lead, nI, R, nI, R).diagonal(dim1=-4, dim2=-2)  # (..., R, R, nI)
    blocks = blocks.movedim(-1, -3)  # (..., nI, R, R)
    inner = torch.exp_(_sub_chunk_segsum(dec.dA, R, sums))  # (..., nI, R, R)
    dt = dec.dt.view(*lead, nI, 1, R)  # on column s
    if out is None:
        blocks.copy_(inner * dt)  # autograd follows a copy into a view
    else:
        torch.mul(inner, dt, out=blocks)
    return L


def _matmul(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b; with `out` (contiguous) as one batched matmul written straight into it."""
    if out is None:
        return a @ b
    torch.bmm(
        a.reshape(-1, *a.shape[-2:]),
        b.reshape(-1, *b.shape[-2:]),
        out=out.view(-1, *out.shape[-2:]),
    )
    return out


def diagonal_blocks(
    x_h: Tensor, L: Tensor, CB: Tensor, D: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """Step 1: outputs from inputs in the same chunk, Y_diag = (L o C B^T) X (+ D X).

    x_h (..., h, Q, p): x with heads before time (the batched matmul's layout); L
    (..., h, Q, Q) from `decay_matrix` (dt included); CB (..., g, Q, Q) = C B^T per group;
    D (h,): the skip connection, added on M's diagonal. Returns (..., h, Q, p), as if every
    chunk started from a zero state. The causal mask goes on C B^T (h / g times smaller
    than L). With `out`, M = L o C B^T overwrites L, and CB is masked in place.
    """
    *lead, h, Q, _ = L.shape
    g = CB.shape[-3]
    CB = CB.tril_() if out is not None else CB.tril()  # the causal mask
    M = L.view(*lead, g, h // g, Q, Q)
    M = torch.mul(M, CB.unsqueeze(-3), out=None if out is None else M).view(L.shape)
    if D is not None:
        M.diagonal(dim1=-2, dim2=-1).add_(D[:, None])
    if out is None:
        return M @ x_h
    # x_h may be a transposed view of x (..., Q, h, p): BLAS reads its rows of p numbers
    # with a stride of h p, one batched matmul per chunk, so x is never copied heads-first.
    for M_k, x_k, out_k in zip(M, x_h, out):  # out (k, h, Q, p): one leading dim
        torch.bmm(M_k, x_k, out=out_k)
    return out


def chunk_state(
    x: Tensor, weight: Tensor, B_t: Tensor, out: Tensor | None = None, work: Tensor | None = None
) -> Tensor:
    """Step 2: each chunk's final state from its own inputs (zero state coming in).

    state = sum_s weight_s x_s B_s^T over the chunk's steps s, with weight (..., Q, h) =
    dt_s times the decay from s to the chunk's end (`ChunkDecays.to_end`); x
    (..., Q, h, p), B_t (..., g, n, Q). Returns (..., g, n, hg*p): the state transposed, all
    heads of a group side by side. `work` (shaped like x) takes the weighted x.
    """
    *lead, Q, h, p = x.shape
    g = B_t.shape[-3]
    u = torch.mul(x, weight.unsqueeze(-1), out=work)  # (..., Q, h, p)
    u = u.reshape(*lead, Q, g, (h // g) * p).transpose(-3, -2)  # (..., g, Q, hg*p)
    return _matmul(B_t, u, out)


def state_passing(
    states: Tensor, chunk_decay: Tensor, initial_state: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Step 3: carry the state across chunks, S_{k+1} = chunk_decay_k S_k + states_k.

    states (..., c, g, n, hg*p) from `chunk_state`, chunk_decay (..., c, h) the decay over
    each whole chunk, initial_state (..., g, n, hg*p). A loop over chunks, linear in c
    (the paper's c x c segsum over chunks would be quadratic in length), one fused
    multiply-add per chunk. Returns the states entering each chunk (..., c, g, n, hg*p)
    and the state after the last one (..., g, n, hg*p). With `out` (..., c+1, g, n, hg*p),
    slot k gets the state entering chunk k and slot c the last; `states` may be out's
    slots 1..c, updated in place.
    """
    *lead, c, g, n, hgp = states.shape
    hg = chunk_decay.shape[-1] // g
    decays = chunk_decay.reshape(*lead, c, g, 1, hg, 1).unbind(-5)  # broadcast over (n, p)
    chunks = states.view(*lead, c, g, n, hg, hgp // hg).unbind(-5)
    if out is None:
        S = initial_state.reshape(*lead, g, n, hg, hgp // hg)
        entering = []
        for s, a in zip(chunks, decays):
            entering.append(S)
            S = torch.addcmul(s, a, S)
        return torch.stack(entering, dim=-5).view(states.shape), S.view(initial_state.shape)
    slots = out.view(*lead, c + 1, g, n, hg, hgp // hg).unbind(-5)
    if initial_state.data_ptr() != out.data_ptr():
        slots[0].copy_(initial_state.view(slots[0].shape))
    for k, (s, a) in enumerate(zip(chunks, decays)):
        if s.data_ptr() == slots[k + 1].data_ptr():  # states are out's slots 1..c
            slots[k + 1].addcmul_(slots[k], a)
        else:
            torch.addcmul(s, a, slots[k], out=slots[k + 1])
    return out.narrow(-4, 0, c), out.select(-4, c)


def state_to_output(
    S: Tensor, from_start: Tensor, C: Tensor, y_diag: Tensor, out: Tensor | None = None
) -> Tensor:
    """Step 4: add what the state entering each chunk contributes to that chunk's outputs.

    y_t = y_diag_t + from_start_t S C_t, with from_start (..., Q, h) the decay from the
    chunk's start through step t. S (..., g, n, hg*p) entering states from
    `state_passing`, C (..., g, Q, n), y_diag (..., h, Q, p) from `diagonal_blocks`.
    Returns (..., Q, h, p); with `out` (contiguous, one group) C S is written there and
    then scaled and added in place: one pass over the output.
    """
    *lead, g, n, hgp = S.shape
    Q, h = from_start.shape[-2:]
    decay = from_start.unsqueeze(-1)  # (..., Q, h, 1)
    if out is not None and g == 1:
        y_off = _matmul(C, S, out.view(*lead, 1, Q, hgp)).view(out.shape)  # (..., Q, h, p)
        return torch.addcmul(y_diag.transpose(-3, -2), y_off, decay, out=out)
    y_off = (C @ S).transpose(-3, -2).reshape(*lead, Q, h, hgp * g // h)  # (..., Q, h, p)
    return torch.addcmul(y_diag.transpose(-3, -2), y_off, decay, out=out)


# The inference path works through the sequence a block of chunks at a time, carrying the
# state between blocks, so every intermediate stays near this many elements (in buffers
# kept from call to call, see `_scratch`).
_BLOCK_ELEMENTS = 1 << 20


def ssd_chunked(
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
    """The chunked SSD algorithm: O(l Q) work in matmuls, O(l / Q) sequential steps.

    With autograd recording, the four steps run once over all chunks as ordinary
    differentiable ops. Without, they run block by block (see `_BLOCK_ELEMENTS`) in
    reused buffers, the outputs written straight into y. Any length and any chunk size
    work either way.
    """
    _check_chunk_size(chunk_size)
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    Q, hg = chunk_size, h // g
    x_dtype = x.dtype
    x, dt, A, B, C, D, initial_state = _common_dtype(x, dt, A, B, C, D, initial_state)
    recording = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, dt, A, B, C, D, initial_state) if t is not None
    )
    c = -(-l // Q)
    # Padding with dt = 0 means a_t = 1 and no input: the state passes through the padded
    # tail unchanged, so the final state stays exact.
    dt = F.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h)
    dec = chunk_decays(dt, A, _sub_chunk_length(Q))  # small: (b, c, h, ...)
    if initial_state is None:
        S0 = x.new_zeros(b, g, n, hg * p)
    else:
        # (b, h, p, n) -> (b, g, n, hg*p), the layout the chunk states use
        S0 = initial_state.reshape(b, g, hg, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, -1)
    run = _chunked_all_at_once if recording else _chunked_in_blocks
    y, S = run(x, dec, B, C, D, S0)
    y = y.to(x_dtype)  # in x's dtype whatever the others' (the state stays in the common one)
    if not return_final_state:
        return y
    return y, S.reshape(b, g, n, hg, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)


def _chunked_all_at_once(
    x: Tensor, dec: ChunkDecays, B: Tensor, C: Tensor, D: Tensor | None, S0: Tensor
) -> tuple[Tensor, Tensor]:
    """The four steps over all chunks at once, differentiable: y (b, l, h, p), final state."""
    b, l, h, p = x.shape
    c, Q = dec.dt.shape[1], dec.dt.shape[-1]
    g, n = B.shape[2:]
    pad = (0, 0, 0, 0, 0, c * Q - l)
    x = F.pad(x, pad).reshape(b, c, Q, h, p)
    B_t = F.pad(B, pad).reshape(b, c, Q, g, n).permute(0, 1, 3, 4, 2)  # (b, c, g, n, Q)
    C_c = F.pad(C, pad).reshape(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    L = decay_matrix(dec)  # (b, c, h, Q, Q)
    states = chunk_state(x, dec.to_end, B_t)  # (b, c, g, n, hg*p)
    y_diag = diagonal_blocks(x.transpose(2, 3), L, C_c @ B_t, D)  # (b, c, h, Q, p)
    entering, S = state_passing(states, dec.whole, S0)
    y = state_to_output(entering, dec.from_start, C_c, y_diag)  # (b, c, Q, h, p)
    return y.reshape(b, c * Q, h, p)[:, :l], S


_SCRATCH = threading.local()


def _scratch(x: Tensor, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Uninitialised buffers of these shapes, like x, for the inference path.

    On CPU they are carved from one allocation that is kept (per thread, dtype and
    inference mode) and reused by the next call: the allocator hands big temporaries back
    to the system, and memory page-faulted in afresh on every call costs about as much as
    the work done in it. It grows to the largest call seen (about 25 MB for the benchmark's
    sizes). Elsewhere (CUDA's caching allocator keeps memory anyway) plain allocations.
    """
    if x.device.type != "cpu":
        return [x.new_empty(shape) for shape in shapes]
    sizes = [-(-math.prod(shape) // 16) * 16 for shape in shapes]  # 64-byte aligned views
    kept = _SCRATCH.__dict__.setdefault("buffers", {})
    # an inference tensor may not be written outside inference mode: one buffer per mode
    key = (x.dtype, torch.is_inference_mode_enabled())
    flat = kept.get(key)
    if flat is None or flat.numel() < sum(sizes):
        flat = kept[key] = x.new_empty(sum(sizes))
    views, start = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(flat[start : start + math.prod(shape)].view(shape))
        start += size
    return views


def _chunked_in_blocks(
    x: Tensor, dec: ChunkDecays, B: Tensor, C: Tensor, D: Tensor | None, S0: Tensor
) -> tuple[Tensor, Tensor]:
    """The same steps without autograd, a block of chunks of one batch element at a time:
    every intermediate in a reused buffer, every output written in place. Very short
    sequences, where the per-block overhead would dominate, go through
    `_chunked_all_at_once` instead, as many at once as fill a block."""
    b, l, h, p = x.shape
    c, Q, (nI, R) = dec.dt.shape[1], dec.dt.shape[-1], dec.into.shape[-2:]
    g, n = B.shape[2:]
    fit = _BLOCK_ELEMENTS // (h * Q * max(Q, p, n))  # chunks per block
    if 32 * c <= fit:  # a block per sequence would be tiny: group whole sequences
        m = min(b, fit // c)
        parts = [
            _chunked_all_at_once(
                x[i : i + m],
                dec.block(slice(i, i + m), 0, c),
                B[i : i + m],
                C[i : i + m],
                D,
                S0[i : i + m],
            )
            for i in range(0, b, m)
        ]
        return torch.cat([y for y, _ in parts]), torch.cat([S for _, S in parts])
    k = max(1, min(c, fit))
    y = x.new_empty(b, l, h, p)
    L_buf, y_diag_buf, u_buf, CB_buf, B_buf, U_t, V, sums, slots = _scratch(
        x,
        (k, h, Q, Q),
        (k, h, Q, p),
        (k, Q, h, p),
        (k, g, Q, Q),
        (k, g, n, Q),
        (k, h, nI, nI, R),
        (k, h, nI, nI, R),
        (k, h, nI, R, R),
        (k + 1, g, n, S0.shape[-1]),  # the states entering each chunk, then the last
    )
    work = (U_t, V.zero_(), sums)  # V is 0 off its block diagonal
    S_final = torch.empty_like(S0)
    for i in range(b):
        slots[0] = S0[i]
        for k0 in range(0, c, k):
            k1 = min(k0 + k, c)
            kb, t0, t1 = k1 - k0, k0 * Q, min(k1 * Q, l)
            xb, Bb, Cb = x[i, t0:t1], B[i, t0:t1], C[i, t0:t1]
            if t1 - t0 < kb * Q:  # only the last block can be ragged: pad it like dt
                pad = (0, 0, 0, 0, 0, kb * Q - (t1 - t0))
                xb, Bb, Cb = F.pad(xb, pad), F.pad(Bb, pad), F.pad(Cb, pad)
            xb = xb.view(kb, Q, h, p)
            B_t = B_buf[:kb].copy_(Bb.view(kb, Q, g, n).permute(0, 2, 3, 1))  # (kb, g, n, Q)
            C_c = Cb.view(kb, Q, g, n).transpose(1, 2)  # (kb, g, Q, n)
            d = dec.block(i, k0, k1)
            L = decay_matrix(d, out=L_buf[:kb], work=tuple(w[:kb] for w in work))
            chunk_state(xb, d.to_end, B_t, out=slots[1 : kb + 1], work=u_buf[:kb])
            x_h = xb.transpose(1, 2)  # (kb, h, Q, p), a view
            CB = _matmul(C_c, B_t, CB_buf[:kb])  # (kb, g, Q, Q)
            y_diag = diagonal_blocks(x_h, L, CB, D, out=y_diag_buf[:kb])  # L becomes M
            state_passing(slots[1 : kb + 1], d.whole, slots[0], out=slots[: kb + 1])
            if t1 - t0 == kb * Q:
                out = y[i, t0:t1].view(kb, Q, h, p)
                state_to_output(slots[:kb], d.from_start, C_c, y_diag, out=out)
            else:
                yb = state_to_output(slots[:kb], d.from_start, C_c, y_diag)
                y[i, t0:t1] = yb.reshape(kb * Q, h, p)[: t1 - t0]
            slots[0] = slots[kb]
        S_final[i] = slots[0]
    return y, S_final


# ---------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------


def _triton_available() -> bool:
    try:
        import aotlib.ssd_triton  # noqa: F401
    except ImportError:
        return False
    return True


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """The SSD layer's sequence mixing. Returns y (b, l, h, p), or (y, final_state).

    backend: "auto" (Triton for CUDA tensors in float32, bfloat16 or float16 when
    `aotlib.ssd_triton` imports, else chunked), "chunked", "scan", "quadratic" or "triton".
    The chunk size splits the work, not the function: "auto" runs the Triton kernels at the
    largest chunk they tile (`supported_chunk_size`: 128 for the 130m preset's 256), while
    "triton" asked by name takes the chunk as given (a power of two <= 128).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_chunk_size(chunk_size)
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    if backend == "auto":
        backend = "chunked"
        given = [t for t in (x, dt, A, B, C, D, initial_state) if t is not None]
        low = all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in given)
        if x.is_cuda and low and _triton_available():
            from aotlib.ssd_triton import supported_chunk_size

            backend, chunk_size = "triton", supported_chunk_size(chunk_size)
    kw = dict(D=D, initial_state=initial_state, return_final_state=return_final_state)
    if backend == "chunked":
        return ssd_chunked(x, dt, A, B, C, chunk_size, **kw)
    if backend == "scan":
        return ssd_scan(x, dt, A, B, C, **kw)
    if backend == "quadratic":
        return ssd_quadratic(x, dt, A, B, C, **kw)
    from aotlib.ssd_triton import ssd_triton  # lazily: needs triton and, compiled, a GPU

    return ssd_triton(x, dt, A, B, C, chunk_size, **kw)


# ---------------------------------------------------------------------------
# Random inputs (tests, notebooks, benchmarks)
# ---------------------------------------------------------------------------


def random_ssd_inputs(
    batch: int,
    seqlen: int,
    nheads: int,
    headdim: int,
    ngroups: int,
    dstate: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    dt_scale: float = 0.5,
    with_D: bool = True,
    with_initial_state: bool = False,
) -> dict[str, Tensor | None]:
    """Inputs shaped and scaled like a trained layer's: keys x, dt, A, B, C, D, initial_state.

    dt = softplus(noise) * dt_scale > 0, A = -exp(noise / 2) < 0, B and C scaled by
    1/sqrt(N) so C_t . B_s is O(1). Drawn in float64 from `seed`, then cast to dtype, so
    the same seed gives the same numbers in every dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    b, l, h, p, g, n = batch, seqlen, nheads, headdim, ngroups, dstate
    out = dict(
        x=r(b, l, h, p),
        dt=F.softplus(r(b, l, h)) * dt_scale,
        A=-torch.exp(r(h) * 0.5),
        B=r(b, l, g, n) / n**0.5,
        C=r(b, l, g, n) / n**0.5,
        D=r(h) if with_D else None,
        initial_state=r(b, h, p, n) if with_initial_state else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in out.items()}


# ---------------------------------------------------------------------------
# Semiseparable structure: numerical rank of off-diagonal blocks
# ---------------------------------------------------------------------------


def offdiagonal_singular_values(M: Tensor, split: int) -> Tensor:
    """Singular values of the block M[..., split:, :split] (rows after, columns before).

    Values below the rounding floor eps * max(block rows, columns) * largest (numpy's
    matrix_rank tolerance) are returned as that floor: they are rounding noise, whose
    digits change with LAPACK's blocking and thread count, and plotted as they came they
    made the committed figure differ from machine to machine.
    """
    l = M.shape[-1]
    if M.dim() < 2 or M.shape[-2] != l or not 0 < split < l:
        raise ValueError(f"need square M (..., l, l) and 0 < split < l, got {_shape(M)}, {split}")
    block = M[..., split:, :split]
    s = torch.linalg.svdvals(block)  # (..., min(l - split, split)), largest first
    floor = torch.finfo(s.dtype).eps * max(block.shape[-2:]) * s[..., :1]
    return torch.maximum(s, floor)


def numerical_rank(singular_values: Tensor, rtol: float = 1e-8) -> int:
    """Number of singular values above rtol times the largest (0 for an all-zero block)."""
    s = singular_values.flatten()
    if s.numel() == 0 or s.max() == 0:
        return 0
    return int((s > rtol * s.max()).sum())


def offdiagonal_ranks(M: Tensor, splits: list[int] | None = None, rtol: float = 1e-8) -> list[int]:
    """Numerical ranks of M[split:, :split] for a 2-D M; every split 1..l-1 by default.

    For an SSD matrix with state size N each is <= N (M is N-semiseparable).
    """
    if M.dim() != 2:
        raise ValueError(f"M must be one head's (l, l) matrix, got {_shape(M)}")
    splits = list(range(1, M.shape[-1])) if splits is None else splits
    return [numerical_rank(offdiagonal_singular_values(M, k), rtol) for k in splits]
