"""The arrow of time: how much harder the backward direction is than the forward one.

    delta = (L_BW - L_FW) / ((L_BW + L_FW) / 2)

Both losses are measured on the same validation windows (the backward windows are
the forward ones reversed), so a paired bootstrap over windows gives its interval.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------
# delta against capability: every evaluation step of a forward/backward pair
# ---------------------------------------------------------------------------
# Comparing runs at equal *steps* mixes two things: which direction is learned faster at
# first, and how hard each direction is for a model of a given skill. Comparing them at
# equal *forward loss* (the paper's capability axis: a lower loss is a more capable
# model) separates the two. The periodic evaluations of a run use the first
# `eval_windows` validation windows, the same windows in both directions (the backward
# ones reversed), so the delta of each evaluation is paired like the final one.


def _config_without_direction(result: dict) -> dict:
    cfg = dict(result["config"])
    cfg.pop("direction", None)
    return cfg


def arrow_curve(fw: dict, bw: dict):
    """delta at every evaluation step of a forward result and its backward twin.

    Returns a DataFrame with one row per evaluation: step, tokens (training tokens seen),
    L_fw, L_bw (validation losses on the same windows) and delta. Raises ValueError if the
    two results are not the two directions of one config evaluated at the same steps.
    """
    import pandas as pd

    if fw["config"]["direction"] != "forward" or bw["config"]["direction"] != "backward":
        raise ValueError("need a forward result and a backward result, in that order")
    a, b = _config_without_direction(fw), _config_without_direction(bw)
    if a != b:
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"not a forward/backward pair: their configs differ in {differ}")
    pts_fw = {h["step"]: h["val_loss"] for h in fw["history"] if "val_loss" in h}
    pts_bw = {h["step"]: h["val_loss"] for h in bw["history"] if "val_loss" in h}
    if sorted(pts_fw) != sorted(pts_bw) or not pts_fw:
        raise ValueError(
            f"the two runs were evaluated at different steps: {sorted(pts_fw)[:5]}... vs "
            f"{sorted(pts_bw)[:5]}..."
        )
    cfg = fw["config"]
    tokens_per_step = cfg["batch_size"] * cfg["data"]["context"]
    steps = sorted(pts_fw)
    return pd.DataFrame(
        {
            "step": steps,
            "tokens": [s * tokens_per_step for s in steps],
            "L_fw": [pts_fw[s] for s in steps],
            "L_bw": [pts_bw[s] for s in steps],
            "delta": [arrow_of_time(pts_fw[s], pts_bw[s]) for s in steps],
        }
    )


def seed_curves(pairs: Sequence[tuple[dict, dict]]):
    """The arrow curves of several seeds of one config, and their mean and spread.

    `pairs` holds (forward, backward) results that differ only in seed. Returns a
    DataFrame with one row per evaluation step: step, tokens, L_fw (mean over seeds),
    delta (mean over seeds), delta_se (standard error over seeds; 0 for one seed),
    n_seeds.
    """
    import pandas as pd

    if not pairs:
        raise ValueError("no (forward, backward) pairs given")
    curves = [arrow_curve(fw, bw) for fw, bw in pairs]
    base = {k: v for k, v in _config_without_direction(pairs[0][0]).items() if k != "seed"}
    for fw, _ in pairs[1:]:
        other = {k: v for k, v in _config_without_direction(fw).items() if k != "seed"}
        if other != base:
            raise ValueError("seed_curves needs runs that differ only in their seed")
    seeds = [fw["config"]["seed"] for fw, _ in pairs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the same seed appears twice: {seeds}")
    rows = []
    for step, group in pd.concat(curves).groupby("step"):
        mean, err = seed_spread(group.delta)
        rows.append({"step": step, "tokens": group.tokens.iloc[0], "L_fw": group.L_fw.mean(),
                     "delta": mean, "delta_se": err, "n_seeds": len(group)})  # fmt: skip
    return pd.DataFrame(rows)


def delta_at_loss(curve, losses: Sequence[float]) -> np.ndarray:
    """delta of an arrow curve interpolated at forward losses `losses` (NaN outside).

    Forward loss falls as training goes on, but not always monotonically: the curve is
    read in step order up to each point's running minimum, so a loss is matched the first
    time the run reaches it.
    """
    L = np.minimum.accumulate(np.asarray(curve.L_fw, dtype=np.float64))
    d = np.asarray(curve.delta, dtype=np.float64)
    keep = np.concatenate([[True], L[1:] < L[:-1]])  # strictly decreasing points
    L, d = L[keep][::-1], d[keep][::-1]  # increasing in loss, for np.interp
    x = np.asarray(losses, dtype=np.float64)
    out = np.interp(x, L, d)
    out[(x < L[0]) | (x > L[-1])] = np.nan
    return out


def window_noise(
    fw_window_losses: Sequence[float], bw_window_losses: Sequence[float], n_windows: int
) -> float:
    """Standard error of delta measured on `n_windows` validation windows (paired).

    Estimated from per-window losses of one pair: the spread of the per-window
    difference L_BW - L_FW, divided by sqrt(n_windows) and by the mean loss. It says how
    much of a single evaluation's delta is window-sampling noise.
    """
    fw = np.asarray(fw_window_losses, dtype=np.float64)
    bw = np.asarray(bw_window_losses, dtype=np.float64)
    if fw.shape != bw.shape or fw.ndim != 1 or len(fw) < 2 or n_windows < 1:
        raise ValueError("need two equal-length 1-D sequences of >= 2 losses and n_windows >= 1")
    mean = (fw.mean() + bw.mean()) / 2
    return float((bw - fw).std(ddof=1) / np.sqrt(n_windows) / mean)


def sign_test(values: Sequence[float]) -> tuple[int, int, float]:
    """How many of `values` are positive, out of how many non-zero, and the two-sided
    p-value of that count under "positive and negative equally likely" (exact binomial)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[v != 0]
    n, k = len(v), int((v > 0).sum())
    if n == 0:
        raise ValueError("no non-zero values to test")
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return k, n, min(1.0, 2 * tail)


def early_late(pairs: Sequence[tuple[dict, dict]], frac: float = 1 / 3) -> dict[str, float]:
    """Does delta rise as the models learn? delta averaged over the first and the last
    `frac` of each run's evaluations, and their difference, per seed; returned as means
    over seeds with the standard error of the change (0 for one seed).

    Keys: early, late, change, change_se, L_fw_early, L_fw_late, n_seeds.
    """
    if not 0 < frac <= 0.5:
        raise ValueError(f"frac must be in (0, 0.5], got {frac}")
    early, late, le, ll = [], [], [], []
    for fw, bw in pairs:
        c = arrow_curve(fw, bw)
        k = max(1, round(frac * len(c)))
        early.append(c.delta.iloc[:k].mean())
        late.append(c.delta.iloc[-k:].mean())
        le.append(c.L_fw.iloc[:k].mean())
        ll.append(c.L_fw.iloc[-k:].mean())
    change, change_se = seed_spread(np.subtract(late, early))
    return {"early": float(np.mean(early)), "late": float(np.mean(late)), "change": change,
            "change_se": change_se, "L_fw_early": float(np.mean(le)),
            "L_fw_late": float(np.mean(ll)), "n_seeds": len(pairs)}  # fmt: skip
