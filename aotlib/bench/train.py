"""Training throughput of the CPU-scale GPT, as a share of this machine's matmul rate.

    python -m aotlib.bench train [--threads 1] [--batch 32] [--dropout 0.1] [--no-compile]

One training step = forward, cross-entropy, backward and a fused AdamW step on random
tokens, for the config the CPU-scale experiments use (`aotlib.experiments`, scale
"cpu"): GPT size "s" (4 layers, d=128, 4 heads), vocab 4096, context 128, batch 32.

Model FLOPs per token (the usual 6N rule; multiply-add = 2 FLOPs, backward = 2x forward):

    6 * N_non_embedding                  every weight matrix (LayerNorm/bias count as if)
  + 6 * n_layer * T * d                  attention scores and mixing, causal half only
  + 6 * vocab * d                        the LM head (computed, though tied)

The rate is compared with a large float32 `torch.matmul` timed in the same run, with the
same thread count, between the training repeats (the machine is shared, so each repeat
gets its own matmul rate and the report gives the median and spread of the ratio).

What the fast path does (all measured against the plain path in the same run):
- torch.compile (inductor, C++) on the model's body: fuses LayerNorm, GELU, residual
  adds and dropout into a few loops;
- LM head + cross-entropy in blocks of rows (`aotlib.models.LinearCrossEntropy`): the
  64 MB of logits never travel to memory, which is what limits the plain path;
- fused AdamW (one kernel over all parameters).
The plain path is what `aotlib.train` runs today: eager model, full logits, F.cross_entropy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aotlib.models import ModelConfig, build_model, count_parameters, linear_cross_entropy
from aotlib.models import model_config as _model_config

TARGET = 0.5  # model FLOP rate / matmul rate


def matmul_rate(n: int = 2048, seconds: float = 0.3) -> float:
    """GFLOP/s of an (n x n) @ (n x n) float32 matmul, best of a few timed bursts."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(3):
        k, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < seconds / 3:
            torch.matmul(a, b, out=out)
            k += 1
        best = max(best, 2 * n**3 * k / dt / 1e9)
    return best


def flops_per_token(cfg: ModelConfig, n_non_embedding: int) -> float:
    """Model FLOPs of one training token (see the module docstring)."""
    T, d = cfg.context, cfg.d_model
    return 6 * n_non_embedding + 6 * cfg.n_layer * T * d + 6 * cfg.vocab_size * d


def make_step(
    cfg: ModelConfig, batch: int, fused_loss: bool, compile: bool, seed: int = 0
) -> tuple[Callable[[], float], torch.nn.Module]:
    """A function running one training step (returns the loss), and its model."""
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
            return linear_cross_entropy(h.flatten(0, 1), head, targets.flatten())
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

    return step, model


def measure(
    step: Callable[[], float], steps: int, repeats: int, tokens_per_step: int
) -> list[tuple[float, float]]:
    """`repeats` pairs (tokens/s over `steps` steps, matmul GFLOP/s just before)."""
    out = []
    for _ in range(repeats):
        peak = matmul_rate()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((tokens_per_step * steps / (time.perf_counter() - t0), peak))
    return out


def _spread(xs: list[float], fmt: str = ".0f") -> str:
    return f"{statistics.median(xs):{fmt}} (min {min(xs):{fmt}}, max {max(xs):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aotlib.bench train", description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--arch", default="gpt", choices=["gpt", "lstm", "gru", "mamba2"])
    p.add_argument("--size", default="s")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, default=None, help="default: the size's own")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="fast path without torch.compile")
    p.add_argument("--plain-loss", action="store_true", help="fast path with full logits")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain eager path")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    over = {"vocab_size": 4096, "context": 128}
    if args.dropout is not None:
        over["dropout"] = args.dropout
    cfg = _model_config(args.arch, args.size, **over)
    tokens = args.batch * cfg.context
    print(
        f"config: {cfg.arch} {args.size} (n_layer={cfg.n_layer}, d={cfg.d_model}, "
        f"vocab={cfg.vocab_size}, T={cfg.context}, dropout={cfg.dropout}), batch {args.batch}, "
        f"float32, {args.threads} thread(s) of {torch.get_num_threads()}"
    )

    fast = ("fast", dict(fused_loss=not args.plain_loss, compile=not args.no_compile))
    plain = ("plain", dict(fused_loss=False, compile=False))
    variants = [fast] + ([] if args.no_baseline else [plain])
    results = {}
    for name, kw in variants:
        t0 = time.perf_counter()
        step, model = make_step(cfg, args.batch, **kw)
        n_ne = count_parameters(model)
        for _ in range(2):  # warm-up: compilation, allocator, caches
            step()
        warm = time.perf_counter() - t0
        fpt = flops_per_token(cfg, n_ne)
        # The plain path is only a reference: fewer, shorter repeats.
        steps, repeats = (args.steps, args.repeats) if name == "fast" else (2, 3)
        runs = measure(step, steps, repeats, tokens)
        tok_s = [r[0] for r in runs]
        peaks = [r[1] for r in runs]
        shares = [r[0] * fpt / 1e9 / r[1] for r in runs]
        results[name] = shares
        print(f"\n[{name}] {kw}; warm-up (incl. compile) {warm:.1f} s")
        print(f"  non-embedding params {n_ne:,}; model FLOPs/token {fpt / 1e6:.2f} M")
        print(f"  tokens/s        {_spread(tok_s)}")
        print(f"  model GFLOP/s   {_spread([t * fpt / 1e9 for t in tok_s], '.1f')}")
        print(f"  matmul GFLOP/s  {_spread(peaks, '.1f')}")
        print(f"  share           {_spread(shares, '.3f')}")

    share = statistics.median(results["fast"])
    if "plain" in results:
        print(f"\nfast / plain speed-up: {share / statistics.median(results['plain']):.2f}x")
    ok = share >= TARGET
    print(f"{'PASS' if ok else 'FAIL'}: median share {share:.1%} (target {TARGET:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
