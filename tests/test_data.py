"""Windows and directions: the data protocol the forward/backward comparison relies on."""

from __future__ import annotations

import random
import sys
import types
from collections import Counter

import pytest
import torch

import aotlib
from aotlib import corpus, data, tokens
from aotlib.data import DataConfig, build_data, orient

# ----------------------------------------------------------------------------- orient


def test_orient_backward_reverses_tokens_and_keeps_bos():
    w = torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]])
    assert orient(w, "forward") is w
    assert orient(w, "backward").tolist() == [[0, 4, 3, 2, 1], [0, 8, 7, 6, 5]]


def test_orient_properties_on_random_windows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(1, 50, (64, 17), generator=gen)
    w[:, 0] = 0
    b = orient(w, "backward")
    assert torch.equal(orient(b, "backward"), w)  # an involution
    assert torch.equal(b[:, 0], w[:, 0])  # BOS first in both directions
    # Both directions predict the same multiset of tokens in every window.
    assert torch.equal(b[:, 1:].sort(1).values, w[:, 1:].sort(1).values)
    assert not torch.equal(b, w)


@pytest.mark.parametrize(
    ("w", "direction", "match"),
    [
        (torch.zeros(4, 5, dtype=torch.long), "sideways", "direction must be one of"),
        (torch.zeros(5, dtype=torch.long), "forward", r"shape \(N, T \+ 1\)"),
        (torch.zeros(4, 1, dtype=torch.long), "backward", r"shape \(N, T \+ 1\)"),
    ],
)
def test_orient_rejects_bad_input(w, direction, match):
    with pytest.raises(ValueError, match=match):
        orient(w, direction)


# ----------------------------------------------------------------------------- windows
def test_make_windows_non_overlapping_with_bos():
    ids = torch.arange(1, 12)  # 11 tokens, context 4 -> 2 windows, 3 tokens dropped
    w = data.make_windows(ids, 4, bos_id=0)
    assert w.dtype == torch.int64
    assert w.tolist() == [[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]]


def test_split_is_a_seeded_partition():
    tr, va = data.split_indices(100, 0.1, seed=42)
    assert len(va) == 10 and len(tr) == 90
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    tr2, va2 = data.split_indices(100, 0.1, seed=42)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, data.split_indices(100, 0.1, seed=43)[1])
    assert len(data.split_indices(3, 0.01, seed=0)[1]) == 1  # never an empty split
    with pytest.raises(ValueError, match="at least 2 windows"):
        data.split_indices(1, 0.5, seed=0)


