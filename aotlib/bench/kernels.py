"""The Triton SSD kernels against the float64 reference, without pytest.

One check runs `aotlib.ssd_triton.ssd_triton` forward and backward on inputs rounded to
the dtype under test, runs the plain reference (`ssd_scan` for short sequences,
`ssd_chunked` otherwise) in float64 on exactly those rounded values, and compares the
output, the final state and every gradient (x, dt, A, B, C, D, initial_state):

    max error / max |reference|  <=  tolerance of the dtype

Kernel buffers are NaN-filled first (`ssd_triton.NAN_FILL`), so an element a kernel
forgets to write fails. `tests/test_ssd_triton.py` runs these checks under pytest (the
interpreter on CPU); `tools/gpu_check.py` runs `CASES` compiled on a GPU in float32,
bfloat16 and float16 where pytest may not even be installed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor

from aotlib.ssd import ssd, ssd_chunked, ssd_scan

# Max error relative to the reference's largest entry. The interpreter's fp32 dot is
# exact fp32; on GPU fp32 dots use TF32 (10-bit significand), and bf16/fp16 round inputs,
# outputs and gradients (fp16 dots run at fp32 accuracy, see ssd_triton.DOT_PRECISION).
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TOL_TF32 = 1e-2
GRADS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def tolerance(device: str, dtype: torch.dtype) -> float:
    return TOL_TF32 if (device == "cuda" and dtype == torch.float32) else TOL[dtype]


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


def run(fn: Callable, inputs: dict, chunk_size: int | None, dy, dfinal) -> dict[str, Tensor]:
    """Forward and backward through fn; returns {name: tensor} of outputs and gradients.

    fn takes (x, dt, A, B, C, [chunk_size=], D=, initial_state=, return_final_state=True);
    chunk_size None: fn has none (the scan).
    """
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in inputs.items()}
    args = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
    kw = {"D": leaves["D"], "initial_state": leaves["initial_state"]}
    if chunk_size is not None:
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


class Error(NamedTuple):
    tensor: str
    max_err: float  # relative to the reference's largest entry
    mean_err: float
    tol: float
    dtype_ok: bool

    @property
    def ok(self) -> bool:
        return self.dtype_ok and self.max_err <= self.tol  # False for NaN too


def check_against_reference(
    shape: tuple[int, ...],
    chunk_size: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    use: str = "both",
    fn: Callable | None = None,
    **opts: Any,
) -> list[Error]:
    """Errors of fn (default `ssd_triton`) against float64, per output and gradient.

    shape (b, l, h, p, g, n); use "both", "y" (no final-state gradient) or "final";
    opts go to `make_inputs`. The reference runs on the same device in float64.
    """
    from aotlib.ssd_triton import ssd_triton

    b, l, h, p, g, n = shape
    inputs = make_inputs(b, l, h, p, g, n, seed=seed, **opts)
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64) if use != "final" else None
    dfinal = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64) if use != "y" else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    low = {k: cast(v) for k, v in inputs.items()}
    got = run(fn or ssd_triton, low, chunk_size, cast(dy), cast(dfinal))
    # The reference sees exactly the (rounded) values the kernels saw, in float64.
    ref_inputs = {k: None if v is None else v.double() for k, v in low.items()}
    ref_dy, ref_dfinal = [None if t is None else cast(t).double() for t in (dy, dfinal)]
    if l <= 64:
        ref = run(ssd_scan, ref_inputs, None, ref_dy, ref_dfinal)
    else:
        ref = run(ssd_chunked, ref_inputs, chunk_size, ref_dy, ref_dfinal)

    tol = tolerance(device, dtype)
    errors = []
    for name in ref:
        dtype_ok = got[name].dtype == low.get(name, low["x"]).dtype
        err = (got[name].double() - ref[name]).abs()
        scale = ref[name].abs().max().clamp_min(1e-30) if ref[name].numel() else 1.0
        max_err = float(err.max() / scale) if err.numel() else 0.0
        mean_err = float(err.mean() / scale) if err.numel() else 0.0
        errors.append(Error(name, max_err, mean_err, tol, dtype_ok))
    return errors


def format_errors(errors: list[Error]) -> str:
    return "\n".join(
        f"{e.tensor:>13}: max err {e.max_err:.2e}  mean err {e.mean_err:.2e}  (tol {e.tol:.0e})"
        + ("" if e.dtype_ok else "  WRONG DTYPE")
        for e in errors
    )


def auto_chunk_256(x, dt, A, B, C, chunk_size, **kw):
    """`ssd(backend="auto")` at chunk 256 (the 130m and medium presets), which on CUDA
    runs the Triton kernels at chunk 128: the same function as chunk 256."""
    return ssd(x, dt, A, B, C, chunk_size, **kw, backend="auto")


@contextmanager
def max_block(width: int):
    """Cap the kernels' P and N tiles (`ssd_triton.MAX_BLOCK`) for the checks inside."""
    from aotlib import ssd_triton

    saved, ssd_triton.MAX_BLOCK = ssd_triton.MAX_BLOCK, width
    try:
        yield
    finally:
        ssd_triton.MAX_BLOCK = saved


