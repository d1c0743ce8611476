"""aotlib.memory: freed memory kept for reuse, and huge pages for large outputs (glibc on
Linux; elsewhere the functions do nothing and these tests skip)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aotlib.memory import advise_huge_pages, keep_freed_memory, libc

pytestmark = pytest.mark.skipif(libc() is None, reason="glibc on Linux only")

MB64 = 16 << 20  # float32 elements in 64 MB: over glibc's 32 MB mmap threshold


def faults_writing(n: int) -> int:
    """Minor page faults taken while allocating and filling a fresh n-element tensor."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture
def kept():
    assert keep_freed_memory()
    yield
    assert keep_freed_memory(False)


def test_kept_memory_is_reused_without_faults(kept):
    for _ in range(10):  # the heap grows to fit: aligned requests leave ragged free chunks
        faults_writing(MB64)
    assert faults_writing(MB64) < 64  # 16384 pages of 4 KiB (32 of 2 MiB) when fresh


def test_fresh_memory_faults_again_once_released(kept):
    faults_writing(MB64)
    keep_freed_memory(False)  # back to mapping large blocks afresh
    assert faults_writing(MB64) >= 32


HUGE_PAGES_OF_A_FRESH_TENSOR = """
import re, torch
from aotlib.memory import advise_huge_pages
t = advise_huge_pages(torch.empty(16 << 20))
t.fill_(1.0)
smaps = open("/proc/self/smaps").read()
for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?^AnonHugePages:\\s+(\\d+)", smaps, re.M | re.S):
    if int(m[1], 16) < t.data_ptr() + 4 * t.numel() and t.data_ptr() < int(m[2], 16):
        print(m[3])  # the advice splits the tensor's mapping: its huge pages' part, and ends
"""


def test_huge_page_advice_is_taken():
    """A fresh 64 MB tensor, advised, is backed by 2 MiB pages once written (in a fresh
    process: a heap that has held and released memory keeps page tables that block them)."""
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not enabled.exists() or "[never]" in enabled.read_text():
        pytest.skip("no transparent huge pages here")
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_OF_A_FRESH_TENSOR],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert sum(int(kb) for kb in out) >= 2048  # kB: at least one 2 MiB page


def test_small_tensors_and_values_are_untouched():
    t = torch.arange(10.0)
    assert advise_huge_pages(t) is t and torch.equal(t, torch.arange(10.0))
