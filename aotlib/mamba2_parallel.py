"""Mamba-2 across processes: a tensor-parallel block and a context-parallel block.

Both are built from a single-process `aotlib.mamba2.Mamba2Block` (its weights), and
`tensor_parallel_lm` / `context_parallel_lm` swap them into a copy of a `Mamba2LM`,
whose forward is then unchanged. `compare_*` check them against their single-process
twins (tests, notebook 09).

Tensor parallel (Dao and Gu 2024, Sec. 8). In Mamba-2, x, z, B, C and dt all come from
the block input in one projection, so with W ranks each rank owns h / W whole heads and
g / W whole groups of B and C, and computes its share with no communication:

    in_proj    column-split: rank r holds the rows [z_r | x_r | B_r | C_r | dt_r] of the
               single-process weight, whose rows are [z | x | B | C | dt] (`tp_rows`)
    conv1d     its channels [x_r | B_r | C_r];  dt_bias, A_log, D: its heads
    SSD        its heads only (head i reads group i // (h / g): a rank's heads read its groups)
    norm       the gated RMSNorm normalises each group on its own (group_size d_inner / g),
               so a rank normalises whole groups with no communication: this is why
               ngroups must be divisible by W
    out_proj   row-split (its d_inner columns of the weight): partial sums, then
    ONE all-reduce of the block output (b, l, d_model) forward.
Backward, the block input's gradient is all-reduced (each rank's share of in_proj only
sees its own rows): one all-reduce each way, Megatron's "g" and "f" operators. Mamba-1
needs two each way: its dt, B, C are projected from the channel-split x.

Context parallel. Each rank holds a segment of the sequence and the whole block. The
projections and the norm act per token; the depthwise conv needs the previous rank's
last d_conv - 1 rows (`aotlib.ssd_parallel.causal_conv1d_sequence_parallel`), and the
SSD only the other ranks' (state, decay) summaries (`ssd_sequence_parallel`). Per layer
forward: one all-gather of the summaries and one send of the halo; backward the same.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from aotlib.comm import (
    Traffic,
    copy_to_parallel,
    count_collectives,
    cp_mamba2_traffic,
    reduce_from_parallel,
    require_group,
    sp_ssd_traffic,
    tp_mamba2_traffic,
)
from aotlib.mamba2 import D_CONV, Mamba2Block, Mamba2LM, RMSNorm
from aotlib.model_config import ModelConfig
from aotlib.ssd import random_ssd_inputs, ssd
from aotlib.ssd_parallel import causal_conv1d_sequence_parallel, ssd_sequence_parallel

# ---------------------------------------------------------------------------
# The block's computation, with the conv and the SSD passed in
# ---------------------------------------------------------------------------


class _Sizes(NamedTuple):
    nheads: int
    ngroups: int
    d_state: int
    head_dim: int
    chunk_size: int


def _mixer(m: nn.Module, sizes: _Sizes, u: Tensor, conv, ssd_fn) -> Tensor:
    """`Mamba2Block.forward` step for step, on whichever heads m holds."""
    h, g, n, P, Q = sizes
    d_inner, d_bc = h * P, g * n
    zxbcdt = m.in_proj(u)  # (b, l, 2 di + 2 g n + h)
    z, xBC, dt = zxbcdt.split([d_inner, d_inner + 2 * d_bc, h], dim=-1)
    xBC = F.silu(conv(xBC))  # (b, l, di + 2gn)
    x, B, C = xBC.split([d_inner, d_bc, d_bc], dim=-1)
    x = x.unflatten(-1, (h, P))  # (b, l, h, p)
    B = B.unflatten(-1, (g, n))  # (b, l, g, n)
    C = C.unflatten(-1, (g, n))  # (b, l, g, n)
    dt = F.softplus(dt + m.dt_bias)  # (b, l, h)
    A = -torch.exp(m.A_log.float())  # (h,)
    y = ssd_fn(x, dt, A, B, C, Q, D=m.D, backend=m.ssd_backend)  # (b, l, h, p)
    return m.out_proj(m.norm(y.flatten(-2), z))  # (b, l, d)


def _local_conv(conv1d: nn.Conv1d):
    """The single-process causal conv: pad both sides, keep the first l outputs."""
    return lambda xBC: conv1d(xBC.transpose(1, 2))[..., : xBC.shape[1]].transpose(1, 2)


# ---------------------------------------------------------------------------
# Tensor parallel
# ---------------------------------------------------------------------------


def check_tensor_parallel(cfg: ModelConfig, world: int) -> None:
    """Heads and groups must split evenly over the ranks."""
    h = cfg.expand * cfg.d_model // cfg.head_dim
    if h % world:
        raise ValueError(f"{h} Mamba-2 heads cannot be split evenly over {world} ranks")
    if cfg.ngroups % world:
        raise ValueError(
            f"ngroups={cfg.ngroups} is not divisible by {world} ranks: each rank must own "
            "whole groups of B and C so the gated RMSNorm needs no communication"
        )


def tp_rows(cfg: ModelConfig, rank: int, world: int) -> dict[str, Tensor]:
    """Which rows of the single-process tensors rank r holds: "in_proj" (rows of in_proj's
    weight, in the order [z_r | x_r | B_r | C_r | dt_r]), "conv" (channels [x_r | B_r | C_r]
    of xBC), "heads", and "inner" (its d_inner positions)."""
    check_tensor_parallel(cfg, world)
    h = cfg.expand * cfg.d_model // cfg.head_dim
    di, gn = cfg.expand * cfg.d_model, cfg.ngroups * cfg.d_state
    di_r, gn_r, h_r = di // world, gn // world, h // world
    ar = torch.arange
    inner = ar(rank * di_r, (rank + 1) * di_r)
    bc = ar(rank * gn_r, (rank + 1) * gn_r)
    heads = ar(rank * h_r, (rank + 1) * h_r)
    conv = torch.cat([inner, di + bc, di + gn + bc])  # within xBC
    in_proj = torch.cat([inner, di + conv, 2 * di + 2 * gn + heads])  # within zxbcdt
    return {"in_proj": in_proj, "conv": conv, "heads": heads, "inner": inner}


def shard_block_tensors(
    tensors: dict[str, Tensor], cfg: ModelConfig, rank: int, world: int
) -> dict[str, Tensor]:
    """Slice a single-process block's state_dict (or its gradients, same keys) into rank
    r's share; keys unchanged. Used to build the block and to compare its gradients."""
    rows = tp_rows(cfg, rank, world)
    pick = {
        "in_proj.weight": lambda t: t[rows["in_proj"]],
        "conv1d.weight": lambda t: t[rows["conv"]],
        "conv1d.bias": lambda t: t[rows["conv"]],
        "dt_bias": lambda t: t[rows["heads"]],
        "A_log": lambda t: t[rows["heads"]],
        "D": lambda t: t[rows["heads"]],
        "norm.weight": lambda t: t[rows["inner"]],
        "out_proj.weight": lambda t: t[:, rows["inner"]],
    }
    return {k: pick[k](t).clone() for k, t in tensors.items()}


