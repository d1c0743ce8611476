"""Training: determinism, exact resumption after kill -9, crash-safe files, DDP == 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aotlib.arrow import arrow_of_time, paired_bootstrap, seed_spread
from aotlib.checkpoint import CorruptFile, load_checkpoint, load_json, save_checkpoint, save_json
from aotlib.data import DataConfig
from aotlib.models import model_config
from aotlib.train import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parent.parent
# A tiny synthetic corpus: no download, a few seconds per run.
DATA = DataConfig(corpus="primes", options=(("digits", 2), ("n_train", 240), ("n_val", 40)))


def tiny(**over) -> TrainConfig:
    model = model_config("gpt", "xs", n_layer=1, d_model=32, n_head=2)
    base = TrainConfig(
        model=model, data=DATA, steps=12, batch_size=8, warmup=3, eval_every=4,
        checkpoint_every=4, eval_windows=16,
    )  # fmt: skip
    return replace(base, **over)


def losses(result: dict) -> list[float]:
    return [h["train_loss"] for h in result["history"]] + [result["final_val_loss"]]


def test_same_config_and_seed_is_bit_identical(tmp_path: Path) -> None:
    a = train(tiny(), tmp_path / "a", progress=False)
    b = train(tiny(), tmp_path / "b", progress=False)
    assert losses(a) == losses(b)
    c = train(tiny(seed=1), tmp_path / "c", progress=False)
    assert losses(a) != losses(c)


def test_backward_and_forward_differ_but_share_windows(tmp_path: Path) -> None:
    fw = train(tiny(), tmp_path / "f", progress=False)
    bw = train(tiny(direction="backward"), tmp_path / "b", progress=False)
    assert len(fw["val_window_losses"]) == len(bw["val_window_losses"]) == 40
    assert fw["final_val_loss"] != bw["final_val_loss"]


def _train_in_subprocess(cfg_json: str, run_dir: Path, kill_at: int | None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill_at is not None:
        env["AOTLIB_KILL_AT_STEP"] = str(kill_at)
    code = (
        "import json, sys, torch\n"
        "from aotlib.train import TrainConfig\n"
        "from aotlib.train import train\n"
        "torch.set_num_threads(1)\n"
        f"cfg = TrainConfig.from_dict(json.loads({cfg_json!r}))\n"
        f"r = train(cfg, {str(run_dir)!r}, progress=False)\n"
        f"json.dump(r, open({str(run_dir / 'result.json')!r}, 'w'))\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode


def test_kill_minus_9_resumes_to_the_identical_result(tmp_path: Path) -> None:
    cfg_json = json.dumps(tiny().to_dict())
    assert _train_in_subprocess(cfg_json, tmp_path / "ref", None) == 0
    # Killed with SIGKILL at step 6 (after the checkpoint of step 4), then resumed.
    assert _train_in_subprocess(cfg_json, tmp_path / "run", 6) == -9
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4
    assert _train_in_subprocess(cfg_json, tmp_path / "run", None) == 0
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    run = json.loads((tmp_path / "run" / "result.json").read_text())
    assert losses(ref) == losses(run)
    assert ref["val_window_losses"] == run["val_window_losses"]


def test_corrupted_checkpoint_is_detected_and_not_loaded(tmp_path: Path) -> None:
    cfg = tiny(steps=4)
    ref = train(cfg, tmp_path / "ref", progress=False)
    path = tmp_path / "bad" / "checkpoint.pt"
    save_checkpoint(path, {"key": cfg.key(), "step": 3})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip a byte of the payload
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile):
        load_checkpoint(path)
    assert losses(train(cfg, tmp_path / "bad", progress=False)) == losses(ref)


def test_json_checksum_detects_edits(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    save_json(path, {"loss": 1.5})
    assert load_json(path) == {"loss": 1.5}
    path.write_text(path.read_text().replace("1.5", "1.4"))
    with pytest.raises(CorruptFile):
        load_json(path)
    path.write_text('{"loss": 1.')  # truncated
    with pytest.raises(CorruptFile):
        load_json(path)


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = tiny(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="direction"):
        tiny(direction="sideways")
    with pytest.raises(ValueError, match="steps"):
        tiny(steps=0)


def test_arrow_of_time_and_bootstrap() -> None:
    assert arrow_of_time(2.0, 2.2) == pytest.approx(0.2 / 2.1)
    gen = torch.Generator().manual_seed(0)
    fw = (2 + torch.rand(200, generator=gen)).tolist()
    bw = [x + 0.1 for x in fw]  # backward uniformly harder
    d, lo, hi = paired_bootstrap(fw, bw)
    assert 0 < lo <= d <= hi
    d0, lo0, hi0 = paired_bootstrap(fw, fw)
    assert d0 == lo0 == hi0 == 0
    with pytest.raises(ValueError):
        paired_bootstrap(fw, bw[:-1])
    assert seed_spread([0.01, 0.03]) == pytest.approx((0.02, 0.01))


@pytest.mark.xdist_group("ddp")
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    cfg = tiny(model=model_config("gpt", "xs", n_layer=1, d_model=32, n_head=2, dropout=0.0))
    single = train(cfg, tmp_path / "single", progress=False)
    code = (
        "import json, torch\n"
        "from aotlib.train import TrainConfig\n"
        "from aotlib.train import train\n"
        "torch.set_num_threads(1)\n"
        f"cfg = TrainConfig.from_dict(json.loads({json.dumps(cfg.to_dict())!r}))\n"
        f"r = train(cfg, {str(tmp_path / 'ddp')!r}, progress=False)\n"
        "if torch.distributed.get_rank() == 0:\n"
        f"    json.dump(r, open({str(tmp_path / 'ddp.json')!r}, 'w'))\n"
        "torch.distributed.destroy_process_group()\n"
    )
    script = tmp_path / "ddp_script.py"
    script.write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(script)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["provenance"]["world_size"] == 2
    torch.testing.assert_close(losses(ddp), losses(single), rtol=1e-4, atol=1e-5)
