"""`aotlib/ssd_cpu.c`, the chunked SSD's masked decay matrices and their backward, against
the float64 definitions (as close as the torch forms in float32 are), and the training
path's gradients with and without it against the float64 scan."""

from __future__ import annotations

import pytest
import torch

from aotlib import native
from aotlib.ssd import random_ssd_inputs, ssd_chunked, ssd_scan
from aotlib.ssd_chunks import (
    _sub_chunk_length,
    chunk_decays,
    decay_matrix,
    flat_decays,
    masked_decay,
    masked_decay_backward,
)

needs_kernels = pytest.mark.skipif(
    native.library("ssd_cpu") is None, reason="no C compiler built aotlib's kernels"
)


def block_of(b: int, c: int, Q: int, h: int, column: bool, seed: int = 0):
    """A block's decays as the blocked paths slice them (float32), and dA in float64:
    every c-th row of the flattened decays (a column block: chunk 1 of each sequence) or a
    run of rows (whole sequences)."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.rand(b, c, Q, h, generator=gen) * 0.6 + 0.05
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    flat = flat_decays(chunk_decays(dt, A, _sub_chunk_length(Q)))
    dec = flat.block(0, b, 1, 2, c) if column else flat.block(0, b, 0, c, c)
    dA64 = dec.dt.double() * A.double()[:, None]  # (K, h, Q)
    return dec, dA64


def L_float64(dA: torch.Tensor) -> torch.Tensor:
    """L[t, s] = exp(dA_{s+1} + ... + dA_t) for s <= t, 0 above: (..., Q) -> (..., Q, Q)."""
    Q = dA.shape[-1]
    cs = dA.cumsum(-1)
    exponent = cs[..., :, None] - cs[..., None, :]  # float64: no cancellation to speak of
    mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    return torch.where(mask, exponent, -torch.inf).exp()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


CASES = [  # b, c, Q, h, g: Mamba-2's chunks (64 and 32, specialised in C) and others
    (3, 4, 64, 4, 1),
    (2, 3, 32, 8, 2),
    (2, 2, 16, 4, 4),
    (2, 3, 12, 6, 3),
    (1, 2, 5, 2, 1),
]


@needs_kernels
@pytest.mark.parametrize("b, c, Q, h, g", CASES)
@pytest.mark.parametrize("column", [False, True])
@pytest.mark.parametrize("with_dt", [True, False])
def test_masked_decay_matches_the_float64_definition(b, c, Q, h, g, column, with_dt) -> None:
    """M = L o tril(C B^T) diag(dt) + diag(D) (and P, without dt and D) within float32
    rounding of the float64 definition, and at most as far from it as the torch form
    (`decay_matrix`, masked) in float32 is, for strided (column) and contiguous blocks,
    groups, and chunk lengths the C code does not specialise."""
    dec, dA64 = block_of(b, c, Q, h, column)
    K = dec.dt.shape[0]
    CB = torch.randn(K, g, Q, Q)
    D = torch.randn(h) if with_dt else None
    got = masked_decay(native.library("ssd_cpu"), dec, CB, D, torch.empty(K, h, Q, Q), with_dt)

    scale = dec.dt.double().unsqueeze(-2) if with_dt else 1.0  # dt on column s
    CBh = CB.double().tril().repeat_interleave(h // g, dim=1)  # (K, h, Q, Q)
    want = L_float64(dA64) * CBh * scale
    if D is not None:
        want = want + torch.diag_embed(D.double()[:, None].expand(h, Q))
    torch_dec = dec if with_dt else dec.without_dt()
    torch_form = decay_matrix(torch_dec).tril() * CB.tril().repeat_interleave(h // g, dim=1)
    if D is not None:
        torch_form = torch_form + torch.diag_embed(D[:, None].expand(h, Q))
    assert (got.triu(1) == 0).all()  # exactly causal
    assert rel_err(got, want) <= max(2 * rel_err(torch_form, want), 1e-6)


@needs_kernels
@pytest.mark.parametrize("b, c, Q, h, g", CASES)
@pytest.mark.parametrize("column", [False, True])
def test_masked_decay_backward_matches_the_float64_definition(b, c, Q, h, g, column) -> None:
    """d(C B^T) = tril(sum over each group's heads of dP o L) and dcs = Z's row sums minus
    its column sums, Z = dP o L o tril(C B^T), against float64, as close as the torch form
    (the same ops on `decay_matrix`'s L in float32)."""
    dec, dA64 = block_of(b, c, Q, h, column, seed=1)
    K = dec.dt.shape[0]
    gen = torch.Generator().manual_seed(2)
    CB, dP = torch.randn(K, g, Q, Q, generator=gen), torch.randn(K, h, Q, Q, generator=gen)
    dCB, dcs = masked_decay_backward(
        native.library("ssd_cpu"), dec, CB, dP, torch.empty(K, g, Q, Q), torch.empty(K, h, Q)
    )

    def definition(L: torch.Tensor, CB: torch.Tensor, dP: torch.Tensor):
        dPL = dP * L
        Z = dPL * CB.tril().repeat_interleave(h // g, dim=1)
        return dPL.view(K, g, h // g, Q, Q).sum(2).tril(), Z.sum(-1) - Z.sum(-2)

    want = definition(L_float64(dA64), CB.double(), dP.double())
    torch_form = definition(decay_matrix(dec.without_dt()).tril(), CB, dP)
    for got_t, want_t, torch_t in zip((dCB, dcs), want, torch_form):
        assert rel_err(got_t, want_t) <= max(2 * rel_err(torch_t, want_t), 1e-6)
    assert (dCB.triu(1) == 0).all()


def grads(fn, inp: dict, dy: torch.Tensor, dh: torch.Tensor, *args) -> dict[str, torch.Tensor]:
    """y, and the gradients of <y, dy> + <final state, dh> with respect to every input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items() if v is not None}
    xs = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
    y, h_last = fn(*xs, *args, D=leaves.get("D"), initial_state=leaves.get("initial_state"),
                   return_final_state=True)  # fmt: skip
    ((y * dy).sum() + (h_last * dh).sum()).backward()
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}


@needs_kernels
@pytest.mark.parametrize(
    "b, l, h, p, g, n, Q",
    [
        (2, 300, 4, 8, 2, 8, 16),  # ragged, groups, whole sequences in a block
        (40, 64, 4, 16, 1, 16, 32),  # many short sequences: column blocks
        (1, 1024, 8, 16, 1, 32, 64),  # long: stretches of one sequence, two blocks
        (3, 50, 2, 4, 1, 4, 12),  # a chunk length the C code does not specialise
    ],
)
def test_training_path_with_the_kernels_matches_the_scan(monkeypatch, b, l, h, p, g, n, Q) -> None:
    """y and every gradient (x, dt, A, B, C, D, the initial state) of the chunked training
    path in float32, with `ssd_cpu.c` and with the torch forms, against the float64 scan:
    the kernels at most 2x as far from it as the torch forms (float32 regrouping), and
    they ran."""
    calls, real = [], native.kernels_for

    def spy(name, *tensors):
        lib = real(name, *tensors)
        if name == "ssd_cpu" and lib is not None:
            calls.append(name)
        return lib

    monkeypatch.setattr(native, "kernels_for", spy)
    inp = random_ssd_inputs(b, l, h, p, g, n, with_initial_state=True)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dh = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    ref = grads(ssd_scan, inp, dy, dh)
    inp32 = {k: v.float() for k, v in inp.items()}
    got = grads(ssd_chunked, inp32, dy.float(), dh.float(), Q)
    assert calls, "the SSD kernels did not run"
    with native.off():
        plain = grads(ssd_chunked, inp32, dy.float(), dh.float(), Q)
    for k in ref:
        err, err_torch = rel_err(got[k], ref[k]), rel_err(plain[k], ref[k])
        print(f"{k:14s} kernels {err:.1e}, torch forms {err_torch:.1e}")
        assert err <= max(2 * err_torch, 1e-6), k


@needs_kernels
def test_float64_takes_the_torch_forms(monkeypatch) -> None:
    """The kernels are float32 only: float64 runs `decay_matrix` and the masking."""
    monkeypatch.setattr(native, "library", lambda name: pytest.fail(f"asked for {name}"))
    inp = random_ssd_inputs(2, 40, 2, 4, 1, 4, with_initial_state=True)
    dy, dh = torch.randn(2, 40, 2, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4).double()
    grads(ssd_chunked, inp, dy, dh, 16)


@needs_kernels
def test_strided_gradients_take_the_torch_dot_products(monkeypatch) -> None:
    """A dY whose (h, p) is not contiguous (here a transposed copy's view) runs the
    backward's dot products in torch (l a multiple of the chunk: a ragged block's padded
    copy would be contiguous); the gradients are the same as with a contiguous dY."""
    import aotlib.ssd_grad as ssd_grad

    calls = []
    real = ssd_grad._row_dots
    monkeypatch.setattr(ssd_grad, "_row_dots", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = {k: v.float() for k, v in random_ssd_inputs(2, 48, 4, 6, 1, 8).items() if v is not None}
    dy = torch.randn(2, 48, 6, 4).transpose(-1, -2)  # (b, l, h, p), p not contiguous
    got = grads_plain(inp, dy, 16)
    assert not calls
    want = grads_plain(inp, dy.contiguous(), 16)
    assert calls
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def grads_plain(inp: dict, dy: torch.Tensor, Q: int) -> dict[str, torch.Tensor]:
    """Gradients of <y, dy> through `ChunkedSSD` itself (dy reaches its backward as given)."""
    from aotlib.ssd_grad import chunked_ssd_function

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    xs = [leaves[k] for k in ("x", "dt", "A", "B", "C", "D")]
    y, _ = chunked_ssd_function(*xs, None, Q, False)
    y.backward(dy)
    return {k: v.grad for k, v in leaves.items()}