class TensorParallelMamba2Block(nn.Module):
    """Rank r's share of a Mamba-2 block: (b, l, d) -> (b, l, d), the same u on every rank.

    One all-reduce forward (the output), one backward (the input's gradient).
    """

    def __init__(self, block: Mamba2Block, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        rank, world = require_group(group)
        cfg = self.cfg = block.cfg
        check_tensor_parallel(cfg, world)
        self.group = group
        h, g = block.nheads // world, cfg.ngroups // world
        self.sizes = _Sizes(h, g, cfg.d_state, cfg.head_dim, cfg.chunk_size)
        d_inner, conv_dim = h * cfg.head_dim, h * cfg.head_dim + 2 * g * cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, d_inner + conv_dim + h, bias=False)
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, D_CONV, groups=conv_dim, padding=D_CONV - 1, bias=True
        )
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        self.norm = RMSNorm(d_inner, group_size=block.norm.group_size, eps=block.norm.eps)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.ssd_backend = block.ssd_backend
        p = next(block.parameters())
        self.to(dtype=p.dtype, device=p.device)
        self.load_state_dict(shard_block_tensors(block.state_dict(), cfg, rank, world))

    def forward(self, u: Tensor) -> Tensor:
        u = copy_to_parallel(u, self.group)
        partial = _mixer(self, self.sizes, u, _local_conv(self.conv1d), ssd)  # (b, l, d)
        return reduce_from_parallel(partial, self.group)


