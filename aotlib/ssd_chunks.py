"""The chunked SSD algorithm's pieces: decays, the paper's four steps, the blocked forward.

`aotlib.ssd.ssd_chunked` calls these; `aotlib.ssd_grad` holds their adjoints (the
training path's backward). Layout as in `aotlib.ssd`: x (b, l, h, p), dt (b, l, h),
A (h,), B and C (b, l, g, n), D (h,); inside, chunk states are (..., g, n, hg*p). On the
CPU in float32 the blocked path builds each block's masked decay matrices with a C kernel
(`masked_decay`, `aotlib/ssd_cpu.c`); `decay_matrix` and `diagonal_blocks`' masking are
its torch form and reference.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from aotlib import native
from aotlib.memory import advise_huge_pages

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
    between J and I, 0 unless J < I (see `decay_matrix`). The backward (`aotlib.ssd_grad`)
    also needs two decays without the dt factor: out (..., nI, R), like out_dt, and
    decay_to_end (b, c, Q, h), like to_end.
    """

    dt: Tensor
    dA: Tensor
    from_start: Tensor
    whole: Tensor
    to_end: Tensor
    into: Tensor
    out_dt: Tensor
    between: Tensor
    out: Tensor
    decay_to_end: Tensor

    def without_dt(self) -> ChunkDecays:
        """The same decays with dt = 1 where it multiplies (not inside dA): then
        `decay_matrix` gives L itself, exp(dA_{s+1} + ... + dA_t), instead of L diag(dt)."""
        return self._replace(dt=torch.ones_like(self.dt), out_dt=self.out)

    def block(self, i0: int, i1: int, k0: int, k1: int, c: int) -> ChunkDecays:
        """Of decays flattened to (b c, ...) (`flat_decays`), those of a block (`blocks`):
        sequences i0 .. i1 - 1 of c chunks, chunks k0 .. k1 - 1 of each, as ten views
        (slicing (b, c, ...) and flattening each block took thirty, measurable at
        Mamba-2's training shapes). Whole sequences or a stretch of one are a run of rows;
        one chunk of several sequences (a column block) every c-th row."""
        if self.dt.dim() != 3:  # (b c, h, Q); (b, c, h, Q) would slice the wrong rows
            raise ValueError("ChunkDecays.block takes decays flattened by `flat_decays`")
        rows = block_rows(i0, i1, k0, k1, c)
        return ChunkDecays(*(t[rows] for t in self))


