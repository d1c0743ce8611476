"""The Triton SSD kernels against the float64 reference: outputs, final state, every gradient.

Without a GPU the kernels run under Triton's interpreter (aotlib.ssd_triton sets
TRITON_INTERPRET=1 when there is no CUDA), so shapes here are tiny. The same tests run
compiled on CUDA in float32, bfloat16 and float16 via tools/gpu_check.py (`make gpu-check`).
Every kernel buffer is NaN-filled first, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aotlib import ssd_triton
from aotlib.ssd import ssd, ssd_chunked, ssd_scan
from aotlib.ssd_triton import ssd_triton as ssd_tr

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available() and not ssd_triton.INTERPRETED

interpreted = pytest.mark.skipif(
    not ssd_triton.INTERPRETED, reason="kernels are compiled here (CUDA present)"
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA (make gpu-check)")]

# (device, dtype) the kernels run in; the reference is always float64.
RUNS = [
    pytest.param("cpu", torch.float32, marks=interpreted, id="interp-f32"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-f32"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, marks=gpu, id="cuda-f16"),
]
# Max error relative to the reference's largest entry. The interpreter's fp32 dot is
# exact fp32; on GPU fp32 dots use TF32 (10-bit mantissa), and bf16/fp16 round inputs,
# outputs and gradients.
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TOL_TF32 = 1e-2
GRADS = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    monkeypatch.setattr(ssd_triton, "NAN_FILL", True)


def make_inputs(b, l, h, p, g, n, seed=0, with_d=True, with_init=True, dt_range=(1e-3, 1.0)):
    """Float64 inputs on the CPU: dt log-uniform in dt_range, A < 0."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor(dt_range, dtype=torch.float64).log()
    dt = (lo + (hi - lo) * torch.rand(b, l, h, generator=gen, dtype=torch.float64)).exp()
    return {
        "x": torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
        "dt": dt,
        "A": -(0.2 + 2 * torch.rand(h, generator=gen, dtype=torch.float64)),
        "B": torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
        "C": torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
        "D": torch.randn(h, generator=gen, dtype=torch.float64) if with_d else None,
        "initial_state": (
            torch.randn(b, h, p, n, generator=gen, dtype=torch.float64) if with_init else None
        ),
    }


def run(fn, inputs, chunk_size, dy, dfinal):
    """Forward and backward through fn; returns {name: tensor} of outputs and gradients."""
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in inputs.items()}
    args = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {"D": leaves["D"], "initial_state": leaves["initial_state"]}
    if fn is not ssd_scan:
        kw["chunk_size"] = chunk_size
    y, final = fn(*args, **kw, return_final_state=True)
    loss = 0
    if dy is not None:
        loss = loss + (y.float() * dy.float()).sum()
    if dfinal is not None:
        loss = loss + (final.float() * dfinal.float()).sum()
    loss.backward()
    out = {"y": y.detach(), "final_state": final.detach()}
    # A gradient the reference leaves as None (C when only the final state is used) is 0.
    out |= {
        k: torch.zeros_like(v) if v.grad is None else v.grad
        for k, v in leaves.items()
        if v is not None
    }
    return out


def check_against_reference(shape, chunk_size, device, dtype, seed=0, use="both", **opts):
    b, l, h, p, g, n = shape
    inputs = make_inputs(b, l, h, p, g, n, seed=seed, **opts)
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64) if use != "final" else None
    dfinal = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64) if use != "y" else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    low = {k: cast(v) for k, v in inputs.items()}
    got = run(ssd_tr, low, chunk_size, cast(dy), cast(dfinal))
    # The reference sees exactly the (rounded) values the kernels saw, in float64.
    ref_inputs = {k: None if v is None else v.double() for k, v in low.items()}
    ref_dy, ref_dfinal = [None if t is None else cast(t).double() for t in (dy, dfinal)]
    reference = ssd_scan if l <= 64 else ssd_chunked
    ref = run(reference, ref_inputs, chunk_size, ref_dy, ref_dfinal)

    tol = TOL_TF32 if (device == "cuda" and dtype == torch.float32) else TOL[dtype]
    failures = []
    for name in ref:
        assert got[name].dtype == low.get(name, low["x"]).dtype, name
        err = (got[name].double() - ref[name]).abs()
        scale = ref[name].abs().max().clamp_min(1e-30) if ref[name].numel() else 1.0
        max_err = float(err.max() / scale) if err.numel() else 0.0
        mean_err = float(err.mean() / scale) if err.numel() else 0.0
        print(f"{name:>13}: max err {max_err:.2e}  mean err {mean_err:.2e}  (tol {tol:.0e})")
        if not max_err <= tol:  # also catches NaN
            failures.append(f"{name} max rel err {max_err:.2e} > {tol:.0e}")
    assert not failures, "; ".join(failures)


# (b, l, h, p, g, n), chunk size: awkward lengths, lengths of one step and of exact
# chunks, chunk size 1, several groups (g = 2 of h = 4 heads, and g = h).
GRID = [
    pytest.param((2, 1, 2, 8, 1, 8), 4, id="l1-q4"),
    pytest.param((1, 7, 4, 8, 2, 16), 4, id="l7-q4-g2"),
    pytest.param((1, 7, 2, 8, 1, 8), 1, id="l7-q1"),
    pytest.param((1, 33, 2, 8, 2, 8), 8, id="l33-q8-g2"),
    pytest.param((2, 33, 4, 16, 1, 16), 16, id="l33-q16"),
    pytest.param((1, 16, 2, 8, 1, 8), 16, id="l16-q16-onechunk"),
    pytest.param((1, 32, 4, 8, 4, 8), 8, id="l32-q8-g4"),
]


