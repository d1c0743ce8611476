"""MQAR, multi-query associative recall (zoology's benchmark): why an SSM's state size matters.

The Mamba-2 paper (Dao, Gu, ICML 2024, Fig. 8) measures recall with zoology's MQAR task
(Arora, Eyuboglu et al., "Zoology", 2023): a sequence opens with K key-value pairs, then
asks for every key once; the model must answer each query with the value that followed
that key. An attention layer can look the pairs up; an SSM must have squeezed them into
its fixed-size state, N x P numbers per head, so it recalls K pairs only when its state
is large enough for them. This module holds the task, the 2-layer models, the training
loop and the grid of notebook 10.

The task, as zoology's `multiquery_ar` defines it (our own code): with vocabulary V,
length T and K pairs,

    keys    K distinct tokens of [1, V/2)      (0 is never a key: it is the filler)
    values  K distinct tokens of [V/2, V)
    inputs  k_1 v_1 k_2 v_2 ... k_K v_K | queries at positions 2K + 2 g_j, filler elsewhere
    targets -100 (ignored) everywhere, except targets[2K + 2 g_j] = v_j

The gaps g_j are K distinct draws from {0, ..., (T - 2K)/2 - 1} with probability
proportional to (g + 1)^(a - 1), a = 0.01: zoology's power law, so most queries come soon
after the pairs, as repeated bigrams do in text. `targets[t]` is the token the model
must output after reading inputs[:t+1]: after the query key, its value. Fillers are 0,
or (the "harder" variant zoology trains with, `random_fillers`) uniform random tokens.

Train and test are disjoint by construction, by a hash split: an example belongs to the
test side when the hash (blake2b) of its key-value prefix falls in one bucket out of
`TEST_BUCKETS`, to the training side otherwise; each generator keeps only its own side
(rejection sampling), so no list of key-value pairs is ever both trained on and tested.
The training examples of a step are a function of (seed, step) only, generated on the
fly, so a run resumes exactly; the test set depends on the task alone (not on the seed),
so every model of a grid is scored on the same examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from aotlib.model_config import ModelConfig
from aotlib.paper import SSD, PaperNumber
from aotlib.paths import results_dir
from aotlib.plotting import check_scale

IGNORE = -100  # targets that take no part in the loss or the accuracy (F.cross_entropy's)
TEST_BUCKETS = 16  # 1 in 16 key-value prefixes is reserved for the test set
TEST_SEED = 2_147_483_647  # the test set's generator: the same for every model and seed

# ---------------------------------------------------------------------------- the task


def check_task(vocab_size: int, seq_len: int, n_pairs: int) -> None:
    """Raise a ValueError saying why K pairs and their K queries do not fit, if they don't."""
    if n_pairs < 1:
        raise ValueError(f"need at least one key-value pair, got n_pairs={n_pairs}")
    n_keys, n_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    if n_pairs > min(n_keys, n_values):
        raise ValueError(
            f"{n_pairs} distinct keys and values do not fit vocab_size={vocab_size}: keys come "
            f"from [1, {vocab_size // 2}) ({n_keys} tokens), values from "
            f"[{vocab_size // 2}, {vocab_size}) ({n_values})"
        )
    if 4 * n_pairs > seq_len:
        raise ValueError(
            f"{n_pairs} pairs do not fit seq_len={seq_len}: the pairs take {2 * n_pairs} tokens "
            f"and their {n_pairs} queries 2 tokens each, so seq_len >= 4 * n_pairs = {4 * n_pairs}"
        )


def power_law_gaps(
    n: int, n_slots: int, n_pairs: int, power_a: float, generator: torch.Generator
) -> torch.Tensor:
    """(n, n_pairs) distinct slots of range(n_slots), P(g) proportional to (g + 1)^(a - 1).

    Successive draws without replacement (zoology's np.random.choice(replace=False, p=...)),
    done at once by the Gumbel-top-k trick: the k largest of log p + Gumbel noise are such
    a draw, in the order drawn.
    """
    log_p = (power_a - 1) * torch.log(torch.arange(1, n_slots + 1, dtype=torch.float64))
    u = torch.rand(n, n_slots, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(u))  # (n, n_slots)
    return (log_p + gumbel).topk(n_pairs, dim=1).indices  # (n, n_pairs)


