"""Linear algebra over GF(2), the field of the paper's linear languages.

Matrices and vectors are numpy arrays of 0/1 (any integer or bool dtype in, uint8 out).
Addition is XOR and multiplication is AND, so elimination needs no division and no
pivot tolerance: a row operation is `row ^= pivot_row`.

The arrow-of-time point these serve: a forward model of y = A x must learn A, a
backward model must learn A^-1, and for a sparse A (identity plus k ones) the inverse
is typically much denser ("sparsity symmetry breaking", `inverse_density_curve`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# The k grid of the density figure: 30 x 30 matrices from the identity to ~13% filled.
DEFAULT_KS = tuple(range(0, 121, 10))


def _as_bits(M: np.ndarray, name: str = "M", square: bool = False) -> np.ndarray:
    M = np.asarray(M)
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {M.shape}")
    if square and M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be square, got shape {M.shape}")
    if M.dtype != bool and not np.issubdtype(M.dtype, np.integer):
        raise ValueError(f"{name} must hold integers or bools, got dtype {M.dtype}")
    return (M.astype(np.int64) & 1).astype(np.uint8)  # any integer is read mod 2


def _row_reduce(M: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Reduced row echelon form of M over GF(2) and the pivot columns (Gauss-Jordan)."""
    R = M.copy()
    rows, cols = R.shape
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        if r == rows:
            break
        hits = np.flatnonzero(R[r:, c]) + r
        if hits.size == 0:
            continue
        R[[r, hits[0]]] = R[[hits[0], r]]  # swap a row with a 1 in column c up to row r
        # Clear column c everywhere else (above too: Gauss-Jordan, not just Gauss).
        others = np.flatnonzero(R[:, c])
        others = others[others != r]
        R[others] ^= R[r]
        pivots.append(c)
        r += 1
    return R, pivots


def rank(M: np.ndarray) -> int:
    """Rank of M over GF(2) (which can be lower than its rank over the reals)."""
    return len(_row_reduce(_as_bits(M))[1])


def matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A @ B mod 2, for matrices (or a batch of row vectors times a matrix)."""
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"matmul needs (m, n) @ (n, p) matrices, got A {A.shape} and B {B.shape}")
    # int64 sums of at most n products cannot overflow, so reduce once at the end.
    return ((A.astype(np.int64) @ B.astype(np.int64)) & 1).astype(np.uint8)


def inverse(M: np.ndarray) -> np.ndarray:
    """Inverse of a square matrix over GF(2) by Gauss-Jordan on [M | I].

    Raises ValueError if M is singular over GF(2).
    """
    M = _as_bits(M, square=True)
    n = M.shape[0]
    R, pivots = _row_reduce(np.concatenate([M, np.eye(n, dtype=np.uint8)], axis=1))
    if pivots[:n] != list(range(n)):
        raise ValueError(f"matrix of shape {M.shape} is singular over GF(2) (rank {rank(M)})")
    return R[:, n:].copy()


def random_sparse_invertible(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's A: the n x n identity plus k ones at distinct random off-diagonal places.

    Ones on both sides of the diagonal can make the matrix singular (e.g. a 2-cycle
    a_ij = a_ji = 1 gives two equal rows), so draws are repeated until one is invertible.
    Every draw uses the same `rng`, so the result is deterministic given its state.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    off_diagonal = n * (n - 1)
    if not 0 <= k <= off_diagonal:
        raise ValueError(f"k must be in [0, n(n-1)] = [0, {off_diagonal}] for n={n}, got {k}")
    rows, cols = np.nonzero(~np.eye(n, dtype=bool))  # the n(n-1) off-diagonal places
    for _ in range(1000):
        A = np.eye(n, dtype=np.uint8)
        chosen = rng.choice(off_diagonal, size=k, replace=False)
        A[rows[chosen], cols[chosen]] = 1
        if rank(A) == n:
            return A
    # Roughly 29% of dense random matrices are invertible, so 1000 misses means a bug.
    raise RuntimeError(f"no invertible draw in 1000 tries for n={n}, k={k}")


def density(M: np.ndarray, off_diagonal: bool = False) -> float:
    """Fraction of entries that are non-zero.

    With `off_diagonal=True`, the fraction of the n(n-1) off-diagonal entries that are
    non-zero: the part of A that the paper's k controls (the identity is not counted).
    """
    M = _as_bits(M, square=off_diagonal)
    if not off_diagonal:
        return float(M.mean())
    n = M.shape[0]
    if n < 2:
        return 0.0
    return float(M[~np.eye(n, dtype=bool)].mean())


def inverse_density_curve(
    n: int = 30,
    ks: Sequence[int] | np.ndarray = DEFAULT_KS,
    trials: int = 20,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Density of A = I + (k off-diagonal ones) against the density of A^-1, per k.

    Densities are fractions of all n^2 entries (`density(M)`), so the identity alone
    has density 1/n. One row per k: the mean over `trials` random invertible draws of
    the density of A and of A^-1, `spread` = the standard deviation of the inverse's
    density over the draws, and the mean number of non-zeros of each (paper-style
    counts, e.g. "Matid25_50_209": k=50 gave 209 off-diagonal ones in A^-1).
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    rng = np.random.default_rng(0) if rng is None else rng
    records = []
    for k in ks:
        dens_a, dens_inv = [], []
        for _ in range(trials):
            A = random_sparse_invertible(n, int(k), rng)
            dens_a.append(density(A))
            dens_inv.append(density(inverse(A)))
        records.append(
            {
                "k": int(k),
                "density_A": float(np.mean(dens_a)),
                "density_inverse": float(np.mean(dens_inv)),
                "spread": float(np.std(dens_inv)),
                "nonzeros_A": float(np.mean(dens_a)) * n * n,
                "nonzeros_inverse": float(np.mean(dens_inv)) * n * n,
            }
        )
    return pd.DataFrame.from_records(records)
