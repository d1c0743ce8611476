"""The chunked SSD's training path (`aotlib.ssd_grad.ChunkedSSD`): its written-out backward
gives the gradients of the plain forms.

Every gradient (x, dt, A, B, C, D, the initial state, and what flows in through the final
state) is compared in float64 with autograd through the step-by-step scan, through the
quadratic form and through the chunked steps themselves (backward="autograd"), on a grid
of awkward sizes: groups, ragged lengths, length 1, chunk 1, blocks of one chunk and
blocks of several whole sequences.
"""

from __future__ import annotations

import pytest
import torch

import aotlib.ssd_chunks as ssd_chunks
from aotlib.ssd import random_ssd_inputs, ssd, ssd_chunked, ssd_quadratic, ssd_scan

NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]


def grads(fn, inp: dict, dy, dh, *args, **kw) -> dict:
    """Gradients of sum(y dy) + sum(final_state dh) with respect to every given input."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    y, h = fn(
        *(leaves[k] for k in NAMES[:5]),
        *args,
        D=leaves.get("D"),
        initial_state=leaves.get("initial_state"),
        return_final_state=True,
        **kw,
    )
    loss = (y * dy).sum() + (0 if dh is None else (h * dh).sum())
    names = [k for k in NAMES if k in leaves]
    return dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))


def cotangents(inp: dict, seed: int = 1, final: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = inp["x"]
    b, _, h, p = x.shape
    n = inp["B"].shape[-1]
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    dh = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64).to(x.dtype)
    return dy, dh if final else None


def assert_grads_close(got: dict, ref: dict, rtol: float) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        a, b = got[k], ref[k]
        assert a.shape == b.shape, k
        err = (a.double() - b.double()).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        print(f"{k:14s} max err {err:.2e} (scale {scale:.2e})")
        assert err <= rtol * scale, (k, err, scale)


# (b, l, h, p, g, n, Q): groups, ragged tails, a single step, chunk 1, chunk > l
SHAPES = [
    (2, 23, 4, 3, 2, 5, 6),
    (1, 16, 2, 4, 1, 3, 4),
    (3, 1, 2, 2, 1, 2, 4),
    (2, 7, 6, 2, 3, 2, 1),
    (2, 5, 4, 3, 4, 2, 8),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("with_init", [True, False])
@pytest.mark.parametrize("final", [True, False], ids=["final_state", "y_only"])
def test_chunked_backward_matches_scan_float64(shape, with_D, with_init, final) -> None:
    b, l, h, p, g, n, Q = shape
    inp = random_ssd_inputs(b, l, h, p, g, n, with_D=with_D, with_initial_state=with_init)
    dy, dh = cotangents(inp, final=final)
    ref = grads(ssd_scan, inp, dy, dh)
    got = grads(ssd_chunked, inp, dy, dh, Q)
    assert_grads_close(got, ref, 1e-10)


# Blocks of one chunk, of several chunks of one sequence, of several whole sequences.
BLOCKS = {"one_chunk": 1, "three_chunks": 3, "whole_sequences": 40}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_chunked_backward_in_blocks(monkeypatch, block: str) -> None:
    b, l, h, p, g, n, Q = 5, 29, 4, 3, 2, 3, 4
    monkeypatch.setattr(ssd_chunks, "_BLOCK_ELEMENTS", BLOCKS[block] * h * Q * max(Q, p, n))
    m, k = ssd_chunks.block_plan(b, -(-l // Q), h, Q, p, n)
    assert (m > 1) == (block == "whole_sequences") and (k == 1) == (block == "one_chunk")
    inp = random_ssd_inputs(b, l, h, p, g, n, with_initial_state=True)
    dy, dh = cotangents(inp)
    assert_grads_close(grads(ssd_chunked, inp, dy, dh, Q), grads(ssd_scan, inp, dy, dh), 1e-10)


@pytest.mark.parametrize("with_init", [True, False])
@pytest.mark.parametrize("final", [True, False], ids=["final_state", "y_only"])
def test_column_blocks_skip_only_zero_products(monkeypatch, with_init, final) -> None:
    """Many short sequences run in column blocks (one chunk of each of several sequences);
    without an initial state the first column skips its state products, and with the
    final state unused the last column skips its own states: the same gradients."""
    b, l, h, p, g, n, Q = 7, 10, 4, 3, 2, 3, 4  # 3 chunks, the last ragged
    monkeypatch.setattr(ssd_chunks, "_BLOCK_ELEMENTS", 5 * h * Q * max(Q, p, n))
    assert ssd_chunks.block_plan(b, -(-l // Q), h, Q, p, n) == (5, 1)  # blocks of 5 and 2
    inp = random_ssd_inputs(b, l, h, p, g, n, with_initial_state=with_init)
    dy, dh = cotangents(inp, final=final)
    ref = grads(ssd_scan, inp, dy, dh)
    assert_grads_close(grads(ssd_chunked, inp, dy, dh, Q), ref, 1e-10)
    # the y-only call (no final state asked for) is the one that skips the last column
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    args = [leaves[k] for k in NAMES[:5]]
    y = ssd_chunked(*args, Q, D=leaves["D"], initial_state=leaves.get("initial_state"))
    names = [k for k in NAMES if k in leaves]
    got = torch.autograd.grad((y * dy).sum(), [leaves[k] for k in names])
    ref = grads(ssd_scan, inp, dy, None)
    assert_grads_close(dict(zip(names, got)), ref, 1e-10)
    kw = {"D": inp["D"], "initial_state": inp.get("initial_state")}
    y_ref, h_ref = ssd_scan(*(inp[k] for k in NAMES[:5]), **kw, return_final_state=True)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the inference path skips the same products
        y0 = ssd_chunked(*(inp[k] for k in NAMES[:5]), Q, **kw)
        y1, h1 = ssd_chunked(*(inp[k] for k in NAMES[:5]), Q, **kw, return_final_state=True)
    for got, want in ((y0, y_ref), (y1, y_ref), (h1, h_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("l", [3, 7, 13], ids=lambda l: f"{-(-l // 4)}_chunks")
@pytest.mark.parametrize("with_init", [True, False])
@pytest.mark.parametrize("final", [True, False], ids=["final_state", "y_only"])
def test_plain_form_skips_only_zero_products(l, with_init, final) -> None:
    """The plain form (autograd through the steps, what torch.compile traces) leaves out
    the same products: outputs and gradients stay the scan's, with 1, 2 and 4 chunks."""
    inp = random_ssd_inputs(2, l, 4, 3, 2, 3, with_initial_state=with_init)
    dy, dh = cotangents(inp, final=final)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    kw = {"D": leaves["D"], "initial_state": leaves.get("initial_state")}
    out = ssd_chunked(*(leaves[k] for k in NAMES[:5]), 4, **kw, return_final_state=final,
                      backward="autograd")  # fmt: skip
    y, h = out if final else (out, None)
    ref = ssd_scan(*(leaves[k] for k in NAMES[:5]), **kw, return_final_state=True)
    torch.testing.assert_close(y, ref[0], rtol=1e-10, atol=1e-10)
    if final:
        torch.testing.assert_close(h, ref[1], rtol=1e-10, atol=1e-10)
    names = [k for k in NAMES if k in leaves]
    loss = (y * dy).sum() + (0 if h is None else (h * dh).sum())
    got = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    assert_grads_close(got, grads(ssd_scan, inp, dy, dh), 1e-10)


