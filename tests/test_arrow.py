"""delta against capability: arrow curves of forward/backward pairs, seeds, sign test."""

from __future__ import annotations

import numpy as np
import pytest

from aotlib.arrow import (
    arrow_curve,
    arrow_of_time,
    delta_at_loss,
    seed_curves,
    sign_test,
    window_noise,
)
from aotlib.experiments import both_directions, lm_config


def fake_pair(gap: float, seed: int = 0, losses=(5.0, 4.0, 3.5, 3.2), steps=(50, 100, 150, 200)):
    """A forward result and its backward twin whose loss is (1 + gap) times larger."""
    fw_cfg, bw_cfg = both_directions(lm_config("smoke", seed=seed))
    hist = lambda f: [{"step": s, "val_loss": f * L} for s, L in zip(steps, losses)]
    fw = {"config": fw_cfg.to_dict(), "history": hist(1.0)}
    bw = {"config": bw_cfg.to_dict(), "history": hist(1 + gap)}
    return fw, bw


def test_arrow_curve_recovers_a_known_gap() -> None:
    fw, bw = fake_pair(0.01)
    curve = arrow_curve(fw, bw)
    assert list(curve.step) == [50, 100, 150, 200]
    assert np.allclose(curve.delta, arrow_of_time(1.0, 1.01))  # = 0.01 / 1.005
    cfg = fw["config"]
    assert list(curve.tokens) == [
        s * cfg["batch_size"] * cfg["data"]["context"] for s in curve.step
    ]


def test_arrow_curve_rejects_unpaired_or_mismatched_runs() -> None:
    fw, bw = fake_pair(0.01)
    with pytest.raises(ValueError, match="forward result and a backward"):
        arrow_curve(bw, fw)
    other = dict(bw, config=dict(bw["config"], lr=1.0))
    with pytest.raises(ValueError, match=r"differ in \['lr'\]"):
        arrow_curve(fw, other)
    short = dict(bw, history=bw["history"][:-1])
    with pytest.raises(ValueError, match="different steps"):
        arrow_curve(fw, short)


def test_seed_curves_average_seeds_and_give_their_spread() -> None:
    pairs = [fake_pair(0.01, seed=0), fake_pair(0.03, seed=1)]
    sc = seed_curves(pairs)
    d1, d3 = arrow_of_time(1, 1.01), arrow_of_time(1, 1.03)
    assert np.allclose(sc.delta, (d1 + d3) / 2)
    assert np.allclose(sc.delta_se, abs(d3 - d1) / 2)  # s.e. of two values
    assert list(sc.n_seeds) == [2] * 4
    with pytest.raises(ValueError, match="same seed"):
        seed_curves([fake_pair(0.01), fake_pair(0.02)])
    fw, bw = fake_pair(0.01, seed=1)
    fw["config"]["lr"] = bw["config"]["lr"] = 1.0
    with pytest.raises(ValueError, match="differ only in their seed"):
        seed_curves([fake_pair(0.01), (fw, bw)])


def test_delta_at_loss_interpolates_on_the_forward_loss() -> None:
    fw, bw = fake_pair(0.0, losses=(5.0, 4.0, 4.2, 3.0))
    curve = arrow_curve(fw, bw)
    curve["delta"] = [0.0, 0.01, 0.5, 0.03]  # the bump at a loss already reached is skipped
    d = delta_at_loss(curve, [4.5, 3.5, 2.0, 6.0])
    assert np.allclose(d[:2], [0.005, 0.02]) and np.isnan(d[2:]).all()


def test_window_noise_shrinks_with_the_square_root_of_windows() -> None:
    rng = np.random.default_rng(0)
    fw = 4 + rng.normal(size=400)
    bw = fw + 0.04 + 0.1 * rng.normal(size=400)
    n128, n512 = window_noise(fw, bw, 128), window_noise(fw, bw, 512)
    assert n128 == pytest.approx(2 * n512)
    assert n128 == pytest.approx(0.1 / np.sqrt(128) / 4.02, rel=0.15)
    with pytest.raises(ValueError):
        window_noise(fw, bw[:-1], 10)


def test_sign_test_is_the_exact_binomial() -> None:
    assert sign_test([1, 2, 3, 4, 5, 6]) == (6, 6, pytest.approx(2 / 64))
    k, n, p = sign_test([0.1, -0.2, 0.3, 0.0])
    assert (k, n) == (2, 3) and p == 1.0
    with pytest.raises(ValueError):
        sign_test([0.0])


def test_paper_numbers_have_sources_and_consistent_shapes() -> None:
    from aotlib.paper import PAPER, paper_number

    for name, num in PAPER.items():
        assert num.source and num.unit, name
        assert ("read off a plot" in num.cite()) == num.read_off_plot
    n = len(paper_number("context_lengths").value)
    assert len(paper_number("context_fr").value) == len(paper_number("context_en").value) == n
    with pytest.raises(KeyError, match="known"):
        paper_number("nope")


def test_verdict_needs_two_standard_errors() -> None:
    from aotlib.paper import verdict

    assert verdict(+1, 0.009, 0.002) == "agree"
    assert verdict(+1, -0.009, 0.002) == "disagree"
    assert verdict(+1, 0.003, 0.002) == "cannot tell at this scale"
    assert verdict(+1, 0.01, 0.0) == "cannot tell at this scale"  # no error bar: no verdict
    with pytest.raises(ValueError):
        verdict(0, 0.01, 0.001)


def test_verdict_from_an_interval_needs_it_to_exclude_zero() -> None:
    from aotlib.paper import verdict_interval

    assert verdict_interval(+1, 0.001, 0.02) == "agree"
    assert verdict_interval(-1, 0.001, 0.02) == "disagree"
    assert verdict_interval(+1, -0.001, 0.02) == "cannot tell at this scale"
    with pytest.raises(ValueError):
        verdict_interval(+1, 0.02, 0.01)


def test_early_late_measures_the_change_of_delta_over_training() -> None:
    from aotlib.arrow import early_late

    fw, bw = fake_pair(0.0)
    bw["history"] = [dict(h, val_loss=h["val_loss"] * g) for h, g in
                     zip(bw["history"], (1.0, 1.0, 1.02, 1.02))]  # fmt: skip
    out = early_late([(fw, bw)], frac=0.5)
    assert out["early"] == 0 and out["late"] == pytest.approx(arrow_of_time(1, 1.02))
    assert out["change"] == pytest.approx(out["late"]) and out["change_se"] == 0
    assert out["L_fw_early"] == pytest.approx(4.5) and out["n_seeds"] == 1
    with pytest.raises(ValueError):
        early_late([(fw, bw)], frac=0.9)


def test_paper_size_points_share_our_parameter_axis() -> None:
    from aotlib.paper import size_points

    gpt = size_points("gpt")
    assert 80_000 < gpt[0][0] < 90_000  # GPT nano: about 83k non-embedding parameters
    assert [d for _, d in gpt] == [-0.3, 0.2, 0.75]  # per mille -> per cent
    assert all(a[0] < b[0] for a, b in zip(gpt, gpt[1:]))
