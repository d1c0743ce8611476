"""Token windows for forward and backward language models (the paper's data protocol).

A corpus is tokenised once, in forward order, with one tokenizer per language; the
token stream is cut into windows of T tokens and each window gets a BOS token in front:
`[BOS, x_1, ..., x_T]`. Windows are split into train and validation by a seeded
permutation. The direction is applied afterwards by `orient`, which reverses
`x_1 .. x_T` and keeps BOS first, so that:

- the forward and the backward model see the same windows, the same split, and predict
  exactly the same tokens of each window (input `w[:, :-1]`, target `w[:, 1:]`);
- an exact model would have the same loss both ways (chain rule), so a gap measures
  how learnable each direction is.

Tokenizers, one per corpus and language: "bpe" is a byte-level BPE trained on the
forward text. "bpe-reversed" is the paper's control, a BPE trained on character-reversed
text: it encodes the reversed text and its token list is reversed back, so the windows
still hold forward-order tokens and `orient` works unchanged; the backward model then
reads text cut by a tokenizer fitted to its own direction. "char" is one token per
character.

Windows do not overlap (stride T; the paper used stride T/2). Non-overlapping windows
count every token once and keep validation tokens out of the training windows.

Synthetic languages ("primes", "linear") come from `aotlib.synthetic`: one window per
line, character tokens, T = the line length (`context` is not used for them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aotlib import corpus as corpus_mod
from aotlib.checkpoint import CorruptFile, load_checkpoint, save_checkpoint
from aotlib.paths import cache_dir
from aotlib.tokens import BPETokenizer, CharTokenizer, bpe_tokenizer, tokenizer_from_state

DATA_VERSION = 1  # bumped when windowing or splitting changes, so disk caches are rebuilt
SYNTHETIC = ("primes", "linear")
TOKENIZERS = ("bpe", "bpe-reversed", "char")
DIRECTIONS = ("forward", "backward")
SEPARATOR = "\n"  # between documents (verses): a token of its own for the models to predict


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "bible"  # "bible" | "cc100" | "primes" | "linear" | a path
    lang: str = "fr"
    tokenizer: str = "bpe"  # "bpe" | "bpe-reversed" | "char"
    vocab_size: int = 4096
    context: int = 128  # T: tokens predicted per window
    parallel: tuple[str, ...] = ()  # bible: keep verses present in all these languages
    val_fraction: float = 0.05
    max_train_tokens: int | None = None  # cap the training split (CPU budgets)
    seed: int = 42
    options: tuple[tuple[str, object], ...] = ()  # synthetic generator options, sorted

    def __post_init__(self) -> None:
        # Normalise to a canonical, hashable form: equal data means an equal config.
        opts = tuple(sorted((str(k), _hashable(v)) for k, v in dict(self.options).items()))
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "parallel", tuple(self.parallel))
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a non-empty string, got {self.corpus!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"context must be an int >= 1, got {self.context!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            raise ValueError(f"max_train_tokens must be None or >= 1, got {self.max_train_tokens}")
        if self.corpus == "bible":
            # "French" and "fr" are the same data, so they must be the same config.
            object.__setattr__(self, "lang", corpus_mod.resolve_language(self.lang))
            par = tuple(corpus_mod.resolve_language(p) for p in self.parallel)
            object.__setattr__(self, "parallel", par)
        elif self.parallel:
            raise ValueError(f"parallel is only meaningful for corpus='bible', not {self.corpus!r}")
        if self.corpus not in SYNTHETIC and self.tokenizer != "char" and self.vocab_size < 257:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 257, got {self.vocab_size}")
        if self.corpus in SYNTHETIC and self.tokenizer == "bpe-reversed":
            raise ValueError(f"synthetic corpus {self.corpus!r} uses character tokens")


@dataclass
class TokenData:
    train: torch.Tensor  # (N_train, T + 1) int64, forward order, column 0 = BOS
    val: torch.Tensor  # (N_val, T + 1)
    vocab_size: int
    bos_id: int
    tokenizer: object  # encode/decode (aotlib.tokens.TextTokenizer)


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list | tuple) else v


# ----------------------------------------------------------------------------- directions
def orient(windows: torch.Tensor, direction: str) -> torch.Tensor:
    """Windows as the model of `direction` reads them: backward reverses x_1..x_T.

    Column 0 (BOS) stays first, so input = w[:, :-1] and target = w[:, 1:] in both
    directions, and each window's targets are the same multiset of tokens.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (N, T + 1) with T >= 1, got {windows.shape}")
    if direction == "forward":
        return windows
    return torch.cat([windows[:, :1], windows[:, 1:].flip(1)], dim=1)  # (N, T + 1)


