"""Sequence-parallel SSD: the sequence split across ranks, only states cross between them.

The Mamba-2 paper (Dao and Gu 2024, Sec. 8, "systems optimization") notes that the
chunked algorithm's state passing works the same one level up: chunks become devices.
Rank r holds a contiguous segment of the sequence, steps [t_r, t_{r+1}), of any length.

1. Each rank runs the chunked algorithm (`aotlib.ssd.ssd`) on its segment from a zero
   state: outputs y0 (b, l_r, h, p), the segment's final state S_r (b, h, p, n) and its
   log total decay  Lam_r = sum_{t in segment} dt_t A  (b, h).
2. The ranks exchange only these summaries (`all_gather_with_grad`, below).
3. Each rank combines the summaries before it into its incoming state, the same state
   passing as the chunked path's step 3 but over ranks, in the matrix form
       H_r = sum_{k < r} exp(Lam_{k+1} + ... + Lam_{r-1}) S_k = sum_k exp(segsum(Lam))[r-1, k] S_k
4. and corrects its outputs with it (the chunked path's step 4, state to output):
       y_t = y0_t + exp(sum_{s = t_r .. t} dt_s A) H_r C_t.
   Its outgoing state is exp(Lam_r) H_r + S_r; on the last rank that is the final state.
`initial_state` (the state entering the whole sequence) goes into rank 0's own run, so
S_0 already carries it and nothing else changes.

Why one all-gather and a local prefix combination, rather than passing the state rank to
rank (send/recv): the pass is W - 1 messages in series, each waiting for the previous
rank's combination, so its latency grows with W; the all-gather is one collective that
every rank joins at once, and afterwards every rank holds every summary (the combination
over W ranks is a (W x W) matrix times the states: nothing next to the segment's own
work). The price is bytes: each rank sends its summary to W - 1 ranks instead of one.
The summary is b h (P N + 1) numbers whatever the length, so this stays small; state and
log-decay are packed into one tensor so there is one collective per layer.

Autograd. The gathered tensor's backward is a reduce-scatter: every rank's copy of S_k
received a gradient, and rank k's gradient is their sum (not "my slice" of my copy).
Every rank keeps the gathered tensor in its graph: rank 0 has nothing before it, but its
outputs still add a zero-weighted term of the gathered summaries, so its backward enters
the reduce-scatter the other ranks wait in (dropping them would hang the others).

Communication per call, per rank (`aotlib.comm.sp_ssd_traffic`):
    forward   1 all_gather_single of b h (P N + 1) elements: (W - 1) x that sent
    backward  1 reduce_scatter_single of W b h (P N + 1) elements: the same bytes
    validate=True adds one all-gather of 10 int64 per rank first (`check_segments`), so a
    mismatch across ranks raises the same clear error on every rank instead of crashing
    gloo or hanging; a model checks once per forward and turns it off in its layers.

A context-parallel Mamba-2 *layer* also needs its depthwise convolution's halo: the
last d_conv - 1 rows before the conv go to the next rank, their gradient comes back
(`halo_exchange`, `causal_conv1d_sequence_parallel`).

Check by hand (two or four processes, CPU, gloo):
    python -m torch.distributed.run --nproc-per-node 2 -m aotlib.ssd_parallel --check
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from aotlib.comm import global_rank, init_from_env, require_group
from aotlib.ssd import check_ssd_inputs, random_ssd_inputs, segsum, ssd, ssd_chunked

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# float32 tolerance of the equality check (parallel float32 against single-process float32),
# relative to each quantity's largest entry: the worst measured on the check's sizes is
# 4e-7 (float32 eps 1.2e-7: the two paths cut the chunks differently and sum in another
# order); a missing, doubled or misplaced state term shows up at 1e-2 or more.
F32_RTOL = 1e-5


# ---------------------------------------------------------------------------
# The one exchange, differentiable
# ---------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """(...) on each rank -> (W, ...) on every rank; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = t.new_empty(world * t.numel())  # gloo wants the flat concatenation
        dist.all_gather_single(out, t.contiguous().view(-1), group=group)
        return out.view(world, *t.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_single(out, grad.contiguous().view(-1), group=ctx.group)
        return out.view(grad.shape[1:]), None


def all_gather_with_grad(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's t stacked (W, ...), differentiable: rank k's gradient is the sum of the
    gradients all ranks' copies of its t received."""
    require_group(group)
    return _AllGather.apply(t, group)


# ---------------------------------------------------------------------------
# Shapes must agree across ranks: one tiny handshake
# ---------------------------------------------------------------------------


def check_segments(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> list[int]:
    """Check that every rank's segment fits together; return all segment lengths.

    Local checks first (`check_ssd_inputs`), but a rank whose inputs are bad still joins
    the handshake (with a flag) before raising, so every rank raises instead of the
    others waiting in a collective. Then (b, h, p, g, n, dtype) must agree, and only
    rank 0 may hold an initial_state. One all-gather of 10 int64 per rank.
    """
    rank, world = require_group(group)
    local_error: ValueError | None = None
    try:
        b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
        code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
        desc = [1, b, h, p, g, n, code, initial_state is not None, l, rank]
    except ValueError as e:
        local_error, desc = e, [0] * 9 + [rank]
    mine = torch.tensor(desc, dtype=torch.int64)
    every = torch.empty(world * mine.numel(), dtype=torch.int64)
    dist.all_gather_single(every, mine, group=group)
    every = every.view(world, -1)
    if local_error is not None:
        raise local_error
    bad = [r for r in range(world) if every[r, 0] == 0]
    if bad:
        raise ValueError(f"rank(s) {bad} got invalid SSD inputs (their own error says why)")
    names = ("b", "h", "p", "g", "n", "dtype")
    shapes = [dict(zip(names, every[r, 1:7].tolist())) for r in range(world)]
    if any(s != shapes[0] for s in shapes):
        listed = "; ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        raise ValueError(
            "sequence-parallel SSD needs the same (b, h, p, g, n, dtype) on every rank, only "
            f"the segment length may differ; got {listed} (dtype: index into {_DTYPES})"
        )
    holders = [r for r in range(world) if every[r, 7] and r != 0]
    if holders:
        raise ValueError(
            "initial_state is the state entering the whole sequence: pass it on rank 0 "
            f"only, got one on rank(s) {holders}"
        )
    return every[:, 8].tolist()


# ---------------------------------------------------------------------------
# Sequence-parallel SSD
# ---------------------------------------------------------------------------


def incoming_state(states: Tensor, log_decays: Tensor, rank: int) -> Tensor:
    """H_r = sum_{k < r} exp(Lam_{k+1} + ... + Lam_{r-1}) S_k, from every rank's summary.

    states (W, b, h, p, n), log_decays (W, b, h) -> (b, h, p, n). Rank 0 gets zero weights
    times the states (not a constant zero), which keeps the gathered tensor in its graph.
    """
    W = states.shape[0]
    L = torch.exp(segsum(log_decays.permute(1, 2, 0)))  # (b, h, W, W): L[j, k] over (k, j]
    before = torch.arange(W, device=states.device) < rank  # only ranks before this one
    w = L[..., max(rank - 1, 0), :] * before  # (b, h, W)
    return torch.einsum("bhk,kbhpn->bhpn", w, states)


def state_to_output(H: Tensor, dA: Tensor, C: Tensor) -> Tensor:
    """What the incoming state adds to each output: exp(sum_{s <= t} dA_s) H C_t.

    H (b, h, p, n), dA (b, l, h) the segment's dt A, C (b, l, g, n) -> (b, l, h, p).
    The cumulative sum runs from the segment's start and only adds terms <= 0.
    """
    b, h, p, n = H.shape
    g = C.shape[2]
    carry = torch.exp(torch.cumsum(dA, dim=1))  # (b, l, h)
    Hg = H.reshape(b, g, h // g, p, n)
    y = torch.einsum("blgn,bgkpn->blgkp", C, Hg).reshape(*C.shape[:2], h, p)  # (b, l, h, p)
    return y * carry.unsqueeze(-1)


def ssd_sequence_parallel(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 64,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    group: dist.ProcessGroup | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """SSD over a sequence split across the ranks of `group`; this rank's segment in, its
    outputs y (b, l_r, h, p) out, or (y, state at the end of this segment).

    Same argument layout as `aotlib.ssd.ssd`; x, dt, B, C hold this rank's segment (any
    length >= 1, ranks in sequence order), A and D are the same on every rank.
    initial_state, the state entering the whole sequence, is given on rank 0 only. The
    returned state on the last rank is the whole sequence's final state. `backend` picks
    the local algorithm as in `ssd` (Triton on CUDA, chunked on CPU).
    """
    rank, world = require_group(group)
    if validate:
        check_segments(x, dt, A, B, C, chunk_size, D, initial_state, group)
    b, l, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, chunk_size, D, initial_state)
    # 1. this segment from a zero state (rank 0: from the sequence's initial state)
    y0, S = ssd(
        x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state,
        return_final_state=True, backend=backend,
    )  # fmt: skip
    dA = dt.to(S.dtype) * A.to(S.dtype)  # (b, l, h)
    log_decay = dA.sum(dim=1)  # (b, h), the segment's total decay, in log space
    # 2. one collective: (state, log decay) packed, (b, h, p n + 1) per rank
    packed = torch.cat([S.reshape(b, h, p * n), log_decay.unsqueeze(-1)], dim=-1)
    every = all_gather_with_grad(packed, group)  # (W, b, h, p n + 1)
    states = every[..., : p * n].unflatten(-1, (p, n))  # (W, b, h, p, n)
    if rank == 0:
        # Nothing enters the first segment. A zero-weighted term keeps the gathered
        # summaries in this rank's graph, so its backward joins the reduce-scatter.
        zero = every.sum() * 0
        y = y0 + zero.to(y0.dtype)
        return (y, S + zero) if return_final_state else y
    # 3. the state entering this segment, 4. its contribution to this segment's outputs
    H = incoming_state(states, every[..., p * n], rank)  # (b, h, p, n)
    y = (y0.to(S.dtype) + state_to_output(H, dA, C.to(S.dtype))).to(x.dtype)
    if not return_final_state:
        return y
    return y, torch.exp(log_decay)[..., None, None] * H + S


# ---------------------------------------------------------------------------
# The depthwise convolution's halo
# ---------------------------------------------------------------------------


class _HaloExchange(torch.autograd.Function):
    """tail (b, k, c) to the next rank; the previous rank's tail back (zeros on rank 0).
    Backward: the halo's gradient goes back to the previous rank (zeros on the last)."""

    @staticmethod
    def forward(ctx, tail: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.group = group
        halo = torch.zeros_like(tail, memory_format=torch.contiguous_format)
        _shift(tail, halo, rank, world, group, step=1)
        return halo

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        grad_tail = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        _shift(grad, grad_tail, rank, world, ctx.group, step=-1)
        return grad_tail, None


def _shift(send: Tensor, recv: Tensor, rank: int, world: int, group, step: int) -> None:
    """send to rank + step, receive from rank - step (where those exist), non-blocking."""
    reqs = []
    if 0 <= rank + step < world:
        reqs.append(dist.isend(send, global_rank(group, rank + step), group=group))
    if 0 <= rank - step < world:
        reqs.append(dist.irecv(recv, global_rank(group, rank - step), group=group))
    for req in reqs:
        req.wait()


def halo_exchange(tail: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The previous rank's last rows, (b, k, c): what a causal conv of width k + 1 reads
    before this segment's first step. Zeros on rank 0 (the conv's own zero padding)."""
    require_group(group)
    return _HaloExchange.apply(tail.contiguous(), group)


def causal_conv1d_sequence_parallel(
    x: Tensor, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Causal depthwise conv over a sequence split across ranks: x (b, l_r, c) -> (b, l_r, c).

    weight (c, 1, K) as nn.Conv1d's. Equals the single-process conv (padding K - 1, first
    l outputs kept) on the concatenated sequence. Every rank but the last needs l_r >= K - 1.
    """
    k = weight.shape[-1] - 1
    rank, world = require_group(group)
    if k == 0:
        return F.conv1d(x.transpose(1, 2), weight, bias, groups=x.shape[-1]).transpose(1, 2)
    if x.shape[1] < k and rank < world - 1:
        raise ValueError(f"a segment before the last needs >= {k} steps for the conv halo")
    tail = x[:, -k:] if x.shape[1] >= k else F.pad(x, (0, 0, k - x.shape[1], 0))
    halo = halo_exchange(tail, group)  # (b, k, c)
    ext = torch.cat([halo, x], dim=1).transpose(1, 2)  # (b, c, k + l)
    return F.conv1d(ext, weight, bias, groups=x.shape[-1]).transpose(1, 2)  # (b, l, c)


# ---------------------------------------------------------------------------
# Equality with the single-process chunked path (tests, notebook 09, --check)
# ---------------------------------------------------------------------------


def segment_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each rank's segment."""
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [(e - n, e) for n, e in zip(lengths, ends)]


def compare_with_single_process(
    lengths: list[int],
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
    nheads: int = 4,
    headdim: int = 3,
    ngroups: int = 2,
    dstate: int = 5,
    chunk_size: int = 8,
    with_D: bool = True,
    with_initial_state: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Run on every rank of the current group: this rank's segment through
    `ssd_sequence_parallel` against the whole sequence through `ssd_chunked`.

    The loss is a random linear function of every rank's outputs and of the state at the
    end of every segment, so the gradients test both. Returns this rank's largest errors,
    each as max |parallel - single| / max |single| (relative to the quantity's scale) and
    the raw max |difference| under "abs_*". A and D (replicated) and initial_state (rank 0
    only) have their gradients summed over ranks before the comparison.
    """
    rank, world = require_group()
    if len(lengths) != world:
        raise ValueError(f"need one segment length per rank, got {lengths} for {world} ranks")
    total = sum(lengths)
    inp = random_ssd_inputs(
        batch, total, nheads, headdim, ngroups, dstate, seed=seed, dtype=dtype,
        with_D=with_D, with_initial_state=with_initial_state,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(batch, total, nheads, headdim, generator=gen, dtype=torch.float64).to(dtype)
    gS = torch.randn(world, batch, nheads, headdim, dstate, generator=gen, dtype=torch.float64)
    gS = gS.to(dtype)
    keys = [k for k in ("x", "dt", "A", "B", "C", "D", "initial_state") if inp[k] is not None]
    bounds = segment_bounds(lengths)

    # single process: the whole sequence, and the state at the end of every segment
    ref = {k: inp[k].clone().requires_grad_() for k in keys}
    args = [ref[k] for k in ("x", "dt", "A", "B", "C")]
    kw = dict(D=ref.get("D"), initial_state=ref.get("initial_state"))
    y_ref = ssd_chunked(*args, chunk_size, **kw)
    loss = (y_ref * gy).sum()
    ends = []
    for r, (_, e) in enumerate(bounds):
        cut = [t[:, :e] for t in args[:2]] + [args[2]] + [t[:, :e] for t in args[3:]]
        ends.append(ssd_chunked(*cut, chunk_size, **kw, return_final_state=True)[1])
        loss = loss + (ends[-1] * gS[r]).sum()
    loss.backward()

    # sequence parallel: this rank's segment
    s, e = bounds[rank]
    par = {k: inp[k].clone() for k in keys}
    for k in ("x", "dt", "B", "C"):
        par[k] = par[k][:, s:e].clone()
    if rank != 0:
        par.pop("initial_state", None)
    for t in par.values():
        t.requires_grad_()
    y, S_end = ssd_sequence_parallel(
        *[par[k] for k in ("x", "dt", "A", "B", "C")], chunk_size,
        D=par.get("D"), initial_state=par.get("initial_state"), return_final_state=True,
    )  # fmt: skip
    ((y * gy[:, s:e]).sum() + (S_end * gS[rank]).sum()).backward()

    def err(name: str, a: Tensor, b: Tensor) -> None:
        d = (a.double() - b.double()).abs().max().item()
        out["abs_" + name] = d
        out[name] = d / max(b.double().abs().max().item(), 1e-300)

    out: dict[str, float] = {}
    err("y", y, y_ref[:, s:e])
    err("state", S_end, ends[rank])
    for k in keys:
        grad = par[k].grad if k in par else torch.zeros_like(inp[k])
        if k in ("A", "D", "initial_state"):
            grad = grad.clone()
            dist.all_reduce(grad)
            err("grad_" + k, grad, ref[k].grad)
        else:
            err("grad_" + k, grad, ref[k].grad[:, s:e])
    return out


def compare_cases(cases: list[tuple[list[int], dict]]) -> list[dict[str, float]]:
    """`compare_with_single_process(lengths, **kw)` for each case, in one process group
    (what `aotlib.comm.run_parallel` runs: one start-up for several checks)."""
    return [compare_with_single_process(lengths, **kw) for lengths, kw in cases]


def check_lengths(world: int) -> list[list[int]]:
    """Segment layouts the equality check runs: even, uneven, and one shorter than a chunk
    (chunk 8) on a rank that is neither first nor last when there is one."""
    uneven = [13 + 6 * r for r in range(world)]
    short = [11] * world
    short[min(1, world - 1)] = 3
    return [[16] * world, uneven, short]


def _forward_backward(fn, seg: list[Tensor], chunk_size: int, D: Tensor) -> None:
    kw = dict(validate=False) if fn is ssd_sequence_parallel else {}
    fn(*seg, chunk_size, D=D, **kw).sum().backward()


def time_sequence_parallel(
    lengths: list[int],
    *,
    repeats: int = 3,
    batch: int = 1,
    nheads: int = 8,
    headdim: int = 32,
    dstate: int = 32,
    chunk_size: int = 64,
) -> list[dict[str, float]]:
    """Run on every rank: wall time of one forward + backward of `ssd_sequence_parallel`
    over each total length (split evenly), best of `repeats`, from a barrier to the last
    rank's end. With one rank, also `ssd_chunked` on the whole sequence (the baseline).
    float32, one thread per rank. Says nothing about a network: the ranks share a machine."""
    rank, world = require_group()
    rows = []
    for total in lengths:
        inp = random_ssd_inputs(
            batch, total, nheads, headdim, 1, dstate, seed=rank, dtype=torch.float32
        )
        lo, hi = segment_bounds([total // world + (r < total % world) for r in range(world)])[rank]
        seg = [inp[k][:, lo:hi] if k != "A" else inp[k] for k in ("x", "dt", "A", "B", "C")]
        seg = [t.clone().requires_grad_() for t in seg]

        D = inp["D"]
        parallel = functools.partial(_forward_backward, ssd_sequence_parallel, seg, chunk_size, D)
        single = functools.partial(_forward_backward, ssd_chunked, seg, chunk_size, D)
        for name, fn in [("parallel", parallel)] + ([("single", single)] if world == 1 else []):
            best = float("inf")
            for _ in range(repeats + 1):  # the first is a warm-up
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                best = min(best, time.perf_counter() - t0)
            rows.append(dict(path=name, ranks=world, length=total, seconds=best))
    return rows


def _main() -> int:
    parser = argparse.ArgumentParser(description="Sequence-parallel SSD (run under torchrun)")
    parser.add_argument("--check", action="store_true", help="compare with one process")
    args = parser.parse_args()
    if not args.check:
        parser.print_help()
        return 0
    rank, world = init_from_env()
    torch.set_num_threads(1)
    worst = 0.0
    for lengths in check_lengths(world):
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, F32_RTOL)):
            errs = compare_with_single_process(lengths, dtype=dtype)
            key = "abs_" if dtype == torch.float64 else ""
            worst_here = max(v for k, v in errs.items() if k.startswith("abs_") == bool(key))
            every = [None] * world
            dist.all_gather_object(every, worst_here)
            if rank == 0:
                ok = max(every) <= tol
                print(
                    f"segments {lengths} {str(dtype):>13}: largest error over outputs, states "
                    f"and gradients {max(every):.1e} ({'abs' if key else 'rel'}; tolerance "
                    f"{tol:.0e}) {'OK' if ok else 'FAIL'}"
                )
            worst = max(worst, max(every) / tol)
    dist.destroy_process_group()
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(_main())
