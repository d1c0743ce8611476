"""What notebook 09 compares Mamba-2 with: attention across processes, on torch.distributed.

Two baselines, each checked against `aotlib.gpt` and each counted by `aotlib.comm`:

Tensor-parallel GPT block (Megatron-LM, Shoeybi et al. 2019). Attention heads are split
across the ranks: c_attn is column-split (rank r holds the rows [q_r | k_r | v_r] of the
single-process weight, whose rows are [q | k | v]), c_proj row-split; the MLP's c_fc is
column-split and its c_proj row-split. Each row-split projection ends in an all-reduce
of (b, l, d), with its bias added after it. Two all-reduces forward, and two backward
(the gradients of the two branch inputs), against Mamba-2's one each way.

Ring attention (context parallel; Liu et al. 2023), forward only. Rank r holds the
queries, keys and values of its segment (equal lengths). For W - 1 hops every rank
passes the key/value block it holds to the next rank and receives one from the previous
(one send of K and V packed together per hop), attending to each block as it passes and
merging the partial softmaxes (running max and sum, as flash attention does). A block
from a later rank is masked out entirely under causality but still travels on, so that
every block visits every rank. The backward (K, V and their gradients around the ring
again) is not implemented; its traffic is the formula in `aotlib.comm`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from aotlib.comm import (
    copy_to_parallel,
    count_collectives,
    global_rank,
    reduce_from_parallel,
    require_group,
    ring_attention_traffic,
    tp_attention_mlp_traffic,
)
from aotlib.gpt import Block, causal_attention_reference
from aotlib.model_config import ModelConfig

# ---------------------------------------------------------------------------
# Tensor-parallel GPT block
# ---------------------------------------------------------------------------


def gpt_tp_rows(cfg: ModelConfig, rank: int, world: int) -> dict[str, Tensor]:
    """Rank r's rows of c_attn ([q_r | k_r | v_r]), its positions of d ("heads") and of
    the MLP's 4 d ("mlp")."""
    if cfg.n_head % world:
        raise ValueError(f"{cfg.n_head} attention heads cannot be split evenly over {world} ranks")
    d = cfg.d_model
    heads = torch.arange(rank * d // world, (rank + 1) * d // world)
    mlp = torch.arange(rank * 4 * d // world, (rank + 1) * 4 * d // world)
    return {"attn": torch.cat([heads, d + heads, 2 * d + heads]), "heads": heads, "mlp": mlp}


def shard_gpt_block_tensors(
    tensors: dict[str, Tensor], cfg: ModelConfig, rank: int, world: int
) -> dict[str, Tensor]:
    """Rank r's share of a GPT Block's state_dict (or gradients): same keys."""
    rows = gpt_tp_rows(cfg, rank, world)
    pick = {
        "attn.c_attn.weight": lambda t: t[rows["attn"]],
        "attn.c_attn.bias": lambda t: t[rows["attn"]],
        "attn.c_proj.weight": lambda t: t[:, rows["heads"]],
        "mlp.c_fc.weight": lambda t: t[rows["mlp"]],
        "mlp.c_fc.bias": lambda t: t[rows["mlp"]],
        "mlp.c_proj.weight": lambda t: t[:, rows["mlp"]],
    }
    return {k: pick.get(k, lambda t: t)(t).clone() for k, t in tensors.items()}


class TensorParallelGPTBlock(nn.Module):
    """Rank r's share of `aotlib.gpt.Block` (no dropout): (b, l, d) -> (b, l, d)."""

    def __init__(self, block: Block, cfg: ModelConfig, group=None) -> None:
        super().__init__()
        rank, world = require_group(group)
        self.group, self.n_head = group, cfg.n_head // world
        d, dr = cfg.d_model, cfg.d_model // world
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * dr)
        self.attn.c_proj = nn.Linear(dr, d)  # its bias is added after the all-reduce
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * dr)
        self.mlp.c_proj = nn.Linear(4 * dr, d)
        p = next(block.parameters())
        self.to(dtype=p.dtype, device=p.device)
        self.load_state_dict(shard_gpt_block_tensors(block.state_dict(), cfg, rank, world))

    def _row_parallel(self, linear: nn.Linear, x: Tensor) -> Tensor:
        return reduce_from_parallel(F.linear(x, linear.weight), self.group) + linear.bias

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        h = copy_to_parallel(self.ln_1(x), self.group)
        q, k, v = self.attn.c_attn(h).chunk(3, dim=-1)  # 3 x (B, T, d / W)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh / W, T, hs)
        x = x + self._row_parallel(self.attn.c_proj, y.transpose(1, 2).reshape(B, T, -1))
        h = copy_to_parallel(self.ln_2(x), self.group)
        return x + self._row_parallel(self.mlp.c_proj, F.gelu(self.mlp.c_fc(h)))


