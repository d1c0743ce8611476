"""The three forms of SSD (scan, quadratic, chunked) compute one function; M is semiseparable.

Follows the claims in aotlib/ssd.py: every output, final state and gradient of the fast
chunked path is checked against the plain scan, on a grid that includes awkward sizes.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aotlib.ssd_chunks as ssd_chunks
from aotlib.ssd import (
    _sub_chunk_length,
    _sub_chunk_segsum,
    check_ssd_inputs,
    chunk_decays,
    decay_matrix,
    numerical_rank,
    offdiagonal_ranks,
    offdiagonal_singular_values,
    random_ssd_inputs,
    segsum,
    ssd,
    ssd_chunked,
    ssd_matrix,
    ssd_quadratic,
    ssd_scan,
)

# float32 tolerance against the float64 scan, as a fraction of the output's largest entry.
# Each output sums at most a few hundred float32 products of O(1) terms, and the measured
# worst case on this grid is ~2e-7 (float32 eps is 1.2e-7); 2e-6 leaves 10x headroom for
# other BLAS builds, while a wrong or missing term shows up at 1e-2 or more.
F32_RTOL = 2e-6


def make_inputs(b, l, h, p, g, n, *, with_init: bool = True, **kw) -> dict:
    return random_ssd_inputs(b, l, h, p, g, n, with_initial_state=with_init, **kw)


def run_all(inp: dict, chunk_size: int) -> dict:
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], initial_state=inp["initial_state"], return_final_state=True)
    return {
        "scan": ssd_scan(*args, **kw),
        "quadratic": ssd_quadratic(*args, **kw),
        "chunked": ssd_chunked(*args, chunk_size, **kw),
    }


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# Without autograd the chunked path runs short sequences all at once (as with autograd)
# and long ones in blocks of chunks written in place; "blocks" forces the blocked path with
# two chunks per block, so small tests cover both.
PATHS = ["auto", "blocks"]


def use_path(monkeypatch, path: str, shape) -> None:
    if path == "blocks":
        b, l, h, p, g, n, Q = shape
        monkeypatch.setattr(ssd_chunks, "_BLOCK_ELEMENTS", 2 * h * Q * max(Q, p, n))


# ---------------------------------------------------------------------------
# segsum
# ---------------------------------------------------------------------------


def test_segsum_matches_definition() -> None:
    x = torch.randn(2, 3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = segsum(x)
    assert out.shape == (2, 3, 9, 9)
    for j in range(9):
        for i in range(9):
            if j >= i:
                torch.testing.assert_close(out[..., j, i], x[..., i + 1 : j + 1].sum(-1))
            else:
                assert torch.isneginf(out[..., j, i]).all()
    # exp(segsum) is the decay matrix L: lower triangular, ones on the diagonal
    L = torch.exp(segsum(x))
    torch.testing.assert_close(L, torch.tril(L))
    torch.testing.assert_close(torch.diagonal(L, dim1=-2, dim2=-1), torch.ones(2, 3, 9).double())


def test_sub_chunk_segsum_matches_segsum() -> None:
    x = torch.randn(4, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _sub_chunk_segsum(x, 6)  # (4, 3, 6, 6): three sub-chunks of 6 steps
    assert got.shape == (4, 3, 6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    for j in range(3):
        ref = segsum(x[:, 6 * j : 6 * (j + 1)])
        torch.testing.assert_close(got[:, j][..., causal], ref[..., causal])
    assert (got[..., ~causal] == 0).all()


def test_segsum_is_stable_in_float32() -> None:
    # One huge decay followed by many small ones: the segment sums over the small ones
    # are ~1e-3 and must keep float32's relative precision. cumsum[j] - cumsum[i] cancels
    # two numbers near -1000 and keeps only ~4 digits; the masked sums do not.
    x = torch.full((64,), -1e-3, dtype=torch.float64)
    x[0] = -1000.0
    ref = segsum(x)[1:, 1:]  # float64, segments that exclude x[0]
    mask = torch.isfinite(ref) & (ref != 0)
    rel = lambda out: ((out[1:, 1:].double() - ref) / ref)[mask].abs().max().item()
    cs = torch.cumsum(x.float(), 0)
    naive = cs[:, None] - cs[None, :]  # (j, i): the unstable way
    assert rel(naive) > 1e-3  # the hazard is real at this size...
    assert rel(segsum(x.float())) < 1e-5  # ...and segsum avoids it
    assert rel(_sub_chunk_segsum(x.float(), 64)[0]) < 1e-5


@pytest.mark.parametrize("Q", [1, 4, 7, 16, 48, 63, 64])
def test_decay_matrix_is_exp_segsum(Q: int) -> None:
    # U @ V off the diagonal sub-blocks plus the sub-block segment sums give the whole
    # decay matrix L diag(dt) on and below the diagonal, for any chunk length; above it
    # only the diagonal sub-blocks are nonzero (the causal C B^T masks them).
    R = _sub_chunk_length(Q)
    assert Q % R == 0 and R <= 2 * Q**0.5
    gen = torch.Generator().manual_seed(Q)
    dt = torch.rand(2, 3, Q, 4, generator=gen, dtype=torch.float64)  # (b, c, Q, h)
    A = -torch.rand(4, generator=gen, dtype=torch.float64) * 2
    dec = chunk_decays(dt, A, R)
    L = decay_matrix(dec)  # (b, c, h, Q, Q)
    dt_h = dt.permute(0, 1, 3, 2)  # (b, c, h, Q)
    ref = torch.exp(segsum(dt_h * A[:, None])) * dt_h.unsqueeze(-2)
    torch.testing.assert_close(L.tril(), ref, rtol=1e-12, atol=0)
    # the chunk-state weights are L's last row; the other decays its first column and sum
    torch.testing.assert_close(dec.to_end, ref[..., -1, :].transpose(-1, -2), rtol=1e-12, atol=0)
    dA = dt_h * A[:, None]
    from_start = ref[..., 0] / dt_h[..., :1] * torch.exp(dA[..., :1])  # exp(dA_0 + .. + dA_t)
    torch.testing.assert_close(dec.from_start, from_start.transpose(-1, -2), rtol=1e-12, atol=0)
    torch.testing.assert_close(dec.whole, torch.exp(dA.sum(-1)))
    in_blocks = torch.block_diag(*[torch.ones(R, R)] * (Q // R)).bool()
    assert (L.triu(1)[..., ~in_blocks] == 0).all()


def test_decay_matrix_is_stable_in_float32() -> None:
    # The hazard of test_segsum_is_stable_in_float32 inside a chunk: one huge decay, then
    # small ones. Every factor of L is summed over its own stretch, so the small
    # segments keep float32's relative precision wherever they fall.
    Q = 64
    for big_at in (0, 5, 16, 40):
        dt = torch.full((1, 1, Q, 1), 1e-3, dtype=torch.float64)
        dt[0, 0, big_at] = 1000.0
        A = torch.tensor([-1.0], dtype=torch.float64)
        ref = decay_matrix(chunk_decays(dt, A, 16))
        got = decay_matrix(chunk_decays(dt.float(), A.float(), 16)).double()
        mask = ref.tril() > 1e-30
        rel = ((got - ref) / ref)[mask].abs().max().item()
        assert rel < 2e-6, (big_at, rel)


# ---------------------------------------------------------------------------
# The three forms agree
# ---------------------------------------------------------------------------

# (b, l, h, p, g, n, chunk_size): lengths 1, 63, 500; chunks that don't divide them;
# head and state dims that are not powers of two; one and several groups.
GRID = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 1, 2, 5, 1, 7, 4),
    (2, 63, 4, 5, 2, 7, 16),
    (1, 63, 3, 5, 3, 7, 64),
    (2, 64, 2, 4, 1, 3, 8),
    (1, 500, 4, 5, 2, 7, 64),
    (1, 500, 2, 3, 1, 6, 48),
    (1, 37, 6, 2, 2, 5, 1),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("with_init", [False, True], ids=["no_init", "init"])
@pytest.mark.parametrize("with_D", [False, True], ids=["no_D", "D"])
@pytest.mark.parametrize("shape", GRID, ids=lambda s: "b{}l{}h{}p{}g{}n{}Q{}".format(*s))
def test_three_forms_agree_float64(monkeypatch, shape, with_D: bool, with_init: bool, path) -> None:
    use_path(monkeypatch, path, shape)
    *dims, Q = shape
    inp = make_inputs(*dims, with_D=with_D, with_init=with_init)
    out = run_all(inp, Q)
    y_ref, h_ref = out["scan"]
    assert y_ref.shape == inp["x"].shape
    assert h_ref.shape == (dims[0], dims[2], dims[3], dims[5])
    for name in ("quadratic", "chunked"):
        y, h = out[name]
        assert y.shape == y_ref.shape and h.shape == h_ref.shape
        assert max_err(y, y_ref) < 1e-10, name
        assert max_err(h, h_ref) < 1e-10, name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", GRID[2:6], ids=lambda s: "b{}l{}h{}p{}g{}n{}Q{}".format(*s))
def test_three_forms_agree_float32(monkeypatch, shape, path: str) -> None:
    use_path(monkeypatch, path, shape)
    *dims, Q = shape
    ref = run_all(make_inputs(*dims), Q)["scan"]
    out = run_all(make_inputs(*dims, dtype=torch.float32), Q)
    scale_y, scale_h = ref[0].abs().max().item(), ref[1].abs().max().item()
    for name, (y, h) in out.items():
        assert y.dtype == torch.float32 and h.dtype == torch.float32
        ey, eh = max_err(y, ref[0]) / scale_y, max_err(h, ref[1]) / scale_h
        print(f"{name}: max rel err y {ey:.2e}, final state {eh:.2e}")
        assert ey < F32_RTOL and eh < F32_RTOL, name


@pytest.mark.parametrize("record", [False, True], ids=["inference", "autograd"])
def test_chunked_blocks_and_ragged_tail(monkeypatch, record: bool) -> None:
    # Without autograd the chunked path works a block of chunks at a time; force blocks of
    # one chunk so the state is carried across block boundaries and only the last block
    # is padded. With autograd the training path (aotlib.ssd_grad) runs the same blocks.
    monkeypatch.setattr(ssd_chunks, "_BLOCK_ELEMENTS", 1)
    inp = make_inputs(2, 203, 4, 3, 2, 5)
    inp["x"].requires_grad_(record)
    out = run_all(inp, 16)
    for name in ("quadratic", "chunked"):
        assert max_err(out[name][0], out["scan"][0]) < 1e-10
        assert max_err(out[name][1], out["scan"][1]) < 1e-10


def test_non_contiguous_inputs() -> None:
    # In the Mamba-2 block x, B, C and dt are slices of one projection: strided views.
    inp = make_inputs(2, 50, 4, 3, 2, 5)
    big = {k: torch.cat([v, v], dim=-1)[..., : v.shape[-1]] for k, v in inp.items() if k != "A"}
    big["initial_state"] = inp["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not any(big[k].is_contiguous() for k in ("x", "dt", "B", "C", "initial_state"))
    ref = run_all(inp, 16)["scan"]
    for name, (y, h) in run_all({**big, "A": inp["A"]}, 16).items():
        assert max_err(y, ref[0]) < 1e-10 and max_err(h, ref[1]) < 1e-10, name


def test_mixed_dtypes() -> None:
    # A float32 parameter A (as in the Mamba-2 block) with float64 activations, and the
    # reverse: every form runs and returns y in x's dtype.
    inp = make_inputs(1, 40, 2, 3, 1, 4)
    ref = run_all(inp, 16)["scan"][0]
    for x_dtype, a_dtype in [(torch.float64, torch.float32), (torch.float32, torch.float64)]:
        mixed = {**inp, "x": inp["x"].to(x_dtype), "A": inp["A"].to(a_dtype)}
        for name, (y, _) in run_all(mixed, 16).items():
            assert y.dtype == x_dtype, name
            assert max_err(y, ref) < 1e-5 * ref.abs().max().item(), name


@pytest.mark.parametrize("path", PATHS)
def test_chunked_writes_every_output(monkeypatch, path: str) -> None:
    # With deterministic mode on, torch.empty fills floats with NaN: an output element
    # the chunked path forgot to write would show up.
    use_path(monkeypatch, path, (2, 70, 2, 3, 1, 4, 32))
    inp = make_inputs(2, 70, 2, 3, 1, 4)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = ssd_chunked(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 32)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.isfinite(y).all()


def test_chunked_reuses_buffers_across_modes(monkeypatch) -> None:
    # The inference path keeps its buffers between calls; one made under inference_mode
    # must not be written under no_grad (torch forbids that), and results stay the same.
    use_path(monkeypatch, "blocks", (2, 70, 2, 3, 1, 4, 16))
    inp = make_inputs(2, 70, 2, 3, 1, 4, dtype=torch.float32)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16)
    with torch.inference_mode():
        first = ssd_chunked(*args, D=inp["D"])
    with torch.no_grad():
        again = ssd_chunked(*args, D=inp["D"])
    with torch.inference_mode():
        third = ssd_chunked(*args, D=inp["D"])
    assert torch.equal(first, again) and torch.equal(first, third)


def test_final_state_continues_the_sequence() -> None:
    # Running two halves, feeding the first half's final state into the second, is the
    # same as running the whole sequence: what initial_state and final_state are for.
    inp = make_inputs(2, 90, 4, 3, 2, 5, with_init=False)
    y_full, h_full = ssd_chunked(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16, D=inp["D"], return_final_state=True
    )
    half = lambda k, sl: inp[k][:, sl]
    y1, h1 = ssd_chunked(
        *(half(k, slice(0, 41)) for k in "x dt".split()),
        inp["A"],
        *(half(k, slice(0, 41)) for k in "B C".split()),
        16,
        D=inp["D"],
        return_final_state=True,
    )
    y2, h2 = ssd_chunked(
        *(half(k, slice(41, None)) for k in "x dt".split()),
        inp["A"],
        *(half(k, slice(41, None)) for k in "B C".split()),
        16,
        D=inp["D"],
        initial_state=h1,
        return_final_state=True,
    )
    assert max_err(torch.cat([y1, y2], 1), y_full) < 1e-10
    assert max_err(h2, h_full) < 1e-10


def test_ssd_matrix_is_the_quadratic_form() -> None:
    inp = make_inputs(2, 30, 4, 3, 2, 5, with_D=False, with_init=False)
    M = ssd_matrix(inp["dt"], inp["A"], inp["B"], inp["C"])
    assert M.shape == (2, 4, 30, 30)
    assert (torch.triu(M, 1) == 0).all()  # causal
    y = (M @ inp["x"].transpose(1, 2)).transpose(1, 2)
    y_ref = ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert max_err(y, y_ref) < 1e-10


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    b=st.integers(1, 2),
    l=st.integers(1, 40),
    hg=st.integers(1, 3),
    g=st.integers(1, 2),
    p=st.integers(1, 6),
    n=st.integers(1, 6),
    chunk_size=st.integers(1, 24),
    with_D=st.booleans(),
    with_init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_three_forms_agree_property(b, l, hg, g, p, n, chunk_size, with_D, with_init, seed):
    inp = make_inputs(b, l, hg * g, p, g, n, seed=seed, with_D=with_D, with_init=with_init)
    out = run_all(inp, chunk_size)
    for name in ("quadratic", "chunked"):
        assert max_err(out[name][0], out["scan"][0]) < 1e-10
        assert max_err(out[name][1], out["scan"][1]) < 1e-10


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("Q,block", [(6, None), (4, 1)], ids=["one_block", "many_blocks"])
def test_chunked_gradients_match_scan(monkeypatch, Q: int, block: int | None) -> None:
    if block is not None:
        monkeypatch.setattr(ssd_chunks, "_BLOCK_ELEMENTS", block)
    inp = make_inputs(2, 23, 4, 3, 2, 5)
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(inp["x"].shape, generator=gen, dtype=torch.float64)
    dh = torch.randn(inp["initial_state"].shape, generator=gen, dtype=torch.float64)

    def grads(fn, *extra):
        leaves = {k: inp[k].clone().requires_grad_(True) for k in names}
        y, h = fn(
            *(leaves[k] for k in names[:5]),
            *extra,
            D=leaves["D"],
            initial_state=leaves["initial_state"],
            return_final_state=True,
        )
        # a loss that reaches every output and the final state
        return torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [leaves[k] for k in names])

    g_ref, g_chunked = grads(ssd_scan), grads(ssd_chunked, Q)
    for name, a, b in zip(names, g_chunked, g_ref):
        assert a.shape == b.shape
        assert max_err(a, b) < 1e-10 * max(1.0, b.abs().max().item()), name


# ---------------------------------------------------------------------------
# Long sequences stay finite
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_long_sequence_float32_is_finite(decay: str) -> None:
    l = 65536
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, l, 2, 4, generator=gen)
    B = torch.randn(1, l, 1, 4, generator=gen)
    C = torch.randn(1, l, 1, 4, generator=gen)
    if decay == "strong":  # dt A ~ -50 per step: every exp underflows to 0 within a step
        dt, A = torch.full((1, l, 2), 5.0), torch.tensor([-10.0, -8.0])
    else:  # dt A ~ -1e-6 per step: decay over the whole sequence is only ~exp(-0.07)
        dt, A = torch.full((1, l, 2), 1e-3), torch.tensor([-1e-3, -1e-4])
    y, h = ssd_chunked(x, dt, A, B, C, 64, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    # Check against the same computation in float64 (the scan would take too long here).
    y64, h64 = ssd_chunked(
        x.double(), dt.double(), A.double(), B.double(), C.double(), 64, return_final_state=True
    )
    assert max_err(y, y64) < 1e-4 * y64.abs().max().item()
    assert max_err(h, h64) < 1e-4 * h64.abs().max().item()
    if decay == "strong":
        # The state forgets everything at once: y_t = dt_t x_t (C_t . B_t) exactly.
        y_local = dt[..., None] * x * (C * B).sum(-1, keepdim=True)
        assert max_err(y, y_local) < 1e-4


# ---------------------------------------------------------------------------
# The public dispatcher
# ---------------------------------------------------------------------------


def test_ssd_backends_agree() -> None:
    inp = make_inputs(2, 45, 4, 3, 2, 5)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 16)
    kw = dict(D=inp["D"], initial_state=inp["initial_state"], return_final_state=True)
    ref = ssd_scan(*args[:5], **kw)
    for backend in ("auto", "chunked", "scan", "quadratic"):
        y, h = ssd(*args, **kw, backend=backend)
        assert max_err(y, ref[0]) < 1e-10 and max_err(h, ref[1]) < 1e-10, backend
    y = ssd(*args, D=inp["D"])
    assert isinstance(y, torch.Tensor) and y.shape == inp["x"].shape


def test_ssd_triton_backend_is_called_lazily(monkeypatch) -> None:
    calls = []

    def fake_ssd_triton(*args, **kwargs):
        calls.append((args, kwargs))
        return "from triton"

    fake = types.ModuleType("aotlib.ssd_triton")
    fake.ssd_triton = fake_ssd_triton
    monkeypatch.setitem(sys.modules, "aotlib.ssd_triton", fake)
    inp = make_inputs(1, 8, 2, 3, 1, 4, with_init=False)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    assert ssd(*args, 4, D=inp["D"], backend="triton") == "from triton"
    ((got_args, got_kw),) = calls
    assert got_args[5] == 4 and got_kw["D"] is inp["D"]
    # "auto" picks Triton only for CUDA tensors: on CPU it is the chunked path
    y = ssd(*args, 4, backend="auto")
    assert isinstance(y, torch.Tensor) and len(calls) == 1


# ---------------------------------------------------------------------------
# Bad inputs: a ValueError that names the argument, never a broadcasting error
# ---------------------------------------------------------------------------

GOOD = dict(b=2, l=10, h=4, p=3, g=2, n=5)


def good_inputs() -> dict:
    return make_inputs(*GOOD.values(), dtype=torch.float32)


def _replace(**changes):
    def edit(inp: dict) -> dict:
        inp = dict(inp)
        for k, fn in changes.items():
            inp[k] = fn(inp)
        return inp

    return edit


BAD = {
    "x_rank": (_replace(x=lambda d: d["x"][0]), "x"),
    "dt_rank": (_replace(dt=lambda d: d["dt"][..., None]), "dt"),
    "dt_length": (_replace(dt=lambda d: d["dt"][:, :-1]), "dt"),
    "dt_heads": (_replace(dt=lambda d: d["dt"][..., :3]), "dt"),
    "A_shape": (_replace(A=lambda d: d["A"][:3]), "A"),
    "A_rank": (_replace(A=lambda d: d["A"][None]), "A"),
    "B_length": (_replace(B=lambda d: d["B"][:, :-1]), "B"),
    "B_batch": (_replace(B=lambda d: d["B"][:1]), "B"),
    "C_state": (_replace(C=lambda d: d["C"][..., :4]), "C"),
    "C_groups": (_replace(C=lambda d: d["C"][:, :, :1]), "C"),
    "groups_not_dividing_heads": (
        _replace(
            B=lambda d: torch.cat([d["B"], d["B"][:, :, :1]], 2),
            C=lambda d: torch.cat([d["C"], d["C"][:, :, :1]], 2),
        ),
        "ngroups",
    ),
    "D_shape": (_replace(D=lambda d: d["D"][:2]), "D"),
    "D_rank": (_replace(D=lambda d: d["D"][:, None]), "D"),
    "init_shape": (_replace(initial_state=lambda d: d["initial_state"][..., :4]), "initial_state"),
    "init_rank": (_replace(initial_state=lambda d: d["initial_state"][0]), "initial_state"),
    "x_integer": (_replace(x=lambda d: d["x"].long()), "x"),
    "B_integer": (_replace(B=lambda d: d["B"].int()), "B"),
    "x_not_tensor": (_replace(x=lambda d: d["x"].tolist()), "x"),
    "zero_length": (
        _replace(
            x=lambda d: d["x"][:, :0],
            dt=lambda d: d["dt"][:, :0],
            B=lambda d: d["B"][:, :0],
            C=lambda d: d["C"][:, :0],
        ),
        "time step",
    ),
    "devices": (_replace(D=lambda d: d["D"].to("meta")), "device"),
}


def _call(fn, inp: dict, chunk_size=4):
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"])
    kw = dict(D=inp["D"], initial_state=inp["initial_state"])
    if fn in (ssd_scan, ssd_quadratic):
        return fn(*args, **kw)
    return fn(*args, chunk_size, **kw)


@pytest.mark.parametrize(
    "fn", [ssd, ssd_chunked, ssd_scan, ssd_quadratic], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_bad_inputs_raise_value_error(fn, case: str) -> None:
    edit, word = BAD[case]
    with pytest.raises(ValueError, match=word):
        _call(fn, edit(good_inputs()))


def test_good_inputs_pass_the_check() -> None:
    inp = good_inputs()
    dims = check_ssd_inputs(
        *(inp[k] for k in "x dt A B C".split()), 4, inp["D"], inp["initial_state"]
    )
    assert tuple(dims) == tuple(GOOD.values())
    assert dims.ngroups == 2 and dims.dstate == 5


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0, True, None])
@pytest.mark.parametrize("fn", [ssd, ssd_chunked], ids=lambda f: f.__name__)
def test_bad_chunk_size(fn, chunk_size) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        _call(fn, good_inputs(), chunk_size)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        inp = good_inputs()
        ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], backend="cuda")


def test_bad_helper_inputs() -> None:
    inp = good_inputs()
    with pytest.raises(ValueError, match="dt"):
        ssd_matrix(inp["dt"][0], inp["A"], inp["B"], inp["C"])
    with pytest.raises(ValueError, match="A"):
        ssd_matrix(inp["dt"], inp["A"][:3], inp["B"], inp["C"])
    with pytest.raises(ValueError, match="split"):
        offdiagonal_singular_values(torch.eye(5), 5)
    with pytest.raises(ValueError, match="M"):
        offdiagonal_ranks(torch.eye(5)[None])


# ---------------------------------------------------------------------------
# Semiseparable: off-diagonal blocks of M have rank <= N
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5])
def test_offdiagonal_blocks_have_rank_at_most_n(n: int) -> None:
    l = 40
    inp = make_inputs(1, l, 2, 1, 1, n, dt_scale=0.1)
    M = ssd_matrix(inp["dt"], inp["A"], inp["B"], inp["C"])[0, 0]  # (l, l), one head
    ranks = offdiagonal_ranks(M)
    assert len(ranks) == l - 1
    assert max(ranks) == n  # <= n everywhere, and the bound is reached
    assert all(r == min(n, k, l - k) for k, r in zip(range(1, l), ranks))
    # The cliff: after the N-th singular value the rest are rounding noise.
    s = offdiagonal_singular_values(M, l // 2)
    assert s[n - 1] > 1e-6 * s[0] and (s[n:] < 1e-12 * s[0]).all()


def test_rank_check_can_fail() -> None:
    # A generic lower-triangular matrix is not semiseparable: its blocks are full rank.
    M = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ranks = offdiagonal_ranks(torch.tril(M))
    assert ranks[9] == 10  # the (10 x 10) block below the diagonal at split 10
    assert numerical_rank(torch.zeros(3)) == 0
