"""Results stored under a hash of their config: ask for a result, get it or train it.

    result = get_result(cfg, scale="cpu")   # loads results/cpu/<name>-<key>.json or trains

Each result file carries its config, loss curves, final losses and provenance, and a
checksum; a damaged file is retrained, never trusted. `make figures FRESH=1` (the
environment variable AOTLIB_FRESH) retrains every result a notebook asks for, once
per process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from aotlib.checkpoint import CorruptFile, load_json, save_json
from aotlib.paths import cache_dir, fresh, results_dir
from aotlib.train import TrainConfig, is_main_process, train

_refreshed: set[str] = set()  # keys retrained in this process under FRESH


def result_path(cfg: TrainConfig, scale: str) -> Path:
    m, d = cfg.model, cfg.data
    name = f"{m.arch}-{d.corpus if d.corpus in ('primes', 'linear') else d.lang}-{cfg.direction}"
    return results_dir(scale) / f"{name}-{cfg.key()}.json"


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    for k in ("val_window_losses", "val_position_losses"):
        out[k] = [round(x, 6) for x in result[k]]
    return out


def load_result(cfg: TrainConfig, scale: str) -> dict[str, Any] | None:
    """The stored result for `cfg`, or None if absent or damaged."""
    return load_stored(result_path(cfg, scale), cfg.key())


def load_stored(path: Path, key: str) -> dict[str, Any] | None:
    """The result stored at `path` for the config whose key is `key`, or None if it is
    absent, damaged (a message says so) or another config's."""
    if not path.exists():
        return None
    try:
        result = load_json(path)
    except CorruptFile as err:
        print(f"retraining: {err}")
        return None
    return result if result.get("key") == key else None


def checkpoint_dir(cfg: TrainConfig, scale: str) -> Path:
    """Where a run's checkpoint (and its claim lock) live: the cache, not results/."""
    return cache_dir() / "runs" / scale / cfg.key()


def get_result(
    cfg: TrainConfig, scale: str, *, train_missing: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Load the stored result of `cfg` at `scale`, training (resumably) if it is missing."""
    return stored_or_trained(
        cfg, result_path(cfg, scale), checkpoint_dir(cfg, scale),
        lambda run_dir: _rounded(train(cfg, run_dir, progress=progress)),
        train_missing=train_missing,
    )  # fmt: skip


def stored_or_trained(
    cfg: Any, path: Path, run_dir: Path, train_run, *, train_missing: bool = True
) -> dict[str, Any]:
    """The result stored at `path` for `cfg` (anything with a `key()`), or, if missing,
    `train_run(run_dir)` (resumable from the checkpoint in `run_dir`) stored there. With
    FRESH=1 each config is retrained once per process, from scratch."""
    key = cfg.key()
    if not (fresh() and key not in _refreshed):
        stored = load_stored(path, key)
        if stored is not None:
            return stored
    if not train_missing:
        raise FileNotFoundError(f"no stored result for {path.name}")
    if fresh() and key not in _refreshed:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    result = train_run(run_dir)
    if is_main_process():  # under torchrun every rank trains; one writes the result
        save_json(path, result)
    if fresh():
        _refreshed.add(key)
    return result


def train_again(stored: dict[str, Any], cfg: Any, run, progress: bool = False) -> dict[str, Any]:
    """A stored result's run trained again: `run(cfg, folder, progress=...)` for `cfg` (its
    config, anything with a `key()`: `TrainConfig`, an MQAR config) with the thread count
    `stored` was trained with (its provenance: threads round differently), in a temporary
    folder (nothing is stored). Raises ValueError if `cfg` is not the stored run's."""
    if cfg.key() != stored["key"]:
        raise ValueError(f"the config hashes to {cfg.key()}, not the stored key {stored['key']}")
    threads = torch.get_num_threads()
    torch.set_num_threads(stored.get("provenance", {}).get("threads", threads))
    try:
        with tempfile.TemporaryDirectory() as folder:
            return run(cfg, Path(folder), progress=progress)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def claim(cfg: TrainConfig, scale: str) -> Iterator[bool]:
    """Claim a run for this process (True) unless a live process holds it (False)."""
    lock = checkpoint_dir(cfg, scale) / "claimed.pid"
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or "0"), 0)
                yield False  # another live process trains it
                return
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # its owner died: take it over
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def arrow_table(runs: list[TrainConfig], results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (forward, backward) pair of a grid: config fields, losses, delta, CI.

    Grids list each forward config immediately followed by its backward twin
    (see aotlib.experiments.both_directions); this pairs them and checks that they are.
    """
    from aotlib.arrow import arrow_from_results

    if len(runs) != len(results) or len(runs) % 2:
        raise ValueError(f"need an even number of runs with results, got {len(runs)}")
    rows = []
    for i in range(0, len(runs), 2):
        fw_cfg, bw_cfg = runs[i], runs[i + 1]
        if replace(fw_cfg, direction="backward") != bw_cfg:
            raise ValueError(f"runs {i} and {i + 1} are not a forward/backward pair")
        m, d = fw_cfg.model, fw_cfg.data
        row = {
            "arch": m.arch,
            "n_layer": m.n_layer,
            "d_model": m.d_model,
            "lang": d.lang,
            "tokenizer": d.tokenizer,
            "context": d.context,
            "seed": fw_cfg.seed,
            "steps": fw_cfg.steps,
            "n_params": results[i]["n_params"],
            "n_params_non_embedding": results[i]["n_params_non_embedding"],
        }
        row.update(dict(d.options))
        row.update(arrow_from_results(results[i], results[i + 1]))
        rows.append(row)
    return pd.DataFrame(rows)


def load_grid(
    runs: list[TrainConfig], scale: str, *, train_missing: bool, progress: bool = True
) -> tuple[list[TrainConfig], list[dict[str, Any]], list[str]]:
    """A grid's (forward, backward) pairs and their results: (runs, results, missing).

    With train_missing, every missing run is trained (resumably) and `missing` is empty.
    Without it, only pairs whose two results are both stored are returned, in grid order,
    and `missing` names the result files of the grid not trained yet, so a notebook can
    draw what is stored and say what is not.
    """
    if len(runs) % 2:
        raise ValueError(f"a grid lists forward/backward pairs, got {len(runs)} runs")
    kept, results, missing = [], [], []
    for fw_cfg, bw_cfg in zip(runs[::2], runs[1::2]):
        pair = [get_result(c, scale, train_missing=train_missing, progress=progress)
                if train_missing else load_result(c, scale) for c in (fw_cfg, bw_cfg)]  # fmt: skip
        if all(r is not None for r in pair):
            kept += [fw_cfg, bw_cfg]
            results += pair
        else:
            missing += [
                result_path(c, scale).name for c, r in zip((fw_cfg, bw_cfg), pair) if r is None
            ]
    return kept, results, missing


def group_pairs(
    runs: list[TrainConfig], results: list[dict[str, Any]], by
) -> dict[Any, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(forward, backward) result pairs of a grid grouped by `by(forward_config)`, in grid
    order: for example by language, to average a language's seeds."""
    groups: dict[Any, list] = {}
    for i in range(0, len(runs), 2):
        if replace(runs[i], direction="backward") != runs[i + 1]:
            raise ValueError(f"runs {i} and {i + 1} are not a forward/backward pair")
        groups.setdefault(by(runs[i]), []).append((results[i], results[i + 1]))
    return groups
