"""Training throughput of the CPU-scale GPT, as a share of this machine's matmul rate.

    python -m aotlib.bench train [--threads 1] [--batch 32] [--dropout 0]
                                 [--variants compiled eager plain] [--repeats 5]
                                 [--arch mamba2 --ssd-at REV] [--head-rows R ...]

One training step = forward, cross-entropy, backward and a fused AdamW step on random
tokens, for the config the CPU-scale experiments use (`aotlib.experiments`, scale
"cpu"): GPT size "s" (4 layers, d=128, 4 heads, dropout 0), vocab 4096, context 128,
batch 32, float32, one torch thread (the machine has 2 cores shared by several users).

Model FLOPs per token (the usual 6N rule; multiply-add = 2 FLOPs, backward = 2x forward):

    6 * N_non_embedding                  every weight matrix (LayerNorm/bias count as if)
  + 3 * n_layer * mixing                 sequence mixing beyond the weights, per layer:
  + 6 * vocab * d                        the LM head (computed, though tied)

where mixing (forward, per token and layer, `mixing_flops`) is what each architecture's
own sequence mixing multiplies, counted the same way for all (causal half only):
GPT 2 T d (scores and mixing over T positions); LSTM, GRU 0 (their recurrences are
weight matrices, already in 6N); Mamba-2's chunked SSD Q N g + h (Q P + 4 N P) (C B^T
once per group and its product with x inside each chunk of Q, then each head's chunk
state and state-to-output: `aotlib.bench.ssd.chunked_flops_per_token`, the causal half,
C B^T once per group).

The reference is a float32 2048^3 `torch.matmul`, timed with the same thread count in
the same run, right before each timed repeat. The machine is shared, so every rate is
measured twice: per wall-clock second, and per CPU second of this process (which does not
count the time other processes hold the core). The verdict is the best CPU-time share of
the named variants but eager_before (the references, --ssd-at's code as it was and
--head-rows' other blocks, are timed for their ratios only); both rates are printed as
median (min, max) over the repeats.

Variants, timed interleaved:
- compiled: torch.compile (inductor, C++) of the model body, which fuses LayerNorm,
  GELU, softmax, residual adds and dropout into a few loops (for Mamba-2 the SSD too:
  under compile `aotlib.ssd.ssd_chunked` is traced as its plain chunked steps, and
  inductor fuses them and writes their backward); then the LM head and the
  loss in cache-sized blocks (`aotlib.models.LinearCrossEntropy`), so that the 64 MB of
  logits of a batch never travel to memory;
- eager: the same without torch.compile (no compile time; `aotlib.models.fused_lm_loss`);
- plain: what a textbook loop does: model(inputs) -> logits -> F.cross_entropy;
- eager_torch (not run by default): "eager" with `aotlib.native`'s C kernels off (the LM
  head's loss, and for Mamba-2 the conv + SiLU and the norms, then run as their torch
  forms, as where no C compiler is found): `--variants eager eager_torch` times what the
  kernels buy;
- eager_before (Mamba-2 only, not run by default): "eager" as Mamba-2 trained before
  issue 15: the SSD's chunked path differentiated by autograd through its steps (not the
  written-out backward of `aotlib.ssd_grad`), the conv as nn.Conv1d then F.silu (not
  `aotlib.mamba2.causal_conv_silu`) and the gated norm as plain ops (not
  `aotlib.mamba2.GatedRMSNorm`): `--variants eager eager_before` is the before/after
  A/B, timed interleaved in one process.
With `--ssd-at REV` (Mamba-2), one more variant, "eager, SSD at REV": "eager" with the
SSD's training path (`aotlib/ssd_chunks.py`, `aotlib/ssd_grad.py`) as it was at a git
revision, loaded next to the working tree's (`aotlib.bench.against`): a change to the SSD
timed as whole training steps, interleaved in one process. With `--head-rows R ...`, "eager"
with the LM head + loss in blocks of R rows, one variant per R (the default block is ~8 MB
of logits, 512 rows at V = 4096).
All use `aotlib.models.Dropout` (four decisions per 64-bit draw; nn.Dropout's one draw
per element costs as much as the model's matmuls here) and fused AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from aotlib import native
from aotlib.bench.ssd import chunked_flops_per_token
from aotlib.experiments import lm_config
from aotlib.mamba2 import RMSNorm
from aotlib.models import ModelConfig, build_model, count_parameters, linear_cross_entropy

TARGET = 0.5  # model FLOP rate / matmul rate

VARIANTS = {
    # name: (LM head + loss in blocks, torch.compile of the model body)
    "compiled": (True, True),
    "eager": (True, False),
    "plain": (False, False),
    "eager_before": (True, False),  # mamba2: "eager" with the SSD and conv paths before
    "eager_torch": (True, False),  # "eager" without aotlib.native's C kernels
}
DEFAULT_VARIANTS = ["compiled", "eager", "plain"]


class Clocks:
    """Wall-clock and process CPU time elapsed since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def matmul_rate(n: int = 2048, bursts: int = 3, per_burst: int = 4) -> tuple[float, float]:
    """GFLOP/s (per wall second, per CPU second) of an n^3 float32 matmul, best burst."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.matmul(a, b, out=out)
    wall = cpu = 0.0
    for _ in range(bursts):
        c = Clocks()
        for _ in range(per_burst):
            torch.matmul(a, b, out=out)
        w, p = c.elapsed()
        flops = 2 * n**3 * per_burst / 1e9
        wall, cpu = max(wall, flops / w), max(cpu, flops / max(p, 1e-9))
    return wall, cpu


def mixing_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token and layer of the sequence mixing that is not a weight
    matrix, causal half only (see the module docstring)."""
    if cfg.arch == "gpt":
        return 2 * cfg.context * cfg.d_model
    if cfg.arch == "mamba2":
        return chunked_flops_per_token(cfg.chunk_size, cfg.d_state, cfg.head_dim,
                                       cfg.n_heads_ssm, cfg.ngroups, causal=True)  # fmt: skip
    return 0.0  # lstm, gru: the recurrence is weights, counted in 6N


