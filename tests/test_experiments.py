"""Presets, grids, the result store and the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import aotlib.results as results_mod
from aotlib.__main__ import main
from aotlib.experiments import (
    GRIDS,
    LANGUAGES,
    SEEDS,
    both_directions,
    languages_grid,
    lm_config,
    synthetic_config,
)
from aotlib.models import build_model, count_parameters
from aotlib.results import arrow_table, get_result, result_path
from aotlib.train import TrainConfig


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AOTLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(results_mod, "_refreshed", set())
    return tmp_path


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace training by a fake that records the configs it was asked to train."""
    seen: list = []
    fake = lambda cfg, run_dir, progress: seen.append(cfg) or fake_result(cfg)
    monkeypatch.setattr(results_mod, "train", fake)
    return seen


def fake_result(cfg: TrainConfig, loss: float = 2.0) -> dict:
    return {"key": cfg.key(), "config": cfg.to_dict(), "final_val_loss": loss,
            "val_window_losses": [loss, loss + 0.1], "val_position_losses": [loss],
            "history": [], "n_params": 1, "n_params_non_embedding": 1}  # fmt: skip


def test_paper_preset_builds_the_papers_model_and_pipeline() -> None:
    cfg = lm_config("paper", lang="en")
    assert cfg.data.corpus == "cc100" and cfg.data.vocab_size == 50257
    assert cfg.data.context == 256 and cfg.lr == 1e-4
    m = cfg.model
    assert (m.arch, m.n_layer, m.d_model, m.n_head) == ("gpt", 24, 1024, 16)
    with torch.device("meta"):  # no memory: just the architecture
        model = build_model(replace(m, vocab_size=50257, context=256))
    total = count_parameters(model, non_embedding=False) + 50257 * 1024  # + untied head
    assert 390e6 < total < 420e6  # the paper's GPT-2 medium: about 405M


def test_every_grid_pairs_forward_with_backward() -> None:
    for name, grid in GRIDS.items():
        if name == "mqar":
            continue  # recall, not an arrow of time: tests/test_mqar.py
        for scale in ("smoke", "cpu", "paper"):
            runs = grid(scale)
            assert len(runs) % 2 == 0 and runs, (name, scale)
            for fw, bw in zip(runs[::2], runs[1::2]):
                assert (fw.direction, bw.direction) == ("forward", "backward")
                assert replace(fw, direction="backward") == bw
            assert len({r.key() for r in runs}) == len(runs), f"duplicate runs in {name}"


def test_languages_grid_goes_seed_by_seed() -> None:
    # `grid languages` trains in list order: every language's first seed (then that seed's
    # tokenizer controls) before any language's second seed
    runs = languages_grid("cpu")
    langs = LANGUAGES["cpu"]
    first = runs[: 2 * len(langs)]
    assert [r.data.lang for r in first[::2]] == langs and {r.seed for r in first} == {0}
    seeds = [r.seed for r in runs]
    assert seeds == sorted(seeds)
    control = [r for r in runs if r.data.tokenizer == "bpe-reversed"]
    assert {(r.data.lang, r.seed) for r in control} == {
        (lang, s) for lang in ("fr", "en") for s in (0, 1)
    }
    assert len(runs) == 2 * len(langs) * len(SEEDS["cpu"]) + len(control)


def test_long_series_is_the_cpu_preset_for_four_times_its_tokens() -> None:
    from aotlib.experiments import long_grid

    base = lm_config("cpu", lang="en")
    runs = long_grid("cpu")
    assert {r.data.lang for r in runs} == {"en", "de", "fr"}
    for r in runs:
        assert r.steps * r.batch_size == 4 * base.steps * base.batch_size
        assert r.model.dropout > 0 and r.data == replace(base.data, lang=r.data.lang)
        assert r.eval_windows == base.eval_windows  # the same validation windows as the grid


def test_config_round_trips_through_json() -> None:
    for cfg in (lm_config("cpu"), synthetic_config("cpu", "primes")):
        back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and back.key() == cfg.key()


def test_result_store_trains_once_then_loads(store: Path, calls: list, monkeypatch) -> None:
    cfg = synthetic_config("smoke", "primes")
    first = get_result(cfg, "smoke")
    second = get_result(cfg, "smoke")
    assert len(calls) == 1 and first == second
    get_result(replace(cfg, seed=1), "smoke")  # a changed config trains anew
    assert len(calls) == 2


def test_damaged_result_is_retrained(store: Path, calls: list, monkeypatch) -> None:
    cfg = synthetic_config("smoke", "primes")
    get_result(cfg, "smoke")
    path = result_path(cfg, "smoke")
    path.write_text(path.read_text().replace('"final_val_loss": 2.0', '"final_val_loss": 1.0'))
    assert get_result(cfg, "smoke")["final_val_loss"] == 2.0
    assert len(calls) == 2


def test_only_the_main_process_writes_the_result(store: Path, calls: list, monkeypatch) -> None:
    """Under torchrun every rank trains the same run; only rank 0 writes its result."""
    cfg = synthetic_config("smoke", "primes")
    monkeypatch.setattr(results_mod, "is_main_process", lambda: False)
    assert get_result(cfg, "smoke")["final_val_loss"] == 2.0
    assert not result_path(cfg, "smoke").exists()
    monkeypatch.setattr(results_mod, "is_main_process", lambda: True)
    get_result(cfg, "smoke")
    assert result_path(cfg, "smoke").exists()


