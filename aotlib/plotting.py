"""Figure helpers shared by the notebooks: one style, one place figures are saved."""

from __future__ import annotations

import matplotlib.pyplot as plt

from aotlib.paths import figures_dir

SCALES = ("smoke", "cpu", "paper")


def check_scale(scale: str) -> str:
    """Validate the notebooks' single scale switch."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def save_figure(fig: plt.Figure, name: str) -> str:
    """Save `fig` as figures/<name>.png (or under AOTLIB_FIGURES) and return the file name."""
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name must be a bare stem like '01_ssd_mask', got {name!r}")
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
    return path.name


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
