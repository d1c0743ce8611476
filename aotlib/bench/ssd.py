"""SSD efficiency (the paper's Fig. 10) on this machine: every SSD path and attention, side by side.

    python -m aotlib.bench ssd [--quick] [--threads N] [--out DIR]
    (on CUDA: `python -m aotlib.bench gpu`, the paper's GPU targets)

Paths, all timed forward only (inference mode) on the same inputs (b=2, h=8, p=64, g=1,
Q=64; N=64 unless swept):
- ssd:       the public `aotlib.ssd.ssd` (backend "auto": the chunked PyTorch path on CPU,
             the Triton kernels on CUDA);
- chunked:   (CUDA only) the chunked PyTorch path on the GPU, next to the Triton one;
- listing:   the paper's minimal SSD listing (Listing 1 of Dao and Gu 2024): four einsums,
             with state passing as a (chunks x chunks) segsum matrix. Written here as a
             baseline from the paper's description; it is not a library path;
- scan:      `aotlib.ssd.ssd_scan`, one time step at a time;
- quadratic: `aotlib.ssd.ssd_quadratic`, the (l x l) matrix M;
- sdpa:      causal attention, torch.nn.functional.scaled_dot_product_attention, with the
             same batch, heads and head dim (q, k, v of shape (b, h, l, p)).

Sweeps: sequence length 512..16K (CUDA: `aotlib.bench.gpu`) at N=64, and state size N=16..256
at length 4096. The scan and the quadratic form are skipped, and printed as "skipped",
where they would take too long (scan: l*N over a cap) or too much memory (quadratic:
about 6 (b, h, l, l) tensors).

How things are measured:
- time: the best of several calls after a warm-up call (the machine is shared; the
  fastest call is the least disturbed); a first call over 1 s is itself a sample, and
  only one more call follows (none past 10 s);
- FLOP rate of the ssd path: 2Q(N+P) + 4NP FLOPs per token and head (C B^T and its
  product with x inside each chunk, then chunk states and state-to-output), over time,
  as a share of a 2048^2 (GPU: 8192^2) torch.matmul's rate in the same dtype and thread
  count: 5 pairs timed alternately, median ratio (load changes hit both sides alike);
- peak memory at the memory length: on CPU each path runs in its own subprocess (a
  fresh heap) and we report its peak RSS during the call minus its RSS just before
  (Linux: the peak mark is reset through /proc/self/clear_refs, read as VmHWM), inputs
  already allocated and the path warmed up on a short input (tracemalloc cannot see
  torch's allocator); on CUDA, torch.cuda.max_memory_allocated above the inputs;
- threads: torch.set_num_threads(--threads, default 1), the same in the memory
  subprocesses and for the matmul rate; recorded in the CSV. One thread by default:
  every target is a ratio measured at the same thread count, and on a shared machine
  multi-threaded timings measure the scheduler (an oversubscribed 2-thread run here
  was 50x slower on some calls) more than the code.

Training (CPU; `--train-only` runs just this, into ssd_<device>_train.csv): at lengths
1K, 4K, 16K and 64K, the forward (inference mode), forward+backward through the chunked
path's written-out backward (`aotlib.ssd_grad`, what training runs) and, as the
before/after A/B in the same process, forward+backward with autograd through the chunked
steps (`ssd_chunked(..., backward="autograd")`, the training path before it). Each is a
share of the matmul rate, timed in alternating pairs with the matmul (median ratio), both
in this process's CPU time (one thread: a call's own work, whatever the load), each
path's pairs together and the autograd reference last (its freed gigabytes slow the calls
that follow it);
forward+backward counts 3x the forward's FLOPs (the backward's matmuls are about twice
the forward's). Peak memory of each at each length, as above (fresh subprocesses).
`--model-shape` runs the same sweep at the shapes Mamba-2 trains in the cpu-scale
experiments (batch 32, length 128, 8 heads of 32, N = 64, chunk 32; into
ssd_<device>_model_shape.csv, not stored).

Results go to results/bench/ssd_<device>.csv (long format: one row per measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from aotlib.paths import ROOT, fresh
from aotlib.ssd import segsum, ssd, ssd_chunked, ssd_quadratic, ssd_scan

if TYPE_CHECKING:
    import pandas as pd  # imported where a table is built: the GPU check runs without it

PATHS = ("ssd", "chunked", "listing", "scan", "quadratic", "sdpa")
COLUMNS = [
    "sweep", "path", "seqlen", "dstate", "time_s", "gflops", "share", "peak_mb", "status",
    "device", "device_name", "dtype", "threads", "batch", "nheads", "headdim", "chunk",
]  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """What one benchmark run measures; `setup_for` builds the standard ones."""

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    nheads: int = 8
    headdim: int = 64
    dstate: int = 64
    chunk: int = 64
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    states: tuple[int, ...] = (16, 32, 64, 128, 256)
    state_length: int = 4096
    listing_at: int = 4096  # length of the "vs listing" ratio and the FLOP-rate share
    sdpa_at: int = 16384  # length of the "vs attention" ratio
    memory_at: int = 16384  # length of the peak-memory comparison
    scan_cap: int = 4096 * 64  # the scan runs while l * N <= this
    quadratic_bytes: float = 1.5e9  # the quadratic form runs while its estimate fits
    threads: int = 1
    min_reps: int = 3  # timed calls after the warm-up (unless the first call takes > 1 s)
    paths: tuple[str, ...] = ("ssd", "listing", "scan", "quadratic", "sdpa")
    train_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)  # forward and fwd+bwd shares
    train_pairs: int = 3  # matmul / path pairs per length
    train_memory: bool = True  # peak memory of each training path (subprocesses)


def setup_for(device: str = "cpu", quick: bool = False, threads: int = 1) -> Setup:
    """The standard runs: CPU or CUDA, full (minutes) or quick (seconds, for smoke tests)."""
    if device == "cpu":
        if quick:
            return Setup(
                lengths=(256, 512, 1024), states=(16, 64), state_length=512,
                listing_at=1024, sdpa_at=1024, memory_at=1024, threads=threads,
                train_lengths=(256, 1024), train_pairs=2, train_memory=False,
            )  # fmt: skip
        return Setup(threads=threads)
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
    lengths = tuple(2**k for k in range(9, 15 if quick else 19))  # 512 .. 16K or 256K
    return Setup(
        device="cuda", dtype="bfloat16", lengths=lengths, threads=threads,
        scan_cap=16384 * 64, quadratic_bytes=0.25 * total,
        paths=("ssd", "chunked", "listing", "scan", "quadratic", "sdpa"), train_lengths=(),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# The paper's listing, as a baseline
# ---------------------------------------------------------------------------


def listing_ssd(X: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """Minimal SSD after Listing 1 of the Mamba-2 paper, no initial state.

    X (b, l, h, p) = dt x, A (b, l, h) = dt A, B and C (b, l, h, n); l a multiple of chunk.
    The paper's four steps as einsums; step 3 mixes all chunk states at once through a
    (c + 1) x (c + 1) decay matrix, quadratic in the number of chunks.
    """
    b, l, h, p = X.shape
    n, c = B.shape[-1], l // chunk
    X = X.reshape(b, c, chunk, h, p)
    B, C = B.reshape(b, c, chunk, h, n), C.reshape(b, c, chunk, h, n)
    A = A.reshape(b, c, chunk, h).permute(0, 3, 1, 2)  # (b, h, c, Q)
    A_cs = torch.cumsum(A, dim=-1)  # (b, h, c, Q)

    # 1. outputs within each chunk (the diagonal blocks)
    L = torch.exp(segsum(A))  # (b, h, c, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. each chunk's final state from its own inputs
    decay_to_end = torch.exp(A_cs[..., -1:] - A_cs)  # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)
    # 3. state passing: every entering state as a decayed sum of all earlier chunk states
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
    # 4. what the entering state contributes to each chunk's outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cs))
    return (y_diag + y_off).reshape(b, l, h, p)


# ---------------------------------------------------------------------------
# Inputs and the timed calls
# ---------------------------------------------------------------------------


def make_inputs(setup: Setup, seqlen: int, dstate: int, seed: int = 0) -> dict[str, Tensor]:
    """Random SSD inputs scaled like a trained layer's, drawn directly on the device."""
    dev, dtype = torch.device(setup.device), getattr(torch, setup.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    b, l, h, p = setup.batch, seqlen, setup.nheads, setup.headdim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)

    return {
        "x": randn(b, l, h, p).to(dtype),
        "dt": (F.softplus(randn(b, l, h)) * 0.5).to(dtype),
        "A": (-torch.exp(randn(h) * 0.5)).to(dtype),  # one dtype for every path
        "B": (randn(b, l, 1, dstate) / dstate**0.5).to(dtype),
        "C": (randn(b, l, 1, dstate) / dstate**0.5).to(dtype),
    }


