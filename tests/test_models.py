"""Language models: shapes, causality, paper parameter counts, init, SSD backends, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aotlib import gpt
from aotlib.models import (
    ARCHS,
    SIZES,
    Dropout,
    ModelConfig,
    build_model,
    count_parameters,
    fused_lm_loss,
    linear_cross_entropy,
    model_config,
)

VOCAB, CONTEXT = 50, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine running
    # pytest -n 2, two threads per worker only oversubscribe the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(arch: str, **over) -> ModelConfig:
    # chunk_size 16 with T = 37 also exercises Mamba-2 on a length that is no multiple of Q.
    return model_config(arch, "xs", vocab_size=VOCAB, context=CONTEXT, chunk_size=16, **over)


def built(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [1, 37, CONTEXT])
def test_logits_shape(arch: str, T: int) -> None:
    model = built(tiny(arch))
    idx = torch.randint(VOCAB, (3, T))
    logits = model(idx)
    assert logits.shape == (3, T, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch: str) -> None:
    """Changing token t leaves every logit before t unchanged, and changes logits at t."""
    model = built(tiny(arch)).eval()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(VOCAB, (2, 37), generator=gen)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 16, 36):  # first, inside a chunk, a chunk boundary, last
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % VOCAB
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_gpt_sdpa_matches_plain_attention() -> None:
    model = built(tiny("gpt")).eval()
    idx = torch.randint(VOCAB, (2, 37))
    with torch.no_grad():
        fast = model(idx)
        for block in model.h:
            block.attn.use_reference = True
        plain = model(idx)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_mamba2_scan_matches_chunked() -> None:
    """The Mamba-2 LM gives the same logits and gradients with the step-by-step SSD scan."""
    cfg = tiny("mamba2", ngroups=2, d_state=8, head_dim=16)  # 8 heads in 2 groups
    model = built(cfg).eval()
    idx = torch.randint(VOCAB, (2, 37))
    results = []
    for backend in ("scan", "chunked"):
        model.set_ssd_backend(backend)
        model.zero_grad()
        logits = model(idx)
        logits.square().mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (ls, gs), (lc, gc) = results
    print("max |logits scan - chunked|:", (ls - lc).abs().max().item())
    torch.testing.assert_close(lc, ls, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mamba2_init_ranges() -> None:
    model = built(model_config("mamba2", "s"))
    blk = model.blocks[0]
    dt = F.softplus(blk.dt_bias)
    A = torch.exp(blk.A_log)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(blk.D, torch.ones_like(blk.D))
    assert blk.nheads == 2 * 128 // 32 and blk.dt_bias.shape == (8,)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_deterministic_under_seed(arch: str) -> None:
    a, b, c = built(tiny(arch), 0), built(tiny(arch), 0), built(tiny(arch), 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _count(arch: str, size: str) -> tuple[ModelConfig, int, int]:
    cfg = model_config(arch, size)
    with torch.device("meta"):  # shapes only: a 400M-parameter model costs nothing
        model = build_model(cfg)
    return cfg, count_parameters(model), count_parameters(model, non_embedding=False)


# Totals quoted by the papers (Arrows of Time: untied head; Mamba-2: tied).
PAPER_TOTALS = [
    ("gpt", "nano", 4.9e6),
    ("gpt", "small", 55.7e6),
    ("gpt", "medium", 405e6),
    ("lstm", "small", 26e6),
    ("lstm", "large", 101e6),
    ("gru", "small", 26e6),
    ("gru", "medium", 56e6),
    ("gru", "large", 94e6),
    ("mamba2", "130m", 130e6),
    ("mamba2", "medium", 370e6),
]


@pytest.mark.parametrize(("arch", "size", "paper"), PAPER_TOTALS)
def test_paper_sizes_match_paper_counts(arch: str, size: str, paper: float) -> None:
    cfg, _, total = _count(arch, size)
    if arch == "gpt":
        total += cfg.vocab_size * cfg.d_model  # the paper's GPT has an untied head
    assert abs(total - paper) / paper < 0.02, (arch, size, total)


def test_gpt_non_embedding_count_formula() -> None:
    """Per block 12 d^2 + 13 d (weights, biases, two LayerNorms), plus the final LayerNorm."""
    for size in ("s", "small"):
        cfg, non_emb, total = _count("gpt", size)
        L, d = cfg.n_layer, cfg.d_model
        assert non_emb == L * (12 * d * d + 13 * d) + 2 * d
        assert total == non_emb + (cfg.vocab_size + cfg.context) * d  # head tied: counted once


def test_cpu_sizes_span_the_range() -> None:
    for arch in ARCHS:
        counts = [_count(arch, s)[1] for s in ("xs", "s", "m", "l")]
        assert counts == sorted(counts), (arch, counts)
        assert 0.07e6 < counts[0] < 0.2e6 and 2e6 < counts[-1] < 3.5e6, (arch, counts)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_a_tiny_batch(arch: str) -> None:
    model = built(tiny(arch, dropout=0.0))
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(VOCAB, (4, 17), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Random tokens: only memorisation lowers the loss below ln(VOCAB) = 3.9.
    assert losses[0] > 3.5 and losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: model_config("transformer", "s"), "arch must be one of"),
        (lambda: model_config("gpt", "huge"), "size for arch 'gpt' must be one of"),
        (lambda: model_config("gpt", "s", n_heads=2), "unknown ModelConfig field"),
        (
            lambda: model_config("gpt", "s", n_head=3),
            r"d_model \(128\) must be divisible by n_head \(3\)",
        ),
        (lambda: model_config("mamba2", "s", head_dim=48), r"divisible by head_dim \(48\)"),
        (lambda: model_config("mamba2", "s", ngroups=3), r"divisible by ngroups \(3\)"),
        (lambda: model_config("lstm", "s", n_layer=0), "n_layer must be >= 1"),
        (lambda: model_config("gru", "s", dropout=1.0), "dropout must be in"),
        (lambda: ModelConfig(arch="rnn"), "arch must be one of"),
    ],
)
def test_bad_configs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("arch", ARCHS)
def test_input_longer_than_context_raises(arch: str) -> None:
    model = built(tiny(arch))
    with pytest.raises(ValueError, match=r"T=41 must be in \[1, context=40\]"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))


def test_sizes_cover_every_arch_and_paper_names() -> None:
    assert set(SIZES) == set(ARCHS)
    assert {"nano", "micro", "mini", "small", "gpt1", "medium"} <= set(SIZES["gpt"])
    assert all("medium" in SIZES[a] for a in ARCHS)  # the "paper" scale's default size


# --- LM head + loss in blocks (the CPU fast path) -----------------------------------


@pytest.mark.parametrize("rows", [7, 32, 1000])
def test_linear_cross_entropy_matches_full_logits(rows: int) -> None:
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(45, 16, generator=gen, requires_grad=True)
    W = torch.randn(70, 16, generator=gen, requires_grad=True)
    tgt = torch.randint(70, (45,), generator=gen)
    ref = F.cross_entropy(h @ W.t(), tgt)
    (2 * ref).backward()  # a non-unit upstream gradient must scale both grads
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    out = linear_cross_entropy(h, W, tgt, rows=rows)
    (2 * out).backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad, gW, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, W, tgt, rows=rows), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_lm_loss_matches_logits_loss(arch: str) -> None:
    model = built(tiny(arch, dropout=0.0))
    windows = torch.randint(VOCAB, (3, 30))
    logits = model(windows[:, :-1])
    assert torch.equal(logits, model.lm_head(model.hidden_states(windows[:, :-1])))
    ref = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = fused_lm_loss(model, windows)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"h \(N, d\), W \(V, d\)"):
        linear_cross_entropy(torch.zeros(4, 8), torch.zeros(10, 9), torch.zeros(4).long())


# --- Dropout with four decisions per random draw ------------------------------------


def test_dropout_keep_rate_scale_and_eval() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.1)
    x = torch.ones(1_000_001)  # odd size: the last 64-bit draw is only partly used
    y = drop(x)
    kept = (y != 0).float().mean().item()
    # 1e6 Bernoulli(0.9) draws: standard error 3e-4, so 4 sigma is 1.2e-3.
    assert abs(kept - 0.9) < 1.2e-3, kept
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    # Each of the four 16-bit lanes of a draw is its own fair decision.
    lanes = (y[:1_000_000] != 0).float().view(-1, 4).mean(0)
    assert (lanes - 0.9).abs().max() < 2.5e-3, lanes
    assert torch.equal(drop.eval()(x), x)


def test_dropout_follows_the_torch_seed() -> None:
    drop, x = Dropout(0.5), torch.ones(1000)
    torch.manual_seed(5)
    a, b = drop(x), drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)


def test_compiled_dropouts_draw_independent_masks() -> None:
    """Two same-sized dropouts in one compiled training graph must not share a mask."""
    d1, d2 = Dropout(0.5), Dropout(0.5)
    f = torch.compile(lambda x, y: (d1(x), d2(y)), backend="aot_eager")
    x = torch.ones(4000, requires_grad=True)
    y = torch.ones(4000, requires_grad=True)
    a, b = f(x, y)
    (a.sum() + b.sum()).backward()
    assert not torch.equal(a == 0, b == 0)
    assert torch.equal(x.grad == 0, a == 0)  # backward used the forward's mask


def test_gpt_dropout_attention_path_is_sdpa_when_nothing_dropped(monkeypatch) -> None:
    """Training-mode attention (materialised, for dropout) computes SDPA's function."""
    model = built(tiny("gpt", dropout=0.3))
    idx = torch.randint(VOCAB, (2, 37))
    with torch.no_grad():
        ref = model.eval()(idx)
    calls = []

    def keep_all(x: torch.Tensor, p: float) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.ones_like(x, dtype=torch.bool)

    monkeypatch.setattr(gpt, "dropout_keep_mask", keep_all)
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0  # embedding and residual dropout off
    for block in model.h:
        block.attn.dropout = 1e-9  # the dropout path, with a scale 1 / (1 - p) of ~1
    with torch.no_grad():
        out = model.train()(idx)
    assert calls == [(2, 2, 37, 37)] * len(model.h)  # (B, nh, T, T) per layer
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