# ----------------------------------------------------------------------------- configs
def test_config_validation_and_normalisation():
    assert DataConfig(lang="French") == DataConfig(lang="fr")
    assert DataConfig(parallel=["english"]).parallel == ("en",)
    assert DataConfig(corpus="primes", options=(("b", 1), ("a", [2]))).options == (
        ("a", (2,)),
        ("b", 1),
    )
    bad = [
        dict(tokenizer="wordpiece"),
        dict(context=0),
        dict(val_fraction=1.0),
        dict(max_train_tokens=0),
        dict(vocab_size=100),
        dict(lang="klingon"),
        dict(corpus="cc100", parallel=("en",)),
        dict(corpus="primes", tokenizer="bpe-reversed"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            DataConfig(**kw)


def test_paper_preset_builds_its_pipeline_offline(monkeypatch, tmp_cache):
    cfg = DataConfig(corpus="cc100", lang="en", vocab_size=50257, context=256)
    spec = data.tokenizer_spec(cfg)
    assert spec == {"kind": "bpe", "name": "cc100-en", "vocab_size": 50257, "reversed_text": False}
    assert data.data_key(cfg) is not None  # keyed without any network
    monkeypatch.setitem(sys.modules, "datasets", None)  # offline: library unavailable
    with pytest.raises(RuntimeError, match="cc100 corpus needs .*pip install"):
        build_data(cfg)


# ----------------------------------------------------------------------------- natural text
WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "lambda", "omega", "sigma", "tau", "rho",
         "the", "of", "and", "to", "in", "is", "was", "for", "on", "with"]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 60k characters of a seeded toy language, one paragraph per line pair."""
    rng = random.Random(0)
    paras = []
    for _ in range(400):
        sent = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))).capitalize() + "."
                for _ in range(rng.randint(1, 3))]  # fmt: skip
        paras.append(" ".join(sent))
    path = tmp_path_factory.mktemp("corpus") / "toy.txt"
    path.write_text("\n\n".join(paras), encoding="utf-8")
    return path


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "cache"))
    build_data.cache_clear()
    yield tmp_path / "cache"
    build_data.cache_clear()


def _cfg(path, **kw):
    base = dict(corpus=str(path), lang="toy", vocab_size=300, context=16, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def test_build_data_windows_split_and_directions(text_file, tmp_cache):
    d = build_data(_cfg(text_file))
    n_tr, n_va = len(d.train), len(d.val)
    assert d.train.shape[1] == d.val.shape[1] == 17 and d.train.dtype == torch.int64
    assert n_tr > 500 and n_va == round(0.1 * (n_tr + n_va))
    assert (d.train[:, 0] == d.bos_id).all() and (d.val[:, 0] == d.bos_id).all()
    assert not (d.train[:, 1:] == d.bos_id).any()  # BOS only in column 0
    assert d.vocab_size == d.tokenizer.vocab_size <= 300
    rows = [tuple(r) for r in torch.cat([d.train, d.val]).tolist()]
    assert len(set(rows)) == len(rows)  # windows are distinct, so the next check has teeth
    assert not set(map(tuple, d.val.tolist())) & set(map(tuple, d.train.tolist()))
    # The windows tile the token stream of the corpus: decode them back in stream order.
    text = "\n".join(corpus.local_text(text_file)) + "\n"
    assert sum(map(len, (d.tokenizer.decode(r[1:]) for r in rows))) <= len(text)
    assert all(d.tokenizer.decode(r[1:]) in text for r in rows[:50])
    # Direction is applied after the split: same windows, same tokens, both ways.
    for split in (d.train, d.val):
        b = orient(split, "backward")
        assert torch.equal(orient(b, "backward"), split)
        assert Counter(b[:, 1:].flatten().tolist()) == Counter(split[:, 1:].flatten().tolist())


def test_max_train_tokens_caps_train_only(text_file, tmp_cache):
    full = build_data(_cfg(text_file))
    capped = build_data(_cfg(text_file, max_train_tokens=160))
    assert len(capped.train) == 10
    assert torch.equal(capped.val, full.val)  # the validation split does not move
    assert torch.equal(capped.train, full.train[:10])  # a random subset, same for all caps


def test_build_data_is_deterministic_and_cached(text_file, tmp_cache, tmp_path, monkeypatch):
    cfg = _cfg(text_file)
    d1 = build_data(cfg)
    assert build_data(cfg) is d1  # in memory
    (path,) = (tmp_cache / "data").glob("*.pt")
    build_data.cache_clear()

    def boom(cfg):
        raise AssertionError("should have been read from the disk cache")

    natural = data._natural
    monkeypatch.setattr(data, "_natural", boom)
    d2 = build_data(cfg)
    assert torch.equal(d1.train, d2.train) and torch.equal(d1.val, d2.val)
    assert d2.tokenizer.encode("alpha beta") == d1.tokenizer.encode("alpha beta")
    monkeypatch.setattr(data, "_natural", natural)
    # A damaged cache file is detected and rebuilt, not trusted.
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    build_data.cache_clear()
    d3 = build_data(cfg)
    assert torch.equal(d1.train, d3.train)
    assert path.read_bytes() != bytes(raw)  # rewritten
    # A fresh cache (nothing stored, tokenizer retrained) gives identical windows.
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "other"))
    build_data.cache_clear()
    d4 = build_data(cfg)
    assert torch.equal(d1.train, d4.train) and torch.equal(d1.val, d4.val)


def test_bpe_reversed_is_the_mirror_tokenizer(text_file, tmp_cache):
    fw = build_data(_cfg(text_file, tokenizer="bpe"))
    bw = build_data(_cfg(text_file, tokenizer="bpe-reversed"))
    tok = bw.tokenizer
    assert isinstance(tok, tokens.BPETokenizer) and tok.reversed_text
    vocab = set(tok.hf.get_vocab())
    assert "ammag" in vocab or "Ġammag" in vocab  # merges learnt on reversed text
    assert "gamma" not in vocab and "Ġgamma" not in vocab
    s = "Gamma of the sigma, omega.\nAlpha tau 123 é"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode(s) == tok.encode_batch([s])[0]
    # Encoding document by document equals encoding the whole stream, in both tokenizers.
    docs = [d + "\n" for d in corpus.local_text(text_file)]
    for t in (fw.tokenizer, tok):
        assert t.encode("".join(docs)) == [i for ids in t.encode_batch(docs) for i in ids]
    # Windows hold forward-order text either way; only the cut into tokens differs.
    text = "\n".join(corpus.local_text(text_file)) + "\n"
    assert tok.decode(bw.train[0, 1:].tolist()) in text
    assert not torch.equal(fw.train, bw.train)


def test_char_tokenizer_on_natural_text(text_file, tmp_cache):
    d = build_data(_cfg(text_file, tokenizer="char", vocab_size=1))
    assert isinstance(d.tokenizer, tokens.CharTokenizer)
    assert d.vocab_size == len(set(text_file.read_text().replace("\n\n", "\n"))) + 1


def test_too_short_corpus_is_reported(tmp_path, tmp_cache):
    f = tmp_path / "short.txt"
    f.write_text("alpha beta gamma " * 70, encoding="utf-8")
    with pytest.raises(ValueError, match="too short for two windows"):
        build_data(_cfg(f, context=4096))


# ----------------------------------------------------------------------------- tokenizers
def test_train_bpe_is_deterministic_and_cached(tmp_path, monkeypatch):
    texts = [" ".join(random.Random(i).choices(WORDS, k=30)) for i in range(200)]
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "a"))
    a = tokens.train_bpe(texts, 300, name="toy")
    (cached,) = (tmp_path / "a" / "tokenizers").glob("toy-*.json")
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "b"))
    b = tokens.train_bpe(texts, 300, name="toy")
    assert a.to_str() == b.to_str()
    assert a.token_to_id(tokens.BOS) == 0 and a.get_vocab_size() == 300
    cached.write_text("{ damaged")  # a broken cache file is retrained, not trusted
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "a"))
    assert tokens.train_bpe(texts, 300, name="toy").to_str() == a.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        tokens.train_bpe(texts, 100, name="toy")


def test_char_tokenizer():
    tok = tokens.CharTokenizer("01*= ")
    assert tok.vocab_size == 6 and tok.bos_id == 0
    assert tok.encode("10 = 1") == [2, 1, 5, 4, 5, 2]
    assert tok.decode([0, *tok.encode("10 = 1")]) == "10 = 1"
    assert isinstance(tok, tokens.TextTokenizer)
    with pytest.raises(ValueError, match="'x' is not in the alphabet"):
        tok.encode("1x")
    with pytest.raises(ValueError, match="without repeats"):
        tokens.CharTokenizer("001")
    state = tokens.tokenizer_from_state(tok.state())
    assert state.encode("01") == tok.encode("01")


# ----------------------------------------------------------------------------- synthetic
@pytest.fixture
def fake_synthetic(monkeypatch):
    """Stands in for aotlib/synthetic.py (written separately) with the agreed signature."""
    calls = []

    def synthetic_lines(name, seed, **options):
        calls.append((name, seed, options))
        rng = random.Random(seed)
        n = options.get("n", 3)
        make = lambda: "".join(rng.choice("01") for _ in range(n)) + "=" + "0" * n
        return [make() for _ in range(40)], [make() for _ in range(8)], "01="

    fake = types.ModuleType("aotlib.synthetic")
    fake.synthetic_lines = synthetic_lines
    monkeypatch.setitem(sys.modules, "aotlib.synthetic", fake)
    monkeypatch.setattr(aotlib, "synthetic", fake, raising=False)
    return calls


def test_synthetic_corpus_one_window_per_line(fake_synthetic, tmp_cache):
    cfg = DataConfig(corpus="linear", tokenizer="char", seed=7, options=(("n", 5),))
    d = build_data(cfg)
    assert fake_synthetic == [("linear", 7, {"n": 5})]
    assert d.train.shape == (40, 12) and d.val.shape == (8, 12)  # BOS + 11 characters
    assert d.vocab_size == 4 and (d.train[:, 0] == d.bos_id).all()
    assert d.tokenizer.decode(d.train[0].tolist())[5:] == "=00000"
    assert list((tmp_cache / "data").glob("*.pt")) == []  # a fake module is never cached
    capped = build_data(
        DataConfig(corpus="linear", seed=7, options=(("n", 5),), max_train_tokens=55)
    )
    assert len(capped.train) == 5


def test_synthetic_lines_must_share_one_length(monkeypatch, fake_synthetic, tmp_cache):
    monkeypatch.setattr(
        sys.modules["aotlib.synthetic"],
        "synthetic_lines",
        lambda name, seed, **o: (["01=1", "0=1"], ["01=1"], "01="),
    )
    with pytest.raises(ValueError, match="share one length"):
        build_data(DataConfig(corpus="primes", tokenizer="char"))


# ----------------------------------------------------------------------------- the Bible
@pytest.fixture(scope="session")
def bible_folder():
    """The real database, downloaded once per session into the normal cache."""
    return corpus.bible_db().parent


@pytest.mark.xdist_group("bible")
def test_bible_smoke_preset(bible_folder, tmp_cache):
    """The smoke-scale notebooks' data: French Bible, BPE 512, context 32, 20k tokens."""
    tmp_cache.mkdir(parents=True, exist_ok=True)
    (tmp_cache / "bible").symlink_to(bible_folder)  # share the download, not the rest
    cfg = DataConfig(corpus="bible", lang="fr", vocab_size=512, context=32, max_train_tokens=20_000)
    d = build_data(cfg)
    assert d.train.shape == (20_000 // 32, 33) and d.vocab_size == 512
    n_windows = round(len(d.val) / 0.05)
    assert 1_000_000 < n_windows * 32 < 2_000_000  # the French Bible: about 1.2M tokens
    assert " et " in d.tokenizer.decode(d.val[:20, 1:].flatten().tolist())
