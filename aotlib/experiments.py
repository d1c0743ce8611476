"""Experiment presets: one scale switch ("smoke" | "cpu" | "paper") -> full configs.

Notebooks and the command line build their configs here, so a figure's runs are
defined once. `smoke` is for CI (seconds), `cpu` is what `make figures` uses (real
training on a 2-core machine), `paper` reproduces the paper's settings for GPU users.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aotlib.data import DataConfig
from aotlib.models import model_config
from aotlib.plotting import check_scale
from aotlib.train import TrainConfig

# Per-scale defaults for natural-language runs. `cpu` follows the calibration in the
# issue tracker (4-layer GPT, d=128, BPE 4096, context 128, AdamW 2e-3, cosine decay),
# except dropout: 0 at the cpu scale, where runs see each token about once (as in
# nanoGPT's pretraining setting) and dropout costs ~20% of CPU throughput; the paper
# preset keeps the paper's 0.1.
LM_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(size="xs", vocab_size=512, context=32, steps=30, batch_size=8,
                  max_train_tokens=20_000, eval_every=10, lr=2e-3, warmup=5,
                  eval_windows=64, final_eval_windows=256, dropout=0.0),
    "cpu": dict(size="s", vocab_size=4096, context=128, steps=1000, batch_size=32,
                max_train_tokens=None, eval_every=50, lr=2e-3, warmup=50,
                eval_windows=128, final_eval_windows=None, dropout=0.0),
    "paper": dict(size="medium", vocab_size=50257, context=256, steps=100_000, batch_size=64,
                  max_train_tokens=None, eval_every=1000, lr=1e-4, warmup=1000,
                  eval_windows=512, final_eval_windows=None, dropout=0.1),
}  # fmt: skip


def lm_config(
    scale: str,
    *,
    arch: str = "gpt",
    lang: str = "fr",
    direction: str = "forward",
    seed: int = 0,
    size: str | None = None,
    context: int | None = None,
    tokenizer: str = "bpe",
    corpus: str | None = None,
    **overrides: Any,
) -> TrainConfig:
    """The natural-language training config of `scale`, with any field overridden."""
    p = dict(LM_PRESETS[check_scale(scale)])
    corpus = corpus or ("cc100" if scale == "paper" else "bible")
    data = DataConfig(
        corpus=corpus,
        lang=lang,
        tokenizer=tokenizer,
        vocab_size=p["vocab_size"],
        context=context or p["context"],
        max_train_tokens=p["max_train_tokens"],
    )
    model = model_config(arch, size or p["size"], dropout=p["dropout"])
    cfg = TrainConfig(
        model=model,
        data=data,
        direction=direction,
        steps=p["steps"],
        batch_size=p["batch_size"],
        lr=p["lr"],
        min_lr=p["lr"] / 10,
        warmup=p["warmup"],
        eval_every=p["eval_every"],
        checkpoint_every=p["eval_every"],
        eval_windows=p["eval_windows"],
        final_eval_windows=p["final_eval_windows"],
        seed=seed,
    )
    return replace(cfg, **overrides) if overrides else cfg


def both_directions(cfg: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The forward and backward versions of one config."""
    return replace(cfg, direction="forward"), replace(cfg, direction="backward")


# Synthetic languages (notebooks 06 and 07). The cpu preset follows the calibration in
# the issue tracker: with the paper's 5-digit primes a CPU budget learns neither
# direction, so the cpu preset uses primes of up to 3 digits; `paper` keeps 5 digits.
SYNTH_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(size="xs", steps=40, batch_size=16, eval_every=10, lr=2e-3, warmup=5,
                  digits=2, n_primes=(200, 40), n_lines=(2000, 200)),
    "cpu": dict(size="s", steps=2000, batch_size=128, eval_every=100, lr=2e-3, warmup=100,
                digits=3, n_primes=(12_000, 2_000), n_lines=(100_000, 2_000)),
    "paper": dict(size="small", steps=50_000, batch_size=256, eval_every=1000, lr=1e-4,
                  warmup=1000, digits=5, n_primes=(1_000_000, 10_000), n_lines=(1_000_000, 10_000)),
}  # fmt: skip


