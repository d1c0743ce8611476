"""Provenance printed under every saved figure: scale, code version and (for timings) device.

Only what does not change between two runs of the same code on the same data, so that
`make figures` twice leaves the tree clean (byte-identical PNGs):

- the code version is the short hash and date of the last commit that changed the
  library (aotlib/), not of HEAD: committing the regenerated figures and notebooks makes
  a new HEAD but must not make them stale. "+dirty" marks uncommitted library changes;
  commit those first, then run `make figures`.
- no wall-clock date: the date printed is that commit's date.
"""

from __future__ import annotations

import subprocess

from aotlib import __version__
from aotlib.paths import ROOT


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version() -> str:
    """'<short hash> (<commit date>)' of the last commit touching aotlib/, '+dirty' if the
    library has uncommitted changes; 'v<package version>' outside a git checkout."""
    stamp = _git("log", "-1", "--format=%h (%cs)", "--", "aotlib")
    if not stamp:
        return f"v{__version__}"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "aotlib")
    if dirty:
        commit, date = stamp.split(" ", 1)
        stamp = f"{commit}+dirty {date}"
    return stamp


def provenance_line(scale: str | None = None, device: str | None = None) -> str:
    """One line of small print, e.g. 'aotlib 72a23c1 (2026-12-03) · scale cpu'."""
    parts = [f"aotlib {code_version()}"]
    if scale:
        parts.append(f"scale {scale}")
    if device:
        parts.append(f"device {device}")
    return " · ".join(parts)
