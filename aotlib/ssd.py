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

import torch
import torch.nn.functional as F
from torch import Tensor

# The chunked path's pieces (re-exported: notebooks and tests read them from here).
from aotlib.ssd_chunks import ChunkDecays as ChunkDecays
from aotlib.ssd_chunks import _chunked_all_at_once, _chunked_in_blocks
from aotlib.ssd_chunks import _sub_chunk_length as _sub_chunk_length
from aotlib.ssd_chunks import _sub_chunk_segsum as _sub_chunk_segsum
from aotlib.ssd_chunks import chunk_decays as chunk_decays
from aotlib.ssd_chunks import chunk_state as chunk_state
from aotlib.ssd_chunks import decay_matrix as decay_matrix
from aotlib.ssd_chunks import diagonal_blocks as diagonal_blocks
from aotlib.ssd_chunks import state_passing as state_passing
from aotlib.ssd_chunks import state_to_output as state_to_output
from aotlib.ssd_grad import chunked_ssd_function

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
# Form 3: the chunked algorithm (the paper's 4 steps; the pieces in aotlib.ssd_chunks,
# their adjoints in aotlib.ssd_grad)
# ---------------------------------------------------------------------------


# The longest sequence (in chunks) that torch.compile traces through `ssd_chunked`; longer
# ones run the eager blocked paths (a graph break), as the traced state passing unrolls.
COMPILE_MAX_CHUNKS = 64

# torch.compile runs the blocked inference path as it is (a graph break), as it does
# `chunked_ssd_function`.
_chunked_in_blocks_eager = torch.compiler.disable(_chunked_in_blocks)


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
    *,
    backward: str = "chunked",
) -> Tensor | tuple[Tensor, Tensor]:
    """The chunked SSD algorithm: O(l Q) work in matmuls, O(l / Q) sequential steps.

    The four steps run block by block (`aotlib.ssd_chunks.block_plan`) in reused buffers,
    the outputs written straight into y; without an initial state, or without
    `return_final_state`, the state products known to be 0 or unread are skipped. With
    autograd recording, backward="chunked" (the default) runs that forward keeping the
    chunk states and a backward written out in the same blocks (`aotlib.ssd_grad`);
    backward="autograd" runs the four steps once over all chunks as ordinary
    differentiable ops (the plain reference: one function, two ways).
    Any length and any chunk size work every way. Under torch.compile, sequences of up to
    `COMPILE_MAX_CHUNKS` chunks take the plain form, which the compiler fuses (inductor
    writes its backward; `python -m aotlib.bench train --arch mamba2 --variants compiled
    eager` measures the difference).
    """
    if backward not in ("chunked", "autograd"):
        raise ValueError(f"backward must be 'chunked' or 'autograd', got {backward!r}")
    _check_chunk_size(chunk_size)
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    Q, hg = chunk_size, h // g
    x_dtype = x.dtype
    x, dt, A, B, C, D, initial_state = _common_dtype(x, dt, A, B, C, D, initial_state)
    recording = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, dt, A, B, C, D, initial_state) if t is not None
    )
    c = -(-l // Q)
    if initial_state is None:
        S0 = None  # zero: the blocked paths skip the products with it
    else:
        # (b, h, p, n) -> (b, g, n, hg*p), the layout the chunk states use
        S0 = initial_state.reshape(b, g, hg, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, -1)
    # Under torch.compile (up to COMPILE_MAX_CHUNKS chunks, as a model's context) the four
    # steps are traced as plain ops, so that inductor fuses their elementwise passes and
    # writes the backward: the blocked paths' views of reused buffers do not trace, and
    # the state passing unrolls one step per chunk.
    traced = torch.compiler.is_compiling() and c <= COMPILE_MAX_CHUNKS
    if recording and backward == "chunked" and not traced:
        y, S = chunked_ssd_function(x, dt, A, B, C, D, S0, Q, return_final_state)
    else:
        # Padding with dt = 0 means a_t = 1 and no input: the state passes through the
        # padded tail unchanged, so the final state stays exact.
        dt = F.pad(dt, (0, 0, 0, c * Q - l)).view(b, c, Q, h)
        dec = chunk_decays(dt, A, _sub_chunk_length(Q))  # small: (b, c, h, ...)
        run = _chunked_all_at_once if recording or traced else _chunked_in_blocks_eager
        y, S = run(x, dec, B, C, D, S0, final_state=return_final_state)
    y = y.to(x_dtype)  # in x's dtype whatever the others' (the state stays in the common one)
    if not return_final_state:
        return y
    return y, S.reshape(b, g, n, hg, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)


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
