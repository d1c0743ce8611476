"""How the CPU paths get their memory from the C library (glibc on Linux; elsewhere every
function here does nothing).

Measured here (one thread, the SSD's long-sequence benchmark, b=2, h=8, P=N=64): one
forward+backward at 64K tokens writes about 800 MB of fresh tensors (y, dx and the chunk
states, 256 MB each, dB and dC). glibc maps every block of 32 MB or more afresh from the
kernel and unmaps it on free, so each call's first writes fault the pages in and the
kernel zeroes them: 0.1-1.0 s of system time per call (`clear_page_erms` was 18% of a
profile), against 1.6-2.3 s of the call's own work. Two remedies:

- `advise_huge_pages(t)` for one large output (the SSD's y, dx and chunk states, through
  `aotlib.ssd_chunks.new_output`): 2 MiB pages, 512 times fewer faults (the zeroing
  stays).
- `keep_freed_memory()` for the whole process: glibc keeps what is freed and hands it out
  again, as PyTorch's CUDA caching allocator (or jemalloc, tcmalloc) does. Once the heap
  has grown to fit (two or three calls) no call faults or zeroes a page: the 64K
  forward+backward takes 0.81 of the CPU time, 16K 0.94 (`python -m aotlib.bench
  memory`), at a resident size 15% over the fresh mappings' peak (2.15 GB against 1.88:
  aligned requests leave ragged free chunks). The command lines (`python -m aotlib`,
  `python -m aotlib.bench`) turn it on; a library call never changes the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

from torch import Tensor

_MADV_HUGEPAGE, _HUGE = 14, 1 << 21  # Linux's advice number, and x86-64's huge page
_GLIBC_MMAP_MAX = 32 << 20  # glibc (64-bit) maps every block from this size on by itself
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt's parameters


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, where it is glibc on Linux (its madvise and mallopt); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl has no malloc_trim: its allocator is its own
        return None
    return lib


def advise_huge_pages(t: Tensor) -> Tensor:
    """Advise 2 MiB pages for `t`'s memory, if it is a CPU tensor glibc mapped on its own
    (32 MB or more) and Linux allows it (transparent huge pages in "madvise" mode); `t`.

    Measured here (`python -m aotlib.bench ssd`): faulting a fresh 64 MB output in, 4 KiB
    page by page on first write, cost about 25 ms; with 2 MiB pages about 4 ms. Below 32
    MB glibc carves the tensor from its heap, and there the advice made the first writes
    slower, not faster (16 MB: 27-40 ms against 7 ms), so it is given only from 32 MB on.
    Only advice: the numbers are the same either way."""
    lib, nbytes = libc(), t.numel() * t.element_size()
    if lib is not None and t.device.type == "cpu" and nbytes >= _GLIBC_MMAP_MAX:
        start = -(-t.data_ptr() // _HUGE) * _HUGE  # the whole huge pages inside
        end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            lib.madvise(start, end - start, _MADV_HUGEPAGE)  # a failure leaves 4 KiB pages
    return t


def keep_freed_memory(keep: bool = True) -> bool:
    """Have glibc keep the memory this process frees and reuse it for later requests
    (`keep`), or go back to mapping large blocks afresh (`keep=False`: glibc's defaults as
    they stand once it has seen large blocks, then what it holds goes back to the
    kernel). Whether it could (glibc on Linux).

    Kept memory is not returned: the process's resident size stays at its peak, as under
    a caching allocator. Numbers are the same either way; only where tensors live moves.
    """
    lib = libc()
    if lib is None:
        return False
    if keep:
        ok = lib.mallopt(_M_MMAP_MAX, 0)  # no block is mapped on its own: all from the heap
        ok &= lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap's top is never returned
    else:
        ok = lib.mallopt(_M_MMAP_MAX, 65536)
        ok &= lib.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)
        ok &= lib.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_MAX)
        lib.malloc_trim(0)
    return bool(ok)
