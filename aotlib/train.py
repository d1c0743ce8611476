"""Training a forward or backward language model: the loop, checkpoints and resumption.

One `TrainConfig` fully determines a run. The same config and seed give bit-identical
losses on CPU, and a run killed at any moment resumes from its last checkpoint and ends
with exactly the result of an uninterrupted run, because everything random is either
derived from (seed, step) (the batches) or saved in the checkpoint (dropout's RNG).

Multi-process training (DDP) is used when launched by torchrun: each rank takes its
share of the same global batch, so the gradient equals the single-process one. With
CUDA each rank uses its own GPU, cuda:LOCAL_RANK (`rank_device`); only rank 0 writes the
checkpoint (`is_main_process` says which process should write results).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from aotlib.checkpoint import CorruptFile, load_checkpoint, save_checkpoint
from aotlib.data import DataConfig, TokenData, build_data, orient
from aotlib.models import ModelConfig, build_model, count_parameters, fused_lm_loss
from aotlib.paths import ROOT

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    direction: str = "forward"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4  # cosine decay floor
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 512  # windows used by periodic evaluations
    final_eval_windows: int | None = None  # the final evaluation (None: every window)
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict` (JSON lists become the tuples the frozen configs use)."""
        data = dict(d["data"])
        data["parallel"] = tuple(data.get("parallel", ()))
        data["options"] = tuple(tuple(kv) for kv in data.get("options", ()))
        rest = {k: v for k, v in d.items() if k not in ("model", "data")}
        return cls(model=ModelConfig(**d["model"]), data=DataConfig(**data), **rest)

    def key(self) -> str:
        """A short hash of the whole config: the name results and checkpoints are stored by."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the remaining steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(cfg: TrainConfig, step: int, n_windows: int) -> torch.Tensor:
    """The windows of one step, a function of (seed, step) only, so resumption is exact."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(n_windows, (cfg.batch_size,), generator=gen)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of predicting windows[:, 1:] from windows[:, :-1]."""
    inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    loss = loss.view_as(targets)  # (B, T)
    return loss.mean() if reduction == "mean" else loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Per-token validation losses, shape (N, T), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        with _autocast(device):
            out.append(lm_loss(model, batch, reduction="none").float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """The device this process trains on, made the current CUDA device if it is one.

    Default: CUDA when available, else the CPU. A bare "cuda" under torchrun means this
    rank's own GPU, cuda:LOCAL_RANK: without it every rank would crowd onto cuda:0, and
    NCCL needs the current device set before the process group starts.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _ddp_options(device: torch.device) -> dict[str, Any]:
    """DistributedDataParallel's device arguments: one GPU per process, or none (CPU)."""
    if device.type == "cuda":
        return {"device_ids": [device.index], "output_device": device.index}
    return {}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Every RNG state dropout draws from: the CPU one and, training on CUDA, the GPU's.

    Under DDP all ranks seed alike and draw alike (equal shares of the batch), so rank
    0's states, saved in the checkpoint, are every rank's.
    """
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases, norms and SSM parameters (A_log,
    D, dt_bias, marked `_no_weight_decay`) are not decayed, as in nanoGPT and the official
    Mamba."""
    params = list(model.parameters())
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, "_no_weight_decay", False)]
    decay = [p for p in params if not any(p is q for q in no_decay)]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def resume(
    ckpt_path: Path,
    key: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    rng_device: torch.device | None = None,
) -> tuple[int, list, float]:
    """Load a run's checkpoint (if any) into `model` and `opt`, and the random state when
    `rng_device` is given; returns (step, history, elapsed seconds), (0, [], 0.0) for a
    new run. A damaged checkpoint, or another config's, is never trusted: the run starts
    again."""
    if not ckpt_path.exists():
        return 0, [], 0.0
    try:
        state = load_checkpoint(ckpt_path)
        if state["key"] != key:
            raise CorruptFile(f"{ckpt_path} belongs to another config")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if rng_device is not None:
            _set_rng_state(state, rng_device)
        return state["step"], state["history"], state["elapsed"]
    except (CorruptFile, KeyError, RuntimeError, EOFError) as err:
        print(f"ignoring checkpoint ({err}); training from scratch")
        return 0, [], 0.0