def test_chunked_backward_matches_other_forms() -> None:
    """The quadratic form and autograd through the chunked steps agree with it too."""
    inp = random_ssd_inputs(2, 37, 4, 5, 2, 6, with_initial_state=True)
    dy, dh = cotangents(inp)
    got = grads(ssd_chunked, inp, dy, dh, 8)
    assert_grads_close(got, grads(ssd_quadratic, inp, dy, dh), 1e-10)
    assert_grads_close(got, grads(ssd_chunked, inp, dy, dh, 8, backward="autograd"), 1e-10)


def test_chunked_backward_is_the_written_out_one() -> None:
    inp = random_ssd_inputs(1, 9, 2, 2, 1, 2)
    x = inp["x"].clone().requires_grad_(True)
    y = ssd_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4)
    assert "ChunkedSSD" in type(y.grad_fn).__name__
    y = ssd_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4, backward="autograd")
    assert "ChunkedSSD" not in type(y.grad_fn).__name__
    y = ssd(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4, backend="chunked")
    assert "ChunkedSSD" in type(y.grad_fn).__name__
    with pytest.raises(ValueError, match="backward"):
        ssd_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4, backward="nope")


def test_cached_mask_made_under_inference_mode_serves_autograd() -> None:
    """The segment-sum mask is cached (`ssd_chunks._segsum_mask`); made first under
    inference mode it must still be a tensor autograd can save."""
    ssd_chunks._segsum_mask.cache_clear()
    inp = random_ssd_inputs(1, 12, 2, 2, 1, 2)
    with torch.inference_mode():
        ssd_chunked(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8)
    dt = inp["dt"].clone().requires_grad_(True)  # the mask multiplies dt A
    y = ssd_chunked(inp["x"], dt, inp["A"], inp["B"], inp["C"], 8, backward="autograd")
    y.sum().backward()
    assert dt.grad is not None and torch.isfinite(dt.grad).all()


