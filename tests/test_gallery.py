"""The README's gallery shows every figure, and only figures a notebook makes.

A new figure that nobody adds to the gallery, or a gallery image whose notebook no longer
saves it (a broken image on the code host), fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def gallery() -> list[tuple[str, str]]:
    """(notebook, figure stem) for every image in the README's Gallery section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Gallery\n", 1)[1].split("\n## ", 1)[0]
    pattern = r'<a href="notebooks/([\w.]+)"><img src="figures/(\w+)\.png"'
    return re.findall(pattern, section)


def saved_by_notebooks() -> dict[str, str]:
    """Figure stem -> the notebook whose code calls save_figure(fig, "<stem>")."""
    owners = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                for stem in re.findall(r'save_figure\(\s*\w+,\s*"(\w+)"', cell.source):
                    owners[stem] = path.name
    return owners


def test_every_figure_is_in_the_gallery() -> None:
    shown = {stem for _, stem in gallery()}
    on_disk = {p.stem for p in (ROOT / "figures").glob("*.png")}
    missing = sorted(on_disk - shown)
    assert not missing, f"figures/ holds {missing}, not shown in the README gallery"


def test_gallery_images_come_from_their_notebook() -> None:
    owners = saved_by_notebooks()
    shown = gallery()
    assert len(shown) == len({stem for _, stem in shown}), "a figure is shown twice"
    for notebook, stem in shown:
        assert stem in owners, f"no notebook saves {stem}.png (a broken image in the README)"
        assert owners[stem] == notebook, f"{stem}.png links to {notebook}, made by {owners[stem]}"
    not_shown = sorted(set(owners) - {stem for _, stem in shown})
    assert not not_shown, f"notebooks save {not_shown}, not shown in the README gallery"


def test_gallery_images_exist() -> None:
    # A figure a notebook saves exists only after `make figures` ran that notebook.
    absent = [stem for _, stem in gallery() if not (ROOT / "figures" / f"{stem}.png").exists()]
    assert not absent, f"README shows {absent}, not in figures/: run `make figures`"