def suspend(
    ckpt_path: Path,
    cfg: Any,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    history: list,
    elapsed: float,
    **extra: Any,
) -> None:
    """Write the checkpoint that `resume` reads (extra: e.g. the random state)."""
    save_checkpoint(ckpt_path, {"key": cfg.key(), "config": cfg.to_dict(),
                                "model": model.state_dict(), "optimizer": opt.state_dict(),
                                **extra, "step": step, "history": history,
                                "elapsed": elapsed})  # fmt: skip


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _uses_fused_loss(device: torch.device, world: int) -> bool:
    """The blocked LM-head loss (`fused_lm_loss`) pays off on the CPU only; on CUDA the
    plain logits + cross-entropy path is the fast one, and DDP needs the wrapped forward."""
    return device.type == "cpu" and world == 1


def is_main_process() -> bool:
    """True in a single process and on DDP rank 0: the one process that writes files."""
    return _dist()[0] == 0


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _provenance(device: torch.device) -> dict[str, Any]:
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--", "aotlib"):
        commit += "+uncommitted"  # the library differed from the commit when training began
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "code_version": commit or "unknown",
        "device": f"{device.type}: {name or platform.machine()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": _dist()[1],
    }


def train(
    cfg: TrainConfig,
    run_dir: Path,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model, resuming from `run_dir/checkpoint.pt` if present; return its result.

    The result holds the config, the loss history, the final validation loss, the
    per-window and per-position validation losses, parameter counts and provenance.
    """
    device = rank_device(device)
    _maybe_init_distributed(device)
    rank, world = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {world}")
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"

    data: TokenData = build_data(cfg.data)
    train_w = orient(data.train, cfg.direction)  # (N, T+1)
    val_w = orient(data.val, cfg.direction)  # (M, T+1)
    mcfg = replace(cfg.model, vocab_size=data.vocab_size, context=train_w.shape[1] - 1)

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    step, history, elapsed = resume(ckpt_path, cfg.key(), model, opt, rng_device=device)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, **_ddp_options(device))

    provenance = _provenance(device)  # the code as it is when (re)training starts
    kill_at = int(os.environ.get("AOTLIB_KILL_AT_STEP", "-1"))  # for the resume test
    eval_sub = val_w[: cfg.eval_windows]
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not progress or rank != 0,
        desc=f"{mcfg.arch} {cfg.direction}",
        mininterval=1.0,
    )
    tokens_per_step = cfg.batch_size * (train_w.shape[1] - 1)
    t0 = time.perf_counter()
    model.train()
    while step < cfg.steps:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        idx = batch_indices(cfg, step, len(train_w))[rank::world]
        batch = train_w[idx].to(device)  # (B / world, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        with _autocast(device):
            # One CPU process: the LM head and the loss run fused in blocks (same values,
            # several times faster there). CUDA and DDP: the plain path (`_uses_fused_loss`).
            if _uses_fused_loss(device, world):
                loss = fused_lm_loss(model, batch)
            else:
                loss = lm_loss(ddp_model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        loss = loss.detach()
        if world > 1:  # report the global batch's loss, not this rank's share
            torch.distributed.all_reduce(loss)
            loss /= world
        record = {"step": step, "train_loss": float(loss), "lr": lr_at(cfg, step - 1)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["val_loss"] = float(evaluate(model, eval_sub, cfg.batch_size, device).mean())
        if step % max(1, cfg.eval_every // 10) == 0 or "val_loss" in record:
            history.append(record)  # a thinned curve keeps stored results small
        now = time.perf_counter()
        tok_s = tokens_per_step * step / max(1e-9, elapsed + now - t0)
        bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
        bar.update(1)
        if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            suspend(ckpt_path, cfg, model, opt, step, history, elapsed + now - t0,
                    **_rng_state(device))  # fmt: skip
    bar.close()
    elapsed += time.perf_counter() - t0

    per_token = evaluate(model, val_w[: cfg.final_eval_windows], cfg.batch_size, device)  # (M, T)
    return {
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "final_val_loss": float(per_token.mean()),
        "val_window_losses": per_token.mean(1).tolist(),
        "val_position_losses": per_token.mean(0).tolist(),
        "history": history,
        "n_params": count_parameters(model, non_embedding=False),
        "n_params_non_embedding": count_parameters(model, non_embedding=True),
        "train_tokens": tokens_per_step * cfg.steps,
        "train_seconds": elapsed,
        "provenance": provenance,
    }