def test_chunked_backward_gradcheck() -> None:
    """Against finite differences, not only against another autograd graph."""
    inp = random_ssd_inputs(1, 7, 2, 2, 1, 3, with_initial_state=True)
    args = [inp[k].clone().requires_grad_(True) for k in NAMES]

    def fn(x, dt, A, B, C, D, h0):
        return ssd_chunked(x, dt, A, B, C, 3, D=D, initial_state=h0, return_final_state=True)

    assert torch.autograd.gradcheck(fn, args)


def test_chunked_backward_float32() -> None:
    """float32 gradients against the float64 scan, relative to each gradient's size."""
    inp = random_ssd_inputs(2, 300, 4, 8, 2, 8, with_initial_state=True)
    dy, dh = cotangents(inp)
    ref = grads(ssd_scan, inp, dy, dh)
    inp32 = {k: v.float() for k, v in inp.items()}
    got = grads(ssd_chunked, inp32, dy.float(), dh.float(), 16)
    for k in ref:
        err = (got[k].double() - ref[k]).abs().max().item()
        scale = ref[k].abs().max().item()
        print(f"{k:14s} max err {err:.2e} (scale {scale:.2e})")
        assert err <= 1e-4 * scale, k


def test_chunked_backward_strong_decay_is_finite() -> None:
    """dt A ~ -50 per step: every decay underflows to 0 within a step; gradients stay finite
    and equal the float64 ones."""
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, n = 1, 200, 2, 4, 4
    inp = {
        "x": torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
        "dt": torch.full((b, l, h), 5.0, dtype=torch.float64),
        "A": torch.tensor([-10.0, -8.0], dtype=torch.float64),
        "B": torch.randn(b, l, 1, n, generator=gen, dtype=torch.float64),
        "C": torch.randn(b, l, 1, n, generator=gen, dtype=torch.float64),
        "D": None,
        "initial_state": None,
    }
    dy, dh = cotangents(inp)
    ref = grads(ssd_chunked, inp, dy, dh, 64, backward="autograd")
    got = grads(ssd_chunked, {k: v.float() for k, v in inp.items() if v is not None},
                dy.float(), dh.float(), 64)  # fmt: skip
    for k in ref:
        assert torch.isfinite(got[k]).all(), k
        err = (got[k].double() - ref[k]).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref[k].abs().max().item()), k