def test_fresh_retrains_each_config_once(store: Path, calls: list, monkeypatch) -> None:
    cfg = synthetic_config("smoke", "primes")
    get_result(cfg, "smoke")
    monkeypatch.setenv("AOTLIB_FRESH", "1")
    get_result(cfg, "smoke")
    get_result(cfg, "smoke")
    assert len(calls) == 2


def test_arrow_table_rejects_unpaired_runs() -> None:
    fw, bw = both_directions(synthetic_config("smoke", "primes"))
    table = arrow_table([fw, bw], [fake_result(fw, 2.0), fake_result(bw, 2.2)])
    assert table.delta.iloc[0] == pytest.approx(0.2 / 2.15)  # from the window means
    with pytest.raises(ValueError, match="pair"):
        arrow_table([fw, replace(bw, seed=3)], [fake_result(fw), fake_result(bw)])


def test_cli_arrow_prints_delta_with_interval(store: Path, monkeypatch, capsys) -> None:
    def fake_train(cfg, run_dir, progress):
        return fake_result(cfg, 2.0 if cfg.direction == "forward" else 2.1)

    monkeypatch.setattr(results_mod, "train", fake_train)
    assert main(["arrow", "--scale", "smoke", "--lang", "fr", "--seeds", "0", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "delta +4.76%" in out and "95% CI" in out and "across 2 seeds" in out


def test_claim_lets_one_process_train_a_run(store: Path) -> None:
    from aotlib.results import claim

    cfg = synthetic_config("smoke", "primes")
    with claim(cfg, "smoke") as first:
        with claim(cfg, "smoke") as second:  # this (live) process already holds it
            assert first and not second
    with claim(cfg, "smoke") as again:  # released on exit
        assert again


def test_seeds_agree_on_sign_needs_two_seeds_and_can_fail() -> None:
    import pandas as pd

    from aotlib.plotting import seeds_agree_on_sign

    one = pd.DataFrame({"context": [16, 32], "seed": [0, 0], "delta": [0.1, -0.1]})
    assert seeds_agree_on_sign(one, "context") is None
    two = pd.DataFrame({"context": [16, 16, 32, 32], "seed": [0, 1, 0, 1],
                        "delta": [0.1, 0.2, -0.1, -0.3]})  # fmt: skip
    assert seeds_agree_on_sign(two, "context") is True
    two.loc[3, "delta"] = 0.3  # the seeds now differ at 32
    assert seeds_agree_on_sign(two, "context") is False


def test_load_grid_without_training_keeps_complete_pairs(store: Path, calls: list) -> None:
    from aotlib.results import group_pairs, load_grid

    runs = list(both_directions(lm_config("smoke", seed=0)))
    runs += both_directions(lm_config("smoke", seed=1))
    get_result(runs[0], "smoke")  # seed 0: forward only
    get_result(runs[2], "smoke")  # seed 1: both
    get_result(runs[3], "smoke")
    kept, results, missing = load_grid(runs, "smoke", train_missing=False)
    assert kept == runs[2:] and [r["key"] for r in results] == [c.key() for c in runs[2:]]
    assert missing == [result_path(runs[1], "smoke").name]
    assert len(calls) == 3  # nothing trained
    kept, results, missing = load_grid(runs, "smoke", train_missing=True)
    assert kept == runs and not missing and len(calls) == 4
    groups = group_pairs(kept, results, lambda c: c.data.lang)
    assert list(groups) == ["fr"] and len(groups["fr"]) == 2
    with pytest.raises(ValueError, match="not a forward/backward pair"):
        group_pairs(kept[1:3], results[1:3], lambda c: c.seed)


def stored_smoke_runs() -> list[Path]:
    """A synthetic-language GPT and an MQAR Mamba-2 at the smoke scale, trained and stored
    (seconds each), their result files."""
    from aotlib.mqar import get_mqar_result, mqar_grid, mqar_result_path

    primes = GRIDS["primes"]("smoke")[0]
    mqar = next(cfg for cfg in mqar_grid("smoke") if cfg.arch == "mamba2")
    get_result(primes, "smoke", progress=False)
    get_mqar_result(mqar, "smoke", progress=False)
    return [result_path(primes, "smoke"), mqar_result_path(mqar, "smoke")]


def test_cli_check_trains_stored_runs_again_to_the_same_numbers(store: Path, capsys) -> None:
    paths = stored_smoke_runs()
    assert main(["check", *map(str, paths), "--tol", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count(": equal") == 3  # a final loss; an MQAR test loss and accuracy


def test_cli_check_fails_on_a_stored_number_it_does_not_reach(store: Path, capsys) -> None:
    from aotlib.checkpoint import load_json, save_json

    primes = GRIDS["primes"]("smoke")[0]
    get_result(primes, "smoke", progress=False)
    path = result_path(primes, "smoke")
    result = load_json(path)
    result["final_val_loss"] += 1e-3  # a valid file (checksum and key) with another number
    save_json(path, result)
    assert main(["check", str(path), "--quiet"]) == 1
    assert "0.001 apart (> tol)" in capsys.readouterr().out
