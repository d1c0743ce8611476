"""SSD and Mamba-2 across processes equal their single-process twins; the bytes they send
are the bytes the cost model in aotlib.comm predicts.

Every multi-process test runs its ranks with `aotlib.comm.run_parallel` (CPU, gloo, a
process-group timeout), so a rank that fails or waits forever fails the test instead of
hanging it. The equality checks and traffic counts for 2 and for 4 ranks run as one job
each (`ranks`), read by several tests. They share one xdist group: two 4-rank jobs at
once would swamp two cores.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist

from aotlib import comm
from aotlib.attention_parallel import compare_and_measure_attention
from aotlib.comm import run_parallel
from aotlib.mamba2 import Mamba2Block
from aotlib.mamba2_parallel import (
    MODEL_RTOL,
    ContextParallelMamba2Block,
    TensorParallelMamba2Block,
    _config,
    compare_cases,
    measure_traffic,
    tp_rows,
)
from aotlib.ssd import random_ssd_inputs
from aotlib.ssd_parallel import (
    F32_RTOL,
    check_lengths,
    ssd_sequence_parallel,
)
from aotlib.ssd_parallel import compare_cases as compare_ssd_cases

pytestmark = pytest.mark.xdist_group("parallel")

F64_ATOL = 1e-10  # float64 SSD: outputs, states and gradients, absolute (values are O(1-100))


def worst(results: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """Largest error over ranks, per quantity."""
    keys = [k for k in results[0] if k.startswith(prefix)]
    return {k: max(r[k] for r in results) for k in keys}


def ssd_cases(world: int) -> list[tuple[list[int], dict]]:
    layouts = check_lengths(world)  # even, uneven, one segment shorter than a chunk
    cases = [(lengths, dict(dtype=torch.float64)) for lengths in layouts]
    cases += [(layouts[1], dict(dtype=torch.float32))]
    cases += [(layouts[2], dict(dtype=torch.float64, with_D=False, with_initial_state=False))]
    cases += [(layouts[1], dict(dtype=torch.float64, ngroups=1, nheads=2, chunk_size=5))]
    return cases


MODEL_CASES = {
    2: [
        ("tensor", (), dict(layers=0)),  # one block
        ("tensor", (), dict(layers=2)),  # a 2-layer LM: loss and every gradient
        ("context", ([9, 5],), dict(layers=0)),
        ("context", ([7, 12],), dict(layers=2)),
    ],
    4: [
        ("tensor", (), dict(layers=2, ngroups=4)),
        # segments shorter than a chunk (8), the last one shorter than the conv halo (3)
        ("context", ([5, 9, 4, 2],), dict(layers=0)),
    ],
}


def every_check(world: int) -> dict:
    """Run on every rank: all equality checks and traffic counts for one world size, in
    one process group (starting the ranks costs more than the checks themselves)."""
    return dict(
        ssd=compare_ssd_cases(ssd_cases(world)),
        models=compare_cases(MODEL_CASES[world]),
        traffic=measure_traffic(),
        attention=compare_and_measure_attention(),
    )


@functools.cache
def ranks(world: int) -> list[dict]:
    """`every_check` on `world` gloo ranks, run once per test session, by rank."""
    return run_parallel(every_check, world, world, timeout_s=120)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_ssd_matches_single_process(world: int) -> None:
    cases = ssd_cases(world)
    assert any(min(lengths) < 8 for lengths, _ in cases)
    results = [r["ssd"] for r in ranks(world)]
    for i, (lengths, kw) in enumerate(cases):
        per_rank = [r[i] for r in results]
        if kw["dtype"] == torch.float64:
            errs = worst(per_rank, "abs_")
            tol = F64_ATOL
        else:
            errs = {k: v for k, v in worst(per_rank).items() if not k.startswith("abs_")}
            tol = F32_RTOL
        print(lengths, kw, f"worst {max(errs.values()):.1e}")
        expected = {"y", "state", "grad_x", "grad_dt", "grad_A", "grad_B", "grad_C"}
        assert expected <= {k.removeprefix("abs_") for k in errs}
        assert max(errs.values()) < tol, (lengths, kw, errs)


@pytest.mark.parametrize("world", [2, 4])
def test_context_and_tensor_parallel_mamba2_match_single_process(world: int) -> None:
    results = [r["models"] for r in ranks(world)]
    for i, case in enumerate(MODEL_CASES[world]):
        errs = worst([r[i] for r in results])
        print(case, f"worst {max(errs.values()):.1e}")
        assert "loss" in errs or "output" in errs
        assert any(k.startswith("grad_blocks.1.") for k in errs) == (case[2]["layers"] == 2)
        assert max(errs.values()) < MODEL_RTOL, (case, errs)


def test_tp_rows_are_a_partition_of_the_single_process_rows() -> None:
    cfg = _config(ngroups=4)
    for world in (1, 2, 4):
        rows = [tp_rows(cfg, r, world) for r in range(world)]
        for key, total in (("in_proj", 2 * 32 + 2 * 16 + 8), ("conv", 32 + 2 * 16)):
            every = torch.cat([r[key] for r in rows])
            assert sorted(every.tolist()) == list(range(total)), key
    # rank 0 of 2: z rows 0-15, x rows 32-47, B rows 64-71, C rows 80-87, dt rows 96-99
    first = tp_rows(cfg, 0, 2)["in_proj"].tolist()
    assert first[:16] == list(range(16)) and first[16:32] == list(range(32, 48))
    assert first[32:40] == list(range(64, 72)) and first[40:48] == list(range(80, 88))
    assert first[48:] == list(range(96, 100))


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def test_no_process_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    inp = random_ssd_inputs(1, 8, 2, 3, 1, 4)
    with pytest.raises(RuntimeError, match="process group"):
        ssd_sequence_parallel(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4)
    with pytest.raises(RuntimeError, match="process group"):
        TensorParallelMamba2Block(Mamba2Block(_config()))


def provoke_errors() -> dict[str, str]:
    """Run on 2 ranks: each misuse must raise ValueError on every rank (not hang)."""
    rank = dist.get_rank()
    out = {}
    inp = random_ssd_inputs(1, 8, 4, 3, 2, 4)
    heads = 4 if rank == 0 else 2  # mismatched segment shapes
    x, dt, A = inp["x"][:, :, :heads], inp["dt"][:, :, :heads], inp["A"][:heads]
    attempts = {
        "mismatch": lambda: ssd_sequence_parallel(x, dt, A, inp["B"], inp["C"], 4),
        "initial_state": lambda: ssd_sequence_parallel(
            *[inp[k] for k in "x dt A B C".split()],
            4,
            initial_state=torch.zeros(1, 4, 3, 4) if rank == 1 else None,
        ),  # fmt: skip
        "bad_local": lambda: ssd_sequence_parallel(
            *[inp[k] for k in "x dt A B C".split()], 4 if rank == 0 else 0
        ),
        "heads": lambda: TensorParallelMamba2Block(
            Mamba2Block(_config(d_model=6, head_dim=4, ngroups=1))
        ),
        "groups": lambda: TensorParallelMamba2Block(Mamba2Block(_config(ngroups=1))),
        "halo": lambda: ContextParallelMamba2Block(Mamba2Block(_config()).double())(
            torch.zeros(1, 2 if rank == 0 else 8, 16, dtype=torch.float64)
        ),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_misuse_raises_on_every_rank() -> None:
    results = run_parallel(provoke_errors, 2, timeout_s=30)
    for r in results:
        assert "same (b, h, p, g, n, dtype)" in r["mismatch"], r["mismatch"]
        assert "rank 0 only" in r["initial_state"]
        assert "invalid" in r["bad_local"] or "chunk_size" in r["bad_local"]
        assert "cannot be split evenly over 2 ranks" in r["heads"]
        assert "ngroups=1 is not divisible by 2" in r["groups"]
        assert "shorter than the conv halo" in r["halo"]


def one_rank_dies() -> None:
    """Rank 1 fails before the collective that rank 0 waits in."""
    inp = random_ssd_inputs(1, 8, 2, 3, 1, 4)
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gives up")
    ssd_sequence_parallel(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4)


def test_a_dying_rank_fails_the_run_instead_of_hanging_it() -> None:
    t0 = time.monotonic()
    with pytest.raises(Exception) as failure:
        run_parallel(one_rank_dies, 2, timeout_s=20)
    # whichever rank is reported first: the one that gave up, or rank 0 losing its peer
    assert "rank 1 gives up" in str(failure.value) or "Connection" in str(failure.value)
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------
# Communication: what the code sends is what the cost model says
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_match_the_cost_model(world: int) -> None:
    for rank, per_layer in enumerate(r["traffic"] for r in ranks(world)):
        for name, (fwd, bwd, want, fwd_ops, bwd_ops) in per_layer.items():
            print(rank, name, fwd, bwd, fwd_ops, bwd_ops)
            assert fwd == want["forward"], (rank, name, fwd, want)
            assert bwd == want["backward"], (rank, name, bwd, want)
        assert per_layer["tp mamba2"][3] == ["all_reduce"]  # ONE all-reduce per block
        assert per_layer["tp mamba2"][4] == ["all_reduce"]
        assert per_layer["ssd validate=False"][3] == ["all_gather_single"]
        assert per_layer["ssd validate=False"][4] == ["reduce_scatter_single"]


@pytest.mark.parametrize("world", [2, 4])
def test_attention_baselines_match_gpt_and_their_cost_model(world: int) -> None:
    for rank, res in enumerate(r["attention"] for r in ranks(world)):
        assert max(res["errors"].values()) < 1e-10, res["errors"]
        assert len(res["errors"]) == 2 + 12 + 1  # output, input grad, 12 parameters, ring
        fwd, bwd, want, fwd_ops, bwd_ops = res["traffic"]["tp attention+mlp"]
        assert (fwd, bwd) == (want["forward"], want["backward"])
        assert fwd_ops == bwd_ops == ["all_reduce", "all_reduce"]  # two per block
        fwd, _, want, fwd_ops, _ = res["traffic"]["ring attention"]
        assert fwd == want["forward"], (rank, fwd, want)
        assert fwd_ops.count("isend") == world - 1


def test_sequence_parallel_bytes_do_not_grow_with_length() -> None:
    short = comm.sp_ssd_traffic(1, 24, 64, 128, 4)["forward"]
    ring = [comm.ring_attention_traffic(1, L, 768, 4)["forward"].bytes for L in (1024, 8192)]
    assert short.bytes == comm.sp_ssd_traffic(1, 24, 64, 128, 4)["forward"].bytes
    assert ring[1] == 8 * ring[0]
    assert comm.tp_mamba2_traffic(1, 64, 768, 2)["forward"].calls == 1
    assert comm.tp_mamba1_traffic(1, 64, 768, 48, 16, 2)["forward"].calls == 2
    assert comm.tp_attention_mlp_traffic(1, 64, 768, 2)["forward"].calls == 2