# ---------------------------------------------------------------------------
# Ring attention (forward)
# ---------------------------------------------------------------------------


@torch.no_grad()
def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None) -> Tensor:
    """Causal attention over a sequence split evenly across ranks: this rank's q, k, v
    (b, nh, l / W, hs) -> its outputs (b, nh, l / W, hs). W - 1 sends of (K, V) per rank."""
    rank, world = require_group(group)
    scale = 1.0 / math.sqrt(q.shape[-1])
    kv = torch.stack([k, v]).contiguous()  # (2, b, nh, l/W, hs): one message per hop
    acc = torch.zeros_like(q)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)  # running max per query
    s = torch.zeros(q.shape[:-1], dtype=q.dtype)  # running sum of exp
    for hop in range(world):
        reqs, nxt = [], None
        if hop < world - 1:  # pass the block on while attending to it
            nxt = torch.empty_like(kv)
            reqs = [
                dist.isend(kv, global_rank(group, (rank + 1) % world), group=group),
                dist.irecv(nxt, global_rank(group, (rank - 1) % world), group=group),
            ]
        src = (rank - hop) % world
        if src <= rank:  # blocks from later ranks are all in the future
            scores = (q @ kv[0].transpose(-1, -2)) * scale  # (b, nh, lq, lk)
            if src == rank:
                n = q.shape[-2]
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            m_new = torch.maximum(m, scores.amax(-1))
            p = torch.exp(scores - m_new.unsqueeze(-1))
            rescale = torch.exp(m - m_new)
            acc = acc * rescale.unsqueeze(-1) + p @ kv[1]
            s = s * rescale + p.sum(-1)
            m = m_new
        for req in reqs:
            req.wait()
        if nxt is not None:
            kv = nxt
    return acc / s.unsqueeze(-1)


# ---------------------------------------------------------------------------
# Checks (tests, notebook 09)
# ---------------------------------------------------------------------------


def _gpt_config() -> ModelConfig:
    return ModelConfig(arch="gpt", vocab_size=64, context=64, n_layer=1, d_model=16, n_head=4,
                       dropout=0.0)  # fmt: skip


def compare_and_measure_attention(seqlen: int = 12, batch: int = 2, seed: int = 0) -> dict:
    """Run on every rank: the TP GPT block and ring attention against their single-process
    twins (float64, max relative errors), and their measured traffic next to the cost model:
    {"errors": {...}, "traffic": {layer: (forward, backward, predicted, fwd ops, bwd ops)}}."""
    rank, world = require_group()
    cfg = _gpt_config()
    torch.manual_seed(seed)
    block = Block(cfg).double()
    for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        nn.init.normal_(lin.bias, std=0.1)  # nonzero biases, so misplaced ones show
    errors, traffic = {}, {}

    def err(name, a, b):
        errors[name] = ((a - b).abs().max() / b.abs().max()).item()

    # tensor parallel: output, input gradient, every parameter gradient
    x = torch.randn(batch, seqlen, cfg.d_model, dtype=torch.float64)
    gy = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    tp = TensorParallelGPTBlock(block, cfg)
    y1 = block(x1)
    (y1 * gy).sum().backward()
    with count_collectives() as fwd:
        y2 = tp(x2)
    with count_collectives() as bwd:
        (y2 * gy).sum().backward()
    err("tp output", y2, y1)
    err("tp grad input", x2.grad, x1.grad)
    want = shard_gpt_block_tensors({k: p.grad for k, p in block.named_parameters()}, cfg,
                                   rank, world)  # fmt: skip
    for k, p in tp.named_parameters():
        err("tp grad " + k, p.grad, want[k])
    predicted = tp_attention_mlp_traffic(batch, seqlen, cfg.d_model, world, itemsize=8)
    traffic["tp attention+mlp"] = (fwd.traffic(), bwd.traffic(), predicted, fwd.ops(), bwd.ops())

    # ring attention: this rank's queries against the whole causal attention
    nh, hs, n = cfg.n_head, cfg.d_model // cfg.n_head, seqlen
    q, k, v = torch.randn(3, batch, nh, n * world, hs, dtype=torch.float64)
    sl = slice(rank * n, (rank + 1) * n)
    with count_collectives() as fwd:
        out = ring_attention(q[..., sl, :], k[..., sl, :], v[..., sl, :])
    err("ring output", out, causal_attention_reference(q, k, v)[..., sl, :])
    predicted = ring_attention_traffic(batch, n * world, cfg.d_model, world, itemsize=8)
    traffic["ring attention"] = (fwd.traffic(), None, predicted, fwd.ops(), None)
    return {"errors": errors, "traffic": traffic}
