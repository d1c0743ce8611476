"""A language small enough to know exactly: the arrow is about learnability, not information.

The source is a Markov chain over a small alphabet, run for `length` steps from a start
distribution. Its joint probability is known, so both factorisations can be computed
exactly:

    forward   P(x) = prod_k P(x_k | x_<k)        backward   P(x) = prod_k P(x_k | x_>k)

and by the chain rule they give the same loss, H(X) / L nats per token
(`exact_losses`, by enumerating all V^L sequences; `markov_losses`, the closed form).

Capacity-limited models are k-gram tables fitted by counting (`fit_kgram`), either on
samples or on the exact distribution itself (the infinite-data limit). Two facts:

1. A *position-aware* k-gram (one table per position) has the same loss in both
   directions, for any source: its loss telescopes to a sum of window entropies,
   sum H(k+1 consecutive tokens) - sum H(k interior consecutive tokens), which reads
   the same backwards. Context length alone makes no arrow.
2. A *position-agnostic* k-gram (one table shared by all positions, like a
   convolution) is exact forward for a time-homogeneous chain, whatever the start. But
   if the start is out of equilibrium (a low-entropy start state), the reversed chain
   is time-inhomogeneous: P(x_k | x_k+1) depends on k through the marginal of x_k.
   A shared table cannot represent that until its context reaches the end of the line
   ([BOS] tells it the time), so the backward loss stays above the forward one. With a
   stationary start both directions are homogeneous and the gap vanishes.
   This is the thermodynamic arrow in miniature: simple laws plus a special initial
   condition make forward prediction easier for models whose bias matches the laws.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class MarkovSource:
    """X_1 ~ start, X_{t+1} ~ transition[X_t]; sequences of `length` symbols in [0, V)."""

    start: np.ndarray  # (V,)
    transition: np.ndarray  # (V, V), rows sum to 1
    length: int

    def __post_init__(self) -> None:
        V = len(self.start)
        if self.transition.shape != (V, V):
            raise ValueError(
                f"transition must be (V, V) = ({V}, {V}) to match start, "
                f"got {self.transition.shape}"
            )
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        for name, rows in (("start", self.start[None]), ("transition", self.transition)):
            if (rows < 0).any() or not np.allclose(rows.sum(axis=1), 1.0):
                raise ValueError(f"{name} must hold probability vectors (rows summing to 1)")

    @property
    def vocab_size(self) -> int:
        return len(self.start)

    def marginals(self) -> np.ndarray:
        """P(X_t = v) for every position: (length, V)."""
        out = [self.start]
        for _ in range(self.length - 1):
            out.append(out[-1] @ self.transition)
        return np.stack(out)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n independent sequences, (n, length) int64."""
        cum_start = np.cumsum(self.start)
        cum_trans = np.cumsum(self.transition, axis=1)  # (V, V)
        u = rng.random((n, self.length))  # inverse-CDF sampling, one uniform per symbol
        x = np.empty((n, self.length), dtype=np.int64)
        x[:, 0] = np.minimum((u[:, :1] >= cum_start[None]).sum(axis=1), self.vocab_size - 1)
        for t in range(1, self.length):
            rows = cum_trans[x[:, t - 1]]  # (n, V)
            x[:, t] = np.minimum((u[:, t : t + 1] >= rows).sum(axis=1), self.vocab_size - 1)
        return x

    def enumerate(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence and its probability: (V^L, L) in lexicographic order, (V^L,)."""
        V, L = self.vocab_size, self.length
        if V**L > 2_000_000:
            raise ValueError(f"V^L = {V}^{L} sequences is too many to enumerate (max 2e6)")
        seqs = np.array(list(itertools.product(range(V), repeat=L)), dtype=np.int64)
        seqs = seqs.reshape(V**L, L)
        probs = self.start[seqs[:, 0]].copy()
        for t in range(1, L):
            probs *= self.transition[seqs[:, t - 1], seqs[:, t]]
        return seqs, probs


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """pi with pi P = pi: the left eigenvector of eigenvalue 1 (assumes it is unique)."""
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return pi / pi.sum()


def random_markov_source(
    vocab_size: int = 4,
    length: int = 8,
    out_degree: int = 2,
    start: str = "fixed",
    rng: np.random.Generator | None = None,
) -> MarkovSource:
    """A random sparse chain: each symbol can be followed by `out_degree` symbols.

    Row supports are random (a cycle through all symbols is always included, so the
    chain is irreducible) with Dirichlet(1) weights. `start`: "fixed" starts every
    sequence in symbol 0 (out of equilibrium: the arrow appears), "stationary" starts
    in the stationary distribution (in equilibrium: no arrow for any k-gram).
    """
    if not 1 <= out_degree <= vocab_size:
        raise ValueError(f"out_degree must be in [1, vocab_size={vocab_size}], got {out_degree}")
    if start not in ("fixed", "stationary"):
        raise ValueError(f"start must be 'fixed' or 'stationary', got {start!r}")
    rng = np.random.default_rng(0) if rng is None else rng
    V = vocab_size
    transition = np.zeros((V, V))
    cycle = rng.permutation(V)
    for a, b in zip(cycle, np.roll(cycle, -1)):
        others = np.setdiff1d(np.arange(V), [b])
        support = np.concatenate([[b], rng.choice(others, out_degree - 1, replace=False)])
        transition[a, support] = rng.dirichlet(np.ones(out_degree))
    if start == "fixed":
        start_dist = np.eye(V)[0]
    else:
        start_dist = stationary_distribution(transition)
    return MarkovSource(start_dist, transition, length)


# ------------------------------------------------------------------- exact models


def _direction(seqs: np.ndarray, direction: str) -> np.ndarray:
    """The token order a model reads: backward models read every line reversed."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return seqs if direction == "forward" else seqs[:, ::-1]


def exact_position_losses(
    seqs: np.ndarray, probs: np.ndarray, direction: str = "forward"
) -> np.ndarray:
    """Per-position loss of the exact model, E[-log P(x_k | everything read before)], (L,).

    Reference implementation by enumeration: `seqs` must be all V^L sequences in
    lexicographic order (as `MarkovSource.enumerate` gives), `probs` their
    probabilities. The conditional is a ratio of prefix marginals of the joint table
    (suffix marginals for the backward direction). Returned in reading order.
    """
    N, L = seqs.shape
    V = int(round(N ** (1 / L)))
    if V**L != N or probs.shape != (N,):
        raise ValueError(
            f"need all V^L sequences and one probability each: {seqs.shape}, {probs.shape}"
        )
    joint = probs.reshape((V,) * L)  # axis t = symbol at position t
    if direction == "backward":
        joint = joint.transpose(tuple(range(L - 1, -1, -1)))  # axis t = t-th symbol read
    elif direction != "forward":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    losses = np.zeros(L)
    prev = np.ones(())  # P(empty prefix) = 1
    for k in range(1, L + 1):
        prefix = joint.sum(axis=tuple(range(k, L)))  # (V,) * k: P(first k symbols read)
        cond = np.divide(prefix, prev[..., None], out=np.zeros_like(prefix), where=prefix > 0)
        mask = prefix > 0  # 0 log 0 = 0: impossible prefixes cost nothing
        losses[k - 1] = -(prefix[mask] * np.log(cond[mask])).sum()
        prev = prefix
    return losses


def exact_losses(source: MarkovSource) -> dict[str, float]:
    """Exact FW and BW loss (nats per token) by enumeration, plus H(X)/L computed directly."""
    seqs, probs = source.enumerate()
    p = probs[probs > 0]
    return {
        "forward": float(exact_position_losses(seqs, probs, "forward").mean()),
        "backward": float(exact_position_losses(seqs, probs, "backward").mean()),
        "entropy": float(-(p * np.log(p)).sum() / source.length),
    }


def _plogp_rows(P: np.ndarray, weights: np.ndarray) -> float:
    """-sum_a weights[a] sum_b P[a, b] log P[a, b], with 0 log 0 = 0."""
    logs = np.log(P, out=np.zeros_like(P), where=P > 0)
    return float(-(weights[:, None] * P * logs).sum())


def markov_losses(source: MarkovSource) -> dict[str, float]:
    """Exact FW and BW loss in closed form (the fast path beside `exact_losses`).

    Forward: P(x_t | x_<t) = transition[x_t-1, x_t]. Backward: the reversed chain,
    P(x_t = a | x_t+1 = b) = marginal_t(a) transition[a, b] / marginal_t+1(b) (Bayes),
    which depends on t unless the chain is in equilibrium.
    """
    m = source.marginals()  # (L, V)
    T = source.transition
    h = lambda d: float(-(d[d > 0] * np.log(d[d > 0])).sum())
    forward = h(source.start) + sum(_plogp_rows(T, m[t]) for t in range(source.length - 1))
    backward = h(m[-1])
    for t in range(source.length - 1):
        pair = m[t][:, None] * T  # (V, V): P(x_t = a, x_t+1 = b)
        rev = np.divide(pair, m[t + 1][None, :], out=np.zeros_like(pair), where=pair > 0)
        backward += _plogp_rows(rev.T, m[t + 1])  # rows: b, the symbol already read
    return {"forward": forward / source.length, "backward": backward / source.length}


# ----------------------------------------------------------------- k-gram models


@dataclass(frozen=True)
class KGram:
    """A k-gram table P(next | last k tokens read), fitted by (weighted) counting.

    The context is padded on the left with BOS (symbol V), exactly as the window
    [BOS] + tokens looks to a model that sees k tokens back. `position_aware` keeps one
    table per position (the model knows the time); otherwise one table is shared by
    every position, the way a convolution or a position-free recurrent model would.
    Only the cells that were counted are stored (sorted keys), so long contexts are
    cheap; P = (count + alpha) / (context total + alpha V), uniform for unseen contexts.
    """

    order: int
    direction: str
    position_aware: bool
    vocab_size: int
    alpha: float
    cell_keys: np.ndarray  # (cells,) sorted key of (position, context, next token)
    cell_counts: np.ndarray  # (cells,) weighted counts
    context_keys: np.ndarray  # (contexts,) sorted key of (position, context)
    context_counts: np.ndarray  # (contexts,) weighted totals

    def conditionals(self, seqs: np.ndarray) -> np.ndarray:
        """P(token | its k-context) for every token of `seqs` (n, L), in reading order."""
        read, context = _context_of_each_token(seqs, self)  # (n, L) each
        count = _lookup(self.cell_keys, self.cell_counts, context * self.vocab_size + read)
        total = _lookup(self.context_keys, self.context_counts, context)
        denom = total + self.alpha * self.vocab_size
        return np.divide(
            count + self.alpha,
            denom,
            out=np.full(count.shape, 1.0 / self.vocab_size),
            where=denom > 0,
        )


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == query] for each query, 0 where the key is absent (keys sorted)."""
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0.0) if len(keys) else np.zeros(query.shape)


def _context_of_each_token(seqs: np.ndarray, model: KGram) -> tuple[np.ndarray, np.ndarray]:
    """(tokens in reading order, key of (position, k-context) of each token), each (n, L)."""
    read = _direction(np.asarray(seqs, dtype=np.int64), model.direction)
    n, L = read.shape
    V, k = model.vocab_size, model.order
    if (V + 1) ** k * L * V >= 2**62:
        raise ValueError(f"order {k} with V={V}, L={L} overflows int64 keys")
    padded = np.concatenate([np.full((n, k), V, dtype=np.int64), read], axis=1)  # (n, k+L)
    context = np.zeros((n, L), dtype=np.int64)
    for j in range(k):  # the k tokens read before each position, as a base-(V+1) number
        context = context * (V + 1) + padded[:, j : j + L]
    if model.position_aware:  # prepend the position as the most significant digit
        context = np.arange(L)[None, :] * (V + 1) ** k + context
    return read, context


def fit_kgram(
    seqs: np.ndarray,
    order: int,
    direction: str = "forward",
    position_aware: bool = False,
    weights: np.ndarray | None = None,
    alpha: float = 0.0,
    vocab_size: int | None = None,
) -> KGram:
    """Fit a k-gram by counting on `seqs` (n, L), reading them in `direction`.

    `weights` (n,) counts each sequence that many times: pass the enumeration and its
    exact probabilities to get the infinite-data table. `alpha` is add-alpha smoothing
    (needed for sample fits, so unseen continuations keep a finite loss).
    """
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    seqs = np.asarray(seqs, dtype=np.int64)
    if seqs.ndim != 2:
        raise ValueError(f"seqs must be (n, L), got shape {seqs.shape}")
    n, L = seqs.shape
    V = int(seqs.max()) + 1 if vocab_size is None else vocab_size
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) to match seqs {seqs.shape}")
    empty = np.zeros(0, dtype=np.int64)
    model = KGram(order, direction, position_aware, V, alpha, empty, empty, empty, empty)
    read, context = _context_of_each_token(seqs, model)  # (n, L) each
    w = np.broadcast_to(weights[:, None], (n, L)).ravel()
    cells, cell_of = np.unique((context * V + read).ravel(), return_inverse=True)
    contexts, context_of = np.unique(context.ravel(), return_inverse=True)
    return KGram(
        order,
        direction,
        position_aware,
        V,
        alpha,
        cells,
        np.bincount(cell_of.ravel(), weights=w, minlength=len(cells)),
        contexts,
        np.bincount(context_of.ravel(), weights=w, minlength=len(contexts)),
    )


def kgram_position_losses(
    model: KGram, seqs: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Per-position loss (nats) of the k-gram on `seqs`, weighted per sequence: (L,).

    Positions are in reading order (for a backward model, position 0 is the last
    symbol of the line). With the enumeration and its probabilities as weights this is
    the exact expected loss under the source.
    """
    seqs = np.asarray(seqs, dtype=np.int64)
    n, L = seqs.shape
    weights = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) to match seqs {seqs.shape}")
    live = weights > 0  # impossible sequences may have p = 0 under a count fit
    p = model.conditionals(seqs[live])  # (n_live, L)
    return (weights[live, None] * -np.log(p)).sum(axis=0) / weights[live].sum()


