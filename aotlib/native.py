"""Small C kernels for the CPU: built on first use by the system's C compiler, loaded
with ctypes, and each one optional.

A kernel here fuses a chain of elementwise passes that torch runs one tensor-wide pass at
a time: `mamba2_cpu.c`, Mamba-2's depthwise conv + SiLU and its RMSNorms, forward and
backward, one pass each instead of six to a dozen; `ssd_cpu.c`, the chunked SSD's masked
decay matrices and their backward, one pass per (chunk, head) tile; `lm_head_cpu.c`, the softmax
cross-entropy of a block of logits and its gradient, in place (`native_math.h` holds their
vectorizable exp). Each kernel's torch form stays in the library as the reference, runs
wherever the kernel does not (no compiler, CUDA tensors, other dtypes, torch.compile), and
tests compare the two.

    library("mamba2_cpu")   # a ctypes.CDLL, or None: use the torch form

The shared library is cached in `aotlib.paths.cache_dir()/native`, under a name that
hashes its source, the compiler and the flags, so an edit or a new machine rebuilds it
(about 0.3 s). `AOTLIB_NATIVE=0` turns every kernel off; `CC` picks the compiler (default
`cc`). A failed build warns once and falls back to the torch form.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from aotlib.paths import cache_dir

_HERE = Path(__file__).parent
_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
# name: its functions' argument types (all return int: 0 on success)
_SIGNATURES = {
    "mamba2_cpu": {
        # x, x's batch and row strides, w (4, c), bias, b, l, c, groups, widths, outputs
        "causal_conv_silu_forward": [_ptr, _i64, _i64, _ptr, _ptr] + [_i64] * 4 + [_ptr, _ptr],
        # ... the same, then douts, dx, dw, dbias
        "causal_conv_silu_backward": [_ptr, _i64, _i64, _ptr, _ptr] + [_i64] * 4 + [_ptr] * 5,
        # x, z, weight, rows, d, group size, eps, out, r
        "gated_rms_norm_forward": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _f32, _ptr, _ptr],
        # x, z, weight, rows, d, group size, r, dout, dx, dz, dw
        "gated_rms_norm_backward": [_ptr, _ptr, _ptr, _i64, _i64, _i64] + [_ptr] * 5,
    },
    "ssd_cpu": {
        # dA, dt (or NULL), into, out, between, their chunk strides, C B^T, D (or NULL),
        # K, h, g, Q, R, M
        "ssd_masked_decay": [_ptr] * 5 + [_i64] * 2 + [_ptr] * 2 + [_i64] * 5 + [_ptr],
        # dA, into, out, between, their chunk strides, C B^T, dP, K, h, g, Q, R, d(C B^T), dcs
        "ssd_masked_decay_backward": [_ptr] * 4 + [_i64] * 2 + [_ptr] * 2 + [_i64] * 5 + [_ptr] * 2,
        # a, its chunk and step strides, b, w, w2 (or NULL), their chunk stride, scale b,
        # K, Q, h, p, out
        "ssd_row_dots": [_ptr, _i64, _i64]
        + [_ptr] * 3
        + [_i64, ctypes.c_int]
        + [_i64] * 4
        + [_ptr],
        # dcs, F dF, E dE, W dW (each or NULL), dt, its chunk stride, A, ddt_direct,
        # K, h, Q, ddt, its chunk stride, dA (double, added into)
        "ssd_exponent_grads": [_ptr] * 5 + [_i64, _ptr, _ptr] + [_i64] * 3 + [_ptr, _i64, _ptr],
        # x, dy (each with chunk and step strides), dxd (or NULL), dxd_h, dt, its chunk
        # stride, D (or NULL), K, Q, h, p, dx with its strides, ddt, dD (double, or NULL)
        "ssd_input_grads": [_ptr, _i64, _i64] * 2
        + [_ptr] * 3
        + [_i64, _ptr]
        + [_i64] * 4
        + [_ptr, _i64, _i64, _ptr, _ptr],
    },
    "lm_head_cpu": {
        # logits (in place), targets, rows, V, scale, the loss sum (one double)
        "softmax_xent_rows": [_ptr, _ptr, _i64, _i64, _f32, _ptr],
    },
}
_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


_switched_off = 0  # depth of `off()` blocks


def enabled() -> bool:
    """Whether native kernels may be used (`AOTLIB_NATIVE=0` or an `off()` block says no)."""
    return not _switched_off and os.environ.get("AOTLIB_NATIVE", "1") != "0"


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Run the torch forms inside this block (tests compare the two; benchmarks time the
    torch forms next to the kernels as "eager_torch"). Not thread-local."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def flags(arch: bool = True) -> list[str]:
    """The compiler flags: optimised, vectorised for this CPU's instruction set (as torch
    reports it; `arch` False: the compiler's baseline, for one that does not know the
    x86-64-v3/v4 levels), and C's math without errno (so that nothing stops
    vectorisation)."""
    level = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}
    march = level.get(torch.backends.cpu.get_cpu_capability(), []) if arch else []
    return ["-O3", "-fno-math-errno", "-fPIC", "-shared", *march]


def kernels_for(name: str, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """`library(name)` for these tensors: where they are all float32 on the CPU and
    torch.compile is not tracing (it traces the torch forms); else None."""
    if torch.compiler.is_compiling() or not enabled():
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return library(name)


def library(name: str) -> ctypes.CDLL | None:
    """The kernel library `name` (a `<name>.c` beside this module), built if needed;
    None where native kernels are off or it cannot be built."""
    if not enabled():
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name)
        return _loaded[name]


def _build_and_load(name: str) -> ctypes.CDLL | None:
    source = _HERE / f"{name}.c"
    compiler = os.environ.get("CC", "cc")
    try:
        path = _build(source, compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(
            f"aotlib.native: could not build {source.name} with {compiler!r} ({detail.strip()}); "
            "using the torch form instead (slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for fn, argtypes in _SIGNATURES[name].items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _build(source: Path, compiler: str) -> Path:
    """Compile `source` into the cache (once per source, compiler and flags): for this
    CPU's instruction set, or if the compiler refuses that, for its baseline."""
    exe = shutil.which(compiler)
    if exe is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    texts = [p.read_text() for p in [source, *sorted(source.parent.glob("*.h"))]]
    for arch in (True, False):
        opts = flags(arch)
        key = hashlib.sha256("\0".join([*texts, exe, version, *opts]).encode()).hexdigest()
        target = cache_dir() / "native" / f"{source.stem}-{key[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, moved in
            built = Path(tmp) / target.name
            cmd = [exe, *opts, f"-I{source.parent}", str(source), "-o", str(built)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(built, target)
                return target
    raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a C kernel; None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


def check(status: int, what: str) -> None:
    """Raise if a kernel returned an error (it only fails to allocate its row buffers)."""
    if status != 0:
        raise MemoryError(f"aotlib.native: {what} could not allocate its buffers")
