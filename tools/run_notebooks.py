"""Execute the notebooks in order with papermill: the engine behind `make figures`.

For each notebook the figures are written to a staging folder first (AOTLIB_FIGURES;
`aotlib.plotting.save_figure` writes nothing when it is unset, as in a notebook run by
hand) and moved into figures/ only when every cell succeeded, so a failing cell leaves
the previous figures (and the previous executed notebook) as they were.

Executed notebooks are tidied before they are written (`tidy`), so that they are safe to
edit and the same code and data give the same bytes (a second `make figures` leaves git
clean): papermill's injected "# Parameters" cell is folded into the cell tagged
`parameters` (which then holds the value the notebook ran with), and run-dependent
metadata (papermill's and the kernel's timestamps and durations, input and output paths)
is dropped; execution counts are renumbered 1, 2, ... in cell order, and consecutive
prints are joined into one stream output (the kernel splits them by timing).

    python tools/run_notebooks.py                  # default (cpu) scale, in place
    python tools/run_notebooks.py --only 01 02     # a subset, by prefix
    python tools/run_notebooks.py --scale smoke --out tests/nbval   # nbval references
    python tools/run_notebooks.py --tidy notebooks/08_exact_model.ipynb  # tidy, no run
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def _assignments(source: str) -> dict[str, ast.Assign]:
    """`name = value` statements of a cell, by name (later ones win, as when run)."""
    return {
        node.targets[0].id: node
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
    }


def fold_parameters(nb: nbformat.NotebookNode) -> None:
    """Fold papermill's injected cell into the cell tagged `parameters`, then drop it.

    Each `name = value` line papermill injected replaces that name's assignment in the
    `parameters` cell (a trailing comment on it is kept), or is appended when the cell
    has none; so the notebook keeps one parameters cell, holding what it ran with, and a
    reader who edits it and runs all cells runs with the edit.
    """
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    if not injected:
        return
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(injected) == 1 and not params:  # papermill put it first: it becomes the one
        injected[0].metadata["tags"] = ["parameters"]
        injected[0].source = injected[0].source.removeprefix("# Parameters\n").strip()
        return
    if len(params) != 1 or len(injected) != 1:
        raise ValueError("need exactly one 'parameters' and one 'injected-parameters' cell")
    cell, src = params[0], injected[0].source
    values = {name: ast.get_source_segment(src, node) for name, node in _assignments(src).items()}
    lines = cell.source.splitlines()
    for name, node in sorted(_assignments(cell.source).items(), key=lambda kv: -kv[1].lineno):
        if name in values:  # bottom-up, so earlier line numbers stay valid
            head = lines[node.lineno - 1][: node.col_offset]
            tail = lines[node.end_lineno - 1][node.end_col_offset :]  # e.g. a comment
            lines[node.lineno - 1 : node.end_lineno] = [head + values.pop(name) + tail]
    cell.source = "\n".join(lines + list(values.values()))  # names the cell did not assign
    nb.cells.remove(injected[0])


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """An executed notebook without what changes from run to run (see the module docstring)."""
    fold_parameters(nb)
    nb.metadata.pop("papermill", None)
    count = 0
    for cell in nb.cells:
        for key in ("papermill", "execution"):  # timings of papermill and of the kernel
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
        if cell.cell_type != "code":
            continue
        if cell.execution_count is not None:
            count += 1
            cell.execution_count = count
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out.execution_count = cell.execution_count
        cell.outputs = _merge_streams(cell.outputs)
    return nb


def _merge_streams(outputs: list) -> list:
    """One stream output per run of prints: how the kernel splits them depends on timing."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and out.output_type == prev.output_type == "stream"
            and out.name == prev.name
        ):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def tidy_file(path: Path) -> None:
    """Tidy an executed notebook in place (no execution)."""
    nb = tidy(nbformat.read(path, as_version=4))
    nbformat.write(nb, path)


def run(notebook: Path, scale: str, out_dir: Path, figures: Path | None, fresh: bool) -> None:
    """Execute `notebook` at `scale` into out_dir (tidied); move its figures to `figures`."""
    with tempfile.TemporaryDirectory() as staging:
        env = {
            "AOTLIB_FIGURES": staging,
            "AOTLIB_SCALE": scale,
            "AOTLIB_FRESH": "1" if fresh else "0",
        }
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
        tidy_file(tmp_out)
        os.replace(tmp_out, out_dir / notebook.name)
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            for png in sorted(Path(staging).glob("*.png")):
                shutil.move(str(png), figures / png.name)
                print(f"  figure  {figures / png.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes")
    parser.add_argument("--out", type=Path, default=None, help="write executed copies here")
    parser.add_argument("--fresh", action="store_true", help="recompute stored results")
    parser.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="move the figures here (default: figures/ when running in place, none with --out)",
    )
    parser.add_argument(
        "--tidy", nargs="+", type=Path, default=None, help="only tidy these executed notebooks"
    )
    args = parser.parse_args()
    if args.tidy:
        for path in args.tidy:
            tidy_file(path)
            print(f"tidied  {path}")
        return 0

    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
    if not notebooks:
        print("no notebook matched", file=sys.stderr)
        return 2
    out_dir = args.out or NOTEBOOKS
    out_dir.mkdir(parents=True, exist_ok=True)
    # Executed reference copies (nbval) keep their figures out of figures/.
    figures = args.figures or (None if args.out else ROOT / "figures")
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
