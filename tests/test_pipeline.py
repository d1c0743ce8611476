"""The notebook pipeline: safe to edit, writes figures only when asked, same bytes twice.

- `save_figure` writes only where `make figures` says (AOTLIB_FIGURES); a notebook run
  by hand shows its figure inline and leaves figures/ as committed.
- tools/run_notebooks.py folds papermill's injected parameters into the `parameters`
  cell and drops per-run metadata, so two runs of the same code give the same bytes.
- Plotted values at the rounding floor are clipped, so they do not follow thread counts.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nbformat
import pytest
import torch

from aotlib.plotting import save_figure
from aotlib.provenance import code_version, provenance_line
from aotlib.ssd import offdiagonal_singular_values, random_ssd_inputs, ssd_matrix

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from run_notebooks import fold_parameters, tidy  # noqa: E402


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def small_figure(label: str = "x") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 4], label=label)
    ax.set_xlabel("step")
    ax.legend()
    return fig


def png_chunks(data: bytes) -> list[bytes]:
    kinds, i = [], 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i : i + 8])
        kinds.append(kind)
        i += 12 + n
    return kinds


# ---------------------------------------------------------------------------
# Safe to edit: figures/ changes only through `make figures`
# ---------------------------------------------------------------------------


def test_save_figure_without_pipeline_writes_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AOTLIB_FIGURES", raising=False)
    monkeypatch.chdir(tmp_path)
    before = snapshot(ROOT / "figures")
    fig = small_figure()
    assert save_figure(fig, "zz_by_hand") is None  # None: a cell ending on it prints nothing
    plt.close(fig)
    assert snapshot(ROOT / "figures") == before
    assert list(tmp_path.iterdir()) == []


def test_notebook_run_by_hand_shows_figure_and_leaves_figures_untouched(monkeypatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.delenv("AOTLIB_FIGURES", raising=False)  # the kernel inherits this env
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('scale = "smoke"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import matplotlib.pyplot as plt\n"
            "from aotlib.plotting import check_scale, save_figure\n"
            "check_scale(scale)\n"
            "fig, ax = plt.subplots(figsize=(3, 2))\n"
            "ax.plot([0, 1, 4])\n"
            'save_figure(fig, "zz_by_hand")'
        ),
    ]
    before = snapshot(ROOT / "figures")
    where = {"metadata": {"path": str(ROOT / "notebooks")}}  # the cwd of a JupyterLab run
    NotebookClient(nb, timeout=120, kernel_name="python3", resources=where).execute()
    outputs = nb.cells[1].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), "figure shown inline"
    assert not [o for o in outputs if o.output_type == "execute_result"], "no stray output"
    assert snapshot(ROOT / "figures") == before


def test_save_figure_in_pipeline_is_stamped_and_deterministic(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AOTLIB_FIGURES", str(tmp_path))
    monkeypatch.setenv("AOTLIB_SCALE", "smoke")
    fig = small_figure()
    texts = list(fig.texts)
    save_figure(fig, "a")
    save_figure(fig, "b")
    save_figure(fig, "c", scale="paper")
    save_figure(fig, "d", device="Intel Xeon, 1 thread")
    assert fig.texts == texts, "the provenance line is removed after saving"
    plt.close(fig)
    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    assert a.read_bytes() == b.read_bytes()
    # The small print is drawn: another scale or a device gives other pixels.
    assert c.read_bytes() != a.read_bytes() and d.read_bytes() != a.read_bytes()
    # No text chunk (matplotlib's Software tag) and no time chunk in the PNG.
    assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(png_chunks(a.read_bytes()))


def test_provenance_is_stable() -> None:
    line = provenance_line("cpu", "Intel Xeon")
    assert line == f"aotlib {code_version()} · scale cpu · device Intel Xeon"
    assert code_version() == code_version()
    assert not re.search(r"\d\d:\d\d", line), "no time of day: it would change every run"


# ---------------------------------------------------------------------------
# Reproducible to the byte
# ---------------------------------------------------------------------------


def executed(params: str, injected: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    i = nbformat.v4.new_code_cell("# Parameters\n" + injected)
    i.metadata["tags"] = ["injected-parameters"]
    nb.cells = [p, i, nbformat.v4.new_code_cell("print(scale)")]
    for n, cell in enumerate(nb.cells, start=5):  # counts as after a few manual runs
        cell.execution_count = n
        cell.metadata["papermill"] = {"duration": 0.1, "start_time": "2026-01-01T00:00:00"}
        cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    nb.metadata["papermill"] = {"duration": 7.1, "input_path": "/somewhere"}
    return nb


def test_fold_parameters_keeps_one_cell_with_the_run_value() -> None:
    nb = executed(
        'scale = "cpu"  # smoke | cpu | paper\nsizes = dict(\n    a=1,\n)\nseed = 0',
        'scale = "smoke"\nsizes = {"a": 2}\nextra = [1, 2]\n',
    )
    fold_parameters(nb)
    assert len(nb.cells) == 2
    assert nb.cells[0].source == (
        'scale = "smoke"  # smoke | cpu | paper\nsizes = {"a": 2}\nseed = 0\nextra = [1, 2]'
    )
    fold_parameters(nb)  # nothing left to fold
    assert len(nb.cells) == 2
    # Without a parameters cell, papermill's injected one (put first) becomes it.
    nb = executed("", 'scale = "smoke"\n')
    del nb.cells[0]
    fold_parameters(nb)
    assert nb.cells[0].metadata["tags"] == ["parameters"]
    assert nb.cells[0].source == 'scale = "smoke"'


def test_tidy_drops_run_metadata_and_renumbers() -> None:
    nb = executed('scale = "cpu"', 'scale = "smoke"\n')
    out = nbformat.v4.new_output
    nb.cells[2].outputs = [  # one print, split in two by the kernel's timing
        out("stream", name="stdout", text="a\n"),
        out("stream", name="stdout", text="b\n"),
        out("stream", name="stderr", text="warning\n"),
    ]
    nb = tidy(nb)
    assert [(o.name, o.text) for o in nb.cells[1].outputs] == [
        ("stdout", "a\nb\n"),
        ("stderr", "warning\n"),
    ]
    assert "papermill" not in nb.metadata
    assert [c.execution_count for c in nb.cells] == [1, 2]
    assert all(not ({"papermill", "execution"} & set(c.metadata)) for c in nb.cells)
    assert nb.cells[0].metadata["tags"] == ["parameters"]


@pytest.mark.slow
def test_two_pipeline_runs_give_identical_bytes(tmp_path: Path) -> None:
    # Notebook 08 at the smoke scale: seconds, no training, one figure.
    runs = []
    for name in ("first", "second"):
        out, figs = tmp_path / name / "nb", tmp_path / name / "figures"
        cmd = [sys.executable, str(ROOT / "tools" / "run_notebooks.py"), "--scale", "smoke"]
        cmd += ["--only", "08", "--out", str(out), "--figures", str(figs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
        runs.append((snapshot(out), snapshot(figs)))
        nb = nbformat.read(out / "08_exact_model.ipynb", as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and 'scale = "smoke"' in params[0].source
        assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    (nb_a, fig_a), (nb_b, fig_b) = runs
    assert list(nb_a) == ["08_exact_model.ipynb"] and fig_a, "one notebook and its figures"
    assert nb_a == nb_b, "executed notebook differs between two runs"
    assert fig_a == fig_b, "figures differ between two runs"


def test_singular_values_below_rounding_floor_are_clipped() -> None:
    # Notebook 01's rank figure: past N the singular values are rounding noise, whose
    # digits follow LAPACK's thread count; they come back as the floor eps*max(shape)*s0.
    inp = random_ssd_inputs(1, 128, 1, 1, 1, 8, seed=1, dt_scale=0.1)
    M = ssd_matrix(inp["dt"], inp["A"], inp["B"], inp["C"])[0, 0]  # (128, 128)
    threads = torch.get_num_threads()
    try:
        per_threads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            per_threads.append(offdiagonal_singular_values(M, 32))  # (96 x 32) block: 32 values
    finally:
        torch.set_num_threads(threads)
    for s in per_threads:
        floor = torch.finfo(s.dtype).eps * 96 * s[0]
        assert (s[:8] > 1e-6 * s[0]).all() and (s[8:] == floor).all()
    one, two = per_threads
    torch.testing.assert_close(one / one[0], two / two[0], rtol=1e-12, atol=0)