def flops_per_token(cfg: ModelConfig, n_non_embedding: int) -> float:
    """Model FLOPs of one training token (see the module docstring)."""
    return (
        6 * n_non_embedding + 3 * cfg.n_layer * mixing_flops(cfg) + 6 * cfg.vocab_size * cfg.d_model
    )


def make_step(
    cfg: ModelConfig,
    batch: int,
    fused_loss: bool,
    compile: bool,
    seed: int = 0,
    head_rows: int | None = None,
    ssd_at: str | None = None,
) -> tuple[Callable[[], float], torch.nn.Module]:
    """A function running one training step (returns the loss), and its model; with
    `fused_loss`, the LM head and loss run in blocks of `head_rows` rows (None:
    `linear_cross_entropy`'s default); with `ssd_at`, the SSD's chunked training path as
    it was at that git revision (`ssd_at_revision`)."""
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    windows = torch.randint(cfg.vocab_size, (batch, cfg.context + 1))  # (B, T+1)
    inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T)

    if fused_loss:
        hidden = torch.compile(model.hidden_states) if compile else model.hidden_states
        head = model.lm_head.weight  # (V, d)

        def loss_fn() -> torch.Tensor:
            h = hidden(inputs)  # (B, T, d)
            return linear_cross_entropy(h.flatten(0, 1), head, targets.flatten(), head_rows)
    else:
        forward = torch.compile(model) if compile else model

        def loss_fn() -> torch.Tensor:
            logits = forward(inputs)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def step() -> float:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return (step if ssd_at is None else ssd_at_revision(ssd_at, step)), model


def variant_step(
    cfg: ModelConfig, batch: int, name: str
) -> tuple[Callable[[], float], torch.nn.Module]:
    """`make_step` for one of `VARIANTS` ("eager_before": Mamba-2's paths before issue 15)."""
    fused, compiled = VARIANTS[name]
    step, model = make_step(cfg, batch, fused_loss=fused, compile=compiled)
    if name == "eager_before":
        if cfg.arch != "mamba2":
            raise SystemExit("--variants eager_before needs --arch mamba2")
        for blk in model.blocks:
            blk.ssd_backward, blk.conv_form = "autograd", "conv1d"
        for norm in model.modules():
            if isinstance(norm, RMSNorm):  # the gated and the residual norms
                norm.fused = False
    if name == "eager_torch":
        return _without_native(step), model
    return step, model


def _without_native(step: Callable[[], float]) -> Callable[[], float]:
    """`step` with `aotlib.native`'s kernels off: the torch forms of what they fuse."""

    def torch_only() -> float:
        with native.off():
            return step()

    return torch_only


def ssd_at_revision(rev: str, step: Callable[[], float]) -> Callable[[], float]:
    """`step` with `aotlib.ssd`'s chunked training path swapped for the one at git
    revision `rev` while it runs (`aotlib.bench.against.revision_modules`)."""
    import tempfile
    from pathlib import Path

    import aotlib.ssd
    from aotlib.bench.against import called_as_now, revision_modules

    with tempfile.TemporaryDirectory() as folder:
        old_function = called_as_now(revision_modules(rev, Path(folder)).chunked_ssd_function)

    def swapped() -> float:
        mine = aotlib.ssd.chunked_ssd_function
        aotlib.ssd.chunked_ssd_function = old_function
        try:
            return step()
        finally:
            aotlib.ssd.chunked_ssd_function = mine

    return swapped


