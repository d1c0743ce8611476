"""Training on CUDA and under DDP, checked on a CPU: the device decisions, with torch.cuda mocked.

What a first multi-GPU run needs (aotlib.train): each rank on its own GPU, cuda:LOCAL_RANK,
made current; DistributedDataParallel told that device; the GPU's RNG state saved and
restored with the CPU one (dropout draws from it on CUDA); the plain LM-head loss on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from aotlib import train as tr


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a two-GPU machine would answer, recording what was set."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(
        torch.cuda, "get_rng_state", lambda d: torch.tensor([7, d.index], dtype=torch.uint8)
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, d: calls.append(("set_rng_state", s.tolist(), d))
    )
    return calls


@pytest.mark.parametrize(
    "local_rank, asked, expected",
    [("1", None, "cuda:1"), ("1", "cuda", "cuda:1"), (None, "cuda", "cuda:0"),
     ("1", "cuda:0", "cuda:0")],
)  # fmt: skip
def test_each_rank_trains_on_its_own_gpu(fake_cuda, monkeypatch, local_rank, asked, expected):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    device = tr.rank_device(asked)
    assert device == torch.device(expected)
    assert fake_cuda == [("set_device", device)]  # current before NCCL starts


def test_cpu_stays_cpu(fake_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert tr.rank_device("cpu") == torch.device("cpu") and fake_cuda == []
    assert tr._ddp_options(torch.device("cpu")) == {}


def test_ddp_is_told_the_ranks_gpu():
    assert tr._ddp_options(torch.device("cuda", 3)) == {"device_ids": [3], "output_device": 3}


def test_cuda_rng_state_is_checkpointed_and_restored(fake_cuda):
    gpu = torch.device("cuda", 1)
    state = tr._rng_state(gpu)
    assert torch.equal(state["rng"], torch.get_rng_state())
    assert state["cuda_rng"].tolist() == [7, 1]
    tr._set_rng_state(state, gpu)
    assert fake_cuda == [("set_rng_state", [7, 1], gpu)]


def test_cpu_checkpoints_keep_their_keys(fake_cuda):
    """CPU runs save exactly what they saved before (the resume tests depend on it)."""
    state = tr._rng_state(torch.device("cpu"))
    assert list(state) == ["rng"]
    tr._set_rng_state(state, torch.device("cuda", 0))  # a CPU checkpoint resumed on a GPU
    assert fake_cuda == []


def test_fused_loss_on_one_cpu_process_only():
    assert tr._uses_fused_loss(torch.device("cpu"), world=1)
    assert not tr._uses_fused_loss(torch.device("cpu"), world=2)  # DDP: the wrapped forward
    assert not tr._uses_fused_loss(torch.device("cuda", 0), world=1)


def test_only_rank_zero_is_main(monkeypatch):
    assert tr.is_main_process()  # no process group: one process
    monkeypatch.setattr(tr, "_dist", lambda: (1, 2))
    assert not tr.is_main_process()