class Case(NamedTuple):
    """One GPU self-check: `check_against_reference(shape, chunk, ...)` with options."""

    name: str
    shape: tuple[int, ...]  # (b, l, h, p, g, n)
    chunk: int
    opts: dict = {}
    tile: int | None = None  # MAX_BLOCK for this case (None: the default)
    fn: Callable | None = None  # None: ssd_triton


# The grid of tests/test_ssd_triton.py (awkward lengths, one step, exact chunks, chunk 1,
# groups), the edge cases, the benchmark's launch shapes (64-wide tiles, 8 warps) and
# the 130m preset's chunk 256 through the public `ssd`.
CASES = [
    Case("l1-q4", (2, 1, 2, 8, 1, 8), 4),
    Case("l7-q4-g2", (1, 7, 4, 8, 2, 16), 4),
    Case("l7-q1", (1, 7, 2, 8, 1, 8), 1),
    Case("l33-q8-g2", (1, 33, 2, 8, 2, 8), 8),
    Case("l33-q16", (2, 33, 4, 16, 1, 16), 16),
    Case("l16-q16-onechunk", (1, 16, 2, 8, 1, 8), 16),
    Case("l32-q8-g4", (1, 32, 4, 8, 4, 8), 8),
    Case("no-d-no-init", (1, 19, 4, 8, 2, 8), 8, {"with_d": False, "with_init": False}),
    Case("only-y-used", (1, 9, 2, 8, 1, 8), 4, {"use": "y"}),
    Case("only-final-used", (1, 9, 2, 8, 1, 8), 4, {"use": "final"}),
    Case("tiles-16-p20-n40", (1, 20, 2, 20, 1, 40), 8, tile=16),
    Case("extreme-dt-l300", (1, 300, 2, 8, 1, 8), 64, {"seed": 3, "dt_range": (1e-4, 50.0)}),
    Case("l1000-q64", (2, 1000, 8, 64, 2, 64), 64),
    Case("l515-q128-n128", (1, 515, 4, 64, 1, 128), 128),
    Case("l300-q32-p48", (1, 300, 4, 48, 4, 16), 32),
    Case("auto-q256-l600", (1, 600, 4, 64, 1, 128), 256, fn=auto_chunk_256),
]


def check_case(case: Case, device: str, dtype: torch.dtype) -> list[Error]:
    opts = dict(case.opts)
    with max_block(case.tile) if case.tile else nullcontext():
        return check_against_reference(case.shape, case.chunk, device, dtype, fn=case.fn, **opts)


def backward_is_deterministic(device: str, dtype: torch.dtype) -> bool:
    """Two backward passes on the same inputs give bit-identical gradients (no atomics)."""
    from aotlib.ssd_triton import ssd_triton

    inputs = make_inputs(1, 40, 2, 8, 1, 8, seed=5)
    low = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    dy = torch.randn(1, 40, 2, 8, dtype=torch.float64).to(device=device, dtype=dtype)
    first = run(ssd_triton, low, 8, dy, None)
    second = run(ssd_triton, low, 8, dy, None)
    return all(torch.equal(first[name], second[name]) for name in first)