def tensor_parallel_lm(model: Mamba2LM, group: dist.ProcessGroup | None = None) -> Mamba2LM:
    """A copy of `model` whose blocks are tensor-parallel; embedding, norms and head are
    replicated. Same input and loss on every rank."""
    out = copy.deepcopy(model)
    out.blocks = nn.ModuleList(TensorParallelMamba2Block(b, group) for b in model.blocks)
    return out


# ---------------------------------------------------------------------------
# Context parallel
# ---------------------------------------------------------------------------


class ContextParallelMamba2Block(nn.Module):
    """A Mamba-2 block on this rank's segment of the sequence: (b, l_r, d) -> (b, l_r, d).

    Holds the single-process block itself (its parameters replicated on every rank; their
    gradients are per-rank partial sums, to be all-reduced as in data parallelism).
    `validate` first checks, with one all-gather of 4 int64, that batch, width and dtype
    agree and that every segment but the last covers the conv's halo.
    """

    def __init__(
        self, block: Mamba2Block, group: dist.ProcessGroup | None = None, validate: bool = True
    ) -> None:
        super().__init__()
        require_group(group)
        self.block, self.group, self.validate = block, group, validate
        cfg = block.cfg
        self.sizes = _Sizes(block.nheads, cfg.ngroups, cfg.d_state, cfg.head_dim, cfg.chunk_size)

    def _check(self, u: Tensor) -> None:
        rank, world = require_group(self.group)
        code = [torch.float16, torch.bfloat16, torch.float32, torch.float64].index(u.dtype)
        mine = torch.tensor([u.shape[0], u.shape[1], u.shape[2], code], dtype=torch.int64)
        every = torch.empty(world * 4, dtype=torch.int64)
        dist.all_gather_single(every, mine, group=self.group)
        every = every.view(world, 4)
        if (every[:, [0, 2, 3]] != every[0, [0, 2, 3]]).any():
            raise ValueError(
                f"context parallelism needs the same batch, width and dtype on every rank, "
                f"got (b, l, d, dtype) by rank {every.tolist()}"
            )
        short = [r for r in range(world - 1) if every[r, 1] < D_CONV - 1]
        if short:
            raise ValueError(
                f"segments of rank(s) {short} are shorter than the conv halo ({D_CONV - 1} "
                f"steps); only the last rank's may be (lengths {every[:, 1].tolist()})"
            )

    def forward(self, u: Tensor) -> Tensor:
        if self.validate:
            self._check(u)
        blk, group = self.block, self.group

        def conv(xBC: Tensor) -> Tensor:
            return causal_conv1d_sequence_parallel(xBC, blk.conv1d.weight, blk.conv1d.bias, group)

        def ssd_fn(*args, **kw) -> Tensor:
            return ssd_sequence_parallel(*args, **kw, group=group, validate=False)

        return _mixer(blk, self.sizes, u, conv, ssd_fn)


def context_parallel_lm(model: Mamba2LM, group: dist.ProcessGroup | None = None) -> Mamba2LM:
    """A copy of `model` on this rank's segment of every sequence (the loss is then a
    per-rank partial sum). Only the first block checks the segments' shapes."""
    out = copy.deepcopy(model)
    out.blocks = nn.ModuleList(
        ContextParallelMamba2Block(b, group, validate=i == 0) for i, b in enumerate(out.blocks)
    )
    return out


# ---------------------------------------------------------------------------
# Equality with the single-process model (tests, notebook 09)
# ---------------------------------------------------------------------------


# The Mamba-2 model keeps its gated RMSNorm in float32 even when the model is float64
# (aotlib.mamba2), so a parallel model agrees with its twin to float32 rounding there:
# the comparisons are relative to each quantity's largest entry, to 1e-5 (measured: ~1e-7;
# a wrong shard or a missing all-reduce shows up at 1e-1).
MODEL_RTOL = 1e-5