def synthetic_config(
    scale: str,
    corpus: str,
    *,
    direction: str = "forward",
    seed: int = 0,
    size: str | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> TrainConfig:
    """A character-level GPT on a synthetic language ("primes" or "linear").

    `options` go to the generator (see aotlib.synthetic), except `steps`.
    """
    p = SYNTH_PRESETS[check_scale(scale)]
    if corpus == "primes":
        opts = dict(digits=p["digits"], n_train=p["n_primes"][0], n_val=p["n_primes"][1])
    elif corpus == "linear":
        opts = dict(n=20, k=6, n_train=p["n_lines"][0], n_val=p["n_lines"][1])
    else:
        raise ValueError(f"corpus must be 'primes' or 'linear', got {corpus!r}")
    steps = options.pop("steps", p["steps"])
    opts.update(options)
    data = DataConfig(corpus=corpus, tokenizer="char", options=tuple(sorted(opts.items())))
    return TrainConfig(
        model=model_config("gpt", size or p["size"]),
        data=data,
        direction=direction,
        steps=steps,
        batch_size=batch_size or p["batch_size"],
        lr=p["lr"],
        min_lr=p["lr"] / 10,
        warmup=p["warmup"],
        eval_every=p["eval_every"],
        checkpoint_every=p["eval_every"],
        eval_windows=1024,
        seed=seed,
    )


# ----------------------------------------------------------------------------- grids
# Each notebook's runs, defined once: the notebook reads them, `python -m aotlib grid`
# trains what is missing (two shards use both cores).

# The language grid: every default language with three seeds at the cpu scale (about 8
# CPU-minutes per run), the reversed-BPE tokenizer control for French and English with two.
# Adding languages or seeds here adds runs and keeps the stored ones (a run is keyed by
# its config, not by its place in a grid).
LANGUAGES = {
    "smoke": ["fr", "en"],
    "cpu": ["fr", "en", "de", "ru", "tr", "ar"],
    "paper": ["en", "fr", "de"],
}
SEEDS = {"smoke": [0], "cpu": [0, 1, 2], "paper": [0]}
CONTROL_LANGUAGES = {"smoke": ["fr"], "cpu": ["fr", "en"], "paper": ["fr"]}
CONTROL_SEEDS = {"smoke": [0], "cpu": [0, 1], "paper": [0]}
TOKENIZER_CONTROL = {"smoke": True, "cpu": True, "paper": True}
SIZES_FOR_ARCH = {
    "smoke": {"gpt": ["xs"], "lstm": ["xs"]},
    "cpu": {a: ["xs", "s", "m", "l"] for a in ("gpt", "lstm", "gru", "mamba2")},
    "paper": {"gpt": ["nano", "small", "medium"], "lstm": ["small", "medium", "large"]},
}
# The size and context grids' short runs (1-10 CPU-minutes each at the cpu scale; the
# paper scale keeps its preset's steps) vary from seed to seed more than a bootstrap over
# validation windows shows, so they have two seeds.
SHORT_RUN_STEPS = {"smoke": {"steps": 30}, "cpu": {"steps": 150}, "paper": {}}
SHORT_RUN_SEEDS = {"smoke": [0], "cpu": [0, 1], "paper": [0]}
CONTEXTS = {"smoke": [16, 32], "cpu": [16, 32, 64, 128, 256, 512], "paper": [16, 64, 256, 512]}
LINEAR_KS = {"smoke": [0, 6], "cpu": [0, 4, 16, 40], "paper": [0, 2, 4, 8, 16, 32, 50]}


def languages_grid(scale: str) -> list[TrainConfig]:
    """Notebook 03: both directions per language and seed, and the tokenizer control.

    Ordered seed by seed (every language's first seed and its controls, then every
    language's second, ...), so that `python -m aotlib grid languages` stopped at any
    point leaves the most languages measured.
    """
    runs = []
    for seed in SEEDS[scale]:
        for lang in LANGUAGES[scale]:
            runs += both_directions(lm_config(scale, lang=lang, seed=seed))
        if TOKENIZER_CONTROL[scale] and seed in CONTROL_SEEDS[scale]:
            for lang in CONTROL_LANGUAGES[scale]:
                rev = lm_config(scale, lang=lang, seed=seed, tokenizer="bpe-reversed")
                runs += both_directions(rev)
    return runs


# The longest series this machine affords (notebook 03): the cpu preset's GPT for 4x its
# tokens (about 15 passes over a language's Bible, so dropout 0.1 against overfitting;
# the notebook reports the best validation point), evaluated every 200 steps. About 40
# CPU-minutes per run, six runs: `python -m aotlib grid long` in two processes.
LONG_SERIES: dict[str, dict[str, Any]] = {
    "smoke": dict(langs=["fr"], steps=40, eval_every=10, dropout=0.1),
    "cpu": dict(langs=["en", "de", "fr"], steps=4000, eval_every=200, dropout=0.1),
    "paper": dict(langs=["en"], steps=400_000, eval_every=4000, dropout=0.1),
}  # fmt: skip


def long_grid(scale: str) -> list[TrainConfig]:
    """Notebook 03: one seed per language of a 4x longer run, both directions."""
    p = LONG_SERIES[check_scale(scale)]
    runs = []
    for lang in p["langs"]:
        every = dict(eval_every=p["eval_every"], checkpoint_every=p["eval_every"])
        cfg = lm_config(scale, lang=lang, steps=p["steps"], **every)
        runs += both_directions(replace(cfg, model=replace(cfg.model, dropout=p["dropout"])))
    return runs


def size_grid(scale: str) -> list[TrainConfig]:
    """Notebook 04: both directions for each architecture and size (French)."""
    over = SHORT_RUN_STEPS[scale]
    runs = []
    for seed in SHORT_RUN_SEEDS[scale]:
        for arch, sizes in SIZES_FOR_ARCH[scale].items():
            for size in sizes:
                cfg = lm_config(scale, arch=arch, size=size, seed=seed, **over)
                runs += both_directions(cfg)
    return runs


def context_grid(scale: str) -> list[TrainConfig]:
    """Notebook 05: both directions per context length at a fixed token budget per step."""
    base = LM_PRESETS[scale]
    tokens_per_step = base["batch_size"] * base["context"]
    runs = []
    for seed in SHORT_RUN_SEEDS[scale]:
        for lang in LANGUAGES[scale][:2]:
            for context in CONTEXTS[scale]:
                batch = max(1, tokens_per_step // context)
                over = dict(SHORT_RUN_STEPS[scale], batch_size=batch, seed=seed)
                runs += both_directions(lm_config(scale, lang=lang, context=context, **over))
    return runs


def primes_grid(scale: str) -> list[TrainConfig]:
    """Notebook 06: multiply (forward) against factor (backward)."""
    return list(both_directions(synthetic_config(scale, "primes")))


def linear_grid(scale: str) -> list[TrainConfig]:
    """Notebook 07: one 20x20 k=6 language (curves), then smaller languages across k.

    At the cpu scale a 2-layer d=64 GPT learned nothing in 2000 steps of 64 lines (both
    directions stayed at the marginal 2n ln2 / (2n+7)), so the runs use the 4-layer
    d=128 GPT of the primes runs; the sweep over k uses 16x16 matrices and 64 lines per
    step to fit a CPU budget (the paper: 25x25).
    """
    curve_steps = {"smoke": 40, "cpu": 1500, "paper": 20_000}[scale]
    runs = list(both_directions(synthetic_config(scale, "linear", steps=curve_steps)))
    n = {"smoke": 25, "cpu": 16, "paper": 25}[scale]
    steps = {"smoke": 40, "cpu": 800, "paper": 20_000}[scale]
    batch = {"smoke": None, "cpu": 64, "paper": None}[scale]
    for k in LINEAR_KS[scale]:
        runs += both_directions(
            synthetic_config(scale, "linear", n=n, k=k, steps=steps, batch_size=batch)
        )
    return runs


# Notebook 10's runs are MQAR configs, not language-model ones (aotlib.mqar).
from aotlib.mqar import mqar_grid

GRIDS = {
    "primes": primes_grid,
    "linear": linear_grid,
    "languages": languages_grid,
    "long": long_grid,
    "size": size_grid,
    "context": context_grid,
    "mqar": mqar_grid,
}
