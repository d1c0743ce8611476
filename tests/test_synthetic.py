"""The synthetic languages and GF(2) algebra: each test checks one claim of aotlib.synthetic/gf2."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aotlib import gf2
from aotlib.synthetic import (
    binary_entropy,
    count_prime_pairs,
    linear_lines,
    linear_matrices,
    linear_noise_entropy,
    linear_noise_floor,
    parse_linear_line,
    parse_primes_line,
    primes_below,
    primes_line_length,
    primes_position_roles,
    synthetic_lines,
)


def is_prime(m: int) -> bool:
    return m >= 2 and all(m % d for d in range(2, math.isqrt(m) + 1))


# ------------------------------------------------------------------------------ GF(2)


def test_rank_is_over_gf2_not_the_reals() -> None:
    # Rows 110, 011, 101 sum to zero mod 2: rank 2 over GF(2), rank 3 over the reals.
    M = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    assert np.linalg.matrix_rank(M) == 3
    assert gf2.rank(M) == 2
    with pytest.raises(ValueError, match="singular"):
        gf2.inverse(M)


@pytest.mark.parametrize("n, k", [(1, 0), (5, 3), (20, 6), (30, 120)])
def test_random_sparse_invertible_and_inverse(n: int, k: int) -> None:
    A = gf2.random_sparse_invertible(n, k, np.random.default_rng(n + k))
    assert A.dtype == np.uint8 and A.shape == (n, n)
    assert (np.diag(A) == 1).all() and int(A.sum()) == n + k  # identity plus k ones
    A_inv = gf2.inverse(A)
    eye = np.eye(n, dtype=np.uint8)
    assert (gf2.matmul(A, A_inv) == eye).all() and (gf2.matmul(A_inv, A) == eye).all()


def test_random_sparse_invertible_resamples_singular_draws() -> None:
    # With ones on both sides of the diagonal many draws are singular (n=3, k=4 often is);
    # every returned matrix must still be invertible, and the search deterministic.
    draws = [gf2.random_sparse_invertible(3, 4, np.random.default_rng(s)) for s in range(30)]
    assert all(gf2.rank(A) == 3 for A in draws)
    again = gf2.random_sparse_invertible(3, 4, np.random.default_rng(7))
    assert (again == draws[7]).all()
    with pytest.raises(ValueError, match="k must be"):
        gf2.random_sparse_invertible(3, 7, np.random.default_rng(0))


def test_density_definitions() -> None:
    A = np.eye(4, dtype=np.uint8)
    A[0, 1] = 1
    assert gf2.density(A) == 5 / 16
    assert gf2.density(A, off_diagonal=True) == 1 / 12


def test_inverse_density_curve_inverse_gets_dense() -> None:
    df = gf2.inverse_density_curve(n=30, ks=[0, 60], trials=5, rng=np.random.default_rng(0))
    assert list(df.columns[:4]) == ["k", "density_A", "density_inverse", "spread"]
    first, last = df.iloc[0], df.iloc[-1]
    assert first.density_inverse == pytest.approx(1 / 30) and first.spread == 0
    assert last.density_A == pytest.approx(90 / 900)
    assert last.density_inverse > 2.5 * last.density_A  # sparsity symmetry breaking


# ----------------------------------------------------------------------------- primes


def test_primes_below() -> None:
    assert primes_below(30).tolist() == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert len(primes_below(10**5)) == 9592


def test_primes_lines_parse_back_to_correct_products() -> None:
    train, val, alphabet = synthetic_lines("primes", seed=3, n_train=500, n_val=100)
    assert len(train) == 500 and len(val) == 100
    assert {len(line) for line in train + val} == {primes_line_length(5)} == {30}
    assert set("".join(train + val)) <= set(alphabet)
    for line in train[:100] + val:
        p, q, product = parse_primes_line(line)
        assert p < q and is_prime(p) and is_prime(q) and product == p * q
        assert line[20:] == f"{p * q:010d}"[::-1]  # least-significant digit first


def test_primes_paper_format_example() -> None:
    from aotlib.synthetic import _primes_lines

    (line,) = _primes_lines(np.array([61]), np.array([2111]), digits=5)
    assert line == "00061 * 02111   =   1778210000"  # 61 * 2111 = 128771, reversed, padded
    assert parse_primes_line(line) == (61, 2111, 128771)
    roles = primes_position_roles(5)
    assert len(roles) == len(line)
    assert roles[:5] == ["p_4", "p_3", "p_2", "p_1", "p_0"] and roles[8] == "q_4"
    assert roles[20] == "prod_0" and roles[-1] == "prod_9"
    assert all(role == "sep" for role, ch in zip(roles, line) if ch in " *=")


def test_primes_split_by_pair_and_deterministic() -> None:
    train, val, _ = synthetic_lines("primes", seed=0, digits=2, n_train=200, n_val=50)
    pairs = lambda lines: {parse_primes_line(line)[:2] for line in lines}
    assert len(pairs(train)) == 200 and len(pairs(val)) == 50  # no repeated pair
    assert not pairs(train) & pairs(val)
    assert len(train[0]) == primes_line_length(2) == 18
    assert synthetic_lines("primes", seed=0, digits=2, n_train=200, n_val=50)[0] == train
    assert synthetic_lines("primes", seed=1, digits=2, n_train=200, n_val=50)[0] != train


def test_primes_too_many_pairs_says_how_many() -> None:
    assert count_prime_pairs(2) == 25 * 24 // 2 == 300
    with pytest.raises(ValueError, match="300 distinct pairs"):
        synthetic_lines("primes", seed=0, digits=2, n_train=290, n_val=20)
    # Exactly all pairs is allowed, and then every pair appears once.
    train, _, _ = synthetic_lines("primes", seed=0, digits=2, n_train=300, n_val=0)
    assert len({parse_primes_line(line)[:2] for line in train}) == 300


def test_pair_unranking_is_exact() -> None:
    from aotlib.synthetic import _pair_from_index

    m = 200
    expected = [(i, j) for j in range(m) for i in range(j)]
    i, j = _pair_from_index(np.arange(m * (m - 1) // 2))
    assert list(zip(i.tolist(), j.tolist())) == expected
    # near the top of the paper's range, where float sqrt could be off by one
    t = np.array([count_prime_pairs(5) - 1, 10**12 - 1], dtype=np.int64)
    i, j = _pair_from_index(t)
    assert (j * (j - 1) // 2 + i == t).all() and (i < j).all() and (i >= 0).all()


# ----------------------------------------------------------------------------- linear


def test_linear_lines_follow_y_equals_Ax() -> None:
    n, k = 12, 5
    train, val, alphabet = synthetic_lines(
        "linear", seed=0, n=n, k=k, noise=0.0, n_train=300, matrix_seed=4
    )
    assert alphabet == "01_" and len(val) == 10_000
    assert {len(line) for line in train} == {2 * n + 7}
    assert all(line[n : n + 7] == "_______" for line in train)
    A, A_inv = linear_matrices(n, k, matrix_seed=4)
    assert int(A.sum()) == n + k
    X, Y = zip(*(parse_linear_line(line, n) for line in train))
    X, Y = np.stack(X), np.stack(Y)  # (300, n) each
    assert (gf2.matmul(X, A.T) == Y).all()  # forward: y = A x
    assert (gf2.matmul(Y, A_inv.T) == X).all()  # backward: x = A^-1 y


def test_linear_noise_rate_matches_setting() -> None:
    n, noise, m = 16, 0.05, 4000
    noisy, _ = linear_lines(seed=5, n=n, k=4, noise=noise, n_train=m, n_val=0)
    clean, _ = linear_lines(seed=5, n=n, k=4, noise=0.0, n_train=m, n_val=0)
    A, _ = linear_matrices(n, 4)
    bits = lambda lines: np.stack([np.concatenate(parse_linear_line(s, n)) for s in lines])
    B = bits(noisy)  # (m, 2n): x' then y'
    # Same seed, so the same x is drawn before the flips: x' differs from x by e1 only.
    x_flips = B[:, :n] != bits(clean)[:, :n]
    trials = m * n
    tol = 5 * math.sqrt(noise * (1 - noise) / trials)  # 5 binomial standard deviations
    assert abs(x_flips.mean() - noise) < tol
    # y' disagrees with A x' when the composite noise A e1 + e2 is 1 in that bit:
    # rate (1 - (1 - 2p)^(w + 1)) / 2 for a row of weight w.
    resid = gf2.matmul(B[:, :n], A.T) ^ B[:, n:]  # (m, n)
    w = A.sum(axis=1)
    expected = (1 - (1 - 2 * noise) ** (w + 1)) / 2  # (n,)
    assert np.abs(resid.mean(axis=0) - expected).max() < 5 * math.sqrt(0.25 / m)
    assert abs(resid.mean() - expected.mean()) < 5 * math.sqrt(expected.mean() / trials)


def test_default_matrix_matches_the_papers_20x20_k6_run() -> None:
    A, A_inv = linear_matrices()  # Matid20_6_15: 6 ones beyond the identity, 15 in A^-1
    assert A.shape == (20, 20) and int(A.sum()) - 20 == 6 and int(A_inv.sum()) - 20 == 15


def test_linear_deterministic_and_shared_matrix() -> None:
    a = linear_lines(seed=1, n=8, k=3, n_train=50, n_val=5)
    assert a == linear_lines(seed=1, n=8, k=3, n_train=50, n_val=5)
    assert a[0] != linear_lines(seed=2, n=8, k=3, n_train=50, n_val=5)[0]
    A1, _ = linear_matrices(8, 3, matrix_seed=0)
    A2, _ = linear_matrices(8, 3, matrix_seed=1)
    assert (A1 != A2).any()


def test_noise_floor_reproduces_paper_0347() -> None:
    floor = linear_noise_floor(25, 0.01, sep_len=7)
    assert round(floor, 3) == 0.347
    expected = (25 * math.log(2) + 25 * binary_entropy(2 * 0.01 * 0.99)) / 57
    assert floor == pytest.approx(expected, rel=1e-12)


def test_noise_floor_exact_for_general_A() -> None:
    n, p = 10, 0.03
    eye = np.eye(n, dtype=np.uint8)
    # identity and any permutation: independent bits, the closed form is exact
    assert linear_noise_floor(n, p, 7, A=eye) == pytest.approx(linear_noise_floor(n, p, 7))
    perm = eye[np.random.default_rng(0).permutation(n)]
    assert linear_noise_entropy(perm, p) == pytest.approx(n * binary_entropy(2 * p * (1 - p)))
    # small case against brute force over all (e1, e2)
    A, _ = linear_matrices(4, 3, matrix_seed=2)
    probs: dict[bytes, float] = {}
    for code in range(2**8):
        e = np.array([(code >> b) & 1 for b in range(8)], dtype=np.uint8)
        z = (gf2.matmul(A, e[:4, None])[:, 0] ^ e[4:]).tobytes()
        probs[z] = probs.get(z, 0.0) + p ** e.sum() * (1 - p) ** (8 - e.sum())
    brute = -sum(q * math.log(q) for q in probs.values())
    assert linear_noise_entropy(A, p) == pytest.approx(brute, rel=1e-10)
    # correlated bits: the exact entropy is below the sum of per-bit entropies
    w = A.sum(axis=1)
    per_bit = sum(binary_entropy((1 - (1 - 2 * p) ** (wi + 1)) / 2) for wi in w)
    assert linear_noise_entropy(A, p) < per_bit


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("cubes", {}, "name must be one of"),
        ("primes", {"digits": 0}, "digits"),
        ("primes", {"n_train": 0}, "n_train"),
        ("primes", {"n": 5}, "unknown options"),
        ("linear", {"noise": 0.7}, "noise"),
        ("linear", {"n": 0}, "n >= 1"),
        ("linear", {"n": 3, "k": 7}, "k must be"),
        ("linear", {"digits": 5}, "unknown options"),
    ],
)
def test_bad_options_raise(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_lines(name, seed=0, **options)


def test_parsers_reject_malformed_lines() -> None:
    with pytest.raises(ValueError, match="not a primes line"):
        parse_primes_line("00061 * 02111 = 1720810000")
    with pytest.raises(ValueError, match="not a linear line"):
        parse_linear_line("0101_x_0101", 4)
