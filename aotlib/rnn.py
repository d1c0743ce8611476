"""LSTM and GRU language models, the Arrows-of-Time paper's recurrent baselines.

Embedding -> dropout -> nn.LSTM / nn.GRU (n_layer layers, hidden size = d_model,
dropout between layers) -> dropout -> LayerNorm -> LM head. As in the paper's code the
head is *untied* (its own vocab x d matrix, no bias) and there is a final LayerNorm, so
the paper's parameter counts (LSTM 26M/101M, GRU 26M/56M/94M) come out exactly.
Weights keep PyTorch's defaults (as in the paper's code): N(0, 1) embedding, U(+-1/sqrt(d))
recurrent and head weights. The recurrence is causal by construction (unidirectional).
"""

from __future__ import annotations

import torch
from torch import nn

from aotlib.layers import Dropout, check_input
from aotlib.model_config import ModelConfig


class RNNLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch not in ("lstm", "gru"):
            raise ValueError(f"RNNLM needs cfg.arch in ('lstm', 'gru'), got {cfg.arch!r}")
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.drop = Dropout(cfg.dropout)
        rnn_cls = nn.LSTM if cfg.arch == "lstm" else nn.GRU
        # nn.LSTM/GRU apply `dropout` between layers only (not after the last one).
        inter = cfg.dropout if cfg.n_layer > 1 else 0.0
        self.rnn = rnn_cls(d, d, num_layers=cfg.n_layer, batch_first=True, dropout=inter)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.wte.weight, self.lm_head.weight]

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm output, (B, T) -> (B, T, d): logits = lm_head(this)."""
        check_input(idx, self.cfg)
        x = self.drop(self.wte(idx))  # (B, T, d)
        x, _ = self.rnn(x)  # (B, T, d), initial state zero
        return self.ln_f(self.drop(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))  # (B, T, V)