@pytest.mark.parametrize("device, dtype", RUNS)
@pytest.mark.parametrize("shape, chunk_size", GRID)
def test_matches_reference(shape, chunk_size, device, dtype):
    check_against_reference(shape, chunk_size, device, dtype)


@pytest.mark.parametrize("device, dtype", RUNS)
def test_without_d_and_initial_state(device, dtype):
    check_against_reference((1, 19, 4, 8, 2, 8), 8, device, dtype, with_d=False, with_init=False)


@pytest.mark.parametrize("use", ["y", "final"])
@pytest.mark.parametrize("device, dtype", RUNS)
def test_gradient_through_one_output(use, device, dtype):
    """Backward with only y used (no final-state gradient) or only the final state used."""
    check_against_reference((1, 9, 2, 8, 1, 8), 4, device, dtype, use=use)


@pytest.mark.parametrize("device, dtype", RUNS)
def test_several_tiles_per_dimension(device, dtype, monkeypatch):
    """P = 20 and N = 40 in tiles of 16: masked tile edges, the loops over P and N tiles."""
    monkeypatch.setattr(ssd_triton, "MAX_BLOCK", 16)
    check_against_reference((1, 20, 2, 20, 1, 40), 8, device, dtype)


@pytest.mark.parametrize("device, dtype", RUNS)
def test_extreme_dt_long_sequence(device, dtype):
    """dt from 1e-4 (no decay over the whole sequence) to 50 (dt*A ~ -100 per step)."""
    check_against_reference((1, 300, 2, 8, 1, 8), 64, device, dtype, seed=3, dt_range=(1e-4, 50.0))


@pytest.mark.parametrize("device, dtype", RUNS)
def test_backward_is_deterministic(device, dtype):
    inputs = make_inputs(1, 40, 2, 8, 1, 8, seed=5)
    low = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    dy = torch.randn(1, 40, 2, 8, dtype=torch.float64).to(device=device, dtype=dtype)
    first = run(ssd_tr, low, 8, dy, None)
    second = run(ssd_tr, low, 8, dy, None)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("chunk_size", [3, 6, 48, 256])
def test_chunk_size_must_be_power_of_two(chunk_size):
    inputs = make_inputs(1, 8, 2, 4, 1, 4)
    args = [inputs[k].float() for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        ssd_tr(*args, chunk_size=chunk_size)


def test_public_ssd_reaches_triton():
    inputs = {k: v.float() for k, v in make_inputs(1, 10, 2, 8, 1, 8).items()}
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {"D": inputs["D"], "initial_state": inputs["initial_state"]}
    if not ssd_triton.INTERPRETED:
        args = [a.cuda() for a in args]
        kw = {k: v.cuda() for k, v in kw.items()}
    y = ssd(*args, chunk_size=4, **kw, backend="triton")
    assert torch.equal(y, ssd_tr(*args, chunk_size=4, **kw))
    # The chunked path takes any chunk size, the Triton one only powers of two:
    ssd(*args, chunk_size=6, **kw, backend="chunked")
    with pytest.raises(ValueError, match="power of two"):
        ssd(*args, chunk_size=6, **kw, backend="triton")


@interpreted
def test_unwritten_output_is_caught(monkeypatch):
    """The NaN fill works: skip the output kernel and every element of y stays NaN."""

    class Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(ssd_triton, "_chunk_scan_kernel", Skipped())
    inputs = {k: v.float() for k, v in make_inputs(1, 5, 2, 8, 1, 8).items()}
    y = ssd_tr(*[inputs[k] for k in ("x", "dt", "A", "B", "C")], chunk_size=4)
    assert torch.isnan(y).all()


@interpreted
def test_interpreter_is_float32_only():
    inputs = make_inputs(1, 4, 2, 4, 1, 4)
    args = [inputs[k].to(torch.bfloat16) for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match="float32 only"):
        ssd_tr(*args, chunk_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (make gpu-check)")
def test_compiled_kernels_reject_cpu_tensors():
    inputs = make_inputs(1, 4, 2, 4, 1, 4)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ssd_tr(*[inputs[k].float() for k in ("x", "dt", "A", "B", "C")], chunk_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (make gpu-check)")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"]
)
@pytest.mark.parametrize(
    "shape, chunk_size",
    [((2, 1000, 8, 64, 2, 64), 64), ((1, 515, 4, 64, 1, 128), 128), ((1, 300, 4, 48, 4, 16), 32)],
    ids=["l1000-q64", "l515-q128-n128", "l300-q32-p48"],
)
def test_matches_reference_gpu_sizes(shape, chunk_size, dtype):
    """The launch configurations the benchmark uses (64-wide tiles, 8 warps)."""
    check_against_reference(shape, chunk_size, "cuda", dtype)


@pytest.mark.slow
@interpreted
def test_kernels_compile_for_sm90():
    """Compile every kernel for sm_90 (no GPU needed): catches what the interpreter can't."""
    pytest.importorskip("triton.backends.nvidia")
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--compile-only", "--arch", "90"]
    cmd += ["--dtype", "fp32", "bf16", "--chunk", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    assert "compile-only: 0 failure(s)" in done.stdout