def block_rows(i0: int, i1: int, k0: int, k1: int, c: int) -> slice:
    """A block's rows in a (b c, ...) flattening (`ChunkDecays.block`): whole sequences or
    a stretch of one are a run of rows; one chunk of several sequences every c-th row."""
    if k1 - k0 == c or i1 - i0 == 1:
        return slice(i0 * c + k0, (i1 - 1) * c + k1)
    if k1 - k0 == 1:
        return slice(i0 * c + k0, (i1 - 1) * c + k1, c)
    raise ValueError("a block is whole sequences, a stretch of one, or one chunk")


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
    out = sub[..., R:].contiguous()
    out_dt = out * dt.view(b, c, h, nI, R)
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
    decay_to_end = (out * after_all.unsqueeze(-1)).reshape(b, c, h, Q)
    from_start = from_start.transpose(-1, -2).contiguous()  # (b, c, Q, h)
    to_end = to_end.transpose(-1, -2).contiguous()  # (b, c, Q, h)
    decay_to_end = decay_to_end.transpose(-1, -2).contiguous()  # (b, c, Q, h)
    whole = from_start[:, :, -1]  # (b, c, h)
    return ChunkDecays(dt, dA, from_start, whole, to_end, into, out_dt, between, out, decay_to_end)


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
    out = None if out is None else out.view(*lead, Q // R, R * R)
    # (traced by torch.compile, it is built in the graph: the compiler folds constants)
    make = _segsum_mask.__wrapped__ if torch.compiler.is_compiling() else _segsum_mask
    mask = make(R, dA.dtype, dA.device)
    return _masked_sums(dA.view(*lead, Q // R, R), mask, out).view(*lead, Q // R, R, R)


@functools.lru_cache(maxsize=32)
def _segsum_mask(R: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[s < k <= t] over (k, (t, s)), (R, R R), in dtype: made once, not per block (the
    handful of small ops that build it were measurable next to a block's matmuls). A
    normal tensor even if first asked for under inference mode, so that autograd may save
    it later."""
    with torch.inference_mode(False):
        k, t = _steps(R, torch.empty(0, device=device))
        mask = (k.unsqueeze(-1) <= t.unsqueeze(-1)) & (k.unsqueeze(-1) > t)  # (k, t, s)
        return mask.view(R, R * R).to(dtype)


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
    than L). With `out`, M = L o C B^T overwrites L, and CB is masked in place; x_h
    should then be contiguous (a copy heads first): one batched matmul over (chunk, head)
    ran faster than a loop of per-chunk ones reading time-major x in place (measured).
    """
    *lead, h, Q, _ = L.shape
    g = CB.shape[-3]
    CB = CB.tril_() if out is not None else CB.tril()  # the causal mask
    M = L.view(*lead, g, h // g, Q, Q)
    M = torch.mul(M, CB.unsqueeze(-3), out=None if out is None else M).view(L.shape)
    if D is not None:
        M.diagonal(dim1=-2, dim2=-1).add_(D[:, None])
    return _matmul(M, x_h, out)


def masked_decay(
    lib, dec: ChunkDecays, CB: Tensor, D: Tensor | None, out: Tensor, with_dt: bool = True
) -> Tensor:
    """M = L o tril(C B^T) diag(dt) + diag(D) for each chunk and head, (K, h, Q, Q), by the
    C kernel `lib` (`ssd_kernels`) into `out`, one pass per (chunk, head): the matrix that
    `diagonal_blocks` multiplies x by, built from the same sub-chunk decays as
    `decay_matrix` (its torch form). `with_dt` False: dt = 1 (the backward's P, which
    multiplies dt x); D None: no skip connection.

    dec: a block's decays (K, ...) (`ChunkDecays.block`: each chunk's part contiguous, a
    run of chunks or every c-th); CB (K, g, Q, Q).
    """
    K, h, nI, R = dec.into.shape
    sk, sb = _block_strides(dec)
    outs = dec.out_dt if with_dt else dec.out
    # (held in names for the call: a temporary's memory could be freed before C reads it)
    CB, D = CB.contiguous(), None if D is None else D.contiguous()
    native.check(
        lib.ssd_masked_decay(
            dec.dA.data_ptr(), dec.dt.data_ptr() if with_dt else None, dec.into.data_ptr(),
            outs.data_ptr(), dec.between.data_ptr(), sk, sb, CB.data_ptr(),
            native.ptr(D), K, h, CB.shape[1], nI * R, R, out.data_ptr(),
        ),
        "ssd_masked_decay",
    )  # fmt: skip
    return out


def masked_decay_backward(
    lib, dec: ChunkDecays, CB: Tensor, dP: Tensor, dCB: Tensor, dcs: Tensor
) -> tuple[Tensor, Tensor]:
    """The gradients reaching C B^T and L's exponents from dP (K, h, Q, Q), the gradient of
    P = L o tril(C B^T), by the C kernel `lib` (`ssd_kernels`), one pass per (chunk,
    head), L rebuilt from the block's decays `dec` as in `masked_decay`:

        dCB (K, g, Q, Q) = tril(sum over each group's heads of dP o L)
        dcs (K, h, Q)    = row sums - column sums of Z = dP o L o tril(C B^T)

    (`aotlib.ssd_grad` carries dcs on to dt and A.) Both are written into the given
    contiguous buffers and returned.
    """
    K, h, nI, R = dec.into.shape
    sk, sb = _block_strides(dec)
    CB, dP = CB.contiguous(), dP.contiguous()  # held for the call, as in `masked_decay`
    native.check(
        lib.ssd_masked_decay_backward(
            dec.dA.data_ptr(), dec.into.data_ptr(), dec.out.data_ptr(),
            dec.between.data_ptr(), sk, sb, CB.data_ptr(),
            dP.data_ptr(), K, h, CB.shape[1], nI * R, R, dCB.data_ptr(),
            dcs.data_ptr(),
        ),
        "ssd_masked_decay_backward",
    )  # fmt: skip
    return dCB, dcs


def _block_strides(dec: ChunkDecays) -> tuple[int, int]:
    """The kernels' chunk strides: of dA, dt, into, the outs (all (h, Q) per chunk, so one
    stride) and of between. A block's rows of contiguous flattened decays, which
    `ssd_kernels` checked once per call."""
    return dec.dA.stride(0), dec.between.stride(0)


# the decays the kernels read, each a contiguous (b c, ...) flattening (`flat_decays`)
_KERNEL_DECAYS = ("dt", "dA", "into", "out", "out_dt", "between", "from_start", "decay_to_end")


def ssd_kernels(x: Tensor, flat: ChunkDecays):
    """`ssd_cpu.c` for this call (`masked_decay`, `masked_decay_backward` and the backward's
    dot products), or None, and the torch forms run: see `aotlib.native.kernels_for`; also
    None unless every decay the kernels read is contiguous in `flat` (`flat_decays`; a
    block's rows of it then share one chunk stride), checked here once, not per block."""
    decays = [getattr(flat, name) for name in _KERNEL_DECAYS]
    if not all(t.is_contiguous() for t in decays):
        return None
    return native.kernels_for("ssd_cpu", x, *decays)


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
    states: Tensor,
    chunk_decay: Tensor,
    initial_state: Tensor | None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Step 3: carry the state across chunks, S_{k+1} = chunk_decay_k S_k + states_k.

    states (..., c, g, n, hg*p) from `chunk_state`, chunk_decay (..., c, h) the decay over
    each whole chunk, initial_state (..., g, n, hg*p). A loop over chunks, linear in c
    (the paper's c x c segsum over chunks would be quadratic in length), one fused
    multiply-add per chunk. Returns the states entering each chunk (..., c, g, n, hg*p)
    and the state after the last one (..., g, n, hg*p). With `out` = (entering, last),
    contiguous buffers of those shapes, they are written there (`initial_state` may be
    `last` itself: it is read first; None is a zero state).
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
    entering, last = out
    slots = entering.view(*lead, c, g, n, hg, hgp // hg).unbind(-5)
    if initial_state is None:  # a zero initial state (out only)
        slots[0].zero_()
    else:
        slots[0].copy_(initial_state.view(slots[0].shape))
    slots += (last.view(*lead, g, n, hg, hgp // hg),)
    for k, (s, a) in enumerate(zip(chunks, decays)):
        torch.addcmul(s, a, slots[k], out=slots[k + 1])
    return entering, last


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
# kept from call to call, see `_scratch`). 2^18 (1 MB per intermediate, about 13 MB for
# the backward's dozen) keeps a block's working set in this machine's L3 cache. Measured
# with `python -m aotlib.bench ssd --train-only` (b=2, h=8, P=N=Q=64) before and after:
# forward+backward per token 21.7 -> 17.1 us at 16K and 22.6 -> 19.0 us at 64K, within
# the host's noise at 1K and 4K and at Mamba-2's training shapes.
_BLOCK_ELEMENTS = 1 << 18


def _chunked_all_at_once(
    x: Tensor,
    dec: ChunkDecays,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    S0: Tensor | None,
    final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The four steps over all chunks at once, differentiable: y (b, l, h, p) and the
    final state (None without `final_state`). As the blocked path does, it leaves out
    the state products known to be 0 or unread: with no initial state (S0 None) the
    first chunk's state-to-output, without the final state the last chunk's own state."""
    b, l, h, p = x.shape
    c, Q = dec.dt.shape[1], dec.dt.shape[-1]
    g, n = B.shape[2:]
    pad = (0, 0, 0, 0, 0, c * Q - l)
    x = F.pad(x, pad).reshape(b, c, Q, h, p)
    B_t = F.pad(B, pad).reshape(b, c, Q, g, n).permute(0, 1, 3, 4, 2)  # (b, c, g, n, Q)
    C_c = F.pad(C, pad).reshape(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    L = decay_matrix(dec)  # (b, c, h, Q, Q)
    y_diag = diagonal_blocks(x.transpose(2, 3), L, C_c @ B_t, D)  # (b, c, h, Q, p)
    k0 = 0 if S0 is not None else 1  # the chunks from k0 on enter with a state
    c_own = c if final_state else c - 1  # the chunks whose own state is read
    own = chunk_state(x[:, :c_own], dec.to_end[:, :c_own], B_t[:, :c_own])  # (b, c_own, g, n, hg*p)
    if c_own > k0:  # the states entering chunks k0 .. c_own - 1, and chunk c_own's
        start = own[:, 0] if S0 is None else S0
        entering, S = state_passing(own[:, k0:], dec.whole[:, k0:c_own], start)
    else:
        entering, S = own[:, :0], own[:, 0] if S0 is None and c_own else S0
    if c_own < c and k0 < c:  # the last chunk enters with S (the final state, unread)
        entering, S = torch.cat([entering, S.unsqueeze(1)], dim=1), None
    y = y_diag.transpose(2, 3)  # (b, c, Q, h, p)
    if k0 < c:
        y_state = state_to_output(entering, dec.from_start[:, k0:], C_c[:, k0:], y_diag[:, k0:])
        y = torch.cat([y[:, :k0], y_state], dim=1)
    return y.reshape(b, c * Q, h, p)[:, :l], S


_SCRATCH = threading.local()


def _scratch(x: Tensor, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Uninitialised buffers of these shapes, like x, for the inference path.

    On CPU they are carved from one allocation that is kept (per thread, dtype and
    inference mode) and reused by the next call: the allocator hands big temporaries back
    to the system, and memory page-faulted in afresh on every call costs about as much as
    the work done in it. It grows to the largest call seen (about 13 MB for the benchmark's
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


def new_output(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor like `like` for a large output (y, dx, the chunk states),
    advised onto huge pages (`aotlib.memory.advise_huge_pages`: a third of the forward's
    time per token at 16K and beyond went to faulting fresh 4 KiB pages in)."""
    return advise_huge_pages(like.new_empty(shape))


def block_plan(b: int, c: int, h: int, Q: int, p: int, n: int) -> tuple[int, int]:
    """(m, k): a block is m sequences and k chunks of each, sized so that its largest
    intermediate, (m k, h, Q, max(Q, p, n)), is near `_BLOCK_ELEMENTS` (`fit` chunks):

    - long sequences (c >= fit): k chunks of one sequence, (1, fit);
    - many short ones (b c > fit, b >= fit / 2): one chunk of each of m sequences, (m, 1),
      a column block. Its chunks all have the same position, so the first column's
      entering states are all the initial state and the last column's own states feed
      only the final state: with no initial state, or the final state unused, their
      matmuls are skipped as a whole (`_chunked_in_blocks`, `aotlib.ssd_grad`);
    - otherwise m whole sequences, (m, c): grouped, since a block per sequence is tiny.
    """
    fit = max(1, _BLOCK_ELEMENTS // (h * Q * max(Q, p, n)))  # chunks per block
    if c >= fit:
        return 1, fit
    if b * c > fit and 2 * b >= fit:
        return min(b, fit), 1
    return max(1, min(b, fit // c)), c


def blocks(b: int, c: int, m: int, k: int) -> list[tuple[int, int, int, int]]:
    """(i0, i1, k0, k1): sequences i0 .. i1-1, chunks k0 .. k1-1, in the forward's order."""
    return [
        (i0, min(i0 + m, b), k0, min(k0 + k, c)) for i0 in range(0, b, m) for k0 in range(0, c, k)
    ]


def chunks_of(t: Tensor, i0: int, i1: int, t0: int, t1: int, kb: int, Q: int) -> Tensor:
    """t[i0:i1, t0:t1] (b, l, ...) as (i1-i0, kb, Q, ...), zero-padded in time if ragged
    (only a sequence's last block can be); a view unless padded."""
    part = t[i0:i1, t0:t1]
    if t1 - t0 < kb * Q:
        part = F.pad(part, (0, 0) * (t.dim() - 2) + (0, kb * Q - (t1 - t0)))
    return part.unflatten(1, (kb, Q))


def enters_at_zero(k0: int, kb: int, zero_start: bool) -> bool:
    """Whether every state entering a block is known to be 0: a first column (one chunk,
    k0 = 0, of each of its sequences) with no initial state. Such a block skips the
    products with its entering states, forward (which leaves them unwritten in the
    training path's saved states) and backward (which does not read them)."""
    return zero_start and k0 == 0 and kb == 1


def flat_decays(d: ChunkDecays) -> ChunkDecays:
    """(m, k, ...) -> (m k, ...): a block's decays with one leading dim (views)."""
    return ChunkDecays(*(t.flatten(0, 1) for t in d))


def _chunked_in_blocks(
    x: Tensor,
    dec: ChunkDecays,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    S0: Tensor | None,
    states: Tensor | None = None,
    final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The same steps without autograd, a block at a time (`block_plan`): every
    intermediate in a reused buffer, every output written in place. S0 None is a zero
    initial state; with `final_state` False the final state is not made (None is
    returned). Column blocks (one chunk of each of their sequences) then skip the matmuls
    whose results are known: the first column's state-to-output with no initial state
    (its states are 0), the last column's chunk states without the final state. With
    `states` (b, c, g, n, hg*p), the state entering every chunk is kept there (the
    training path's backward reads them); otherwise only a block's."""
    b, l, h, p = x.shape
    c, Q, (nI, R) = dec.dt.shape[1], dec.dt.shape[-1], dec.into.shape[-2:]
    g, n = B.shape[2:]
    hgp = (h // g) * p
    m, k = block_plan(b, c, h, Q, p, n)
    K = m * k
    flat = flat_decays(dec)  # (b c, ...)
    y = new_output(x, b, l, h, p)
    L_buf, y_diag_buf, x_h_buf, u_buf, CB_buf, B_buf, U_t, V, sums, own, ent_buf, carry = _scratch(
        x,
        (K, h, Q, Q),
        (K, h, Q, p),
        (K, h, Q, p),  # x heads first (step 1)
        (K, Q, h, p),
        (K, g, Q, Q),
        (K, g, n, Q),
        (K, h, nI, nI, R),
        (K, h, nI, nI, R),
        (K, h, nI, R, R),
        (K, g, n, hgp),  # each chunk's own state (step 2)
        (m, k, g, n, hgp),  # the states entering each chunk (step 3)
        (m, g, n, hgp),  # the state leaving a block for the next one
    )
    work = (U_t, V.zero_(), sums)  # V is 0 off its block diagonal
    lib = ssd_kernels(x, flat)  # C kernels for the (Q x Q) tiles, or None
    S_final = x.new_empty(b, g, n, hgp)
    for i0, i1, k0, k1 in blocks(b, c, m, k):
        mb, kb = i1 - i0, k1 - k0
        Kb, t0, t1 = mb * kb, k0 * Q, min(k1 * Q, l)
        if k0 > 0:
            S_in = carry[:mb]  # the state the previous block of these sequences left
        else:
            S_in = None if S0 is None else S0[i0:i1]  # (mb, g, n, hg*p); None: 0
        zero_in = enters_at_zero(k0, kb, S0 is None)  # its `states` are left unwritten
        no_out = kb == 1 and k1 == c and not final_state  # own states feed nothing
        xb = chunks_of(x, i0, i1, t0, t1, kb, Q).flatten(0, 1)  # (Kb, Q, h, p)
        Bb = chunks_of(B, i0, i1, t0, t1, kb, Q).flatten(0, 1)  # (Kb, Q, g, n)
        Cb = chunks_of(C, i0, i1, t0, t1, kb, Q).flatten(0, 1)
        B_t = B_buf[:Kb].copy_(Bb.permute(0, 2, 3, 1))  # (Kb, g, n, Q)
        C_c = Cb.transpose(1, 2)  # (Kb, g, Q, n)
        df = flat.block(i0, i1, k0, k1, c)  # (Kb, ...)
        S_ent = ent_buf[:mb, :kb] if states is None else states[i0:i1, k0:k1]
        last = S_final[i0:i1] if k1 == c else carry[:mb]
        if zero_in:  # (kb = 1) the state leaving is the chunk's own: written there
            if not no_out:
                chunk_state(xb, df.to_end, B_t, out=last, work=u_buf[:Kb])
        elif no_out:  # (kb = 1) nothing to pass on: only S_ent, as the backward reads it
            S_ent.copy_(S_in.unsqueeze(1))
        else:
            chunk_state(xb, df.to_end, B_t, out=own[:Kb], work=u_buf[:Kb])
            state_passing(own[:Kb].view(mb, kb, g, n, hgp), dec.whole[i0:i1, k0:k1], S_in,
                          out=(S_ent, last))  # fmt: skip
        CB = _matmul(C_c, B_t, CB_buf[:Kb])  # (Kb, g, Q, Q)
        x_h = x_h_buf[:Kb].copy_(xb.transpose(1, 2))  # (Kb, h, Q, p)
        if lib is not None:  # M = L o tril(C B^T) diag(dt) + D in one pass, then step 1
            M = masked_decay(lib, df, CB, D, L_buf[:Kb])
            y_diag = _matmul(M, x_h, y_diag_buf[:Kb])
        else:
            L = decay_matrix(df, out=L_buf[:Kb], work=tuple(w[:Kb] for w in work))
            y_diag = diagonal_blocks(x_h, L, CB, D, out=y_diag_buf[:Kb])
        C_c, y_diag = C_c.unflatten(0, (mb, kb)), y_diag.unflatten(0, (mb, kb))
        from_start = df.from_start.unflatten(0, (mb, kb))  # (mb, kb, Q, h)
        if t1 - t0 == kb * Q:
            out = y[i0:i1, t0:t1].unflatten(1, (kb, Q))  # (mb, kb, Q, h, p)
            if zero_in:
                out.copy_(y_diag.transpose(-3, -2))
            else:
                state_to_output(S_ent, from_start, C_c, y_diag, out=out)
        else:
            yb = (
                y_diag.transpose(-3, -2)
                if zero_in
                else state_to_output(S_ent, from_start, C_c, y_diag)
            )
            y[i0:i1, t0:t1] = yb.flatten(1, 2)[:, : t1 - t0]
    return y, S_final if final_state else None