def path_call(path: str, inp: dict[str, Tensor], chunk: int) -> Callable[[], object]:
    """A zero-argument call running one path on prepared inputs (setup outside the call)."""
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    b, l, h, p = x.shape
    if path == "ssd":
        return lambda: ssd(x, dt, A, B, C, chunk)
    if path == "chunked":
        return lambda: ssd_chunked(x, dt, A, B, C, chunk)
    if path == "scan":
        return lambda: ssd_scan(x, dt, A, B, C)
    if path == "quadratic":
        return lambda: ssd_quadratic(x, dt, A, B, C)
    if path == "listing":

        def run_listing():
            Bh, Ch = B.expand(b, l, h, B.shape[-1]), C.expand(b, l, h, C.shape[-1])
            return listing_ssd(x * dt[..., None], (dt * A).to(x.dtype), Bh, Ch, chunk)

        return run_listing
    if path == "sdpa":
        q, k, v = (x.transpose(1, 2).contiguous() for _ in range(3))  # (b, h, l, p)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if path in TRAIN_PATHS[1:]:
        return train_call(path, inp, chunk)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS + TRAIN_PATHS[1:]}")


def skip_reason(path: str, seqlen: int, dstate: int, setup: Setup) -> str | None:
    """Why a path is not run at this size (too slow or too big), or None."""
    if path == "scan" and seqlen * dstate > setup.scan_cap:
        return f"skipped: scan over l*N={setup.scan_cap}"
    if path == "quadratic":
        nbytes = 6 * setup.batch * setup.nheads * seqlen**2 * 4
        if nbytes > setup.quadratic_bytes:
            return f"skipped: ~{nbytes / 1e9:.0f} GB"
    if path == "listing" and seqlen % setup.chunk:
        return "skipped: length not a multiple of the chunk"
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], object],
    device: str,
    min_reps: int = 3,
    budget_s: float = 0.5,
    warmup_s: float = 0.2,
) -> float:
    """Best time of repeated calls after warm-up calls (at least one, for `warmup_s`).

    A first call over 1 s counts as a sample (no warm-up needed at that size); below
    10 s one more call follows, so that one disturbed call cannot decide the result.
    The warm-up runs for a while rather than once because a CPU core slows down for a
    moment after heavy vector work such as the reference matmul: measured here, the ssd
    path timed right after it took up to 30 ms at l=4096 against 24 ms otherwise.
    """

    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    first = timed()
    if first > 1.0:
        return min(first, timed()) if first < 10.0 else first
    warm = first
    while warm < warmup_s:
        warm += timed()
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < budget_s and len(times) < 50):
        times.append(timed())
    return min(times)


