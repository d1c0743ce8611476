"""The Triton SSD kernels against the float64 reference: outputs, final state, every gradient.

Without a GPU the kernels run under Triton's interpreter (aotlib.ssd_triton sets
TRITON_INTERPRET=1 when there is no CUDA), so shapes here are tiny. The same tests run
compiled on CUDA in float32, bfloat16 and float16 under `make gpu-check` (tools/gpu_check.py
runs the checks of aotlib.bench.kernels without pytest, then this file when pytest is there).
Every kernel buffer is NaN-filled first, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aotlib import ssd_triton
from aotlib.bench import kernels
from aotlib.bench.kernels import make_inputs, run
from aotlib.ssd import ssd, ssd_chunked
from aotlib.ssd_triton import ssd_triton as ssd_tr

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available() and not ssd_triton.INTERPRETED

interpreted = pytest.mark.skipif(
    not ssd_triton.INTERPRETED, reason="kernels are compiled here (CUDA present)"
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA (make gpu-check)")]

# (device, dtype) the kernels run in; the reference is always float64. Tolerances:
# aotlib.bench.kernels.TOL (the same checks `make gpu-check` runs without pytest).
RUNS = [
    pytest.param("cpu", torch.float32, marks=interpreted, id="interp-f32"),
    pytest.param("cuda", torch.float32, marks=gpu, id="cuda-f32"),
    pytest.param("cuda", torch.bfloat16, marks=gpu, id="cuda-bf16"),
    pytest.param("cuda", torch.float16, marks=gpu, id="cuda-f16"),
]


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    monkeypatch.setattr(ssd_triton, "NAN_FILL", True)


def check_against_reference(shape, chunk_size, device, dtype, seed=0, use="both", **opts):
    errors = kernels.check_against_reference(shape, chunk_size, device, dtype, seed, use, **opts)
    print(kernels.format_errors(errors))
    failures = [f"{e.tensor} max rel err {e.max_err:.2e} > {e.tol:.0e}" for e in errors if not e.ok]
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA: the kernels are compiled")
def test_kernels_run_on_the_interpreter_without_cuda():
    """Without CUDA every kernel test here runs on the interpreter. Were triton imported
    in compiled mode before aotlib set TRITON_INTERPRET (torch._dynamo imports it), they
    would all be skipped as if a GPU were present: this test fails instead."""
    assert ssd_triton.INTERPRETED, (
        "triton was imported before aotlib could set TRITON_INTERPRET=1 (see "
        "aotlib/__init__.py): the Triton kernels cannot run on this CPU machine"
    )


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
    cmd += ["--dtype", "fp32", "bf16", "fp16", "--chunk", "64"]  # fp16: the 3xTF32 dots
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    assert "compile-only: 0 failure(s)" in done.stdout


# ---------------------------------------------------------------------------
# What the first CUDA run would hit: chunk 256, launch limits, devices, dot precision.
# Mocks stand in for CUDA where the decision is the point; the interpreter runs the math.
# ---------------------------------------------------------------------------


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: how `ssd(backend="auto")` decides, on a CPU."""

    @property
    def is_cuda(self):
        return True


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


@pytest.fixture
def auto_on_cuda(monkeypatch):
    """`ssd(backend="auto")` given a CUDA-looking x, with the Triton call recorded and
    run by the interpreter on the plain CPU tensors; yields the chunk sizes it ran."""
    if not ssd_triton.INTERPRETED:
        pytest.skip("CUDA present: `make gpu-check` runs the auto path for real")
    seen = []

    def spy(*args, **kw):
        seen.append(args[5])
        return ssd_tr(*map(_plain, args), **{k: _plain(v) for k, v in kw.items()})

    monkeypatch.setattr(ssd_triton, "ssd_triton", spy)
    yield seen


def auto_with_cuda_x(x, dt, A, B, C, chunk_size, **kw):
    return ssd(x.as_subclass(CudaLooking), dt, A, B, C, chunk_size, **kw, backend="auto")


@pytest.mark.parametrize("chunk_size, runs_at", [(256, 128), (48, 32), (64, 64)])
def test_auto_path_runs_an_unsupported_chunk_as_a_supported_one(auto_on_cuda, chunk_size, runs_at):
    """The 130m preset's chunk 256 on CUDA: the Triton kernels (at most 128) run at 128,
    and the result, outputs and every gradient, is the reference's at chunk 256."""
    check_against_reference((1, 300, 2, 8, 1, 8), chunk_size, "cpu", torch.float32,
                            fn=auto_with_cuda_x)  # fmt: skip
    assert set(auto_on_cuda) == {runs_at}


def test_auto_path_keeps_float64_on_the_chunked_path(auto_on_cuda):
    inputs = make_inputs(1, 10, 2, 4, 1, 4)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    y = auto_with_cuda_x(*args, 256)
    assert auto_on_cuda == []  # the kernels take float32, bfloat16, float16 only
    torch.testing.assert_close(_plain(y), ssd_chunked(*args, 256))


