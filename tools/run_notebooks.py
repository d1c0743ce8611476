"""Execute the notebooks in order with papermill: the engine behind `make figures`.

For each notebook the figures are written to a staging folder first and moved into
figures/ only when every cell succeeded, so a failing cell leaves the previous figures
(and the previous executed notebook) as they were.

    python tools/run_notebooks.py                  # default (cpu) scale, in place
    python tools/run_notebooks.py --only 01 02     # a subset, by prefix
    python tools/run_notebooks.py --scale smoke --out tests/nbval   # nbval references
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def run(notebook: Path, scale: str, out_dir: Path, figures: Path | None, fresh: bool) -> None:
    with tempfile.TemporaryDirectory() as staging:
        env = {"AOTLIB_FIGURES": staging, "AOTLIB_FRESH": "1" if fresh else "0"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        tmp_out = out_dir / f".tmp-{notebook.name}"
        try:
            papermill.execute_notebook(
                str(notebook),
                str(tmp_out),
                parameters={"scale": scale},
                cwd=str(NOTEBOOKS),
                kernel_name="python3",
                progress_bar=False,
            )
        except Exception:
            tmp_out.unlink(missing_ok=True)
            raise
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        os.replace(tmp_out, out_dir / notebook.name)
        if figures is not None:
            figures.mkdir(exist_ok=True)
            for png in sorted(Path(staging).glob("*.png")):
                shutil.move(str(png), figures / png.name)
                print(f"  figure  figures/{png.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes")
    parser.add_argument("--out", type=Path, default=None, help="write executed copies here")
    parser.add_argument("--fresh", action="store_true", help="recompute stored results")
    args = parser.parse_args()

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
    if not notebooks:
        print("no notebook matched", file=sys.stderr)
        return 2
    out_dir = args.out or NOTEBOOKS
    out_dir.mkdir(parents=True, exist_ok=True)
    # Executed reference copies (nbval) keep their figures out of figures/.
    figures = None if args.out else ROOT / "figures"
    for nb in notebooks:
        print(f"{nb.name} (scale={args.scale})", flush=True)
        try:
            run(nb, args.scale, out_dir, figures, args.fresh)
        except papermill.PapermillExecutionError as err:
            print(f"FAILED {nb.name}: {err.ename}: {err.evalue}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
