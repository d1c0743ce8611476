"""The arrow of time: how much harder the backward direction is than the forward one.

    delta = (L_BW - L_FW) / ((L_BW + L_FW) / 2)

Both losses are measured on the same validation windows (the backward windows are
the forward ones reversed), so a paired bootstrap over windows gives its interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def arrow_of_time(loss_fw: float, loss_bw: float) -> float:
    """delta = (L_BW - L_FW) / mean(L_BW, L_FW); positive when backward is harder."""
    if loss_fw <= 0 or loss_bw <= 0:
        raise ValueError(f"losses must be positive, got {loss_fw}, {loss_bw}")
    return (loss_bw - loss_fw) / ((loss_bw + loss_fw) / 2)


def paired_bootstrap(
    fw_window_losses: Sequence[float],
    bw_window_losses: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """delta and its percentile interval, resampling validation windows in pairs."""
    fw = np.asarray(fw_window_losses, dtype=np.float64)
    bw = np.asarray(bw_window_losses, dtype=np.float64)
    if fw.shape != bw.shape or fw.ndim != 1 or len(fw) < 2:
        raise ValueError(
            f"need two equal-length 1-D sequences of >= 2 window losses, got {fw.shape} and "
            f"{bw.shape}"
        )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(fw), size=(n_boot, len(fw)))  # (n_boot, M)
    f, b = fw[idx].mean(1), bw[idx].mean(1)  # (n_boot,)
    boots = (b - f) / ((b + f) / 2)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return arrow_of_time(fw.mean(), bw.mean()), float(lo), float(hi)


def seed_spread(deltas: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of delta across seeds (0 error for one seed)."""
    d = np.asarray(deltas, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no deltas given")
    err = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
    return float(d.mean()), float(err)


def arrow_from_results(fw: dict, bw: dict, n_boot: int = 2000) -> dict[str, float]:
    """delta with its paired-bootstrap interval from two stored results (see aotlib.results)."""
    if fw["config"]["direction"] != "forward" or bw["config"]["direction"] != "backward":
        raise ValueError("need a forward result and a backward result, in that order")
    d, lo, hi = paired_bootstrap(fw["val_window_losses"], bw["val_window_losses"], n_boot)
    return {"L_fw": fw["final_val_loss"], "L_bw": bw["final_val_loss"], "delta": d,
            "lo": lo, "hi": hi}  # fmt: skip


def format_arrow_table(table, columns: list[str]) -> str:
    """`columns` of an `aotlib.results.arrow_table`, then L_fw, L_bw, delta and its CI in %."""
    out = table[columns + ["L_fw", "L_bw"]].round(3)
    out["delta_%"] = (100 * table.delta).round(2)
    out["CI_%"] = [f"{100 * lo:+.2f} .. {100 * hi:+.2f}" for lo, hi in zip(table.lo, table.hi)]
    return out.to_string(index=False)
