"""Tokenisers: byte-level BPE for natural text, characters for the synthetic languages.

Both satisfy one small protocol (`TextTokenizer`): `encode(str) -> list[int]`,
`decode(list[int]) -> str`, `vocab_size`, `bos_id`. Id 0 is always the "<bos>" token
that starts every training window.

The paper's tokenizer control ("a BPE trained on reversed text") is `BPETokenizer` with
`reversed_text=True`: the merges are learnt on character-reversed text, a text is
encoded by reversing its characters, encoding, and reversing the token list back. The
token sequence is then in forward order like any other, so the data pipeline and the
forward/backward split treat it identically: only *which* tokenizer was trained on
which direction changes. Read backward, this tokenisation is exactly what a forward
BPE is to forward text, which is what the control needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aotlib.checkpoint import load_json, save_json
from aotlib.paths import cache_dir

BOS = "<bos>"
TOKENIZER_VERSION = 1  # bumped when the training recipe changes, so caches are retrained
MIN_BPE_VOCAB = 257  # the 256 byte tokens and <bos>


@runtime_checkable
class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def fingerprint(texts: Iterable[str]) -> str:
    """SHA-256 of a list of documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _new_bpe(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level pre-tokenisation, without a prefix space so that encoding the
    # documents one by one gives the same ids as encoding their concatenation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    return tok, trainer


def train_bpe(
    texts: list[str], vocab_size: int, *, reversed_text: bool = False, name: str
) -> Tokenizer:
    """A byte-level BPE trained on `texts` (character-reversed if `reversed_text`).

    Deterministic, and cached under cache_dir()/tokenizers/ by a hash of the settings
    and of the texts, so the same corpus gives the same tokenizer without retraining. A
    cached file that fails its checksum is retrained. Wrap the result in `BPETokenizer`
    (with the same `reversed_text`) to encode.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_BPE_VOCAB}, got {vocab_size!r}")
    if not texts or not any(texts):
        raise ValueError("train_bpe needs at least one non-empty text")
    settings = {
        "recipe": TOKENIZER_VERSION,
        "tokenizers": tokenizers.__version__,
        "vocab_size": vocab_size,
        "reversed_text": bool(reversed_text),
        "texts": fingerprint(texts),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^\w.-]+", "_", name) or "bpe"
    path = cache_dir() / "tokenizers" / f"{safe}-{'rev-' if reversed_text else ''}{key}.json"
    if path.exists():
        try:
            stored = load_json(path)
            if stored.get("settings") == settings:
                return Tokenizer.from_str(stored["tokenizer"])
        except Exception:  # damaged, truncated or foreign file: retrain below
            pass
    tok, trainer = _new_bpe(vocab_size)
    stream = (t[::-1] for t in texts) if reversed_text else iter(texts)
    tok.train_from_iterator(stream, trainer, length=len(texts))
    if tok.token_to_id(BOS) != 0:
        raise AssertionError("the BPE trainer did not put <bos> at id 0")
    save_json(path, {"settings": settings, "tokenizer": tok.to_str()})
    return tok


class BPETokenizer:
    """A trained HF tokenizer behind the `TextTokenizer` protocol."""

    def __init__(self, tokenizer: Tokenizer, reversed_text: bool = False):
        self.hf = tokenizer
        self.reversed_text = bool(reversed_text)
        self.vocab_size = tokenizer.get_vocab_size()
        bos = tokenizer.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"the tokenizer has no {BOS} token")
        self.bos_id = bos

    def encode(self, text: str) -> list[int]:
        if self.reversed_text:
            return self.hf.encode(text[::-1]).ids[::-1]
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in parallel threads (same result as one by one)."""
        if self.reversed_text:
            return [e.ids[::-1] for e in self.hf.encode_batch([t[::-1] for t in texts])]
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.reversed_text:
            return self.hf.decode(ids[::-1])[::-1]
        return self.hf.decode(ids)

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer (`tokenizer_from_state`)."""
        return {"kind": "bpe", "json": self.hf.to_str(), "reversed_text": self.reversed_text}

    def __repr__(self) -> str:
        rev = ", reversed_text=True" if self.reversed_text else ""
        return f"BPETokenizer(vocab_size={self.vocab_size}{rev})"


def bpe_tokenizer(
    texts: list[str], vocab_size: int, *, reversed_text: bool = False, name: str
) -> BPETokenizer:
    """`train_bpe` wrapped in `BPETokenizer`."""
    tok = train_bpe(texts, vocab_size, reversed_text=reversed_text, name=name)
    return BPETokenizer(tok, reversed_text)


class CharTokenizer:
    """One token per character of `alphabet`, after <bos> (id 0): character i has id i + 1."""

    def __init__(self, alphabet: str):
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be non-empty without repeats, got {alphabet!r}")
        self.alphabet = alphabet
        self.bos_id = 0
        self.vocab_size = len(alphabet) + 1
        self._ids = {ch: i + 1 for i, ch in enumerate(alphabet)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.alphabet)
        out = []
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if not 1 <= i <= n:
                raise ValueError(f"id {i} is outside this tokenizer's range 0..{n}")
            out.append(self.alphabet[i - 1])
        return "".join(out)

    def state(self) -> dict[str, Any]:
        return {"kind": "char", "alphabet": self.alphabet}

    def __repr__(self) -> str:
        return f"CharTokenizer({self.alphabet!r})"


def tokenizer_from_state(state: dict[str, Any]) -> BPETokenizer | CharTokenizer:
    """Inverse of the tokenizers' `state()`."""
    if state.get("kind") == "bpe":
        return BPETokenizer(Tokenizer.from_str(state["json"]), state["reversed_text"])
    if state.get("kind") == "char":
        return CharTokenizer(state["alphabet"])
    raise ValueError(f"unknown tokenizer state kind {state.get('kind')!r}")
