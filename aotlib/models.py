"""Language models of both papers behind one config: GPT, LSTM, GRU and Mamba-2.

`model_config(arch, size)` picks a preset from `SIZES`; `build_model(cfg)` returns a
module mapping token ids (B, T) to logits (B, T, vocab). Every model has the same input
convention: T <= cfg.context, and inputs are [BOS] + the first T-1 tokens of a window.

Parameter counts (`count_parameters`)
-------------------------------------
"non-embedding" follows Kaplan et al. (2020): every parameter except the token
embedding, the learned position embedding, and an untied LM-head matrix (all three
are vocab- or context-sized tables, not computation). GPT and Mamba-2 tie the LM head
to the token embedding, so their total counts it once. The LSTM and GRU use an untied
head like the Arrows-of-Time code, so their total includes a second vocab x d matrix.

The Arrows-of-Time paper quotes *total* parameters of models with an *untied* head
(e.g. GPT "small" 55.7M, "nano" 4.9M): our tied GPT's total plus vocab_size * d_model
equals their number (see `tests/test_models.py`).

Sizes, in millions of parameters (`python -m aotlib.models` prints this table; CPU
sizes at vocab 4096 and context 128, paper sizes at their own vocab 50257, context 256):

    arch    size    layers  d_model  non-emb  total    notes
    gpt     xs      2       64       0.10     0.37     CPU scale, 2 heads
    gpt     s       4       128      0.79     1.33     CPU default (4 heads)
    gpt     m       5       160      1.55     2.22
    gpt     l       6       192      2.67     3.48
    gpt     nano    3       48       0.08     2.51     paper 4.9M   = 2.51 + 2.41 untied head
    gpt     micro   4       128      0.79     7.26
    gpt     mini    6       192      2.67     12.37
    gpt     small   10      380      17.38    36.57    paper 55.7M  = 36.57 + 19.10
    gpt     gpt1    12      768      85.06    123.85
    gpt     medium  24      1024     302.31   354.04   paper 405M   = 354.04 + 51.46 (GPT-2 medium)
    lstm    xs      1       128      0.13     1.18     untied head (a second vocab x d table)
    lstm    s       2       192      0.59     2.17
    lstm    m       2       288      1.33     3.69
    lstm    l       3       352      2.98     5.87
    lstm    small   1       256      0.53     26.26    paper 26M
    lstm    medium  3       512      6.30     57.77    paper figure reads 38M (see below)
    lstm    large   5       768      23.63    100.82   paper 101M
    gru     xs      1       128      0.10     1.15
    gru     s       2       224      0.61     2.44
    gru     m       2       320      1.23     3.85
    gru     l       3       384      2.66     5.81
    gru     small   1       256      0.40     26.13    paper 26M
    gru     medium  3       512      4.73     56.19    paper 56M
    gru     large   5       768      17.72    94.91    paper 94M
    mamba2  xs      3       64       0.10     0.37     N=64, P=32, expand 2, chunk 32
    mamba2  s       8       128      0.94     1.47     two Mamba-2 layers per GPT block
    mamba2  m       8       160      1.43     2.08
    mamba2  l       10      192      2.51     3.30
    mamba2  130m    24      768      90.37    128.97   Mamba-2 paper 130M (N=128, P=64)
    mamba2  medium  48      1024     316.85   368.31   Mamba-2 370M, the size of GPT-2 medium

The RNN paper sizes are the Arrows-of-Time configs (1x256, 3x512, 5x768; hidden size =
embedding size, untied head, final LayerNorm, dropout 0.05). They reproduce the quoted
26M/101M (LSTM) and 26M/56M/94M (GRU). The 38M of the middle LSTM does not match its
3x512 config (57.8M) and no depth/width of this design lands near 38M, so we keep the
config. Every arch has a "medium" (the default size of the "paper" scale).

Dropout everywhere is `Dropout` (`aotlib.layers`), not nn.Dropout: the same distribution with
four decisions per random draw, several times cheaper on a CPU. `fused_lm_loss` computes
the LM head and the cross-entropy in cache-sized blocks (`LinearCrossEntropy`); both
are CPU speed-ups measured by `python -m aotlib.bench train`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
from torch import nn

# The config and the pieces every architecture shares live in their own modules, which
# gpt.py, rnn.py and mamba2.py import; re-exported here under their old names.
from aotlib import native
from aotlib.layers import Dropout as Dropout
from aotlib.layers import check_input as check_input
from aotlib.layers import dropout_keep_mask as dropout_keep_mask
from aotlib.model_config import ARCHS as ARCHS
from aotlib.model_config import ModelConfig as ModelConfig

_PAPER_LM = dict(vocab_size=50257, context=256)  # Arrows of Time: GPT-2 BPE, context 256
_PAPER_RNN = dict(_PAPER_LM, dropout=0.05)  # their RNN configs: embedding dropout ~0.05

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt": {
        # CPU scale: 0.1M .. 2.7M non-embedding parameters.
        "xs": dict(n_layer=2, d_model=64, n_head=2),
        "s": dict(n_layer=4, d_model=128, n_head=4),
        "m": dict(n_layer=5, d_model=160, n_head=5),
        "l": dict(n_layer=6, d_model=192, n_head=6),
        # Arrows of Time model-size series (heads as in their configs: head size 16..64).
        "nano": dict(_PAPER_LM, n_layer=3, d_model=48, n_head=3),
        "micro": dict(_PAPER_LM, n_layer=4, d_model=128, n_head=4),
        "mini": dict(_PAPER_LM, n_layer=6, d_model=192, n_head=6),
        "small": dict(_PAPER_LM, n_layer=10, d_model=380, n_head=10),
        "gpt1": dict(_PAPER_LM, n_layer=12, d_model=768, n_head=12),
        "medium": dict(_PAPER_LM, n_layer=24, d_model=1024, n_head=16),
    },
    "lstm": {
        "xs": dict(n_layer=1, d_model=128),
        "s": dict(n_layer=2, d_model=192),
        "m": dict(n_layer=2, d_model=288),
        "l": dict(n_layer=3, d_model=352),
        "small": dict(_PAPER_RNN, n_layer=1, d_model=256),
        "medium": dict(_PAPER_RNN, n_layer=3, d_model=512),
        "large": dict(_PAPER_RNN, n_layer=5, d_model=768),
    },
    "gru": {
        "xs": dict(n_layer=1, d_model=128),
        "s": dict(n_layer=2, d_model=224),
        "m": dict(n_layer=2, d_model=320),
        "l": dict(n_layer=3, d_model=384),
        "small": dict(_PAPER_RNN, n_layer=1, d_model=256),
        "medium": dict(_PAPER_RNN, n_layer=3, d_model=512),
        "large": dict(_PAPER_RNN, n_layer=5, d_model=768),
    },
    "mamba2": {
        "xs": dict(n_layer=3, d_model=64),
        "s": dict(n_layer=8, d_model=128),
        "m": dict(n_layer=8, d_model=160),
        "l": dict(n_layer=10, d_model=192),
        # Mamba-2 paper's 130M and 370M models (state 128, head dim 64, chunk 256).
        "130m": dict(_PAPER_LM, n_layer=24, d_model=768, d_state=128, head_dim=64,
                     chunk_size=256, dropout=0.0),
        "medium": dict(_PAPER_LM, n_layer=48, d_model=1024, d_state=128, head_dim=64,
                       chunk_size=256, dropout=0.0),
    },
}  # fmt: skip


def model_config(arch: str, size: str, **overrides: Any) -> ModelConfig:
    """The `SIZES[arch][size]` preset, with any `ModelConfig` field overridden."""
    if arch not in SIZES:
        raise ValueError(f"arch must be one of {tuple(SIZES)}, got {arch!r}")
    if size not in SIZES[arch]:
        known_sizes = tuple(SIZES[arch])
        raise ValueError(f"size for arch {arch!r} must be one of {known_sizes}, got {size!r}")
    known = {f.name for f in fields(ModelConfig)} - {"arch"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
    return replace(ModelConfig(arch=arch), **{**SIZES[arch][size], **overrides})


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for `cfg` (uses the global torch RNG: seed it first)."""
    if cfg.arch == "gpt":
        from aotlib.gpt import GPT

        return GPT(cfg)
    if cfg.arch in ("lstm", "gru"):
        from aotlib.rnn import RNNLM

        return RNNLM(cfg)
    if cfg.arch == "mamba2":
        from aotlib.mamba2 import Mamba2LM

        return Mamba2LM(cfg)
    raise ValueError(f"arch must be one of {ARCHS}, got {cfg.arch!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP keeps the model in .module, torch.compile in ._orig_mod.
    while True:
        for name in ("module", "_orig_mod"):
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def count_parameters(model: nn.Module, non_embedding: bool = True) -> int:
    """Number of parameters, tied ones counted once.

    With `non_embedding`, leave out the token and position embeddings and an untied LM
    head (the tables listed by the model's `embedding_parameters()`).
    """
    model = _unwrap(model)
    params = {id(p): p for p in model.parameters()}
    if non_embedding:
        embedding = getattr(model, "embedding_parameters", None)
        if embedding is None:
            raise ValueError(f"{type(model).__name__} has no embedding_parameters()")
        for p in embedding():
            params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


# -------------------------------------------------------------------------------------
# LM head and cross-entropy in one pass
# -------------------------------------------------------------------------------------


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ W^T, without ever holding all the logits.

    The (N, V) logits of a whole batch (64 MB at N = V = 4096) are written to memory,
    read back by log-softmax, written again as their gradient and read by two matmuls.
    Here they exist one block of rows at a time, small enough to stay in cache: each
    block's loss and its gradients dh and dW are computed in the forward pass (the
    gradient of a mean cross-entropy needs nothing else), and backward only scales them.
    Same function and gradients as `F.cross_entropy(h @ W.T, targets)` (tested).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, rows: int):
        n = h.shape[0]
        need_dh, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        Wf = W.float()
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_dh else None
        dW = torch.zeros_like(Wf) if need_dW else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # float32 sums over the vocab
            _blocks(h, Wf, targets, rows, total, dh, dW)
        ctx.save_for_backward(dh, dW)
        ctx.dtypes = (h.dtype, W.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dh, dW = ctx.saved_tensors
        gh = None if dh is None else (dh * grad_out).to(ctx.dtypes[0])
        gW = None if dW is None else (dW * grad_out).to(ctx.dtypes[1])
        return gh, gW, None, None


def _blocks(
    h: torch.Tensor,
    Wf: torch.Tensor,
    targets: torch.Tensor,
    rows: int,
    total: torch.Tensor,
    dh: torch.Tensor | None,
    dW: torch.Tensor | None,
) -> None:
    """LinearCrossEntropy's loop: add each block's loss to `total`, write dh, add to dW.
    Float32 on the CPU, each block's softmax, loss and gradient are one C kernel's pass
    (`aotlib/lm_head_cpu.c`, through `aotlib.native`), the torch form below elsewhere."""
    n = h.shape[0]
    lib = _lm_head_kernel(h, Wf, targets)
    loss = torch.zeros(1, dtype=torch.float64)  # the kernel's sum over every row
    for i in range(0, n, rows):
        hc, tc = h[i : i + rows].float(), targets[i : i + rows]  # (r, d), (r,)
        logits = hc @ Wf.t()  # (r, V)
        if lib is not None:  # logits -> d(mean loss)/d logits, in place
            status = lib.softmax_xent_rows(
                logits.data_ptr(), tc.data_ptr(), len(tc), logits.shape[1], 1.0 / n,
                loss.data_ptr(),
            )  # fmt: skip
            if status == 2:
                raise IndexError(f"a target is outside the vocabulary of {logits.shape[1]}")
            native.check(status, "softmax_xent_rows")
            _add_block_gradients(logits, hc, Wf, dh, dW, i)
            continue
        picked = logits.gather(1, tc[:, None])  # (r, 1) logit of each target
        # Stable log-sum-exp, keeping exp(logits - max) for the gradient: one exp pass.
        top = logits.amax(dim=-1, keepdim=True)  # (r, 1)
        e = logits.sub_(top).exp_()  # (r, V), in place
        z = e.sum(dim=-1, keepdim=True)  # (r, 1)
        total += (top + z.log() - picked).sum()
        if dh is None and dW is None:
            continue
        # d(mean loss)/d logits = (softmax - onehot) / n, built in place.
        g = e.mul_(1.0 / (z * n))  # (r, V)
        g[torch.arange(len(tc), device=g.device), tc] -= 1.0 / n
        _add_block_gradients(g, hc, Wf, dh, dW, i)
    if lib is not None:
        total += loss.to(total.dtype).squeeze(0)


def _add_block_gradients(g, hc, Wf, dh, dW, i: int) -> None:
    """dh of the block's rows (from row i) = g Wf, dW += g^T hc; g (r, V) = d loss/d logits."""
    if dh is not None:
        torch.mm(g, Wf, out=dh[i : i + len(g)])  # (r, d)
    if dW is not None:
        dW.addmm_(g.t(), hc)  # (V, d)


def _lm_head_kernel(h: torch.Tensor, Wf: torch.Tensor, targets: torch.Tensor):
    """`lm_head_cpu.c` for contiguous int64 targets and what `native.kernels_for` asks of
    h and Wf; else None."""
    if targets.dtype != torch.int64 or not targets.is_contiguous():
        return None
    return native.kernels_for("lm_head_cpu", h, Wf)


def fused_lm_loss(model: nn.Module, windows: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of windows[:, 1:] given windows[:, :-1].

    Equal to `F.cross_entropy(model(windows[:, :-1]) ...)`, but the LM head and the
    loss run together in blocks of `rows` positions (`LinearCrossEntropy`), which on a
    CPU makes them several times faster. Bypasses a DDP wrapper's gradient hooks:
    single-process use only.
    """
    inner = _unwrap(model)
    inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
    h = inner.hidden_states(inputs)  # (B, T, d)
    return linear_cross_entropy(h.flatten(0, 1), inner.lm_head.weight, targets.flatten(), rows)


def linear_cross_entropy(
    h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """`F.cross_entropy(h @ W.T, targets)` for h (N, d), W (V, d), in blocks of `rows`."""
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(
            f"need h (N, d), W (V, d), targets (N,); got h {tuple(h.shape)}, "
            f"W {tuple(W.shape)}, targets {tuple(targets.shape)}"
        )
    if rows is None:
        # ~8 MB of logits per block (512 rows at V = 4096): with d = 128 the (rows, d) @
        # (d, V) product runs faster on more rows, and the block still sits in L3. The
        # head + loss took 0.90-0.92x the time of 128-row (2 MB) blocks (N = V = 4096).
        rows = min(1024, max(32, 2**21 // W.shape[0]))
    return LinearCrossEntropy.apply(h, W, targets, rows)


def sizes_table() -> str:
    """The sizes table of this module's docstring, computed (builds every model once)."""
    rows = ["arch    size    layers  d_model  non-emb     total"]
    for arch, sizes in SIZES.items():
        for size in sizes:
            cfg = model_config(arch, size)
            with torch.device("meta"):  # shapes only: no memory, no init cost
                model = build_model(cfg)
            ne, tot = count_parameters(model), count_parameters(model, non_embedding=False)
            rows.append(
                f"{arch:<7} {size:<7} {cfg.n_layer:<7} {cfg.d_model:<8} "
                f"{ne / 1e6:<11.2f} {tot / 1e6:.2f}"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(sizes_table())
