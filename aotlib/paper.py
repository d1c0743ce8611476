"""The papers' numbers that the notebooks compare against, each once, with its source.

Most Arrows-of-Time numbers were read off figures (the paper's, its project page's or
its ICML poster's), not taken from a table: `read_off_plot` says so, and such a number
is a target for the trend, good to about the width of a plotted line. Notebooks use
these through `paper_number(name)` and print `source` beside the value.

Two numbers that look alike are different measurements. The English arrow at the end of
training of GPT-2 medium, +0.76% (L_FW 2.880, L_BW 2.902), comes from the language
figure; the context figure's English point at context 256, +0.90%, comes from the
context sweep, a separate set of runs with the same model and context: the two differ
by about as much as reading the two plots can, and both say "a forward arrow of just
under one per cent" for English.
"""

from __future__ import annotations

from dataclasses import dataclass

AOT = "Arrows of Time (Papadopoulos, Wenger, Hongler, ICML 2024)"
SSD = "Transformers are SSMs (Dao, Gu, ICML 2024)"


@dataclass(frozen=True)
class PaperNumber:
    value: float | tuple[float, ...]
    unit: str
    source: str
    read_off_plot: bool
    note: str = ""

    def cite(self) -> str:
        """The source in one line, marked "(est., read off a plot)" where it applies."""
        return self.source + (" (est., read off a plot)" if self.read_off_plot else "")


PAPER: dict[str, PaperNumber] = {
    # --- natural language, GPT-2 medium (24 layers, d=1024) on CC100, context 256
    "en_final": PaperNumber(
        (2.880, 2.902, 0.76), "L_FW, L_BW (nats/token), delta %",
        f"{AOT}: validation curves, English vs French, end of training", True),
    "fr_final": PaperNumber(
        (2.788, 2.862, 2.6), "L_FW, L_BW (nats/token), delta %",
        f"{AOT}: validation curves, English vs French, end of training", True),
    "context_lengths": PaperNumber(
        (16, 32, 64, 128, 256, 512), "tokens",
        f"{AOT}: BW/FW loss difference vs context length (GPT-2 medium)", False),
    "context_fr": PaperNumber(
        (0.40, 0.82, 1.21, 1.94, 2.65, 2.92), "delta % at each context length",
        f"{AOT}: BW/FW loss difference vs context length (GPT-2 medium)", True),
    "context_en": PaperNumber(
        (0.07, 0.18, 0.48, 0.84, 0.90, 1.02), "delta % at each context length",
        f"{AOT}: BW/FW loss difference vs context length (GPT-2 medium)", True),
    # --- model size, English (delta in per mille; the poster's panel). Each point is
    # (aotlib size preset of that model, total parameters quoted, delta per mille).
    "size_gpt": PaperNumber(
        (("nano", 4.9e6, -3.0), ("small", 55.6e6, 2.0), ("medium", 405e6, 7.5)),
        "(preset, total parameters, delta per mille)",
        f"{AOT}: poster, delta vs model size (GPT nano / small / medium)", True,
        "nano has about 83k non-embedding parameters; the rest is the 50257-token embedding"),
    "size_lstm": PaperNumber(
        (("small", 26e6, -3.0), ("medium", 38e6, 1.0), ("large", 101e6, 1.3)),
        "(preset, total parameters, delta per mille)",
        f"{AOT}: poster, delta vs model size (LSTM)", True),
    "size_gru": PaperNumber(
        (("small", 26e6, -1.0), ("medium", 56e6, 2.0), ("large", 94e6, 3.0)),
        "(preset, total parameters, delta per mille)",
        f"{AOT}: poster, delta vs model size (GRU)", True),
    # --- synthetic languages
    "linear_floor_25": PaperNumber(
        0.347, "nats/token", f"{AOT}: linear languages, 25x25, identity matrix, p = 0.01",
        False, "[n ln2 + n H_b(2p(1-p))] / (2n + 7) with n = 25, p = 0.01"),
    "linear_k50_25": PaperNumber(
        0.53, "nats/token", f"{AOT}: linear languages, 25x25 loss vs k, k = 50", True),
    # --- SSD efficiency (A100 80GB)
    "ssd_vs_scan": PaperNumber(
        (2.0, 8.0), "speed-up range", f"{SSD}: Fig. 10, SSD vs Mamba's fused scan", False),
    "ssd_vs_flash": PaperNumber(
        (2048, 6.0, 10.0), "(crossover length, speed-up at 16K, at 32K: more than)",
        f"{SSD}: Fig. 10 and text, SSD vs FlashAttention-2", False),
}  # fmt: skip


def paper_number(name: str) -> PaperNumber:
    """The paper number `name` (see PAPER), with a clear error for an unknown name."""
    if name not in PAPER:
        raise KeyError(f"no paper number {name!r}; known: {', '.join(sorted(PAPER))}")
    return PAPER[name]


def size_points(arch: str) -> list[tuple[int, float]]:
    """The paper's model-size points of `arch` as (non-embedding parameters, delta in %),
    counting parameters of aotlib's preset of each model (built on the meta device: shapes
    only), so they share an axis with this project's own sizes."""
    import torch

    from aotlib.models import build_model, count_parameters, model_config

    points = []
    for preset, _, permille in paper_number(f"size_{arch}").value:
        with torch.device("meta"):
            model = build_model(model_config(arch, preset))
        points.append((count_parameters(model), permille / 10))
    return points


def verdict(paper_sign: int, mean: float, err: float, z: float = 2.0) -> str:
    """ "agree", "disagree" or "cannot tell at this scale" for a measurement mean +- err
    (one standard error) against the sign a paper reports (+1 or -1)."""
    if err < 0 or paper_sign not in (1, -1):
        raise ValueError(f"need err >= 0 and paper_sign in (1, -1), got {err}, {paper_sign}")
    if err == 0 or abs(mean) < z * err:
        return "cannot tell at this scale"
    return "agree" if mean * paper_sign > 0 else "disagree"


def verdict_interval(paper_sign: int, lo: float, hi: float) -> str:
    """The same verdict from a confidence interval [lo, hi] (e.g. a bootstrap over windows
    of one run): it agrees or disagrees only when the interval excludes zero."""
    if lo > hi or paper_sign not in (1, -1):
        raise ValueError(f"need lo <= hi and paper_sign in (1, -1), got {lo}, {hi}, {paper_sign}")
    if lo <= 0 <= hi:
        return "cannot tell at this scale"
    return "agree" if lo * paper_sign > 0 else "disagree"
