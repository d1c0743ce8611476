"""The exact-model claims of aotlib.exact: the arrow is about learnability, not information."""

from __future__ import annotations

import numpy as np
import pytest

from aotlib.exact import (
    MarkovSource,
    exact_losses,
    exact_position_losses,
    fit_kgram,
    kgram_loss,
    kgram_position_losses,
    kgram_table,
    markov_losses,
    random_markov_source,
    stationary_distribution,
)

SOURCES = [(V, L, d, start, seed) for V, L, d in [(2, 9, 2), (3, 6, 2), (4, 6, 3)]
           for start in ("fixed", "stationary") for seed in (0, 1)]  # fmt: skip


def source(V: int, L: int, d: int, start: str, seed: int) -> MarkovSource:
    return random_markov_source(V, L, d, start, np.random.default_rng(seed))


@pytest.mark.parametrize("V, L, d, start, seed", SOURCES)
def test_exact_forward_equals_exact_backward(V, L, d, start, seed) -> None:
    src = source(V, L, d, start, seed)
    ex, mk = exact_losses(src), markov_losses(src)
    assert abs(ex["forward"] - ex["backward"]) < 1e-10  # the chain rule, both ways
    assert abs(ex["forward"] - ex["entropy"]) < 1e-10
    # the closed form (Bayes-reversed chain) agrees with enumeration
    assert mk["forward"] == pytest.approx(ex["forward"], abs=1e-10)
    assert mk["backward"] == pytest.approx(ex["backward"], abs=1e-10)


def test_per_position_losses_differ_but_sum_agrees() -> None:
    src = source(4, 6, 2, "fixed", 0)
    seqs, probs = src.enumerate()
    fw = exact_position_losses(seqs, probs, "forward")
    bw = exact_position_losses(seqs, probs, "backward")
    assert abs(fw[0]) < 1e-15 and abs(bw[-1]) < 1e-15  # x_1 is known: fixed start
    assert np.abs(fw - bw[::-1]).max() > 0.05  # not a mere relabelling of positions
    assert fw.sum() == pytest.approx(bw.sum(), abs=1e-12)


def test_exact_losses_on_a_non_markov_joint() -> None:
    # The enumeration reference is not tied to Markov chains: any joint table works.
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(3**5, 0.3))
    seqs = np.array(np.unravel_index(np.arange(3**5), (3,) * 5)).T
    fw = exact_position_losses(seqs, probs, "forward").sum()
    bw = exact_position_losses(seqs, probs, "backward").sum()
    assert fw == pytest.approx(-(probs * np.log(probs)).sum(), abs=1e-10)
    assert abs(fw - bw) < 1e-10


def test_sampling_matches_marginals() -> None:
    src = source(3, 5, 2, "fixed", 1)
    x = src.sample(20_000, np.random.default_rng(0))
    freq = np.stack([np.bincount(x[:, t], minlength=3) / len(x) for t in range(5)])
    assert np.abs(freq - src.marginals()).max() < 0.02  # 5 sigma is ~0.018


def test_stationary_distribution() -> None:
    src = source(4, 3, 2, "stationary", 0)
    pi = stationary_distribution(src.transition)
    assert np.allclose(pi @ src.transition, pi) and np.allclose(src.marginals(), pi[None])


@pytest.mark.parametrize("V, L, d, start, seed", SOURCES)
def test_position_aware_kgrams_have_no_arrow(V, L, d, start, seed) -> None:
    # Any source, any order: the infinite-data position-aware k-gram is direction-symmetric.
    src = source(V, L, d, start, seed)
    seqs, probs = src.enumerate()
    for order in range(L):
        fw, bw = (
            kgram_loss(fit_kgram(seqs, order, direction, True, probs, vocab_size=V), seqs, probs)
            for direction in ("forward", "backward")
        )
        assert abs(fw - bw) < 1e-10, order


def test_shared_kgram_arrow_needs_an_out_of_equilibrium_start() -> None:
    tables = {
        start: kgram_table(source(4, 6, 2, start, 0), orders=list(range(6)))
        for start in ("fixed", "stationary")
    }
    exact = exact_losses(source(4, 6, 2, "fixed", 0))["forward"]
    shared = tables["fixed"].query("not position_aware and data == 'exact'").set_index("order")
    # forward: one shared transition table is the exact model from order 1 on
    assert np.allclose(shared.forward.iloc[1:], exact, atol=1e-12)
    # backward: the reversed chain is time-dependent, so a shared table loses, short
    # of the full context (which reaches [BOS], so knows the position)
    assert (shared.gap.iloc[1:4] > 0.1).all() and (shared.gap > -1e-12).all()
    assert abs(shared.gap.iloc[5]) < 1e-12 and abs(shared.gap.iloc[0]) < 1e-12
    # in equilibrium the reversed chain is homogeneous too: no arrow at any order
    assert tables["stationary"].query("data == 'exact'").gap.abs().max() < 1e-12


def test_full_context_kgram_fitted_on_samples_approaches_exact() -> None:
    src = source(3, 6, 2, "fixed", 0)
    seqs, probs = src.enumerate()
    exact = exact_losses(src)["forward"]
    for n, tol in [(2_000, 0.05), (100_000, 0.003)]:
        train = src.sample(n, np.random.default_rng(1))
        for direction in ("forward", "backward"):
            model = fit_kgram(train, 5, direction, alpha=0.5, vocab_size=3)
            loss = kgram_loss(model, seqs, probs)
            assert exact <= loss < exact + tol, (n, direction)


def test_kgram_counts_match_a_plain_loop() -> None:
    # Reference: count (context, next) pairs with a dict, reading each line backwards.
    src = source(3, 4, 3, "fixed", 2)
    x = src.sample(50, np.random.default_rng(0))
    model = fit_kgram(x, 1, "backward", alpha=1.0, vocab_size=3)
    counts: dict[tuple[int, int], int] = {}
    for line in x:
        prev = 3  # BOS = V
        for tok in line[::-1]:
            counts[prev, tok] = counts.get((prev, tok), 0) + 1
            prev = int(tok)
    manual = np.zeros(4)
    for line in x:
        prev = 3
        for t, tok in enumerate(line[::-1]):
            total = sum(counts.get((prev, v), 0) for v in range(3))
            manual[t] -= np.log((counts.get((prev, tok), 0) + 1.0) / (total + 3.0)) / len(x)
            prev = int(tok)
    assert np.allclose(kgram_position_losses(model, x), manual)


def test_kgram_smoothing_and_unseen_contexts() -> None:
    model = fit_kgram(np.array([[0, 0, 0]]), 1, "forward", alpha=1.0, vocab_size=3)
    # BOS was seen once (followed by 0): (0 + 1) / (1 + 3); context 1 never: uniform
    assert np.allclose(model.conditionals(np.array([[1, 2, 0]])), [[0.25, 1 / 3, 1 / 3]])
    assert np.allclose(model.conditionals(np.array([[0, 0, 1]])), [[0.5, 3 / 5, 1 / 5]])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="transition must be"):
        MarkovSource(np.ones(2) / 2, np.eye(3), 4)
    with pytest.raises(ValueError, match="probability vectors"):
        MarkovSource(np.array([0.5, 0.6]), np.eye(2), 4)
    with pytest.raises(ValueError, match="direction"):
        fit_kgram(np.zeros((2, 3), dtype=int), 1, "sideways")
    with pytest.raises(ValueError, match="too many to enumerate"):
        random_markov_source(4, 12).enumerate()
    with pytest.raises(ValueError, match="weights must have shape"):
        fit_kgram(np.zeros((2, 3), dtype=int), 1, weights=np.ones(3))
