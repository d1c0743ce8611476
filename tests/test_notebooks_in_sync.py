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


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_a_title_and_an_introduction(notebook: Path) -> None:
    # A reader opening the notebook meets the paper's claim before any code: the first
    # cell is markdown, a level-1 title, then an introduction (claim, data, what is plotted).
    first = nbformat.read(notebook, as_version=4).cells[0]
    assert first.cell_type == "markdown", "the first cell is the title and introduction"
    assert first.source.startswith("# "), "the first cell starts with a level-1 title"
    assert len(first.source.split()) >= 100, "the introduction says the claim, data and plot"


@pytest.mark.parametrize("notebook", EXECUTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_stray_cell_values(notebook: Path) -> None:
    # A cell that ends in a bare expression (a string, a path, a return value) prints it
    # as Out[n]; the notebooks print what they mean to show and end other cells quietly.
    nb = nbformat.read(notebook, as_version=4)
    stray = [
        (i, o.data.get("text/plain", "")[:40])
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "execute_result" and "text/html" not in o.data
    ]
    assert not stray, f"cells print a stray value: {stray}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_executed(notebook: Path) -> None:
    # A reader opening notebooks/ in JupyterLab or on a code host sees the results
    # without running anything: `make figures` left outputs in every code cell that prints.
    nb = nbformat.read(notebook, as_version=4)
    assert any(c.outputs for c in nb.cells if c.cell_type == "code"), (
        f"{notebook.name} has no outputs: run `make figures ONLY={notebook.name[:2]}`"
    )
