"""The nbval references in tests/nbval must run the same code as notebooks/.

nbval re-executes the committed smoke-scale copies; if a notebook changed without
`make nbval-refs`, CI would test stale code. This test catches that.
"""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [
        c.source
        for c in nb.cells
        if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])
    ]


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