def _config(**kw) -> ModelConfig:
    base = dict(
        arch="mamba2", vocab_size=64, context=64, n_layer=2, d_model=16, d_state=4,
        head_dim=4, expand=2, chunk_size=8, ngroups=4, dropout=0.0,
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _err(out: dict, name: str, a: Tensor, b: Tensor) -> None:
    d = (a.double() - b.double()).abs().max().item()
    out[name] = d / max(b.double().abs().max().item(), 1e-300)


def compare_tensor_parallel(
    *, layers: int = 2, batch: int = 2, seqlen: int = 21, seed: int = 0, **cfg_kw
) -> dict[str, float]:
    """Run on every rank: a `layers`-layer float64 model (layers=0: one bare block) against
    its tensor-parallel copy; relative max errors of outputs or loss and every gradient."""
    rank, world = require_group()
    cfg = _config(n_layer=max(layers, 1), **cfg_kw)
    torch.manual_seed(seed)  # same weights and data on every rank
    model = Mamba2LM(cfg).double()
    out: dict[str, float] = {}
    if layers == 0:
        block = model.blocks[0]
        u = torch.randn(batch, seqlen, cfg.d_model, dtype=torch.float64)
        gy = torch.randn(batch, seqlen, cfg.d_model, dtype=torch.float64)
        tp = TensorParallelMamba2Block(block, None)
        u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
        y1, y2 = block(u1), tp(u2)
        (y1 * gy).sum().backward()
        (y2 * gy).sum().backward()
        _err(out, "output", y2, y1)
        _err(out, "grad_input", u2.grad, u1.grad)
        pairs = [(block, tp)]
    else:
        idx = torch.randint(cfg.vocab_size, (batch, seqlen))
        tgt = torch.randint(cfg.vocab_size, (batch, seqlen))
        tp_model = tensor_parallel_lm(model)
        losses = []
        for m in (model, tp_model):
            loss = F.cross_entropy(m(idx).flatten(0, 1), tgt.flatten())
            loss.backward()
            losses.append(loss)
        _err(out, "loss", losses[1], losses[0])
        for (name, p1), (_, p2) in zip(model.named_parameters(), tp_model.named_parameters()):
            if not name.startswith("blocks."):
                _err(out, "grad_" + name, p2.grad, p1.grad)
        pairs = list(zip(model.blocks, tp_model.blocks))
    for i, (single, par) in enumerate(pairs):
        grads = {k: p.grad for k, p in single.named_parameters()}
        want = shard_block_tensors(grads, cfg, rank, world)
        for k, p in par.named_parameters():
            _err(out, f"grad_blocks.{i}.{k}", p.grad, want[k])
    return out


def compare_context_parallel(
    lengths: list[int], *, layers: int = 2, batch: int = 2, seed: int = 0, **cfg_kw
) -> dict[str, float]:
    """Run on every rank: a float64 model (layers=0: one bare block) on the whole sequence
    against its context-parallel copy on this rank's segment; parameter gradients are
    all-reduced before the comparison (they are per-rank partial sums)."""
    rank, world = require_group()
    cfg = _config(n_layer=max(layers, 1), **cfg_kw)
    torch.manual_seed(seed)
    model = Mamba2LM(cfg).double()
    s = sum(lengths[:rank])
    e = s + lengths[rank]
    total = sum(lengths)
    out: dict[str, float] = {}
    if layers == 0:
        single = model.blocks[0]
        par = ContextParallelMamba2Block(copy.deepcopy(single), None)
        u = torch.randn(batch, total, cfg.d_model, dtype=torch.float64)
        gy = torch.randn(batch, total, cfg.d_model, dtype=torch.float64)
        u1, u2 = u.clone().requires_grad_(), u[:, s:e].clone().requires_grad_()
        y1, y2 = single(u1), par(u2)
        (y1 * gy).sum().backward()
        (y2 * gy[:, s:e]).sum().backward()
        _err(out, "output", y2, y1[:, s:e])
        _err(out, "grad_input", u2.grad, u1.grad[:, s:e])
        named = zip(single.named_parameters(), par.block.named_parameters())
    else:
        idx = torch.randint(cfg.vocab_size, (batch, total))
        tgt = torch.randint(cfg.vocab_size, (batch, total))
        cp_model = context_parallel_lm(model)
        loss = F.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
        loss.backward()
        logits = cp_model(idx[:, s:e])
        part = F.cross_entropy(logits.flatten(0, 1), tgt[:, s:e].flatten(), reduction="sum")
        (part / tgt.numel()).backward()
        whole = part.detach().clone()
        dist.all_reduce(whole)
        _err(out, "loss", whole / tgt.numel(), loss)
        named = zip(model.named_parameters(), cp_model.named_parameters())
    for (name, p1), (_, p2) in named:
        g = p2.grad.clone()
        dist.all_reduce(g)
        _err(out, "grad_" + name, g, p1.grad)
    return out


def compare_cases(cases: list[tuple[str, tuple, dict]]) -> list[dict[str, float]]:
    """Several ("tensor" | "context", args, kwargs) comparisons in one process group."""
    fns = {"tensor": compare_tensor_parallel, "context": compare_context_parallel}
    return [fns[kind](*args, **kw) for kind, args, kw in cases]


def measure_traffic() -> dict[str, tuple]:
    """Run on every rank: count the calls and bytes of each parallel layer, forward and
    backward (`count_collectives`), next to what the cost model in aotlib.comm predicts
    for this rank. {layer: (measured forward, measured backward, predicted {direction:
    Traffic}, forward ops, backward ops)}; the tests and notebook 09 read the same."""
    rank, world = require_group()
    out = {}
    b, h, p, n = 2, 4, 3, 5
    inp = random_ssd_inputs(b, 6 + 3 * rank, h, p, 2, n, dtype=torch.float32)
    args = [inp[k].requires_grad_() for k in ("x", "dt", "A", "B", "C")]
    for validate in (False, True):
        with count_collectives() as fwd:
            y = ssd_sequence_parallel(*args, 4, D=inp["D"], validate=validate)
        with count_collectives() as bwd:
            y.sum().backward()
        want = sp_ssd_traffic(b, h, p, n, world, itemsize=4)
        if validate:  # the handshake: one all-gather of 10 int64
            want["forward"] = want["forward"] + Traffic(1, (world - 1) * 80)
        out[f"ssd validate={validate}"] = (fwd.traffic(), bwd.traffic(), want, fwd.ops(), bwd.ops())

    cfg = _config(ngroups=world)
    block = Mamba2Block(cfg)
    u = torch.randn(2, 11, cfg.d_model, requires_grad=True)
    tp = TensorParallelMamba2Block(block)
    with count_collectives() as fwd:
        y = tp(u)
    with count_collectives() as bwd:
        y.sum().backward()
    want = tp_mamba2_traffic(2, 11, cfg.d_model, world)
    out["tp mamba2"] = (fwd.traffic(), bwd.traffic(), want, fwd.ops(), bwd.ops())

    cp = ContextParallelMamba2Block(block, validate=False)
    u = torch.randn(2, 5 + rank, cfg.d_model, requires_grad=True)
    with count_collectives() as fwd:
        y = cp(u)
    with count_collectives() as bwd:
        y.sum().backward()
    d = cfg.d_model
    want = cp_mamba2_traffic(
        2, d, cfg.expand, cfg.head_dim, cfg.ngroups, cfg.d_state, D_CONV, world, rank
    )
    out["cp mamba2"] = (fwd.traffic(), bwd.traffic(), want, fwd.ops(), bwd.ops())
    return out


def _main() -> int:
    """`python -m torch.distributed.run --nproc-per-node 2 -m aotlib.mamba2_parallel --check`"""
    import argparse

    from aotlib.comm import init_from_env

    parser = argparse.ArgumentParser(description="Parallel Mamba-2 (run under torchrun)")
    parser.add_argument("--check", action="store_true", help="compare with one process")
    if not parser.parse_args().check:
        parser.print_help()
        return 0
    rank, world = init_from_env()
    torch.set_num_threads(1)
    lengths = [9 + 2 * r for r in range(world)]
    cases = [
        ("tensor", (), dict(layers=0, ngroups=world)),
        ("tensor", (), dict(layers=2, ngroups=world)),
        ("context", (lengths,), dict(layers=0)),
        ("context", (lengths,), dict(layers=2)),
    ]
    names = ["TP block", "TP 2-layer LM", f"CP block {lengths}", f"CP 2-layer LM {lengths}"]
    bad = 0
    for name, res in zip(names, compare_cases(cases)):
        every = [None] * world
        dist.all_gather_object(every, max(res.values()))
        bad += max(every) > MODEL_RTOL
        if rank == 0:
            print(
                f"{name:<24} largest relative error over outputs/loss and every gradient "
                f"{max(every):.1e} (tolerance {MODEL_RTOL:.0e}) "
                f"{'OK' if max(every) <= MODEL_RTOL else 'FAIL'}"
            )
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    sys.exit(_main())
