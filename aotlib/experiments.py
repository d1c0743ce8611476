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
# issue tracker (4-layer GPT, d=128, BPE 4096, context 128, AdamW 2e-3, cosine decay).
LM_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(size="xs", vocab_size=512, context=32, steps=30, batch_size=8,
                  max_train_tokens=20_000, eval_every=10, lr=2e-3, warmup=5),
    "cpu": dict(size="s", vocab_size=4096, context=128, steps=600, batch_size=32,
                max_train_tokens=None, eval_every=50, lr=2e-3, warmup=50),
    "paper": dict(size="medium", vocab_size=50257, context=256, steps=100_000, batch_size=64,
                  max_train_tokens=None, eval_every=1000, lr=1e-4, warmup=1000),
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
    model = model_config(arch, size or p["size"])
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
        seed=seed,
    )
    return replace(cfg, **overrides) if overrides else cfg


def both_directions(cfg: TrainConfig) -> tuple[TrainConfig, TrainConfig]:
    """The forward and backward versions of one config."""
    return replace(cfg, direction="forward"), replace(cfg, direction="backward")
