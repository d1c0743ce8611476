"""Where things live: repository root, figures, results and the download cache.

Every location can be moved with an environment variable, so tests and the notebook
runner can redirect writes without touching notebook code.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def figures_dir() -> Path | None:
    """Where `save_figure` writes: the folder in `AOTLIB_FIGURES`, or None when it is unset.

    Only the notebook pipeline sets it (tools/run_notebooks.py, behind `make figures`, to
    a staging folder whose files it moves into figures/ when a notebook succeeds; `make
    nbval` to a temporary folder). A notebook run by hand leaves it unset and writes no
    file, so the committed figures/ change only through `make figures`.
    """
    folder = os.environ.get("AOTLIB_FIGURES", "")
    if not folder:
        return None
    path = Path(folder)
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