def _distinct(n: int, k: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """(n, k) tokens of [low, high), distinct within a row: the first k of a permutation."""
    perm = torch.rand(n, high - low, generator=generator).argsort(dim=1)  # (n, high - low)
    return perm[:, :k] + low  # (n, k)


def _draw(
    n: int,
    vocab_size: int,
    seq_len: int,
    n_pairs: int,
    power_a: float,
    random_fillers: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples of the task, before the train/test split: (inputs, targets), (n, T) each."""
    half = vocab_size // 2
    keys = _distinct(n, n_pairs, 1, half, generator)  # (n, K)
    values = _distinct(n, n_pairs, half, vocab_size, generator)  # (n, K)
    gaps = power_law_gaps(n, (seq_len - 2 * n_pairs) // 2, n_pairs, power_a, generator)
    if random_fillers:
        inputs = torch.randint(vocab_size, (n, seq_len), generator=generator)  # (n, T)
    else:
        inputs = torch.zeros(n, seq_len, dtype=torch.int64)  # (n, T)
    inputs[:, 0 : 2 * n_pairs : 2] = keys
    inputs[:, 1 : 2 * n_pairs : 2] = values
    where = 2 * n_pairs + 2 * gaps  # (n, K): the query of key j sits at where[:, j]
    inputs.scatter_(1, where, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.int64)  # (n, T)
    targets.scatter_(1, where, values)
    return inputs, targets


def is_test_example(inputs: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """(n,) bool: which examples the hash split reserves for testing (by their pairs)."""
    prefix = inputs[:, : 2 * n_pairs].to(torch.int32).numpy()  # (n, 2K)
    digests = (hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in prefix)
    return torch.tensor([int.from_bytes(d, "little") % TEST_BUCKETS == 0 for d in digests])


def mqar_examples(
    n: int,
    *,
    vocab_size: int,
    seq_len: int,
    n_pairs: int,
    split: str,
    seed: int,
    power_a: float = 0.01,
    random_fillers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n MQAR examples of one side of the split ("train" | "test"): inputs, targets (n, T).

    Deterministic: the same arguments give the same tensors. An example's side is the hash
    of its key-value prefix (`is_test_example`); draws of the other side are dropped.
    """
    check_task(vocab_size, seq_len, n_pairs)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    gen = torch.Generator().manual_seed(seed)
    want_test = split == "test"
    # Expected share of a draw on our side, with a margin so one draw is nearly always enough.
    share = 1 / TEST_BUCKETS if want_test else 1 - 1 / TEST_BUCKETS
    inputs, targets, have = [], [], 0
    for _ in range(100):
        if have >= n:
            break
        m = math.ceil(1.2 * (n - have) / share) + 8
        x, y = _draw(m, vocab_size, seq_len, n_pairs, power_a, random_fillers, gen)
        keep = is_test_example(x, n_pairs) == want_test  # (m,)
        inputs.append(x[keep])
        targets.append(y[keep])
        have += int(keep.sum())
    else:
        raise ValueError(
            f"found {have} of {n} {split} examples: with vocab_size={vocab_size} and "
            f"n_pairs={n_pairs} too few distinct lists of pairs fall on the {split} side"
        )
    return torch.cat(inputs)[:n], torch.cat(targets)[:n]  # (n, T), (n, T)


# ------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR run: the task, the model, the optimiser and the seed. Hashed into its key."""

    arch: str = "mamba2"  # "gpt" | "mamba2"
    d_model: int = 32
    d_state: int = 0  # mamba2 N (0 for gpt)
    head_dim: int = 16  # mamba2 P
    n_head: int = 1  # gpt heads (zoology's MQAR attention has one)
    short_conv: int = 0  # gpt: causal depthwise conv of this width before attention (0: none)
    n_layer: int = 2
    vocab_size: int = 256
    seq_len: int = 64
    n_pairs: int = 16
    random_fillers: bool = True
    power_a: float = 0.01
    steps: int = 8000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay floor
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    curriculum: float = 0.3  # share of the steps spent on K/8, K/4, K/2 pairs before K
    n_test: int = 1000
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        check_task(self.vocab_size, self.seq_len, self.n_pairs)
        if self.arch not in ("gpt", "mamba2"):
            raise ValueError(f"arch must be 'gpt' or 'mamba2', got {self.arch!r}")
        if self.arch == "mamba2" and (self.d_state < 1 or self.short_conv):
            raise ValueError("mamba2 needs d_state >= 1 and short_conv = 0 (it has its own conv)")
        if self.arch == "gpt" and self.d_state:
            raise ValueError(f"gpt has no state size; got d_state={self.d_state}")
        if not 0.0 <= self.curriculum < 1.0:
            raise ValueError(f"curriculum must be in [0, 1), got {self.curriculum}")
        self.model_config()  # the model's own checks (widths, heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """A short hash of the whole config: the name its result and checkpoint are stored by."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(("mqar:" + canon).encode()).hexdigest()[:16]

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch=self.arch,
            vocab_size=self.vocab_size,
            context=self.seq_len,
            n_layer=self.n_layer,
            d_model=self.d_model,
            n_head=self.n_head,
            dropout=0.0,
            d_state=max(1, self.d_state),
            head_dim=self.head_dim,
            expand=2,
            chunk_size=min(32, self.seq_len),
        )

    def state_per_pair(self) -> float | None:
        """Mamba-2: recurrent state numbers per layer (expand*d heads' N x P) per stored pair."""
        if self.arch != "mamba2":
            return None
        return 2 * self.d_model * self.d_state / self.n_pairs

    def label(self) -> str:
        if self.arch == "mamba2":
            return f"Mamba-2 N={self.d_state}"
        return "attention" + (f" (conv {self.short_conv})" if self.short_conv else "")


def build_mqar_model(cfg: MQARConfig) -> nn.Module:
    """The 2-layer model of `cfg` (uses the global torch RNG: seed it first)."""
    if cfg.arch == "gpt":
        from aotlib.gpt import GPT

        return GPT(cfg.model_config(), short_conv=cfg.short_conv)
    from aotlib.mamba2 import Mamba2LM

    return Mamba2LM(cfg.model_config())


def pairs_at(cfg: MQARConfig, step: int) -> int:
    """The curriculum: K/8, K/4, K/2 pairs (the paper's T/32, T/16, T/8 at K = T/4), each
    for an equal part of the first `curriculum` share of the steps, then all K pairs.

    "Compressed": the paper trains a stage per K for many epochs; here the easy stages
    together take a third of a short run, only to get recall started.
    """
    stages = sorted({max(1, cfg.n_pairs // f) for f in (8, 4, 2)} - {cfg.n_pairs})
    warm = int(cfg.curriculum * cfg.steps)
    if not stages or step >= warm:
        return cfg.n_pairs
    return stages[step * len(stages) // warm]


def train_batch(cfg: MQARConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of one training step, a function of (seed, step) only: (B, T) each."""
    return mqar_examples(
        cfg.batch_size,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        n_pairs=pairs_at(cfg, step),
        split="train",
        seed=cfg.seed * 1_000_003 + step,
        power_a=cfg.power_a,
        random_fillers=cfg.random_fillers,
    )


def test_set(cfg: MQARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed test examples of cfg's task at its full K: (n_test, T) each."""
    return mqar_examples(
        cfg.n_test,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        n_pairs=cfg.n_pairs,
        split="test",
        seed=TEST_SEED,
        power_a=cfg.power_a,
        random_fillers=cfg.random_fillers,
    )


# --------------------------------------------------------------------------- training


def recall_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the query positions only (targets != IGNORE)."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy, loss) over every query of the examples: argmax over the whole vocabulary."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]  # (b, T)
        logits = model(x)  # (b, T, V)
        asked = y != IGNORE  # (b, T)
        correct += int((logits.argmax(-1)[asked] == y[asked]).sum())
        total += int(asked.sum())
        loss_sum += float(F.cross_entropy(logits[asked], y[asked], reduction="sum"))
    model.train(was_training)
    return correct / total, loss_sum / total


def _lr_at(cfg: MQARConfig, step: int) -> float:
    from aotlib.train import lr_at  # linear warm-up, then cosine to min_lr (same schedule)

    return lr_at(cfg, step)  # type: ignore[arg-type]


def _die() -> None:
    """Kill this process as `kill -9` would (the resume test replaces it)."""
    os.kill(os.getpid(), signal.SIGKILL)


def train_mqar(cfg: MQARConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train one MQAR model on the CPU, resuming from run_dir/checkpoint.pt; return its result.

    AdamW (betas 0.9, 0.95; weight decay on matrices only), linear warm-up then cosine
    decay, gradient clipping, fresh examples every step (`train_batch`), test accuracy
    every `eval_every` steps on the fixed `test_set`. Bit-identical for the same config on
    one thread, and a run killed at any point ends with the same numbers (nothing random
    is drawn outside `train_batch`, which depends on the step alone; the model has no
    dropout).
    """
    from aotlib.models import count_parameters
    from aotlib.train import _provenance, adamw, resume, suspend

    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    test_x, test_y = test_set(cfg)  # (n_test, T) each

    torch.manual_seed(cfg.seed)
    model = build_mqar_model(cfg)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    # no random state to restore: examples depend on (seed, step) alone, no dropout
    step, history, elapsed = resume(ckpt_path, cfg.key(), model, opt)

    provenance = _provenance(torch.device("cpu"))
    kill_at = int(os.environ.get("AOTLIB_KILL_AT_STEP", "-1"))  # for the resume test
    label = f"{cfg.label()} d={cfg.d_model} K={cfg.n_pairs} lr={cfg.lr:g}"
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=label, mininterval=1.0)
    t0 = time.perf_counter()
    model.train()
    while step < cfg.steps:
        if step == kill_at:
            _die()
        inputs, targets = train_batch(cfg, step)  # (B, T) each
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        loss = recall_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss = float(loss.detach())
        record = {"step": step, "train_loss": loss, "n_pairs": pairs_at(cfg, step - 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["test_accuracy"], record["test_loss"] = evaluate(model, test_x, test_y)
        if step % max(1, cfg.eval_every // 10) == 0 or "test_accuracy" in record:
            history.append(record)  # a thinned curve keeps stored results small
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            elapsed_now = elapsed + time.perf_counter() - t0
            suspend(ckpt_path, cfg, model, opt, step, history, elapsed_now)
    bar.close()
    elapsed += time.perf_counter() - t0

    accuracy, test_loss = evaluate(model, test_x, test_y)
    return {
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "history": history,
        "n_params": count_parameters(model, non_embedding=False),
        "train_examples": cfg.steps * cfg.batch_size,
        "train_seconds": elapsed,
        "provenance": provenance,
    }


# ---------------------------------------------------------------------- stored results


def mqar_result_path(cfg: MQARConfig, scale: str) -> Path:
    state = f"-N{cfg.d_state}" if cfg.arch == "mamba2" else ""
    name = f"mqar-{cfg.arch}-d{cfg.d_model}{state}-K{cfg.n_pairs}-lr{cfg.lr:g}-s{cfg.seed}"
    return results_dir(scale) / f"{name}-{cfg.key()}.json"


def load_mqar_result(cfg: MQARConfig, scale: str) -> dict[str, Any] | None:
    """The stored result of `cfg`, or None if absent or damaged."""
    from aotlib.results import load_stored

    return load_stored(mqar_result_path(cfg, scale), cfg.key())


def get_mqar_result(
    cfg: MQARConfig, scale: str, *, train_missing: bool = True, progress: bool = True
) -> dict[str, Any]:
    """The stored result of `cfg` at `scale`, trained (resumably) if missing; as
    `aotlib.results.get_result` does for the language-model runs."""
    from aotlib.results import checkpoint_dir, stored_or_trained

    return stored_or_trained(
        cfg, mqar_result_path(cfg, scale), checkpoint_dir(cfg, scale),  # type: ignore[arg-type]
        lambda run_dir: train_mqar(cfg, run_dir, progress=progress),
        train_missing=train_missing,
    )  # fmt: skip


# --------------------------------------------------------------------------- the grid

# Per scale: the task, the budget, the widths, state sizes and learning rates. `cpu` is
# the proposed setting (T = 64, K = 16 = T/4 pairs, fully packed, V = 256) with
# widths chosen so that the state per pair, 2 d N / K per layer, runs from 4 (d = 16,
# N = 2) to 256 (d = 64, N = 32) across the paper's 8-64 transition: 84 runs, 7.6 hours
# of training here (`python -m aotlib.mqar --scale cpu` prints the estimate from measured
# step times). Calibrated by pilots
# (4000 steps of 64 examples, 256k examples a run): attention d = 128 at lr 3e-3 reaches
# test accuracy 1.00; Mamba-2 d = 64, N = 32 reaches 0.10 at 3e-3 and 0.06 at 1e-3 (step
# 1000), but 0.98 by step 1500 at 1e-2. So the rates are zoology's upper range,
# 3e-3 to 3e-2, not 1e-3 to 1e-2, and 4000 steps suffice where the state is large enough.
# `paper` is the Mamba-2 paper's T = 512 point (K = 128, V = 8192) for GPU users.
MQAR_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(vocab_size=32, seq_len=16, n_pairs=4, steps=30, batch_size=16, warmup=5,
                  eval_every=10, n_test=64, widths=[16], gpt_widths=[16], states=[2, 8],
                  lrs=[3e-3, 1e-2], pairs=[2], pairs_width=16),
    "cpu": dict(vocab_size=256, seq_len=64, n_pairs=16, steps=4000, batch_size=64,
                warmup=100, eval_every=500, n_test=1000, widths=[16, 32, 64],
                gpt_widths=[16, 32, 64, 128], states=[2, 8, 32], lrs=[3e-3, 1e-2, 3e-2],
                pairs=[4, 8], pairs_width=32),
    "paper": dict(vocab_size=8192, seq_len=512, n_pairs=128, steps=20_000, batch_size=256,
                  warmup=1000, eval_every=1000, n_test=3000, widths=[32, 64, 128, 256],
                  gpt_widths=[32, 64, 128, 256], states=[16, 64, 256],
                  lrs=[1e-4, 3e-4, 1e-3, 3e-3], pairs=[32, 64], pairs_width=64),
}  # fmt: skip
GPT_SHORT_CONV = 4  # the kernel width Mamba-2's own conv uses
SECOND_SEED = 1  # run again at each point's best learning rate


def mqar_config(scale: str, arch: str, d_model: int, d_state: int = 0, **over: Any) -> MQARConfig:
    """One run of `scale`'s preset: GPT (with the short conv) or Mamba-2 with state d_state."""
    p = MQAR_PRESETS[check_scale(scale)]
    task = {k: p[k] for k in ("vocab_size", "seq_len", "n_pairs", "steps", "batch_size",
                              "warmup", "eval_every", "n_test")}  # fmt: skip
    task["checkpoint_every"] = p["eval_every"]
    if arch == "gpt":
        model = dict(short_conv=GPT_SHORT_CONV)
    else:
        model = dict(d_state=d_state, head_dim=min(16, d_model))
    cfg = MQARConfig(arch=arch, d_model=d_model, **model, **task)
    cfg = replace(cfg, **over)
    return replace(cfg, min_lr=cfg.lr / 10)


def grid_points(scale: str) -> list[MQARConfig]:
    """Every point of the grid at seed 0 with no learning rate yet (each is swept over the
    preset's rates): (model, width) at the preset's K, Mamba-2 first (the figure's
    subject, and cheaper per run), then attention; then the capacity sweep
    (`_capacity_points`)."""
    p = MQAR_PRESETS[check_scale(scale)]
    points = [mqar_config(scale, "mamba2", d, n) for d in p["widths"] for n in p["states"]]
    return (
        points + [mqar_config(scale, "gpt", d) for d in p["gpt_widths"]] + _capacity_points(scale)
    )


def _capacity_points(scale: str) -> list[MQARConfig]:
    """The capacity sweep: every model at one width (`pairs_width`) with fewer pairs.

    Swept over the learning rates like the full task's points. (Training them at their
    full-task twin's best rate instead, to save runs, left 3 of 8 points' seed-0 runs at
    chance, 1/K: the best rate at K = 16 does not carry over to K = 4 or 8.)
    """
    p = MQAR_PRESETS[check_scale(scale)]
    d = p["pairs_width"]
    if d not in p["widths"] or d not in p["gpt_widths"]:
        raise ValueError(f"pairs_width={d} must be one of the grid's widths (Mamba-2 and GPT)")
    models = [mqar_config(scale, "gpt", d)] + [
        mqar_config(scale, "mamba2", d, n) for n in p["states"]
    ]
    return [replace(m, n_pairs=k) for k in p["pairs"] for m in models]


def grid_plan(scale: str) -> list[tuple[MQARConfig, int]]:
    """Every point the grid will hold once trained (seed 0, no rate chosen), with its number
    of runs: the rate sweep plus seed 1. A listing that does not depend on what is stored
    (`mqar_grid` grows as runs are stored)."""
    lrs = MQAR_PRESETS[check_scale(scale)]["lrs"]
    runs = len(lrs) + (1 if len(lrs) > 1 else 0)
    return [(pt, runs) for pt in grid_points(scale)]


def best_lr(scale: str, point: MQARConfig) -> float | None:
    """The learning rate with the best stored seed-0 test accuracy at `point`, or None
    until all of the preset's learning rates are stored for it."""
    accs = {}
    for lr in MQAR_PRESETS[scale]["lrs"]:
        r = load_mqar_result(replace(point, lr=lr, min_lr=lr / 10), scale)
        if r is None:
            return None
        accs[lr] = r["test_accuracy"]
    return max(accs, key=lambda lr: (accs[lr], -lr))  # a tie goes to the smaller rate


def mqar_grid(scale: str) -> list[MQARConfig]:
    """Notebook 10: every point (`grid_points`) at each learning rate on seed 0, then (appended
    once a point's seed-0 runs are all stored) its best learning rate on seed 1.

    The second part grows as the first is trained: `python -m aotlib grid mqar` lists the
    grid again after each pass, so one command trains both.
    """
    lrs = MQAR_PRESETS[check_scale(scale)]["lrs"]
    points = grid_points(scale)
    runs = [replace(pt, lr=lr, min_lr=lr / 10) for pt in points for lr in lrs]
    for pt in points:
        lr = best_lr(scale, pt)
        if lr is not None and len(lrs) > 1:
            runs.append(replace(pt, lr=lr, min_lr=lr / 10, seed=SECOND_SEED))
    return runs


def grid_table(scale: str) -> list[dict[str, Any]]:
    """One row per stored run of the grid: the point, the learning rate, seed, accuracy."""
    rows = []
    for cfg in mqar_grid(scale):
        r = load_mqar_result(cfg, scale)
        if r is None:
            continue
        rows.append({"model": cfg.label(), "arch": cfg.arch, "d_model": cfg.d_model,
                     "d_state": cfg.d_state, "n_pairs": cfg.n_pairs, "lr": cfg.lr,
                     "seed": cfg.seed, "state_per_pair": cfg.state_per_pair(),
                     "test_accuracy": r["test_accuracy"], "train_seconds": r["train_seconds"],
                     "train_examples": r["train_examples"]})  # fmt: skip
    return rows


def train_grid(scale: str, progress: bool = True) -> None:
    """Train every missing run of `mqar_grid(scale)`, second seeds included (as the CLI)."""
    done: set[str] = set()
    while todo := [cfg for cfg in mqar_grid(scale) if cfg.key() not in done]:
        for cfg in todo:
            get_mqar_result(cfg, scale, progress=progress)
            done.add(cfg.key())


def summary_table(scale: str) -> pd.DataFrame:
    """One row per point of the grid with stored runs: its best learning rate (seed 0) among
    the `rates` stored so far and the test accuracy there, per seed and averaged, as
    zoology reports a point."""
    rows = grid_table(scale)
    cols = ["model", "arch", "d_model", "d_state", "n_pairs", "state_per_pair", "rates",
            "best_lr", "seeds", "accuracy", "acc_seed0", "acc_seed1"]  # fmt: skip
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = []
    for key, g in df.groupby(["model", "arch", "d_model", "d_state", "n_pairs"], sort=False):
        first = g[g.seed == 0]
        if first.empty:
            continue
        best = first.sort_values(["test_accuracy", "lr"], ascending=[False, True]).iloc[0]
        at = g[g.lr == best.lr].sort_values("seed")
        accs = dict(zip(at.seed, at.test_accuracy))
        out.append(dict(zip(["model", "arch", "d_model", "d_state", "n_pairs"], key),
                        state_per_pair=best.state_per_pair, rates=len(first),
                        best_lr=best.lr, seeds=len(at),
                        accuracy=float(at.test_accuracy.mean()), acc_seed0=accs.get(0),
                        acc_seed1=accs.get(SECOND_SEED)))  # fmt: skip
    return pd.DataFrame(out, columns=cols)


MARGIN = 0.05  # an accuracy difference smaller than this (or the seeds' spread) is a tie


def _margin(*rows: pd.Series) -> float:
    spread = [abs(r.acc_seed0 - r.acc_seed1) for r in rows if r.seeds > 1]
    return max([MARGIN] + [2 * s for s in spread])


def _order(low: pd.Series | None, high: pd.Series | None) -> str:
    """Is `high` above `low` by more than the margin: agree / disagree / cannot tell."""
    if low is None or high is None:
        return "cannot tell (not trained)"
    diff, m = high.accuracy - low.accuracy, _margin(low, high)
    if diff > m:
        return "agree"
    if diff < -m:
        return "disagree"
    return "cannot tell (a tie)"


def verdicts(summary: pd.DataFrame, scale: str) -> pd.DataFrame:
    """The paper's qualitative MQAR claims, each with the paper's numbers, ours and a verdict."""
    p = MQAR_PRESETS[check_scale(scale)]
    K, widths, states = p["n_pairs"], p["widths"], p["states"]
    lo_n, hi_n = min(states), max(states)

    def row(arch: str, d: int, n: int = 0, k: int = K) -> pd.Series | None:
        hit = summary[(summary.arch == arch) & (summary.d_model == d) & (summary.d_state == n)
                      & (summary.n_pairs == k)]  # fmt: skip
        return None if hit.empty else hit.iloc[0]

    def acc(r: pd.Series | None) -> str:
        return "-" if r is None else f"{r.accuracy:.2f}"

    paper = {k: v.value for k, v in PAPER_MQAR.items()}
    out = []
    for d in widths:  # larger state, better recall, at every width
        a, b = row("mamba2", d, lo_n), row("mamba2", d, hi_n)
        out.append(dict(claim=f"Mamba-2: N={hi_n} above N={lo_n} at d={d}",
                        paper=f"N=256 {paper['Mamba-2 N=256'][0]} vs N=16 "
                              f"{paper['Mamba-2 N=16'][0]} at d=32",
                        here=f"{acc(b)} vs {acc(a)}", verdict=_order(a, b)))  # fmt: skip
    a, b = row("mamba2", min(widths), lo_n), row("mamba2", max(widths), lo_n)
    out.append(dict(claim=f"Mamba-2 N={lo_n} improves with width, d={min(widths)} to "
                          f"{max(widths)}",
                    paper=f"N=16: {paper['Mamba-2 N=16'][0]} at d=32, "
                          f"{paper['Mamba-2 N=16'][3]} at d=256",
                    here=f"{acc(a)} to {acc(b)}", verdict=_order(a, b)))  # fmt: skip
    top = row("gpt", max(p["gpt_widths"]))
    near = "cannot tell (not trained)" if top is None else (
        "agree" if top.accuracy >= 0.9 else "disagree")  # fmt: skip
    out.append(dict(claim=f"attention near-perfect (>= 0.9) at its largest width d="
                          f"{max(p['gpt_widths'])}",
                    paper=f"{paper['attention'][3]} at d=256", here=acc(top),
                    verdict=near))  # fmt: skip
    d, ks = p["pairs_width"], sorted(set(p["pairs"]) | {K})
    a, b = row("mamba2", d, lo_n, max(ks)), row("mamba2", d, lo_n, min(ks))
    out.append(dict(claim=f"Mamba-2 N={lo_n}, d={d}: fewer pairs, better recall "
                          f"(K={min(ks)} above K={max(ks)})",
                    paper="the capacity argument (2dN numbers a layer hold K pairs)",
                    here=f"{acc(b)} vs {acc(a)}", verdict=_order(a, b)))  # fmt: skip
    return pd.DataFrame(out)


# ---------------------------------------------------------------------- cost estimate


def step_seconds(cfg: MQARConfig, steps: int = 5) -> float:
    """Measured seconds per training step of `cfg` (CPU, this process's threads), after
    one warm-up step, at the full K. In CPU time of this process (one thread: its own
    work): wall time on a busy machine counts the other processes' share of the core."""
    torch.manual_seed(0)
    model = build_mqar_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    full = replace(cfg, curriculum=0.0)
    times = []
    for step in range(steps + 1):
        t0 = time.process_time()
        loss = recall_loss(model, *train_batch(full, step))  # generating counts too
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.process_time() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]  # the median, past the first call


def grid_cost(scale: str, steps: int = 5) -> list[dict[str, Any]]:
    """The grid's cost from measured step times: one row per model kind, then a total.

    Counts every run the grid will hold once complete: each point at every learning rate
    on seed 0, plus its best rate on seed 1.
    """
    rows: dict[tuple, dict[str, Any]] = {}
    for pt, n_runs in grid_plan(scale):
        k = (pt.label(), pt.d_model, pt.n_pairs)
        if k not in rows:
            ms = 1000 * step_seconds(pt, steps)
            rows[k] = {"model": pt.label(), "d_model": pt.d_model, "n_pairs": pt.n_pairs,
                       "runs": 0, "steps": pt.steps, "ms_per_step": ms}  # fmt: skip
        rows[k]["runs"] += n_runs
    out = list(rows.values())
    for r in out:
        r["cpu_hours"] = r["runs"] * r["steps"] * r["ms_per_step"] / 3.6e6
    return out


# --------------------------------------------------------------------- the paper's figure

# Mamba-2 paper, Fig. 8 (MQAR), the T = 512, K = 128 panel, accuracy at model dimension
# 32 / 64 / 128 / 256 (read off the plot; ../shared/PAPERS.md).
PAPER_MQAR: dict[str, PaperNumber] = {
    name: PaperNumber(value, "accuracy at d = 32, 64, 128, 256",
                      f"{SSD}, Fig. 8 (MQAR, T=512, K=128)", read_off_plot=True)
    for name, value in {
        "attention": (0.04, 0.94, 0.98, 1.00),
        "Mamba-1 N=16": (0.0, 0.0, 0.0, 0.0),
        "Mamba-2 N=16": (0.04, 0.38, 0.88, 0.99),
        "Mamba-2 N=64": (0.45, 0.95, 0.98, 1.00),
        "Mamba-2 N=256": (0.88, 0.99, 1.00, 1.00),
    }.items()
}  # fmt: skip
PAPER_WIDTHS = (32, 64, 128, 256)
PAPER_PAIRS = 128  # the panel's K = T/4


def paper_capacity() -> pd.DataFrame:
    """The paper's Mamba-2 points of `PAPER_MQAR` against their state per pair 2dN/K (as
    `MQARConfig.state_per_pair`): one row per (state size, width)."""
    rows = []
    for name, number in PAPER_MQAR.items():
        if name.startswith("Mamba-2 N="):
            n = int(name.removeprefix("Mamba-2 N="))
            rows += [{"model": name, "d_state": n, "d_model": d, "accuracy": a,
                      "state_per_pair": 2 * d * n / PAPER_PAIRS}
                     for d, a in zip(PAPER_WIDTHS, number.value)]  # fmt: skip
    return pd.DataFrame(rows)


def format_example(inputs: torch.Tensor, targets: torch.Tensor, n_pairs: int) -> str:
    """One example as four aligned rows: position, token, its role, and the target."""
    cols = []
    for t, (tok, tgt) in enumerate(zip(inputs.tolist(), targets.tolist())):
        if t < 2 * n_pairs:
            role = "key" if t % 2 == 0 else "value"
        else:
            role = "query" if tgt != IGNORE else "-"
        cols.append((str(t), str(tok), role, "." if tgt == IGNORE else str(tgt)))
    width = max(len(c) for col in cols for c in col) + 1
    names = ("position", "input", "role", "target")
    return "\n".join(
        f"{name:<9}" + "".join(f"{col[i]:>{width}}" for col in cols) for i, name in enumerate(names)
    )


def format_cost(rows: list[dict[str, Any]]) -> str:
    """`grid_cost`'s rows as a table with a total line."""
    head = ("model", "d", "K", "runs", "steps", "ms/step", "CPU-h")
    lines = ["{:<20} {:>4} {:>3} {:>5} {:>6} {:>8} {:>6}".format(*head)]
    for r in rows:
        lines.append(
            f"{r['model']:<20} {r['d_model']:>4} {r['n_pairs']:>3} {r['runs']:>5} "
            f"{r['steps']:>6} {r['ms_per_step']:>8.1f} {r['cpu_hours']:>6.2f}"
        )
    runs, hours = sum(r["runs"] for r in rows), sum(r["cpu_hours"] for r in rows)
    lines.append(f"{'total':<20} {'':>4} {'':>3} {runs:>5} {'':>6} {'':>8} {hours:>6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the MQAR grid's cost from measured step times")
    parser.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"one thread, batch {MQAR_PRESETS[args.scale]['batch_size']}, median of {args.steps}")
    print(format_cost(grid_cost(args.scale, args.steps)))
