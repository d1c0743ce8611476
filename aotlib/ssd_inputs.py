"""Input checks of the SSD layer, shared by every path: scan, quadratic, chunked, Triton.

A module of its own so that `aotlib.ssd` (the PyTorch paths and the dispatcher) and
`aotlib.ssd_triton` (the Triton kernels, which `ssd` dispatches to) both import it, and
neither imports the other back: ssd -> ssd_triton -> ssd_inputs, ssd -> ssd_inputs.
Layout as in `aotlib.ssd`: x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SSDDims(NamedTuple):
    """Sizes read off validated SSD inputs."""

    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int


def shape_of(t: Tensor | None) -> str:
    """A tensor's shape as text for error messages ("None" or the type for non-tensors)."""
    if t is None:
        return "None"
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_ssd_inputs(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> SSDDims:
    """Validate shapes, dtypes and devices; raise ValueError naming the argument and shapes.

    `chunk_size=None` skips the chunk-size check (the scan and quadratic forms have none).
    Values are not checked (A < 0, dt > 0): that would need a device sync on GPU.
    """
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": initial_state}
    shapes = ", ".join(f"{k}={shape_of(v)}" for k, v in named.items())
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    ranks = {"x": 4, "dt": 3, "A": 1, "B": 4, "C": 4, "D": 1, "initial_state": 4}
    for name, t in named.items():
        if t is not None and t.dim() != ranks[name]:
            raise ValueError(f"{name} must have {ranks[name]} dims, got {shape_of(t)} ({shapes})")
    devices = {t.device for t in named.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{k}={v.device}" for k, v in named.items() if v is not None)
        raise ValueError(f"all inputs must be on one device, got {where}")

    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must have shape (b, l, h)={(b, l, h)} like x, got ({shapes})")
    if A.shape != (h,):
        raise ValueError(f"A must have shape (h,)={(h,)}, got ({shapes})")
    if B.shape[:2] != (b, l):
        raise ValueError(f"B must have shape (b, l, g, n) with (b, l)={(b, l)}, got ({shapes})")
    if C.shape != B.shape:
        raise ValueError(f"C must have the same shape as B (b, l, g, n), got ({shapes})")
    if g < 1 or h % g != 0:
        raise ValueError(f"ngroups g={g} (B.shape[2]) must divide nheads h={h} ({shapes})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must have shape (h,)={(h,)} or be None, got ({shapes})")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(
            f"initial_state must have shape (b, h, p, n)={(b, h, p, n)}, got ({shapes})"
        )
    if l < 1:
        raise ValueError(f"x must have at least one time step, got ({shapes})")
    if chunk_size is not None:
        check_chunk_size(chunk_size)
    return SSDDims(b, l, h, p, g, n)


def check_chunk_size(chunk_size: int) -> None:
    """Raise ValueError unless chunk_size is an int >= 1 (bools excluded)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
