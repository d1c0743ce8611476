"""Collectives for the parallel SSD and Mamba-2 paths: launch, count, and what they cost.

Three things live here, shared by `aotlib.ssd_parallel`, `aotlib.mamba2_parallel`, the
tests and notebook 09:

- `run_parallel(fn, world_size, ...)` starts world_size processes (torch.multiprocessing,
  spawn), joins them in one gloo process group with a timeout, runs fn on every rank and
  returns the results, so a test or a notebook cell can run multi-process code without
  torchrun. A rank that raises, dies, or waits past the timeout makes it raise instead
  of hang. Under torchrun, `init_from_env()` does the joining.
- `count_collectives()` records every torch.distributed communication call made inside
  it (operation, bytes handed in, group size): the measurement the tests check the cost
  model against.
- The cost model: `ring_bytes_sent` converts one call into the bytes each rank sends,
  and `*_traffic` functions predict, per layer and per direction, the number of
  communication calls and those bytes for (a) sequence-parallel SSD, (b) tensor-parallel
  Mamba-2, and for comparison Mamba-1, ring attention and tensor-parallel attention + MLP.

Bytes are counted under the bandwidth-optimal ring algorithms (what NCCL uses for large
messages): for W ranks and a tensor of n bytes handed in,

    all_reduce(n)                       2 (W - 1) / W * n   sent by each rank
    all_gather_single(in: n)            (W - 1) n
    reduce_scatter_single(in: W n)      (W - 1) n
    send / isend(n)                     n

gloo's own algorithms may move more; what the tests check is that the calls the code
makes, with the sizes it hands in, are the calls and sizes the formulas predict.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------


def require_group(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in `group`; a clear error when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "this parallel path needs an initialised torch.distributed process group: "
            "launch with torchrun and call torch.distributed.init_process_group('gloo' or "
            "'nccl') (aotlib.comm.init_from_env does), or run it through aotlib.comm.run_parallel"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The global rank of `group`'s rank r (what send/recv take as peer)."""
    return rank if group is None else dist.get_global_rank(group, rank)


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        out = partial.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_parallel(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Megatron's "f", where a replicated input enters a tensor-parallel region: identity
    forward; backward, an all-reduce of the gradient (each rank saw only its share)."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Megatron's "g", where a region's partial sums leave it: an all-reduce forward;
    identity backward."""
    return _ReduceFromParallel.apply(x, group)


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL when CUDA is there)."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise RuntimeError(
            "no torchrun environment: launch with "
            "python -m torch.distributed.run --nproc-per-node 2 -m <module> --check"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _worker(
    rank: int,
    world_size: int,
    store_file: str,
    out_dir: str,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_parallel(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 1,
    kwargs: dict | None = None,
) -> list[Any]:
    """Run fn(*args, **kwargs) on world_size CPU processes in one gloo group; their results by rank.

    fn must be importable (defined at a module's top level) and its result picklable.
    The group's timeout makes a collective that one rank never joins fail after
    timeout_s; the whole run is killed after 2 timeout_s plus start-up, so nothing hangs.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="aotlib-dist-") as tmp:
        ctx = torch.multiprocessing.start_processes(
            _worker,
            args=(
                world_size,
                str(Path(tmp) / "store"),
                tmp,
                timeout_s,
                threads,
                fn,
                args,
                kwargs or {},
            ),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 2 * timeout_s + 60  # spawning imports torch per rank
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                limit = 2 * timeout_s + 60
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {limit:.0f} s")
        results = []
        for rank in range(world_size):
            with open(Path(tmp) / f"{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


# ---------------------------------------------------------------------------
# Counting what goes through the process group
# ---------------------------------------------------------------------------


class Call(NamedTuple):
    """One communication call: op name, bytes of the tensor handed in, group size."""

    op: str
    nbytes: int
    world: int


# The tensor whose size defines each op's cost (see the module docstring): position, keyword.
_COUNTED = {
    "all_reduce": (0, "tensor"),
    "all_gather_single": (1, "input_tensor"),
    "reduce_scatter_single": (1, "input"),
    "all_gather_into_tensor": (1, "input_tensor"),  # older names of the two above
    "reduce_scatter_tensor": (1, "input"),
    "send": (0, "tensor"),
    "isend": (0, "tensor"),
    "recv": (0, "tensor"),
    "irecv": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_to_all_single": (1, "input"),
}
_RECEIVES = ("recv", "irecv")


def ring_bytes_sent(op: str, nbytes: int, world: int) -> float:
    """Bytes one rank sends for one call under the ring algorithms (module docstring)."""
    if op in _RECEIVES:
        return 0
    if op in ("send", "isend"):
        return nbytes
    if op == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    if op in ("all_gather_single", "all_gather_into_tensor"):
        return (world - 1) * nbytes
    if op in ("reduce_scatter_single", "reduce_scatter_tensor", "all_to_all_single"):
        return (world - 1) / world * nbytes
    if op == "broadcast":
        return nbytes
    raise ValueError(f"no cost model for {op!r}")


@dataclass
class Traffic:
    """Per rank, one direction of one layer: communication calls issued and bytes sent."""

    calls: int = 0
    bytes: float = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.calls + other.calls, self.bytes + other.bytes)


class CommLog:
    """The calls recorded by `count_collectives`, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def traffic(self) -> Traffic:
        """Calls that send (receives are the other side of a send) and bytes this rank sent."""
        sending = [c for c in self.calls if c.op not in _RECEIVES]
        return Traffic(len(sending), sum(ring_bytes_sent(*c) for c in sending))

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]


@contextlib.contextmanager
def count_collectives():
    """Record every torch.distributed call of `_COUNTED` made inside the block.

    The functions are wrapped on the `torch.distributed` module, so any code calling
    them as `dist.<op>` (ours does) is seen, whatever layer it comes from.
    """
    log = CommLog()
    originals = {name: getattr(dist, name) for name in _COUNTED}
    depth = [0]

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if depth[0]:  # one op calling another (an old name calling its new one): once
                return fn(*args, **kwargs)
            pos, key = _COUNTED[name]
            t = args[pos] if len(args) > pos else kwargs[key]
            group = kwargs.get("group")
            log.calls.append(Call(name, t.numel() * t.element_size(), dist.get_world_size(group)))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------------------
# The cost model, per layer and per direction, for one rank
# ---------------------------------------------------------------------------


def sp_ssd_traffic(
    batch: int, nheads: int, headdim: int, dstate: int, world: int, itemsize: int = 4
) -> dict[str, Traffic]:
    """Sequence-parallel SSD (`aotlib.ssd_parallel`): one all-gather of each rank's
    (final state, log decay) summary forward, one reduce-scatter of its gradient backward.
    No term grows with the sequence length."""
    summary = batch * nheads * (headdim * dstate + 1) * itemsize
    one = Traffic(1, ring_bytes_sent("all_gather_single", summary, world))
    return {"forward": one, "backward": Traffic(1, one.bytes)}


def conv_halo_traffic(
    batch: int, conv_dim: int, d_conv: int, world: int, rank: int = 0, itemsize: int = 4
) -> dict[str, Traffic]:
    """The depthwise conv's halo: d_conv - 1 rows of conv_dim channels to the next rank
    forward (all but the last rank send), their gradient back (all but rank 0 send)."""
    rows = batch * (d_conv - 1) * conv_dim * itemsize
    fwd = Traffic(1, rows) if rank < world - 1 else Traffic()
    bwd = Traffic(1, rows) if rank > 0 else Traffic()
    return {"forward": fwd, "backward": bwd}


def cp_mamba2_traffic(
    batch: int,
    d_model: int,
    expand: int,
    headdim: int,
    ngroups: int,
    dstate: int,
    d_conv: int,
    world: int,
    rank: int = 0,
    itemsize: int = 4,
) -> dict[str, Traffic]:
    """A context-parallel Mamba-2 layer: the SSD summaries plus the conv halo."""
    d_inner = expand * d_model
    ssd = sp_ssd_traffic(batch, d_inner // headdim, headdim, dstate, world, itemsize)
    conv_dim = d_inner + 2 * ngroups * dstate
    halo = conv_halo_traffic(batch, conv_dim, d_conv, world, rank, itemsize)
    return {k: ssd[k] + halo[k] for k in ssd}


def _all_reduces(n: int, batch: int, seqlen: int, width: int, world: int, itemsize: int):
    one = ring_bytes_sent("all_reduce", batch * seqlen * width * itemsize, world)
    return Traffic(n, n * one)


def tp_mamba2_traffic(
    batch: int, seqlen: int, d_model: int, world: int, itemsize: int = 4
) -> dict[str, Traffic]:
    """Tensor-parallel Mamba-2 block (`aotlib.mamba2_parallel`): x, z, B, C, dt all come
    from the block input, so the only all-reduce is of out_proj's partial sums (b, l, d)
    forward, and of the input's gradient backward."""
    one = _all_reduces(1, batch, seqlen, d_model, world, itemsize)
    return {"forward": one, "backward": Traffic(one.calls, one.bytes)}


def tp_mamba1_traffic(
    batch: int, seqlen: int, d_model: int, dt_rank: int, dstate: int, world: int, itemsize: int = 4
) -> dict[str, Traffic]:
    """Tensor-parallel Mamba-1 block (a formula only: aotlib has no Mamba-1). dt, B, C are
    projected from the channel-sharded x (x_proj, row-parallel), so the block needs an
    all-reduce of (b, l, dt_rank + 2N) before the scan as well as the one after out_proj;
    backward mirrors both."""
    small = _all_reduces(1, batch, seqlen, dt_rank + 2 * dstate, world, itemsize)
    big = _all_reduces(1, batch, seqlen, d_model, world, itemsize)
    both = small + big
    return {"forward": both, "backward": Traffic(both.calls, both.bytes)}


def tp_attention_mlp_traffic(
    batch: int, seqlen: int, d_model: int, world: int, itemsize: int = 4
) -> dict[str, Traffic]:
    """Megatron tensor parallelism for a Transformer block (a formula only): one all-reduce
    of (b, l, d) after attention's output projection and one after the MLP's, and the
    same two for the input gradients backward."""
    two = _all_reduces(2, batch, seqlen, d_model, world, itemsize)
    return {"forward": two, "backward": Traffic(two.calls, two.bytes)}


def ring_attention_traffic(
    batch: int, seqlen: int, d_kv: int, world: int, itemsize: int = 4
) -> dict[str, Traffic]:
    """Context-parallel causal attention by a ring (a formula only): each rank's keys and
    values (b, l / W, d_kv each) take W - 1 hops forward. Backward, in the common schedule,
    K, V and their gradients dK, dV travel together for W - 1 hops and dK, dV take one more
    hop home. Every term grows linearly with the length."""
    block = batch * (seqlen / world) * d_kv * itemsize  # one of K, V, dK, dV on one rank
    fwd = Traffic(world - 1, (world - 1) * 2 * block)
    bwd = Traffic(world, (world - 1) * 4 * block + 2 * block) if world > 1 else Traffic()
    return {"forward": fwd, "backward": bwd}
