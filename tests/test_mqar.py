"""MQAR (aotlib.mqar): the task's definition, its split, the GPT short conv, and a tiny run.

The checks follow the task's definition: every query is answered by the value paired
with that key earlier in the sequence, nothing else is labelled, the generator is a
function of its seed, train and test never share a list of pairs, and pairs that do not
fit say so. Then a smoke-sized run trains, is killed, resumes to the same numbers and
is stored where `python -m aotlib grid mqar` puts it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import aotlib.mqar as mqar
from aotlib.checkpoint import save_json
from aotlib.mqar import (
    IGNORE,
    MQARConfig,
    get_mqar_result,
    is_test_example,
    mqar_config,
    mqar_examples,
    mqar_grid,
    mqar_result_path,
    pairs_at,
    train_batch,
)

TASK = dict(vocab_size=64, seq_len=40, n_pairs=8)


def examples(n: int = 200, split: str = "train", seed: int = 0, **over):
    return mqar_examples(n, **{**TASK, **over}, split=split, seed=seed)


@pytest.mark.parametrize("random_fillers", [False, True])
def test_every_query_is_answered_by_its_pair_and_nothing_else_is_labelled(random_fillers):
    inputs, targets = examples(random_fillers=random_fillers)
    V, K = TASK["vocab_size"], TASK["n_pairs"]
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0 : 2 * K : 2], x[1 : 2 * K : 2]
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        assert len(set(keys)) == K and len(set(values)) == K
        pair = dict(zip(keys, values))
        asked = [t for t, target in enumerate(y) if target != IGNORE]
        assert len(asked) == K and min(asked) >= 2 * K  # each key asked once, after the pairs
        assert sorted(x[t] for t in asked) == sorted(keys)
        for t in asked:
            assert y[t] == pair[x[t]]  # the value that followed this key
        if not random_fillers:  # fillers are 0, never a key
            rest = [x[t] for t in range(2 * K, len(x)) if t not in asked]
            assert set(rest) == {0}


def test_query_gaps_follow_a_decreasing_power_law():
    # zoology's a = 0.01: the first query slots are the most likely.
    _, targets = examples(n=2000, seq_len=64, n_pairs=4)
    slots = ((targets != IGNORE).nonzero()[:, 1] - 8) // 2  # (n * K,) gap of each query
    counts = torch.bincount(slots, minlength=28).float()
    assert counts[:4].sum() > counts[-4:].sum() * 2
    assert counts[-1] > 0  # late queries happen too


def test_the_generator_is_deterministic_for_a_seed():
    a, b, c = examples(seed=3), examples(seed=3), examples(seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    cfg = mqar_config("smoke", "gpt", 16)
    assert torch.equal(train_batch(cfg, 7)[0], train_batch(cfg, 7)[0])
    assert not torch.equal(train_batch(cfg, 7)[0], train_batch(cfg, 8)[0])


def test_train_and_test_are_disjoint_by_construction():
    K = TASK["n_pairs"]
    train_x, _ = examples(n=400, split="train")
    test_x, _ = examples(n=400, split="test")
    assert not is_test_example(train_x, K).any() and is_test_example(test_x, K).all()
    assert not pair_lists(train_x, K) & pair_lists(test_x, K)
    # A tiny task whose pair lists repeat keeps them apart too (4*3 * 5*4 = 240 lists exist).
    small = dict(vocab_size=10, seq_len=8, n_pairs=2)
    tr = mqar_examples(300, **small, split="train", seed=0)[0]
    te = mqar_examples(300, **small, split="test", seed=0)[0]
    assert len(pair_lists(tr, 2)) > 20 and not pair_lists(tr, 2) & pair_lists(te, 2)


def pair_lists(x: torch.Tensor, n_pairs: int) -> set[tuple[int, ...]]:
    return {tuple(row) for row in x[:, : 2 * n_pairs].tolist()}


@pytest.mark.parametrize(
    "task, message",
    [
        (dict(vocab_size=64, seq_len=40, n_pairs=11), "seq_len >= 4 \\* n_pairs = 44"),
        (dict(vocab_size=16, seq_len=64, n_pairs=8), "do not fit vocab_size=16"),
        (dict(vocab_size=64, seq_len=40, n_pairs=0), "at least one"),
    ],
)
def test_pairs_that_do_not_fit_raise_a_clear_error(task, message):
    with pytest.raises(ValueError, match=message):
        mqar_examples(4, **task, split="train", seed=0)
    with pytest.raises(ValueError, match=message):
        MQARConfig(**task)


def test_curriculum_goes_from_few_pairs_to_all():
    cfg = MQARConfig(arch="mamba2", d_state=2, n_pairs=16, steps=100, curriculum=0.3)
    ks = [pairs_at(cfg, s) for s in range(100)]
    assert ks[:10] == [2] * 10 and ks[10:20] == [4] * 10 and ks[20:30] == [8] * 10
    assert set(ks[30:]) == {16}
    assert {pairs_at(replace(cfg, curriculum=0.0), s) for s in range(100)} == {16}


def test_gpt_short_conv_is_causal_and_off_by_default():
    from aotlib.gpt import GPT

    cfg = mqar_config("smoke", "gpt", 16).model_config()
    torch.manual_seed(0)
    plain = GPT(cfg)
    torch.manual_seed(0)
    again = GPT(cfg, short_conv=0)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), again.parameters()))
    torch.manual_seed(0)
    conv = GPT(cfg, short_conv=4)
    x = torch.randint(cfg.vocab_size, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % cfg.vocab_size  # change one token: earlier outputs must not move
    a, b = conv(x), conv(y)
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_the_cpu_grid_sweeps_learning_rates_then_adds_the_second_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTLIB_RESULTS", str(tmp_path))
    runs = mqar_grid("cpu")
    lrs = mqar.MQAR_PRESETS["cpu"]["lrs"]
    assert {r.seed for r in runs} == {0} and len(runs) == len(mqar.grid_points("cpu")) * len(lrs)
    assert len({r.key() for r in runs}) == len(runs)
    # Once a point's sweep is stored, its best learning rate is run with the second seed.
    point = runs[: len(lrs)]
    for cfg, acc in zip(point, [0.2, 0.9, 0.5]):
        save_json(mqar_result_path(cfg, "cpu"), {"key": cfg.key(), "test_accuracy": acc})
    extra = mqar_grid("cpu")[len(runs) :]
    assert extra == [replace(point[1], seed=mqar.SECOND_SEED)]


def test_capacity_points_are_swept_like_the_full_task(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTLIB_RESULTS", str(tmp_path))
    p = mqar.MQAR_PRESETS["cpu"]
    lrs, runs = p["lrs"], mqar_grid("cpu")
    capacity = mqar._capacity_points("cpu")
    assert len(capacity) == len(p["pairs"]) * (1 + len(p["states"]))
    assert {(q.d_model, q.seed) for q in capacity} == {(p["pairs_width"], 0)}
    assert {q.n_pairs for q in capacity} == set(p["pairs"])
    # every capacity point at every rate on seed 0, from the start
    assert [r for r in runs if r.n_pairs != p["n_pairs"]] == [
        replace(q, lr=lr, min_lr=lr / 10) for q in capacity for lr in lrs
    ]
    assert mqar.grid_points("cpu")[-len(capacity) :] == capacity
    # once a capacity point's sweep is stored, its own best rate runs on seed 1
    q = capacity[-1]  # the largest state at the most pairs swept
    for lr, acc in zip(lrs, [0.3, 0.2, 0.7]):
        cfg = replace(q, lr=lr, min_lr=lr / 10)
        save_json(mqar_result_path(cfg, "cpu"), {"key": cfg.key(), "test_accuracy": acc})
    assert mqar_grid("cpu")[len(runs) :] == [
        replace(q, lr=lrs[2], min_lr=lrs[2] / 10, seed=mqar.SECOND_SEED)
    ]


def test_the_capacity_sweep_needs_a_width_of_the_grid(monkeypatch):
    preset = dict(mqar.MQAR_PRESETS["smoke"], pairs_width=24)
    monkeypatch.setitem(mqar.MQAR_PRESETS, "smoke", preset)
    with pytest.raises(ValueError, match="pairs_width=24"):
        mqar_grid("smoke")


def test_smoke_run_trains_resumes_after_a_kill_and_is_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("AOTLIB_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = mqar_config("smoke", "mamba2", 16, 2, steps=12, eval_every=4, n_test=32)
    whole = mqar.train_mqar(cfg, tmp_path / "whole", progress=False)

    class Killed(Exception):
        pass

    def die():
        raise Killed

    monkeypatch.setattr(mqar, "_die", die)
    monkeypatch.setenv("AOTLIB_KILL_AT_STEP", "10")  # after the checkpoint at step 8
    with pytest.raises(Killed):
        get_mqar_result(cfg, "smoke", progress=False)
    assert not mqar_result_path(cfg, "smoke").exists()
    monkeypatch.delenv("AOTLIB_KILL_AT_STEP")
    resumed = get_mqar_result(cfg, "smoke", progress=False)
    for key in ("test_accuracy", "test_loss", "history", "n_params"):
        assert resumed[key] == whole[key], key
    stored = mqar.load_mqar_result(cfg, "smoke")
    assert stored is not None and stored["test_accuracy"] == whole["test_accuracy"]
    assert Path(mqar_result_path(cfg, "smoke")).parent == tmp_path / "results" / "smoke"


def test_summary_takes_each_points_best_rate_and_the_verdicts_read_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AOTLIB_RESULTS", str(tmp_path))
    assert mqar.summary_table("smoke").empty
    assert set(mqar.verdicts(mqar.summary_table("smoke"), "smoke").verdict) == {
        "cannot tell (not trained)"
    }

    def store(cfg, acc):
        result = {"key": cfg.key(), "test_accuracy": acc, "train_seconds": 1.0,
                  "train_examples": 10}  # fmt: skip
        save_json(mqar_result_path(cfg, "smoke"), result)

    # Accuracy: the state size N (0 for attention) decides, the higher rate adds 0.1.
    acc = lambda cfg: min(1.0, 0.1 + cfg.d_state / 10 + (cfg.lr > 5e-3) / 10)  # noqa: E731
    for cfg in mqar_grid("smoke"):
        store(cfg, acc(cfg) if cfg.arch == "mamba2" else 0.95)
    later = mqar_grid("smoke")[
        len(mqar.grid_points("smoke")) * len(mqar.MQAR_PRESETS["smoke"]["lrs"]) :
    ]
    second = [cfg for cfg in later if cfg.seed == mqar.SECOND_SEED]
    assert len(second) == len(mqar.grid_points("smoke"))
    for cfg in later:
        store(cfg, acc(cfg) if cfg.arch == "mamba2" else 0.95)
    assert mqar_grid("smoke")[-len(later) :] == later  # nothing more to add
    summary = mqar.summary_table("smoke")
    m = summary[summary.arch == "mamba2"]
    assert (m.best_lr == 1e-2).all() and (summary.seeds == 2).all()
    assert set(summary.rates) == {2}  # every point swept over both rates, K = 2 too
    assert list(m.accuracy.round(2)) == [0.4, 1.0, 0.4, 1.0]  # N = 2, 8 at K = 4, then K = 2
    v = mqar.verdicts(summary, "smoke").set_index("claim").verdict
    assert v["Mamba-2: N=8 above N=2 at d=16"] == "agree"
    assert v["attention near-perfect (>= 0.9) at its largest width d=16"] == "agree"


def test_the_plan_counts_every_run_the_grid_will_hold():
    p = mqar.MQAR_PRESETS["cpu"]
    plan = mqar.grid_plan("cpu")
    main = len(p["gpt_widths"]) + len(p["widths"]) * len(p["states"])
    capacity = len(p["pairs"]) * (1 + len(p["states"]))
    assert [pt for pt, _ in plan] == mqar.grid_points("cpu") and len(plan) == main + capacity
    assert sum(n for _, n in plan) == (main + capacity) * (len(p["lrs"]) + 1) == 84


def test_the_papers_capacity_points_use_the_grids_state_per_pair():
    paper = mqar.paper_capacity().set_index(["d_state", "d_model"])
    assert len(paper) == 3 * len(mqar.PAPER_WIDTHS)  # Mamba-2 N = 16, 64, 256
    assert paper.loc[(16, 32), "state_per_pair"] == 2 * 32 * 16 / 128 == 8.0
    assert paper.loc[(16, 32), "accuracy"] == mqar.PAPER_MQAR["Mamba-2 N=16"].value[0]
    cfg = MQARConfig(arch="mamba2", d_model=32, d_state=16, n_pairs=4, seq_len=16)
    assert cfg.state_per_pair() == 2 * 32 * 16 / 4  # the same formula
