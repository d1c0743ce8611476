"""Figure helpers shared by the notebooks: one style, one place figures are saved."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt

from aotlib.paths import figures_dir
from aotlib.provenance import provenance_line

SCALES = ("smoke", "cpu", "paper")


def check_scale(scale: str) -> str:
    """Validate the notebooks' single scale switch."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def save_figure(
    fig: plt.Figure, name: str, *, scale: str | None = None, device: str | None = None
) -> None:
    """Save `fig` as <name>.png when the notebook pipeline asks for files; else do nothing.

    Files are written only under the folder in `AOTLIB_FIGURES`, which `make figures`
    (tools/run_notebooks.py) points at a staging folder that it moves into figures/ once
    the notebook succeeds. A notebook run by hand (JupyterLab, any scale) leaves it unset:
    the figure still shows inline, and figures/ keeps the committed files, so those
    change only through `make figures`. Set AOTLIB_FIGURES yourself to keep a copy.

    The saved file carries one line of provenance in small print under the figure:
    the code version (last commit of aotlib/, with its date), the scale (`scale`, else
    `AOTLIB_SCALE`, which the pipeline sets) and, for timing figures, `device`. Nothing
    volatile (no clock time, no Software tag in the PNG): the same code and data give
    the same bytes, so a second `make figures` leaves git clean. The line is removed
    again after saving, so the inline figure is the same with or without the pipeline.
    Returns None, so a call that ends a cell prints nothing.
    """
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name must be a bare stem like '01_ssd_mask', got {name!r}")
    folder = figures_dir()
    if folder is None:
        return
    line = provenance_line(scale or os.environ.get("AOTLIB_SCALE"), device)
    stamp = _small_print_below(fig, line)
    try:
        fig.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight", metadata=PNG_METADATA)
    finally:
        stamp.remove()


# PNG text chunks: matplotlib writes only "Software" (its version) unless told otherwise;
# None drops it, so upgrading matplotlib alone does not rewrite every figure.
PNG_METADATA = {"Software": None}


def _small_print_below(fig: plt.Figure, text: str):
    """Add `text` in small grey print under everything already drawn in `fig`."""
    fig.draw_without_rendering()  # run the layout engine first: it moves the axes
    box = fig.get_tightbbox()  # inches, all artists (labels, legends outside the axes)
    w, h = fig.get_size_inches()
    # In figure fractions (the coordinates bbox_inches="tight" shifts), 0.05 in below.
    return fig.text(box.x1 / w, (box.y0 - 0.05) / h, text, ha="right", va="top",
                    fontsize=6, color="0.45")  # fmt: skip


def plot_curves(ax, fw: dict, bw: dict, label: str = "", key: str = "val_loss") -> None:
    """Forward (solid) and backward (dashed) validation-loss curves of two stored results."""
    for result, style, name in ((fw, "-", "forward"), (bw, "--", "backward")):
        pts = [(h["step"], h[key]) for h in result["history"] if key in h]
        steps, losses = zip(*pts)
        ax.plot(steps, losses, style, label=f"{label} {name}".strip())
    ax.set(xlabel="training step", ylabel="validation loss (nats/token)")


def plot_delta(ax, x, rows, **kwargs) -> None:
    """delta in % with its 95% interval as error bars, for rows of an arrow table."""
    d, lo, hi = rows.delta.to_numpy(), rows.lo.to_numpy(), rows.hi.to_numpy()
    ax.errorbar(x, 100 * d, yerr=[100 * (d - lo), 100 * (hi - d)], **kwargs)


def plot_delta_seeds(ax, rows, x: str, color: str, label: str):
    """One dot per seed (with its window-bootstrap interval) and the mean over seeds as a
    line, against column `x` of an arrow table on a log axis. Returns the mean delta per x.

    Seeds sit side by side (a few percent apart in x) so their error bars stay readable.
    """
    seeds = sorted(rows.seed.unique())
    for j, seed in enumerate(seeds):
        srows = rows[rows.seed == seed].sort_values(x)
        shift = 1.04 ** (j - (len(seeds) - 1) / 2)
        plot_delta(ax, srows[x].to_numpy() * shift, srows, fmt="o", ms=3, capsize=2,
                   color=color, alpha=0.6)  # fmt: skip
    mean = rows.groupby(x).delta.mean()
    ax.plot(mean.index, 100 * mean.to_numpy(), "-", color=color, label=label)
    return mean


def seeds_agree_on_sign(rows, by: str) -> bool | None:
    """Whether every group of an arrow table (by column `by`) has the same sign of delta
    in all its seeds; None with a single seed, where the question does not arise."""
    if rows.seed.nunique() < 2:
        return None
    return bool(rows.groupby(by).delta.agg(lambda d: len(set(d > 0)) == 1).all())


def plot_delta_vs_loss(ax, pairs, color: str, label: str, x: str = "L_fw"):
    """delta against the forward validation loss (the capability axis) for the seeds of
    one config: each seed as a thin line, their mean as a thick line with a band of one
    standard error over seeds. `pairs` holds (forward, backward) results differing only in
    seed; x="tokens" plots against training tokens instead. Returns the mean curve.

    With x="L_fw" the axis is inverted, so capability grows to the right; the mean's x is
    the mean forward loss over seeds at each evaluation step.
    """
    from aotlib.arrow import arrow_curve, seed_curves

    for fw, bw in pairs:
        c = arrow_curve(fw, bw)
        ax.plot(c[x], 100 * c.delta, "-", color=color, lw=0.7, alpha=0.35)
    mean = seed_curves(pairs)
    d, se = 100 * mean.delta, 100 * mean.delta_se
    n = int(mean.n_seeds.min())
    ax.plot(mean[x], d, "-", color=color, lw=2, label=f"{label} ({n} seed{'s' * (n > 1)})")
    if n > 1:
        ax.fill_between(mean[x], d - se, d + se, color=color, alpha=0.2, lw=0)
    ax.axhline(0, color="gray", lw=0.8)
    if x == "L_fw" and not ax.xaxis_inverted():
        ax.invert_xaxis()
    xlabel = "forward validation loss (nats/token; capability ->)" if x == "L_fw" else x
    ax.set(xlabel=xlabel, ylabel="delta [%]")
    return mean
