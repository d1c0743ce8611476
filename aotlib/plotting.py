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
