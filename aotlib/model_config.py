"""`ModelConfig`: the one config of every language model (GPT, LSTM, GRU, Mamba-2).

It lives apart from `aotlib.models` (which builds the models and holds the size
presets) so that the architectures (gpt.py, rnn.py, mamba2.py) and the registry that
builds them both import it, and no import runs in a circle. `aotlib.models` re-exports it.

Its fields are hashed into the key of every stored result (`TrainConfig.key`): adding,
renaming or reordering one would orphan every result in results/.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = ("gpt", "lstm", "gru", "mamba2")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"  # "gpt" | "lstm" | "gru" | "mamba2"
    vocab_size: int = 4096
    context: int = 128  # max input length T (input is [BOS] + T-1 tokens)
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4  # gpt heads; mamba2 heads = expand * d_model // head_dim
    dropout: float = 0.1
    d_state: int = 64  # mamba2 N
    head_dim: int = 32  # mamba2 P
    expand: int = 2  # mamba2
    chunk_size: int = 32  # mamba2 SSD chunk
    ngroups: int = 1  # mamba2

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "context", "n_layer", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "gpt":
            if self.n_head < 1 or self.d_model % self.n_head:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
                )
        if self.arch == "mamba2":
            for name in ("d_state", "head_dim", "expand", "chunk_size", "ngroups"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            d_inner = self.expand * self.d_model
            if d_inner % self.head_dim:
                raise ValueError(
                    f"expand * d_model ({d_inner}) must be divisible by head_dim ({self.head_dim})"
                )
            n_heads = d_inner // self.head_dim
            if n_heads % self.ngroups:
                raise ValueError(
                    f"mamba2 heads ({n_heads} = expand * d_model // head_dim) must be "
                    f"divisible by ngroups ({self.ngroups})"
                )

    @property
    def n_heads_ssm(self) -> int:
        """Mamba-2 heads: the inner width expand * d_model split into heads of head_dim."""
        return self.expand * self.d_model // self.head_dim