def matmul_rate(setup: Setup) -> float:
    """FLOP/s of a large square torch.matmul, in the benchmark's dtype."""
    size = 2048 if setup.device == "cpu" else 8192
    a = torch.randn(size, size, device=setup.device).to(getattr(torch, setup.dtype))
    seconds = time_call(lambda: a @ a, setup.device)
    return 2 * size**3 / seconds


def flop_share(setup: Setup, pairs: int = 5) -> tuple[float, list[float]]:
    """The ssd path's FLOP rate over the matmul rate, timed in alternating pairs.

    On a shared machine the load changes from second to second; timing the two side by
    side, several times, and taking the median ratio keeps load changes out of it.
    Returns the median share and the matmul rates (GFLOP/s).
    """
    inp = make_inputs(setup, setup.listing_at, setup.dstate)
    call = path_call("ssd", inp, setup.chunk)
    flops = ssd_flops(setup, setup.listing_at, setup.dstate)
    ratios, rates = [], []
    for _ in range(pairs):
        rates.append(matmul_rate(setup) / 1e9)
        with torch.inference_mode():
            seconds = time_call(call, setup.device, setup.min_reps)
        ratios.append(flops / seconds / 1e9 / rates[-1])
    return sorted(ratios)[len(ratios) // 2], rates


def chunked_flops_per_token(
    Q: int, N: int, P: int, heads: int, groups: int | None = None, causal: bool = False
) -> float:
    """Forward FLOPs per token of the chunked SSD's matmuls: C B^T (2QN, once per group of
    heads sharing B and C, or per head when `groups` is None) and its product with x
    (2QP per head) inside each chunk of Q, then chunk states and state-to-output (4NP per
    head). `causal` counts only the lower half of the (Q x Q) products, as attention's
    count does."""
    inner = 1 if causal else 2  # the Q x Q products: all of them, or their causal half
    cb = inner * Q * N * (heads if groups is None else groups)
    return cb + heads * (inner * Q * P + 4 * N * P)


def ssd_flops(setup: Setup, seqlen: int, dstate: int) -> float:
    """Forward FLOPs of the chunked algorithm: 2Q(N+P) + 4NP per token and head."""
    per_token = chunked_flops_per_token(setup.chunk, dstate, setup.headdim, setup.nheads)
    return setup.batch * seqlen * per_token


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------


def _rss_reset() -> int:
    """Reset the kernel's peak-RSS mark if allowed (Linux clear_refs); return the RSS now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(x.split()[1]) for x in status if x.startswith("VmRSS")) * 1024
    except (OSError, StopIteration):  # not Linux: fall back on the lifetime peak
        return _rss_peak()


def _rss_peak() -> int:
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(x.split()[1]) for x in status if x.startswith("VmHWM")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory_here(path: str, setup: Setup, seqlen: int) -> float:
    """Peak memory (bytes) one call of `path` adds on top of its inputs, in this process."""
    inp = make_inputs(setup, seqlen, setup.dstate)
    mode = contextlib.nullcontext() if path in TRAIN_PATHS[1:] else torch.inference_mode()
    with mode:
        path_call(path, make_inputs(setup, 2 * setup.chunk, setup.dstate), setup.chunk)()
        fn = path_call(path, inp, setup.chunk)
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - base)
        base = _rss_reset()
        fn()
        return float(_rss_peak() - base)


def peak_memory(path: str, setup: Setup, seqlen: int) -> float:
    """Peak memory of one call; on CPU in a fresh subprocess so earlier peaks don't hide it."""
    if setup.device == "cuda":
        return peak_memory_here(path, setup, seqlen)
    cmd = [sys.executable, "-m", "aotlib.bench.ssd", "--peak-memory-of", path]
    cmd += ["--length", str(seqlen), "--setup", json.dumps(asdict(setup))]
    env = os.environ | {"OMP_NUM_THREADS": str(setup.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


# ---------------------------------------------------------------------------
# Training: forward and forward+backward
# ---------------------------------------------------------------------------

# The forward (the public path, inference mode); forward+backward through the chunked
# path's written-out backward (what training runs); the same through autograd over the
# chunked steps (the training path before `aotlib.ssd_grad`: the A/B).
TRAIN_PATHS = ("ssd", "ssd_fwd_bwd", "autograd_fwd_bwd")
TRAIN_TARGETS = {"ssd": 0.6, "ssd_fwd_bwd": 0.5}  # shares of the matmul rate (issue 15)


def train_call(path: str, inp: dict[str, Tensor], chunk: int) -> Callable[[], object]:
    """One forward+backward (gradients of every input for a fixed random dy)."""
    leaves = [inp[k].detach().requires_grad_(True) for k in ("x", "dt", "A", "B", "C")]
    dy = torch.randn_like(inp["x"])
    backward = "chunked" if path == "ssd_fwd_bwd" else "autograd"

    def step():
        y = ssd_chunked(*leaves, chunk, backward=backward)
        return torch.autograd.grad(y, leaves, dy)

    return step


def cpu_time_call(fn: Callable[[], object], min_reps: int = 3, budget_s: float = 0.5) -> float:
    """`time_call` in this process's CPU time (CUDA: wall time, as `time_call`).

    The training sweep's calls reach 16 s at 64K, where wall-clock best-of-two on a
    loaded machine measures the other processes' share of the core more than the code
    (measured here: the forward's wall-clock share at 64K read 0.31 in a run where its
    CPU-time share was 0.45-0.49). One thread, so the CPU time is this call's own work.
    """
    clock = time.process_time

    def timed() -> float:
        t0 = clock()
        fn()
        return clock() - t0

    first = timed()
    if first > 1.0:
        return min(first, timed()) if first < 10.0 else first
    warm = first
    while warm < 0.2:
        warm += timed()
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < budget_s and len(times) < 50):
        times.append(timed())
    return min(times)


def model_shape_setup(setup: Setup, batch: int = 32) -> Setup:
    """`setup`'s training sweep at the shapes the cpu preset's Mamba-2 trains
    (`aotlib.experiments.lm_config("cpu", arch="mamba2")`): its heads, head size, state and
    chunk, one length (its context), the benchmark's batch of `python -m aotlib.bench
    train`. There the SSD's matmuls are small ((Q x Q) @ (Q x P) per chunk and head), so
    its share is well below the long-sequence sweep's."""
    from aotlib.experiments import lm_config

    cfg = lm_config("cpu", arch="mamba2").model
    if cfg.ngroups != 1:
        raise ValueError("the benchmark's inputs have one group of B and C")
    return replace(setup, batch=batch, nheads=cfg.n_heads_ssm, headdim=cfg.head_dim,
                   dstate=cfg.d_state, chunk=cfg.chunk_size, train_lengths=(cfg.context,),
                   train_pairs=max(setup.train_pairs, 5))  # fmt: skip


def train_matmul_rate(setup: Setup) -> float:
    """FLOP/s of a 2048^2 float32 matmul in CPU time (`matmul_rate` on CUDA)."""
    if setup.device != "cpu":
        return matmul_rate(setup)
    a = torch.randn(2048, 2048).to(getattr(torch, setup.dtype))
    return 2 * 2048**3 / cpu_time_call(lambda: a @ a)


def train_sweep(setup: Setup, log: Callable[[str], None] = print) -> list[dict]:
    """Rows (for `run`'s add) of the training sweep: per length, each path's best time and
    median share over `train_pairs` alternating (matmul, path) pairs, then peak memory.
    On CPU both sides of every ratio are CPU times of this process (`cpu_time_call`)."""
    rows: list[dict] = []
    for seqlen in setup.train_lengths:
        inp = make_inputs(setup, seqlen, setup.dstate)
        flops = ssd_flops(setup, seqlen, setup.dstate)
        calls = {path: path_call(path, inp, setup.chunk) for path in TRAIN_PATHS}
        times: dict[str, list[float]] = {path: [] for path in TRAIN_PATHS}
        shares: dict[str, list[float]] = {path: [] for path in TRAIN_PATHS}
        # Each path's pairs together, the autograd reference last: its gigabytes of
        # temporaries, freed, slowed the calls after it (measured: the forward at 64K read
        # 0.47 in the rotation, 0.63 without the reference, at the same best time).
        for path, call in calls.items():
            for _ in range(setup.train_pairs):
                rate = train_matmul_rate(setup)
                mode = torch.inference_mode() if path == "ssd" else contextlib.nullcontext()
                with mode:
                    if setup.device == "cpu":
                        seconds = cpu_time_call(call, setup.min_reps)
                    else:
                        seconds = time_call(call, setup.device, setup.min_reps)
                work = flops * (1 if path == "ssd" else 3)
                times[path].append(seconds)
                shares[path].append(work / seconds / rate)
        del inp, calls
        gc.collect()
        for path in TRAIN_PATHS:
            share = sorted(shares[path])[len(shares[path]) // 2]
            seconds = min(times[path])
            mb = peak_memory(path, setup, seqlen) / 2**20 if setup.train_memory else math.nan
            gflops = flops * (1 if path == "ssd" else 3) / seconds / 1e9
            rows.append(dict(sweep="train", path=path, seqlen=seqlen, dstate=setup.dstate,
                             time_s=seconds, gflops=gflops, share=share, peak_mb=mb))  # fmt: skip
            log(f"train  l={seqlen:<7d} {path:17s} {seconds * 1e3:10.2f} ms  share "
                f"{share:.2f}  peak {mb:8.1f} MiB")  # fmt: skip
    return rows


def summarize_train(df: pd.DataFrame) -> list[tuple]:
    """(name, at, value, op, goal) for the training sweep: the lowest share over lengths of
    the forward and of forward+backward, and the A/B speed-up over autograd."""
    sel = df[df.sweep == "train"]
    if sel.empty:
        return []
    top = int(sel.seqlen.max())
    at = f"l<={top // 1024}K" if top >= 1024 else f"l={top}"
    by = sel.pivot(index="seqlen", columns="path", values="share")
    t = sel.pivot(index="seqlen", columns="path", values="time_s")
    speedup = float((t["autograd_fwd_bwd"] / t["ssd_fwd_bwd"]).min())
    return [
        ("forward share (lowest)", at, float(by["ssd"].min()), ">=", TRAIN_TARGETS["ssd"]),
        ("fwd+bwd share (lowest)", at, float(by["ssd_fwd_bwd"].min()), ">=",
         TRAIN_TARGETS["ssd_fwd_bwd"]),
        ("fwd+bwd speed-up vs autograd", at, speedup, ">=", 1.0),
    ]  # fmt: skip


def format_train(df: pd.DataFrame) -> list[str]:
    """The training sweep as a table: share of the matmul rate, time and peak memory."""
    sel = df[df.sweep == "train"]
    if sel.empty:
        return []
    table = sel.pivot(index="seqlen", columns="path", values=["share", "time_s", "peak_mb"])
    cols = {}
    for path in TRAIN_PATHS:
        cols[f"{path} share"] = table["share"][path].map("{:.2f}".format)
        cols[f"{path} ms"] = (table["time_s"][path] * 1e3).map("{:.1f}".format)
        cols[f"{path} MiB"] = table["peak_mb"][path].map("{:.0f}".format)
    import pandas as pd

    return ["", "training sweep (ssd = forward; fwd+bwd counts 3x its FLOPs; CPU-time shares):",
            pd.DataFrame(cols).to_string()]  # fmt: skip


def plot_train(ax, df: pd.DataFrame) -> None:
    """Share of the matmul rate against length: forward, forward+backward, and the
    forward+backward through autograd (the training path before), with the goals."""
    sel = df[df.sweep == "train"]
    labels = {"ssd": "forward", "ssd_fwd_bwd": "forward+backward",
              "autograd_fwd_bwd": "forward+backward, autograd (before)"}  # fmt: skip
    styles = {"ssd": STYLE["ssd"], "ssd_fwd_bwd": dict(color="C1", marker="v", lw=2.2),
              "autograd_fwd_bwd": dict(color="0.5", marker="s", ls="--")}  # fmt: skip
    for path in TRAIN_PATHS:
        one = sel[sel.path == path].sort_values("seqlen")
        ax.plot(one.seqlen, one.share, label=labels[path], ms=4, **styles[path])
    for path, goal in TRAIN_TARGETS.items():
        ax.axhline(goal, color=styles[path]["color"], ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("share of the matmul rate")
    if len(df):
        ax.set_title(panel_title(df), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def run(setup: Setup, log: Callable[[str], None] = print, train_only: bool = False) -> pd.DataFrame:
    """Every measurement of one benchmark run, as a long table (see COLUMNS)."""
    torch.set_num_threads(setup.threads)
    rows: list[dict] = []
    meta = {
        "device": setup.device, "device_name": device_name(setup.device),
        "dtype": setup.dtype, "threads": setup.threads, "batch": setup.batch,
        "nheads": setup.nheads, "headdim": setup.headdim, "chunk": setup.chunk,
    }  # fmt: skip

    def add(sweep, path, seqlen, dstate, time_s=math.nan, status="ok", **extra):
        row = {"sweep": sweep, "path": path, "seqlen": seqlen, "dstate": dstate}
        row |= {"time_s": time_s, "status": status, **extra, **meta}
        rows.append(row)

    if hasattr(os, "getloadavg"):
        log(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if train_only:
        for row in train_sweep(setup, log):
            add(**row)
        import pandas as pd

        return pd.DataFrame(rows).reindex(columns=COLUMNS)
    share, matmul_gflops = flop_share(setup)
    log(f"ssd FLOP rate / matmul rate at l={setup.listing_at}: {share:.2f} (median of pairs)")
    sweeps = [("length", l, setup.dstate) for l in setup.lengths]
    sweeps += [("state", setup.state_length, n) for n in setup.states]
    for sweep, seqlen, dstate in sweeps:
        inp = make_inputs(setup, seqlen, dstate)
        for path in setup.paths:
            if sweep == "state" and path == "sdpa":
                continue  # attention has no state: its time does not depend on N
            reason = skip_reason(path, seqlen, dstate, setup)
            if reason is None:
                try:
                    with torch.inference_mode():
                        call = path_call(path, inp, setup.chunk)
                        seconds = time_call(call, setup.device, setup.min_reps)
                except Exception as err:  # one failing path (e.g. out of memory) is a row
                    reason = f"error: {type(err).__name__}: {str(err)[:80]}"
                    if setup.device == "cuda":
                        torch.cuda.empty_cache()
            if reason is None and path in ("ssd", "chunked"):  # the chunked algorithm's FLOPs
                gflops = ssd_flops(setup, seqlen, dstate) / seconds / 1e9
                add(sweep, path, seqlen, dstate, seconds, gflops=gflops)
            elif reason is None:
                add(sweep, path, seqlen, dstate, seconds)
            else:
                add(sweep, path, seqlen, dstate, status=reason)
            shown = f"{seconds * 1e3:10.2f} ms" if reason is None else reason
            log(f"{sweep:6s} l={seqlen:<7d} N={dstate:<4d} {path:10s} {shown}")
        del inp
        if setup.device == "cuda":
            torch.cuda.empty_cache()
    if hasattr(os, "getloadavg"):
        log(f"load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for rate in matmul_gflops:
        add("matmul", "matmul", 0, 0, gflops=rate)
    add("share", "ssd", setup.listing_at, setup.dstate, share=share)
    for path in ("ssd", "listing"):
        mb = peak_memory(path, setup, setup.memory_at) / 2**20
        add("memory", path, setup.memory_at, setup.dstate, peak_mb=mb)
        log(f"memory l={setup.memory_at} {path:10s} peak {mb:10.1f} MiB")
    for row in train_sweep(setup, log):
        add(**row)
    import pandas as pd

    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _time_of(df: pd.DataFrame, path: str, seqlen: int, sweep: str = "length") -> float:
    sel = df[(df.sweep == sweep) & (df.path == path) & (df.seqlen == seqlen)]
    return float(sel.time_s.iloc[0]) if len(sel) else math.nan


def summarize(df: pd.DataFrame, setup: Setup) -> list[dict]:
    """The headline ratios, each with its target and PASS/FAIL (targets are CPU ones on
    CPU; on CUDA the attention target is the paper's 'faster than FlashAttention-2')."""
    if not (df.sweep == "share").any():  # a --train-only run
        return _with_verdicts(summarize_train(df))
    share = float(df[df.sweep == "share"].share.iloc[0])
    ssd_at = _time_of(df, "ssd", setup.listing_at)
    vs_listing = _time_of(df, "listing", setup.listing_at) / ssd_at
    vs_sdpa = _time_of(df, "sdpa", setup.sdpa_at) / _time_of(df, "ssd", setup.sdpa_at)
    mem = df[df.sweep == "memory"].set_index("path").peak_mb
    mem_ratio = float(mem["ssd"] / mem["listing"])
    sdpa_target = 20.0 if setup.device == "cpu" else 1.0
    out = [
        ("ssd FLOP rate / matmul rate", f"l={setup.listing_at}", share, ">=", 0.5),
        ("speed-up vs paper listing", f"l={setup.listing_at}", vs_listing, ">=", 2.0),
        ("speed-up vs causal SDPA", f"l={setup.sdpa_at}", vs_sdpa, ">=", sdpa_target),
        ("peak memory ssd / listing", f"l={setup.memory_at}", mem_ratio, "<=", 0.5),
    ]
    return _with_verdicts(out + summarize_train(df))


def _with_verdicts(out: list[tuple]) -> list[dict]:
    result = []
    for name, where, value, op, target in out:
        ok = value >= target if op == ">=" else value <= target
        result.append({"target": name, "at": where, "value": value, "op": op,
                       "goal": target, "pass": bool(ok)})  # fmt: skip
    return result


def format_report(df: pd.DataFrame, setup: Setup, summary: list[dict]) -> str:
    """Time tables (ms; 'skipped' where a path was not run) and the targets."""
    lines = [
        f"SSD benchmark on {df.device_name.iloc[0]} ({setup.device}, {setup.dtype}, "
        f"threads={setup.threads}); b={setup.batch} h={setup.nheads} p={setup.headdim} "
        f"Q={setup.chunk}; forward, best-of time in ms",
    ]
    for sweep, key, title in [("length", "seqlen", f"N={setup.dstate}"),
                              ("state", "dstate", f"l={setup.state_length}")]:  # fmt: skip
        sel = df[df.sweep == sweep].copy()
        if sel.empty:
            continue
        sel["cell"] = [
            f"{t * 1e3:.2f}" if s == "ok" else s.split(":")[0]
            for t, s in zip(sel.time_s, sel.status)
        ]
        table = sel.pivot(index=key, columns="path", values="cell")
        table = table[[p for p in setup.paths if p in table.columns]]
        lines += ["", f"time vs {key} ({title}):", table.to_string()]
    rate = df[df.sweep == "matmul"].gflops
    if len(rate):
        lines += [
            "",
            f"matmul rate: median {rate.median():.1f} GFLOP/s, range {rate.min():.1f}-"
            f"{rate.max():.1f} ({len(rate)} measurements, alternating with the ssd path)",
        ]
    lines += format_train(df)
    lines += [f"{'target':30s} {'at':8s} {'value':>8s}   goal"]
    for s in summary:
        verdict = "PASS" if s["pass"] else "FAIL"
        lines.append(
            f"{s['target']:30s} {s['at']:8s} {s['value']:8.2f}   {s['op']} {s['goal']:<5g} "
            f"{verdict}"
        )
    return "\n".join(lines)


def csv_path(device: str, out: Path | None = None) -> Path:
    return (out or ROOT / "results" / "bench") / f"ssd_{device}.csv"


# ---------------------------------------------------------------------------
# What notebook 02 uses
# ---------------------------------------------------------------------------


def results_for(scale: str) -> tuple[pd.DataFrame, str]:
    """CPU results for a notebook scale, and where they came from.

    smoke: a quick run now (seconds, nothing written); cpu and paper: the stored
    results/bench/ssd_cpu.csv, or a full run that writes it (also with FRESH=1).
    """
    if scale == "smoke":
        return run(setup_for("cpu", quick=True), log=lambda _: None), "quick run (smoke scale)"
    import pandas as pd

    path = csv_path("cpu")
    if path.exists() and not fresh():
        return pd.read_csv(path), f"stored {path.relative_to(ROOT)}"
    df = run(setup_for("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return df, f"full run, written to {path.relative_to(ROOT)}"


def gpu_results() -> list[pd.DataFrame]:
    """Benchmark CSVs under results/gpu (written by tools/gpu_check.py), if any."""
    import pandas as pd

    found = []
    for path in sorted((ROOT / "results" / "gpu").glob("*.csv")):
        df = pd.read_csv(path)
        if {"sweep", "path", "time_s", "device_name"} <= set(df.columns):
            found.append(df)
    return found


def ran(df: pd.DataFrame, sweep: str = "length") -> pd.DataFrame:
    """Which paths ran ('ok') or were skipped at each size: a stable summary of a run."""
    key = "seqlen" if sweep == "length" else "dstate"
    sel = df[df.sweep == sweep]
    table = sel.assign(ran=sel.status.eq("ok").map({True: "ran", False: "skipped"}))
    return table.pivot(index=key, columns="path", values="ran")


def loglog_slope(df: pd.DataFrame, path: str, sweep: str = "length") -> float:
    """Least-squares slope of log time against log size (1 linear, 2 quadratic)."""
    key = "seqlen" if sweep == "length" else "dstate"
    sel = df[(df.sweep == sweep) & (df.path == path) & (df.status == "ok")]
    if len(sel) < 2:
        return math.nan
    x, y = torch.tensor(sel[key].values).log(), torch.tensor(sel.time_s.values).log()
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


STYLE = {
    "ssd": dict(color="C3", marker="o", lw=2.2),
    "chunked": dict(color="C1", marker="v"),
    "listing": dict(color="C0", marker="s"),
    "scan": dict(color="C2", marker="^"),
    "quadratic": dict(color="C4", marker="D"),
    "sdpa": dict(color="k", marker="x", ls="--"),
}


def panel_title(df: pd.DataFrame) -> str:
    row = df.iloc[0].to_dict()  # a dict: a Series' .dtype would shadow the column
    where = "CPU" if row["device"] == "cpu" else "GPU"
    n = int(row["threads"])
    threads = f", {n} thread{'s' if n != 1 else ''}" if where == "CPU" else ""
    return f"{where}: {row['device_name']}\n({row['dtype']}{threads})"


def plot_sweep(ax, df: pd.DataFrame, sweep: str = "length") -> None:
    """Time per path against sequence length (with slope-1 and slope-2 guides) or state size."""
    key = "seqlen" if sweep == "length" else "dstate"
    sel = df[(df.sweep == sweep) & (df.status == "ok")]
    for path in [p for p in PATHS if p in set(sel.path)]:
        one = sel[sel.path == path].sort_values(key)
        label = "ssd (public path)" if path == "ssd" else path
        ax.plot(one[key], one.time_s, label=label, ms=4, **STYLE.get(path, {}))
    if sweep == "length" and len(sel):
        ssd_rows = sel[sel.path == "ssd"].sort_values(key)
        x0, t0 = float(ssd_rows[key].iloc[0]), float(ssd_rows.time_s.iloc[0])
        xs = torch.tensor([x0, float(sel[key].max())])
        for slope, style in [(1, ":"), (2, "-.")]:
            ax.plot(xs, t0 * (xs / x0) ** slope, color="0.6", ls=style, lw=1,
                    label=f"slope {slope}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if sweep == "length":
        ax.set_xlabel("sequence length")
    else:  # the state sweep runs at one length: name it
        lengths = sorted(set(sel.seqlen))
        ax.set_xlabel(f"state size N (length {', '.join(str(int(x)) for x in lengths)})")
    ax.set_ylabel("forward time (s)")
    ax.set_title(panel_title(df), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="short lengths, for smoke runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="CSV folder (results/bench)")
    parser.add_argument("--json", type=Path, default=None, help="also write the targets here")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="only the forward and forward+backward shares (CPU)",
    )
    parser.add_argument(
        "--train-lengths",
        type=int,
        nargs="+",
        default=None,
        help="lengths of the training sweep (default 1K 4K 16K 64K)",
    )
    parser.add_argument("--train-pairs", type=int, default=None,
                        help="matmul/path pairs per length (default 3)")  # fmt: skip
    parser.add_argument(
        "--model-shape",
        action="store_true",
        help="the training sweep at the shapes the cpu preset's Mamba-2 trains (batch 32, "
        "its heads, head size, state and chunk, length = its context)",
    )
    parser.add_argument("--peak-memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peak_memory_of:  # the subprocess of `peak_memory`
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in json.loads(args.setup).items()})  # fmt: skip
        torch.set_num_threads(setup.threads)
        print(json.dumps({"peak_bytes": peak_memory_here(args.peak_memory_of, setup, args.length)}))
        return 0

    if args.device == "cuda":
        # The GPU's goals are the paper's (against FlashAttention), not the CPU's FLOP share.
        where = "`python -m aotlib.bench gpu` (or `make gpu-check`)"
        print(f"--device cuda: the GPU benchmark is {where}: SSD against FlashAttention, as in "
              "the paper", file=sys.stderr)  # fmt: skip
        return 2
    setup = setup_for(args.device, args.quick, args.threads)
    if args.train_lengths:
        setup = replace(setup, train_lengths=tuple(args.train_lengths))
    if args.train_pairs:
        setup = replace(setup, train_pairs=args.train_pairs)
    if args.model_shape:
        setup, args.train_only = model_shape_setup(setup), True
    df = run(setup, train_only=args.train_only)
    summary = summarize(df, setup)
    print()
    print(format_report(df, setup, summary))
    path = csv_path(args.device, args.out)
    if args.train_only:
        suffix = "model_shape" if args.model_shape else "train"
        path = path.with_name(f"{path.stem}_{suffix}.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    print(f"\nwrote {path}")
    if args.json:
        report = {"setup": asdict(setup), "device_name": df.device_name.iloc[0],
                  "targets": summary}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
