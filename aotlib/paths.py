"""Where things live: repository root, figures, results and the download cache.

Every location can be moved with an environment variable, so tests and the notebook
runner can redirect writes without touching notebook code.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def figures_dir() -> Path:
    """Figures go here (`AOTLIB_FIGURES`); the notebook runner points it at a staging folder."""
    path = Path(os.environ.get("AOTLIB_FIGURES", ROOT / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(scale: str) -> Path:
    """Stored training results for one scale; `results/smoke` is not committed."""
    path = Path(os.environ.get("AOTLIB_RESULTS", ROOT / "results")) / scale
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Downloads, extracted corpora, tokenizers and checkpoints (`AOTLIB_CACHE`), outside git."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aotlib"
    path = Path(os.environ.get("AOTLIB_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh() -> bool:
    """True when stored results must be recomputed (`make figures FRESH=1`)."""
    return os.environ.get("AOTLIB_FRESH", "") not in ("", "0")