def kgram_loss(model: KGram, seqs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean loss (nats per token) of the k-gram on `seqs`, weighted per sequence.

    With the enumeration and its probabilities as weights this is the exact expected
    loss under the source: a cross-entropy, so never below the exact model's loss.
    """
    return float(kgram_position_losses(model, seqs, weights).mean())


def kgram_table(
    source: MarkovSource,
    orders: list[int],
    n_samples: int | None = None,
    alpha: float = 0.5,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """FW and BW losses of k-gram models on `source`, exact expectations, one row per case.

    Columns: order, position_aware, data ("exact" = infinite-data tables, or
    "<n> samples" = tables counted on n sampled sequences with add-alpha smoothing),
    forward, backward, gap = backward - forward. Losses are expectations under the
    source, computed over the full enumeration, so they carry no evaluation noise.
    """
    seqs, probs = source.enumerate()
    seqs, probs = seqs[probs > 0], probs[probs > 0]  # the support: a sparse chain has few
    train = None
    if n_samples is not None:
        train = source.sample(n_samples, np.random.default_rng(0) if rng is None else rng)
    rows = []
    for position_aware in (False, True):
        for order in orders:
            cases = [("exact", seqs, probs, 0.0)]
            if train is not None:
                cases.append((f"{n_samples} samples", train, None, alpha))
            for data, fit_seqs, fit_w, a in cases:
                loss = {
                    d: kgram_loss(
                        fit_kgram(fit_seqs, order, d, position_aware, fit_w, a, source.vocab_size),
                        seqs,
                        probs,
                    )
                    for d in DIRECTIONS
                }
                rows.append(
                    {
                        "order": order,
                        "position_aware": position_aware,
                        "data": data,
                        **loss,
                        "gap": loss["backward"] - loss["forward"],
                    }
                )
    return pd.DataFrame.from_records(rows)