def test_supported_chunk_size():
    assert [ssd_triton.supported_chunk_size(q) for q in (1, 3, 64, 100, 128, 256, 1000)] == [
        1, 2, 64, 64, 128, 128, 128,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        ssd_triton.supported_chunk_size(0)


KERNELS = [
    "_chunk_cumsum_kernel",
    "_chunk_state_kernel",
    "_state_passing_kernel",
    "_chunk_scan_kernel",
    "_chunk_scan_bwd_dx_kernel",
    "_chunk_scan_bwd_dbdc_kernel",
]


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch recorded as (kernel, grid, constexprs, probe()); nothing runs
    unless a test sets `launches.run`. `launches.probe` is called at each launch."""

    class Log(list):
        run = False
        probe = staticmethod(lambda: None)

    log = Log()

    class Recorder:
        def __init__(self, name):
            self.name, self.real = name, getattr(ssd_triton, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log.append((self.name, grid, kwargs, log.probe()))
                if log.run:
                    self.real[grid](*args, **kwargs)

            return launch

    for name in KERNELS:
        monkeypatch.setattr(ssd_triton, name, Recorder(name))
    return log


def _fwd_bwd(b, l, h, p, g, n, chunk, dtype=torch.float32):
    """Run the forward and backward launchers directly (any dtype: no kernel runs)."""
    inputs = make_inputs(b, l, h, p, g, n, with_init=False)
    x, dt, A, B, C, D = (inputs[k].to(dtype) for k in ("x", "dt", "A", "B", "C", "D"))
    ssd_triton._ssd_fwd(x, dt, A, B, C, D, None, chunk)
    ssd_triton._ssd_bwd(x, dt, A, B, C, D, None, chunk, torch.ones_like(x), None)


@pytest.mark.parametrize(
    "shape, chunk",
    [((2, 3, 35_000, 4, 1, 4), 2), ((1, 70_000, 1, 4, 1, 4), 1)],
    ids=["batch-x-heads-70000", "chunks-70000"],
)
def test_launch_grids_stay_within_cuda_limits(launches, monkeypatch, shape, chunk):
    """Batch x heads = 70,000 or 70,000 chunks: more programs than a CUDA grid's axis 1 or
    2 takes (65,535), where the old (chunk, batch x head, tile) grids put them."""
    monkeypatch.setattr(ssd_triton, "NAN_FILL", False)
    _fwd_bwd(*shape, chunk)
    assert {name for name, *_ in launches} == set(KERNELS)
    for name, grid, *_ in launches:
        assert len(grid) == 1 and 1 <= grid[0] <= 2**31 - 1, (name, grid)
    assert max(grid[0] for _, grid, *_ in launches) > 65_535  # would not fit on axis 1 or 2
    with pytest.raises(ValueError, match="2\\^31"):
        ssd_triton._grid(2**16, 2**16)


@pytest.mark.parametrize(
    "dtype, precision",
    [(torch.float16, "tf32x3"), (torch.bfloat16, "tf32"), (torch.float32, "tf32")],
)
def test_float16_dots_keep_float32_accuracy(launches, monkeypatch, dtype, precision):
    """Float16 keeps 10 significand bits, as many as TF32: its dots run at float32's
    accuracy (3xTF32), every other dtype's on TF32. (The interpreter's dot is exact
    whatever it is told: the GPU check measures the difference.)"""
    monkeypatch.setattr(ssd_triton, "NAN_FILL", False)
    _fwd_bwd(1, 20, 2, 8, 1, 8, 8, dtype)
    dots = {name: kw["DOT"] for name, _, kw, _ in launches if "DOT" in kw}
    assert set(dots) == set(KERNELS) - {"_chunk_cumsum_kernel", "_state_passing_kernel"}
    assert set(dots.values()) == {precision}


@interpreted
def test_kernels_launch_under_the_tensors_device_guard(launches, monkeypatch):
    """Forward and backward launch inside `_on_device_of(x)` (cuda:1 under DDP)."""
    launches.run = True
    inside, guarded = [], []

    class Guard:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    monkeypatch.setattr(ssd_triton, "_on_device_of", lambda x: guarded.append(x) or Guard())
    launches.probe = lambda: bool(inside)
    check_against_reference((1, 9, 2, 8, 1, 8), 4, "cpu", torch.float32)
    assert len(guarded) == 2  # forward, backward
    assert len(launches) >= 9 and all(in_guard for *_, in_guard in launches)


def test_device_guard_is_the_tensors_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or "guard")
    x = torch.zeros(2)
    assert ssd_triton._on_device_of(x) is not None and entered == []  # CPU: a no-op
    assert ssd_triton._on_device_of(x.as_subclass(CudaLooking)) == "guard"
    assert entered == [x.device]