def _spread(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}, {max(xs):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m aotlib.bench train", description=doc)
    p.add_argument("--arch", default="gpt", choices=["gpt", "lstm", "gru", "mamba2"])
    p.add_argument("--size", default="s")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=None, help="default: the cpu preset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--ssd-at", metavar="REV", help="mamba2: also eager with the SSD at REV")
    p.add_argument("--head-rows", type=int, nargs="+", default=[], metavar="R",
                   help="also eager with the LM head + loss in blocks of R rows")  # fmt: skip
    args = p.parse_args(argv)
    if args.ssd_at and args.arch != "mamba2":
        raise SystemExit("--ssd-at needs --arch mamba2")

    torch.set_num_threads(args.threads)
    # The model the cpu-scale experiments train (aotlib.experiments.lm_config).
    cfg = lm_config("cpu", arch=args.arch, size=args.size).model
    if args.dropout is not None:
        cfg = replace(cfg, dropout=args.dropout)
    tokens = args.batch * cfg.context
    print(
        f"config: {cfg.arch} {args.size} (n_layer={cfg.n_layer}, d={cfg.d_model}, "
        f"vocab={cfg.vocab_size}, T={cfg.context}, dropout={cfg.dropout}), "
        f"batch {args.batch}, float32, torch threads {torch.get_num_threads()}"
    )

    # Every variant as (name, its builder), then one warm-up for all of them: the named
    # variants, then eager with the options --ssd-at and --head-rows ask for.
    options = [(f"eager, SSD at {args.ssd_at}", {"ssd_at": args.ssd_at})] if args.ssd_at else []
    options += [(f"eager, head rows {rows}", {"head_rows": rows}) for rows in args.head_rows]
    builds = [(name, partial(variant_step, cfg, args.batch, name)) for name in args.variants]
    builds += [
        (name, partial(make_step, cfg, args.batch, True, False, **kw)) for name, kw in options
    ]
    steps: dict[str, Callable[[], float]] = {}
    for name, build in builds:
        t0 = time.perf_counter()
        steps[name], model = build()
        for _ in range(2):  # warm-up: compilation, allocator, caches
            steps[name]()
        print(f"[{name}] warm-up (incl. compilation) {time.perf_counter() - t0:.1f} s")
    n_ne = count_parameters(model)
    fpt = flops_per_token(cfg, n_ne)
    mix = 3 * cfg.n_layer * mixing_flops(cfg)
    print(
        f"non-embedding parameters {n_ne:,}; model FLOPs/token {fpt / 1e6:.2f} M "
        f"(of which sequence mixing {mix / 1e6:.2f} M)"
    )

    # Each repeat times every variant, each right after a fresh matmul rate, so that
    # all of them see the same (shared, changing) machine.
    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            mm_wall, mm_cpu = matmul_rate()
            c = Clocks()
            for _ in range(args.steps):
                step()
            wall, cpu = c.elapsed()
            n = tokens * args.steps
            rows[name].append((n / wall, n / cpu, mm_wall, mm_cpu))

    print("\nmedian (min, max) over repeats; rates per wall second | per CPU second")
    best_name, best = "", 0.0
    first = next(iter(rows))
    for name, rs in rows.items():
        tok_w, tok_c, mm_w, mm_c = (list(col) for col in zip(*rs))
        share_w = [t * fpt / 1e9 / m for t, m in zip(tok_w, mm_w)]
        share_c = [t * fpt / 1e9 / m for t, m in zip(tok_c, mm_c)]
        print(f"[{name}]")
        print(f"  tokens/s        {_spread(tok_w, '.0f'):<24} | {_spread(tok_c, '.0f')}")
        gf_w, gf_c = [t * fpt / 1e9 for t in tok_w], [t * fpt / 1e9 for t in tok_c]
        print(f"  model GFLOP/s   {_spread(gf_w, '.1f'):<24} | {_spread(gf_c, '.1f')}")
        print(f"  matmul GFLOP/s  {_spread(mm_w, '.1f'):<24} | {_spread(mm_c, '.1f')}")
        print(f"  share           {_spread(share_w, '.3f'):<24} | {_spread(share_c, '.3f')}")
        if name != first:  # paired with the first variant's timing of the same repeat
            ratio = [r[1] / f[1] for r, f in zip(rs, rows[first])]
            print(f"  tokens/CPU s / {first}'s, per repeat: {_spread(ratio, '.3f')}")
        # the verdict is the working tree's: not the references (code as it was before)
        judged = name in args.variants and name != "eager_before"
        if judged and statistics.median(share_c) > best:
            best_name, best = name, statistics.median(share_c)
    ok = best >= TARGET
    verdict = "PASS" if ok else "FAIL"
    print(
        f"\n{verdict}: best median share (CPU time) {best:.1%} ({best_name}), target {TARGET:.0%}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