# ----------------------------------------------------------------------------- windows
def make_windows(ids: torch.Tensor, context: int, bos_id: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows of `context` tokens, BOS in front.

    The last partial window is dropped. Returns (len(ids) // context, context + 1) int64.
    """
    n = len(ids) // context
    body = ids[: n * context].view(n, context)  # (N, T)
    bos = torch.full((n, 1), bos_id, dtype=torch.int64)
    return torch.cat([bos, body.to(torch.int64)], dim=1)  # (N, T + 1)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) window indices from a seeded permutation; at least one of each."""
    if n < 2:
        raise ValueError(f"need at least 2 windows to split into train and val, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return perm[n_val:], perm[:n_val]


def tokenizer_spec(cfg: DataConfig) -> dict[str, Any]:
    """The tokenizer `build_data(cfg)` uses, described without building anything."""
    if cfg.corpus in SYNTHETIC:
        return {"kind": "char", "name": cfg.corpus}
    name = f"{Path(cfg.corpus).name if _is_path(cfg.corpus) else cfg.corpus}-{cfg.lang}"
    if cfg.parallel:
        name += "-par-" + "-".join(cfg.parallel)
    if cfg.tokenizer == "char":
        return {"kind": "char", "name": name}
    return {
        "kind": "bpe",
        "name": name,
        "vocab_size": cfg.vocab_size,
        "reversed_text": cfg.tokenizer == "bpe-reversed",
    }


def _is_path(corpus: str) -> bool:
    return corpus not in ("bible", "cc100", *SYNTHETIC)


def _natural(cfg: DataConfig) -> TokenData:
    docs = corpus_mod.load_corpus(
        cfg.corpus,
        cfg.lang,
        parallel=cfg.parallel or None,
        max_chars=dict(cfg.options).get("max_chars"),
    )
    spec = tokenizer_spec(cfg)
    if spec["kind"] == "char":
        tok: BPETokenizer | CharTokenizer = CharTokenizer(
            "".join(sorted(set("".join(docs)) | {SEPARATOR}))
        )
        pieces = [tok.encode(d + SEPARATOR) for d in docs]
    else:
        tok = bpe_tokenizer(
            docs, cfg.vocab_size, reversed_text=spec["reversed_text"], name=spec["name"]
        )
        # Document by document (threads) equals encoding the whole stream at once: the
        # byte-level pre-tokeniser always splits at the separator.
        pieces = tok.encode_batch([d + SEPARATOR for d in docs])
    ids = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64))
    windows = make_windows(ids, cfg.context, tok.bos_id)  # (N, T + 1)
    if len(windows) < 2:
        raise ValueError(
            f"corpus {cfg.corpus}/{cfg.lang} has {len(ids)} tokens: too short for two windows "
            f"of context {cfg.context}"
        )
    train_idx, val_idx = split_indices(len(windows), cfg.val_fraction, cfg.seed)
    if cfg.max_train_tokens is not None:
        # The permutation order makes this a random subset of the corpus, not its start.
        train_idx = train_idx[: max(1, cfg.max_train_tokens // cfg.context)]
    return TokenData(windows[train_idx], windows[val_idx], tok.vocab_size, tok.bos_id, tok)


def _synthetic_module() -> Any:
    try:
        from aotlib import synthetic  # imported only when a synthetic corpus is asked for
    except ImportError as err:
        raise RuntimeError(f"synthetic corpora need aotlib/synthetic.py: {err}") from err
    return synthetic


def _synthetic(cfg: DataConfig) -> TokenData:
    train_lines, val_lines, alphabet = _synthetic_module().synthetic_lines(
        cfg.corpus, seed=cfg.seed, **dict(cfg.options)
    )
    if not train_lines or not val_lines:
        raise ValueError(f"synthetic corpus {cfg.corpus!r} returned an empty split")
    lengths = {len(line) for line in itertools.chain(train_lines, val_lines)}
    if len(lengths) != 1:
        raise ValueError(f"synthetic lines must share one length, got lengths {sorted(lengths)}")
    if cfg.max_train_tokens is not None:
        train_lines = train_lines[: max(1, cfg.max_train_tokens // lengths.pop())]
    tok = CharTokenizer(alphabet)

    def windows(lines: list[str]) -> torch.Tensor:
        rows = [[tok.bos_id, *tok.encode(line)] for line in lines]
        return torch.tensor(rows, dtype=torch.int64)  # (N, L + 1)

    return TokenData(windows(train_lines), windows(val_lines), tok.vocab_size, tok.bos_id, tok)


# ----------------------------------------------------------------------------- caching
def _source_fingerprint(cfg: DataConfig) -> Any:
    """What the data depends on besides the config; None means "do not cache on disk"."""
    if cfg.corpus == "bible":
        return [corpus_mod.WHEEL_SHA256, corpus_mod.CLEANING_VERSION]
    if cfg.corpus == "cc100":
        return ["cc100", corpus_mod.CC100_DEFAULT_CHARS]
    if cfg.corpus in SYNTHETIC:
        origin = getattr(_synthetic_module(), "__file__", None)
        if not origin or not os.path.isfile(origin):
            return None
        return hashlib.sha256(Path(origin).read_bytes()).hexdigest()  # the generator's code
    p = Path(cfg.corpus).expanduser()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def data_key(cfg: DataConfig) -> str | None:
    """The disk-cache name of `build_data(cfg)`, or None when it is not cached on disk."""
    source = _source_fingerprint(cfg)
    if source is None:
        return None
    import tokenizers

    blob = {
        "version": DATA_VERSION,
        "config": dataclasses.asdict(cfg),
        "source": source,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=repr).encode()).hexdigest()[:20]


def _valid(d: TokenData) -> bool:
    for w in (d.train, d.val):
        if w.dtype != torch.int64 or w.dim() != 2 or len(w) == 0 or w.shape[1] < 2:
            return False
        if (
            not bool((w[:, 0] == d.bos_id).all())
            or int(w.min()) < 0
            or int(w.max()) >= d.vocab_size
        ):
            return False
    return d.train.shape[1] == d.val.shape[1] and d.tokenizer.vocab_size == d.vocab_size


def _load(path: Path) -> TokenData | None:
    try:
        s = load_checkpoint(path)
        d = TokenData(
            s["train"], s["val"], s["vocab_size"], s["bos_id"], tokenizer_from_state(s["tokenizer"])
        )
    except (CorruptFile, KeyError, ValueError, TypeError, EOFError, RuntimeError, OSError):
        return None
    return d if _valid(d) else None


@functools.lru_cache(maxsize=16)
def build_data(cfg: DataConfig) -> TokenData:
    """Train and validation windows of `cfg`, in forward order (apply `orient` after).

    Cached in memory (this function) and on disk under cache_dir()/data/ by a hash of
    the config and of the source text's identity; a cache file that fails its checksum
    or its sanity checks is rebuilt, never trusted. The returned tensors are shared:
    treat them as read-only.
    """
    key = data_key(cfg)
    path = cache_dir() / "data" / f"{key}.pt" if key else None
    if path is not None and path.exists():
        data = _load(path)
        if data is not None:
            return data
    data = _synthetic(cfg) if cfg.corpus in SYNTHETIC else _natural(cfg)
    if not _valid(data):
        raise AssertionError(f"build_data produced inconsistent windows for {cfg}")
    if path is not None:
        state = {"train": data.train, "val": data.val, "vocab_size": data.vocab_size,
                 "bos_id": data.bos_id, "tokenizer": data.tokenizer.state(),
                 "config": dataclasses.asdict(cfg)}  # fmt: skip
        save_checkpoint(path, state)
    return data
