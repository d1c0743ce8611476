"""The nbval references in tests/nbval must run the same code as notebooks/.

nbval re-executes the committed smoke-scale copies; if a notebook changed without
`make nbval-refs`, CI would test stale code. This test catches that.
"""

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(path: Path) -> list[str]:
    """The code a notebook runs; of its parameters cell only the names it sets, since the
    references hold the value they ran with (scale = "smoke")."""
    nb = nbformat.read(path, as_version=4)
    cells = []
    for c in nb.cells:
        tags = c.metadata.get("tags", [])
        if c.cell_type != "code" or "injected-parameters" in tags:
            continue
        if "parameters" in tags:
            names = [n.targets[0].id for n in ast.parse(c.source).body if isinstance(n, ast.Assign)]
            cells.append(f"parameters: {sorted(names)}")
        else:
            cells.append(c.source)
    return cells


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_reference_is_current(notebook: Path) -> None:
    ref = ROOT / "tests" / "nbval" / notebook.name
    assert ref.exists(), f"missing nbval reference; run `make nbval-refs` for {notebook.name}"
    assert code_cells(ref) == code_cells(notebook), f"{ref} is stale: run `make nbval-refs`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_has_parameters_cell_with_scale(notebook: Path) -> None:
    nb = nbformat.read(notebook, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert "scale" in params[0].source


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_no_sys_path_edits(notebook: Path) -> None:
    text = notebook.read_text()
    assert "sys.path" not in text, "aotlib is installed editable; notebooks must not edit sys.path"


EXECUTED = NOTEBOOKS + sorted((ROOT / "tests" / "nbval").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", EXECUTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_executed_notebook_is_tidy(notebook: Path) -> None:
    # tools/run_notebooks.py folds papermill's injected cell into the parameters cell (so
    # editing `scale` there and running all cells runs at the new scale) and drops
    # per-run timings (so re-running unchanged code leaves git clean).
    nb = nbformat.read(notebook, as_version=4)
    tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
    assert "injected-parameters" not in tags, "papermill's injected cell is still there"
    assert "papermill" not in nb.metadata, "papermill's run metadata (times, paths) is still there"
    timed = [i for i, c in enumerate(nb.cells) if {"papermill", "execution"} & set(c.metadata)]
    assert not timed, f"cells {timed} keep per-run timings"
    if notebook.parent.name == "nbval":
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assert 'scale = "smoke"' in params.source, "nbval references run at the smoke scale"
