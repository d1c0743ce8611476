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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "chunked", "scan", "quadratic", "triton")


class SSDDims(NamedTuple):
    """Sizes read off validated SSD inputs."""

    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int


# ---------------------------------------------------------------------------
# Input checks (shared by every path, the Triton one included)
# ---------------------------------------------------------------------------


def _shape(t: Tensor | None) -> str:
    if t is None:
        return "None"
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_ssd_inputs(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> SSDDims:
    """Validate shapes, dtypes and devices; raise ValueError naming the argument and shapes.

    `chunk_size=None` skips the chunk-size check (the scan and quadratic forms have none).
    Values are not checked (A < 0, dt > 0): that would need a device sync on GPU.
    """
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": initial_state}
    shapes = ", ".join(f"{k}={_shape(v)}" for k, v in named.items())
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    ranks = {"x": 4, "dt": 3, "A": 1, "B": 4, "C": 4, "D": 1, "initial_state": 4}
    for name, t in named.items():
        if t is not None and t.dim() != ranks[name]:
            raise ValueError(f"{name} must have {ranks[name]} dims, got {_shape(t)} ({shapes})")
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{k}={v.device}" for k, v in named.items() if v is not None)
        raise ValueError(f"all inputs must be on one device, got {where}")

    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must have shape (b, l, h)={(b, l, h)} like x, got ({shapes})")
    if A.shape != (h,):
        raise ValueError(f"A must have shape (h,)={(h,)}, got ({shapes})")
    if B.shape[:2] != (b, l):
        raise ValueError(f"B must have shape (b, l, g, n) with (b, l)={(b, l)}, got ({shapes})")
    if C.shape != B.shape:
        raise ValueError(f"C must have the same shape as B (b, l, g, n), got ({shapes})")
    if g < 1 or h % g != 0:
        raise ValueError(f"ngroups g={g} (B.shape[2]) must divide nheads h={h} ({shapes})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must have shape (h,)={(h,)} or be None, got ({shapes})")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(
            f"initial_state must have shape (b, h, p, n)={(b, h, p, n)}, got ({shapes})"
        )
    if l < 1:
        raise ValueError(f"x must have at least one time step, got ({shapes})")
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    return SSDDims(b, l, h, p, g, n)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


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


def _segsum_transposed(x: Tensor) -> Tensor:
    """segsum(x) transposed, (..., T) -> (..., T, T) with out[..., i, j] = sum_{i<k<=j} x_k.

    0 (not -inf) where j < i. The same masked sums as `segsum`, computed as one matmul with
    a triangular 0/1 matrix: still each entry sums only its own segment (no cancellation),
    and on CPU the GEMM is about twice as fast as cumsum down a (T, T) tensor. The
    transposed layout is what the chunked path's matmuls want. Meant for short T (chunks):
    the work is T^3 per row of x.
    """
    T = x.shape[-1]
    ones = torch.ones(T, T, dtype=x.dtype, device=x.device)
    z = x.unsqueeze(-2) * ones.triu(1)  # (..., i, k) = x_k [k > i]
    return z @ ones.triu(0)  # (..., i, j) = sum_k z[i, k] [k <= j]


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
# Layout: time is split as l = c * Q, and heads as h = g * hg (hg heads per group), so
# the matmuls that share B or C across a group's heads see all hg heads as one matrix
# of width hg * p. Every decay is a sum of dt * A <= 0 over a stretch inside one chunk,
# so every exp below is <= 1 and nothing can overflow, however long the sequence.
# ---------------------------------------------------------------------------


def diagonal_blocks(xdt_h: Tensor, L: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Step 1: outputs from inputs in the same chunk, Y_diag = (L o C B^T) (dt x).

    xdt_h (b, c, h, Q, p) = dt x with heads before time (the batched matmul's layout);
    L (b, c, h, Q, Q) = exp(segsum(dt A)) per chunk; B, C (b, c, Q, g, n).
    Returns (b, c, h, Q, p): the quadratic form on each diagonal block, as if every chunk
    started from a zero state.
    """
    b, c, h, Q, p = xdt_h.shape
    g = B.shape[3]
    # C B^T computed as (B C^T)^T, so that like L (from `_segsum_transposed`) it is stored
    # transposed: M then is too, and the last matmul reads it with a transpose flag.
    CB = (B.transpose(2, 3) @ C.permute(0, 1, 3, 4, 2)).transpose(-1, -2)  # (b, c, g, Q, Q)
    causal = torch.ones(Q, Q, dtype=L.dtype, device=L.device).tril()
    M = L.view(b, c, g, h // g, Q, Q) * (CB * causal).unsqueeze(3)  # (b, c, g, hg, Q, Q)
    return M.view(b, c, h, Q, Q) @ xdt_h  # (b, c, h, Q, p)


def chunk_state(x: Tensor, weight: Tensor, B: Tensor) -> Tensor:
    """Step 2: each chunk's final state from its own inputs (zero state coming in).

    state_c = sum_s weight_s x_s B_s^T over the chunk's steps s, where weight (b, c, Q, h)
    is dt_s times the decay from step s to the chunk's last step; x (b, c, Q, h, p),
    B (b, c, Q, g, n). Returns (b, c, g, n, hg*p): the state transposed, all heads of a
    group side by side.
    """
    b, c, Q, h, p = x.shape
    g = B.shape[3]
    u = x * weight.unsqueeze(-1)  # (b, c, Q, h, p)
    u = u.view(b, c, Q, g, (h // g) * p).transpose(2, 3)  # (b, c, g, Q, hg*p)
    return B.permute(0, 1, 3, 4, 2) @ u  # (b, c, g, n, hg*p)


def state_passing(
    states: Tensor, chunk_decay: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """Step 3: carry the state across chunks, S_{c+1} = chunk_decay_c S_c + states_c.

    states (b, c, g, n, hg*p) from `chunk_state`, chunk_decay (b, c, h) the decay over
    each whole chunk, initial_state (b, g, n, hg*p). A loop over chunks, linear in c (the
    paper's c x c segsum over chunks would be quadratic in length), one fused
    multiply-add per chunk. Returns the states entering each chunk (b, c, g, n, hg*p) and
    the state after the last one (b, g, n, hg*p).
    """
    b, c, g, n, hgp = states.shape
    hg = chunk_decay.shape[-1] // g
    decays = chunk_decay.view(b, c, g, 1, hg, 1).unbind(1)  # broadcast over (n, p)
    S = initial_state.reshape(b, g, n, hg, hgp // hg)
    entering = []
    for s, a in zip(states.view(b, c, g, n, hg, -1).unbind(1), decays):
        entering.append(S)
        S = torch.addcmul(s, a, S)
    return torch.stack(entering, dim=1).view(b, c, g, n, hgp), S.view(b, g, n, hgp)


def state_to_output(
    S: Tensor, decay_from_start: Tensor, C: Tensor, y_diag: Tensor, out: Tensor | None = None
) -> Tensor:
    """Step 4: add what the state entering each chunk contributes to that chunk's outputs.

    y_t = y_diag_t + decay_from_start_t S_c C_t, with decay_from_start (b, c, Q, h) the
    decay from the chunk's start through step t. S (b, c, g, n, hg*p) entering states from
    `state_passing`, C (b, c, Q, g, n), y_diag (b, c, h, Q, p) from `diagonal_blocks`.
    Returns (b, c, Q, h, p), written into `out` when given (one pass, no temporary).
    """
    b, c, g, n, hgp = S.shape
    Q, h = decay_from_start.shape[2], decay_from_start.shape[3]
    y = C.transpose(2, 3) @ S  # (b, c, g, Q, hg*p)
    y = y.transpose(2, 3).reshape(b, c, Q, h, hgp * g // h)  # (b, c, Q, h, p)
    decay = decay_from_start.unsqueeze(-1)
    if out is None:
        return y * decay + y_diag.transpose(2, 3)
    return torch.addcmul(y_diag.transpose(2, 3), y, decay, out=out)


# The chunked path works through the sequence a block of chunks at a time, carrying the
# state between blocks, so its (b, chunks, h, Q, Q) intermediates stay near this many
# elements: they stay in cache on CPU, and no tensor as large as x is allocated (and
# page-faulted in) except the output.
_BLOCK_ELEMENTS = 1 << 18


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

    The four steps run on a block of chunks at a time (see `_BLOCK_ELEMENTS`), the state
    carried from block to block by `state_passing`; any length and any chunk size work.
    """
    _check_chunk_size(chunk_size)
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    Q, hg = chunk_size, h // g
    y = x.new_empty(b, l, h, p)  # in x's dtype; the rest is computed in the common one
    x, dt, A, B, C, D, initial_state = _common_dtype(x, dt, A, B, C, D, initial_state)
    # When autograd is not recording, outputs go straight into y (out=, in place): fewer
    # passes over memory. When it is, every step is an ordinary differentiable op.
    recording = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, dt, A, B, C, D, initial_state) if t is not None
    )
    if initial_state is None:
        S = x.new_zeros(b, g, n, hg * p)
    else:
        # (b, h, p, n) -> (b, g, n, hg*p), the layout the chunk states use
        S = initial_state.reshape(b, g, hg, p, n).permute(0, 1, 4, 2, 3)
        S = S.reshape(b, g, n, hg * p)
    nchunks = -(-l // Q)
    pad = nchunks * Q - l
    # Padding with dt = 0 means a_t = 1 and no input: the state passes through the padded
    # tail unchanged, so the final state stays exact.
    dt_c = F.pad(dt, (0, 0, 0, pad)).reshape(b, nchunks, Q, h)
    # The decays are small (b, l, h) tensors: computed for the whole sequence at once.
    dA = (dt_c * A).transpose(2, 3).contiguous()  # (b, nchunks, h, Q)
    dA_cs = torch.cumsum(dA, dim=-1)  # (b, nchunks, h, Q), from each chunk's start
    decay_from_start = torch.exp(dA_cs).transpose(2, 3)  # (b, nchunks, Q, h), step 4
    chunk_decay = torch.exp(dA_cs[..., -1])  # (b, nchunks, h), step 3

    chunks_per_block = max(1, _BLOCK_ELEMENTS // (b * h * Q * max(Q, p, n)))
    for k0 in range(0, nchunks, chunks_per_block):
        k1 = min(k0 + chunks_per_block, nchunks)
        c, t0, t1 = k1 - k0, k0 * Q, min(k1 * Q, l)
        ragged = t1 - t0 < c * Q  # only the last block can be: pad it like dt
        xb, Bb, Cb = x[:, t0:t1], B[:, t0:t1], C[:, t0:t1]
        if ragged:
            tail = c * Q - (t1 - t0)
            xb = F.pad(xb, (0, 0, 0, 0, 0, tail))
            Bb, Cb = F.pad(Bb, (0, 0, 0, 0, 0, tail)), F.pad(Cb, (0, 0, 0, 0, 0, tail))
        xb = xb.reshape(b, c, Q, h, p)
        Bb, Cb = Bb.reshape(b, c, Q, g, n), Cb.reshape(b, c, Q, g, n)
        dtb = dt_c[:, k0:k1]  # (b, c, Q, h)
        # Decays inside each chunk, L[t, s] = exp(sum of dA over (s, t]). Row Q-1 is the
        # decay from each step to the chunk's end, what step 2 needs.
        L = torch.exp(_segsum_transposed(dA[:, k0:k1])).transpose(-1, -2)  # (b, c, h, Q, Q)
        # dt x with heads before time, in one pass when nothing is recorded
        xdt_h = (xb.transpose(2, 3), dtb.transpose(2, 3).unsqueeze(-1))  # (b, c, h, Q, p)
        if recording:
            xdt_h = torch.mul(*xdt_h).contiguous()
        else:
            xdt_h = torch.mul(*xdt_h, out=x.new_empty(b, c, h, Q, p))

        y_diag = diagonal_blocks(xdt_h, L, Bb, Cb)  # (b, c, h, Q, p)
        states = chunk_state(xb, dtb * L[..., -1, :].transpose(2, 3), Bb)  # (b,c,g,n,hg*p)
        entering, S = state_passing(states, chunk_decay[:, k0:k1], S)
        decay = decay_from_start[:, k0:k1]
        if recording or ragged:
            yb = state_to_output(entering, decay, Cb, y_diag).reshape(b, c * Q, h, p)
            yb = yb[:, : t1 - t0]
            if D is not None:
                yb = torch.addcmul(yb, x[:, t0:t1], D[:, None])
            y[:, t0:t1] = yb
        else:
            state_to_output(entering, decay, Cb, y_diag, out=y[:, t0:t1].view(b, c, Q, h, p))
            if D is not None:
                y[:, t0:t1].addcmul_(x[:, t0:t1], D[:, None])
    if not return_final_state:
        return y
    final = S.view(b, g, n, hg, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)
    return y, final


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

    backend: "auto" (Triton for CUDA tensors when `aotlib.ssd_triton` imports, else
    chunked), "chunked", "scan", "quadratic" or "triton".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_chunk_size(chunk_size)
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    if backend == "auto":
        backend = "triton" if x.is_cuda and _triton_available() else "chunked"
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
    """Singular values of the block M[..., split:, :split] (rows after, columns before)."""
    l = M.shape[-1]
    if M.dim() < 2 or M.shape[-2] != l or not 0 < split < l:
        raise ValueError(f"need square M (..., l, l) and 0 < split < l, got {_shape(M)}, {split}")
    return torch.linalg.svdvals(M[..., split:, :split])


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