def test_bench_training_sweep_smoke(monkeypatch) -> None:
    """`python -m aotlib.bench ssd`'s training sweep runs and reports every path (tiny; the
    matmul reference is a constant here: this checks the plumbing, not the rates)."""
    from dataclasses import replace

    from aotlib.bench import ssd as bench

    monkeypatch.setattr(bench, "train_matmul_rate", lambda setup: 1e10)

    setup = replace(
        bench.setup_for("cpu", quick=True), batch=1, nheads=2, headdim=8, dstate=8, chunk=16,
        train_lengths=(40,), train_pairs=1, train_memory=False, min_reps=1,
    )  # fmt: skip
    df = bench.run(setup, log=lambda _: None, train_only=True)
    assert set(df.path) == set(bench.TRAIN_PATHS) and (df.share > 0).all()
    names = [t["target"] for t in bench.summarize(df, setup)]
    assert names == ["forward share (lowest)", "fwd+bwd share (lowest)",
                     "fwd+bwd speed-up vs autograd"]  # fmt: skip
    assert "training sweep" in bench.format_report(df, setup, bench.summarize(df, setup))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_bench_train_counts_the_ssd_flops(ngroups) -> None:
    """`python -m aotlib.bench train` charges Mamba-2 with its chunked SSD's matmuls (the
    causal half inside chunks), GPT with attention's 2 T d and the RNNs with nothing
    beyond their weights: Mamba-2's count is the SSD forward's counted matmul FLOPs less
    the masked-out half of the Q x Q products, up to the decay matrices' share."""
    from torch.utils.flop_counter import FlopCounterMode

    from aotlib.bench.train import mixing_flops
    from aotlib.models import model_config

    cfg = model_config("mamba2", "s", vocab_size=256, context=128, ngroups=ngroups)
    b, l, h, p = 2, cfg.context, cfg.n_heads_ssm, cfg.head_dim
    g, n, Q = cfg.ngroups, cfg.d_state, cfg.chunk_size
    x, dt, A = torch.randn(b, l, h, p), torch.rand(b, l, h) / 10, -torch.rand(h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked(x, dt, A, B, C, Q, backward="autograd")  # the dense form: every matmul
    counted = counter.get_total_flops() / (b * l)  # per token, all heads
    masked_half = Q * n * g + Q * p * h  # above the diagonal of each chunk's C B^T and M
    mixing = mixing_flops(cfg)
    # what remains beyond the count is the decay matrices' small matmuls (a few percent)
    assert mixing <= counted - masked_half <= 1.05 * mixing
    gpt, lstm = model_config("gpt", "s", context=128), model_config("lstm", "s", context=128)
    assert mixing_flops(gpt) == 2 * 128 * gpt.d_model and mixing_flops(lstm) == 0


def test_bench_model_shape_is_the_cpu_presets_mamba2() -> None:
    """`python -m aotlib.bench ssd --model-shape` times the SSD at the shapes Mamba-2 trains."""
    from aotlib.bench import ssd as bench
    from aotlib.experiments import LM_PRESETS
    from aotlib.models import model_config

    setup = bench.model_shape_setup(bench.setup_for("cpu"))
    cfg = model_config("mamba2", "s", context=LM_PRESETS["cpu"]["context"])
    assert (setup.nheads * setup.headdim, setup.dstate, setup.chunk) == (
        cfg.expand * cfg.d_model, cfg.d_state, cfg.chunk_size)  # fmt: skip
    assert setup.train_lengths == (cfg.context,) and setup.batch == 32


def test_bench_against_a_revision(capsys) -> None:
    """`python -m aotlib.bench against REV` loads the SSD's training path as it was at REV
    next to the working tree's and times both (tiny here: plumbing, not rates)."""
    import subprocess

    from aotlib.bench import against

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=against.ROOT).returncode != 0:
        pytest.skip("not a git checkout")
    assert against.main(["HEAD", "--length", "40", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "y and every gradient:" in out and "working tree" in out and "time / HEAD's" in out
    with pytest.raises(SystemExit, match="git show no-such-rev"):
        against.main(["no-such-rev", "--length", "40", "--rounds", "1"])


def test_bench_train_head_rows_change_only_the_blocking(monkeypatch) -> None:
    """`bench train --head-rows R` times the same step with the LM head in blocks of R
    rows: the same loss and gradients, up to float32 regrouping. (Not the parameters after
    the step: AdamW's first step moves each by lr times the sign of its gradient, so a
    gradient near 0 whose rounding flips sign moves its parameter the other way.)"""
    from dataclasses import replace

    import aotlib.models
    from aotlib.bench.train import make_step
    from aotlib.experiments import lm_config

    used, apply = [], aotlib.models.LinearCrossEntropy.apply

    def spy(h, W, targets, rows):
        used.append(rows)
        return apply(h, W, targets, rows)

    monkeypatch.setattr(aotlib.models.LinearCrossEntropy, "apply", spy)
    cfg = replace(lm_config("smoke", arch="mamba2").model, vocab_size=64)
    runs = [make_step(cfg, 3, True, False, head_rows=rows) for rows in (None, 7)]
    losses = [step() for step, _ in runs]
    assert used[1] == 7 and used[0] != 7  # the default block holds all 3 x context rows
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for pa, pb in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6 * pa.grad.abs().max())


def test_bench_train_swaps_in_the_ssd_at_a_revision() -> None:
    """`bench train --ssd-at REV` runs a step with REV's chunked SSD in place of the working
    tree's, then puts it back; a revision from before S0 could be None gets a zero S0."""
    import subprocess

    import aotlib.ssd
    from aotlib.bench import against
    from aotlib.bench.against import called_as_now
    from aotlib.bench.train import ssd_at_revision

    inp = random_ssd_inputs(2, 9, 2, 3, 1, 4)
    mine, seen = aotlib.ssd.chunked_ssd_function, []

    def step():  # a training step's SSD, its gradient with respect to x
        seen.append(aotlib.ssd.chunked_ssd_function)
        x = inp["x"].clone().requires_grad_(True)
        ssd_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4).square().sum().backward()
        return x.grad

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=against.ROOT).returncode != 0:
        pytest.skip("not a git checkout")
    g_head = ssd_at_revision("HEAD", step)()
    assert seen[-1] is not mine and aotlib.ssd.chunked_ssd_function is mine
    torch.testing.assert_close(g_head, step(), rtol=1e-12, atol=1e-12)

    def before(x, dt, A, B, C, D, S0, chunk_size):  # as revisions before S0 could be None
        assert S0 is not None and not S0.any()
        return mine(x, dt, A, B, C, D, S0, chunk_size)

    x = inp["x"]
    y, S = called_as_now(before)(x, inp["dt"], inp["A"], inp["B"], inp["C"], None, None, 4)
    assert S.shape == (2, 1, 4, 6)
    torch.testing.assert_close(y, ssd_chunked(x, inp["dt"], inp["A"], inp["B"], inp["C"], 4))


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "graph_break"])
def test_mamba2_under_torch_compile(monkeypatch, traced: bool) -> None:
    """torch.compile of a Mamba-2 LM traces the SSD as plain ops (inductor writes the
    backward) up to `COMPILE_MAX_CHUNKS` chunks, and runs the eager blocked paths beyond
    (a graph break): loss and every gradient equal eager's to float32 rounding, and the
    compiled model also runs without gradients."""
    import aotlib.ssd
    from aotlib.models import build_model, linear_cross_entropy, model_config

    if not traced:
        monkeypatch.setattr(aotlib.ssd, "COMPILE_MAX_CHUNKS", 1)
    torch.manual_seed(0)
    cfg = model_config("mamba2", "xs", vocab_size=64, context=48, n_layer=1, d_model=32,
                       d_state=8, head_dim=8, chunk_size=16, dropout=0.0)  # fmt: skip
    model = build_model(cfg)
    idx, targets = torch.randint(64, (2, 48)), torch.randint(64, (2 * 48,))

    def loss_and_grads(hidden):
        model.zero_grad(set_to_none=True)
        loss = linear_cross_entropy(hidden(idx).flatten(0, 1), model.lm_head.weight, targets)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(model.hidden_states, dynamic=False)
    want, got = loss_and_grads(model.hidden_states), loss_and_grads(compiled)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model.hidden_states(idx), rtol=1e-4, atol=1e-6)
