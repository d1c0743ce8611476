"""`make gpu-check` on a machine without a GPU: what can be checked before the first GPU run.

- Without CUDA it says "no CUDA device", writes nothing and never touches .venv.
- A stage that hangs is killed at its time limit (TIMEOUT), the others still run.
- The kernel stage's checks (aotlib.bench.kernels) run here through the interpreter and
  catch a wrong result; the driver turns stage outputs into one PASS/FAIL line each.
- The model check runs a small Mamba-2 through the Triton interpreter and the chunked path.
- The GPU timing CSV is one notebook 02 can draw.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aotlib.bench import gpu, kernels
from aotlib.bench import ssd as bench_ssd

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")


def _listing(path: Path) -> dict:
    return {str(p): p.stat().st_mtime for p in path.rglob("*")} if path.exists() else {}


@needs_no_cuda
def test_make_gpu_check_without_cuda_says_so_and_touches_nothing():
    venv = ROOT / ".venv"
    before = (_listing(ROOT / "results" / "gpu"), _listing(venv / ".installed"))
    dry = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and ".venv" not in dry.stdout and "pip" not in dry.stdout
    # The machine's python may lack torch entirely; this one has a CPU-only torch.
    done = subprocess.run(
        ["make", "-s", "gpu-check", f"PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr, done.stderr
    assert (_listing(ROOT / "results" / "gpu"), _listing(venv / ".installed")) == before


def test_a_hung_stage_is_killed_at_its_limit():
    log = gpu_check.Log()
    hang = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    quick = [sys.executable, "-c", "print('done')"]
    t0 = time.monotonic()
    codes = gpu_check.run_processes({"hang": hang, "quick": quick}, timeout_s=3, log=log)
    assert codes == {"hang": None, "quick": 0}
    assert time.monotonic() - t0 < 30
    assert "[hang] started" in log.lines and "[quick] done" in log.lines
    assert any("TIMEOUT" in line for line in log.lines)


SMALL = [
    kernels.Case("l7-q4-g2", (1, 7, 4, 8, 2, 16), 4),
    kernels.Case("l20-q8-tiles16", (1, 20, 2, 20, 1, 40), 8, tile=16),
]


def _off_by_one_percent(x, dt, A, B, C, chunk_size, **kw):
    from aotlib.ssd_triton import ssd_triton

    y, final = ssd_triton(x, dt, A, B, C, chunk_size, **kw)
    return y * 1.01, final


def test_kernel_stage_runs_and_catches_a_wrong_result(tmp_path, monkeypatch):
    """The GPU stage's code path, here on the interpreter in float32."""
    from aotlib import ssd_triton

    if not ssd_triton.INTERPRETED:
        pytest.skip("CUDA present: make gpu-check runs this stage compiled")
    monkeypatch.setattr(ssd_triton, "NAN_FILL", False)  # restored after the test
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)
    assert gpu_check.run_kernel_cases(SMALL, "cpu", "fp32", tmp_path / "kernels_fp32.csv") == 0
    wrong = [kernels.Case("wrong-y", (1, 9, 2, 8, 1, 8), 4, fn=_off_by_one_percent)]
    # Run in float32 (the interpreter's only dtype), filed as the fp16 table: the point is
    # the verdict. y is off by 1% (and so is every gradient through it); the state is not.
    assert gpu_check.run_kernel_cases(wrong, "cpu", "fp32", tmp_path / "kernels_fp16.csv") == 1
    rows = list(csv.DictReader(open(tmp_path / "kernels_fp16.csv")))
    failed = {r["tensor"] for r in rows if r["pass"] == "False"}
    assert "y" in failed and "final_state" not in failed
    codes = {"fp32": [0, 0], "bf16": [0, None], "fp16": [0, 1]}  # per shard; None: killed
    checks = {c.name: c for c in gpu_check.kernels_checks(codes, n_cases=len(SMALL))}
    assert checks["kernels-fp32"].status == "PASS", checks["kernels-fp32"]
    assert checks["kernels-bf16"].status == "TIMEOUT"
    assert checks["kernels-fp16"].status == "FAIL" and "wrong-y" in checks["kernels-fp16"].detail


def _timing_rows(setup) -> list[dict]:
    """Made-up times with SSD linear and attention quadratic in the length."""
    rows = []
    for sweep in ("length", "length_fwd_bwd"):
        k = 3.0 if sweep == "length_fwd_bwd" else 1.0
        for l in setup.lengths:
            for path, t in [("ssd", 1e-7 * l), ("chunked", 5e-7 * l), ("sdpa", 2e-11 * l * l)]:
                rows.append({"sweep": sweep, "path": path, "seqlen": l, "dstate": setup.dstate,
                             "time_s": k * t, "status": "ok", "device": "cuda", "threads": 1,
                             "device_name": "Fake GPU", "dtype": "bfloat16"})  # fmt: skip
    for n in setup.states:
        for path in ("ssd", "chunked"):
            rows.append({"sweep": "state", "path": path, "seqlen": setup.state_length,
                         "dstate": n, "time_s": 1e-4 * (1 + n / 256), "status": "ok",
                         "device": "cuda", "device_name": "Fake GPU", "dtype": "bfloat16",
                         "threads": 1})  # fmt: skip
    return rows


def test_comparison_puts_the_papers_claims_beside_the_measurement():
    setup = gpu.gpu_setup()
    cmp = gpu.compare(_timing_rows(setup), setup)
    # ssd 1e-7 l, sdpa 2e-11 l^2: sdpa / ssd = 2e-4 l, 0.41 at 2K, 6.6 at 32K
    assert cmp["vs_sdpa"]["length@32768"] == pytest.approx(2e-4 * 32768)
    assert cmp["vs_chunked"]["length_fwd_bwd@4096"] == pytest.approx(5.0)
    by_claim = {(c["claim"], c["pass"]): c["reproduced"] for c in cmp["claims"]}
    assert not by_claim[("faster than FlashAttention-2 from 2K", "length")]
    assert not by_claim[("more than 10x faster than FlashAttention-2 at 32K", "length")]
    assert cmp["state_growth"]["time_ratio"] == pytest.approx(2.0 / (1 + 16 / 256))
    text = gpu.format_comparison(cmp, setup)
    assert "reproduced: no" in text and "32768" in text


def test_gpu_csv_is_what_notebook_02_draws(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = gpu.gpu_setup()
    gpu.write_csv(_timing_rows(setup), tmp_path / "results" / "gpu" / "ssd_cuda.csv")
    (tmp_path / "results" / "gpu" / "kernels_fp32.csv").write_text("case,tensor\nx,y\n")
    monkeypatch.setattr(bench_ssd, "ROOT", tmp_path)
    (df,) = bench_ssd.gpu_results()  # the kernel table is not a timing table
    fig, ax = plt.subplots()
    bench_ssd.plot_sweep(ax, df, "length")
    assert {line.get_label() for line in ax.lines} >= {"ssd (public path)", "chunked", "sdpa"}
    assert ax.get_title().startswith("GPU: Fake GPU")
    plt.close(fig)


def test_model_check_through_the_interpreter():
    """A small Mamba-2, loss and every gradient, Triton (interpreted) against chunked."""
    from aotlib import ssd_triton

    if not ssd_triton.INTERPRETED:
        pytest.skip("CUDA present: make gpu-check runs the 130m-shaped model")
    (row,) = gpu.model_check("cpu", batch=1, seqlen=48, size="xs", precisions=("fp32",),
                             fast="triton")  # fmt: skip
    assert row["triton_calls"] == 3 and row["triton_chunks"] == [32]  # one per layer
    assert row["loss_rel_diff"] < 1e-5 and row["grad_cosine"] > 0.99999, row
    assert row["pass"]


def test_driver_turns_stage_outputs_into_one_line_per_check(tmp_path, monkeypatch):
    """The whole `gpu_check` flow with the stages faked: verdicts, summary, exit status."""
    monkeypatch.setattr(gpu_check, "OUT", tmp_path)
    env_json = {"has_cuda": True, "device": "Fake GPU", "capability": "9.0", "memory_gib": 140,
                "torch": "2.11", "triton": "3.6", "cuda": "12.8"}  # fmt: skip

    class Done:
        stdout, stderr = json.dumps(env_json) + "\n", ""

    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: Done())
    setup = gpu.gpu_setup()

    def fake_stages(cmds, timeout_s, log):
        assert timeout_s >= 20
        codes = {}
        for label in cmds:
            if label.startswith("kernels"):
                _, d, i = label.split()
                i = int(i)
                names = [c.name for c in kernels.CASES[i :: gpu_check.SHARDS]]
                names += ["backward-deterministic"] if i == 0 else []
                killed = d == "fp16" and i == 3  # one fp16 shard runs out of time
                with open(gpu_check._kernel_part(d, i), "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=gpu_check.KERNEL_FIELDS)
                    w.writeheader()
                    for name in names[:1] if killed else names:
                        w.writerow({"case": name, "dtype": d, "tensor": "dA", "max_err": "5e-3",
                                    "mean_err": "1e-4", "tol": "1e-2", "pass": True})  # fmt: skip
                codes[label] = None if killed else 0
            elif label == "model":
                row = {"check": "model-130m-fp32", "loss_triton": 10.9, "loss_chunked": 10.9,
                       "loss_rel_diff": 1e-6, "limits": {"loss_rel_diff": 1e-3,
                       "grad_cosine": 0.999}, "grad_cosine": 0.99999, "grad_rel_err": 1e-3,
                       "worst_tensor": "blocks.0.A_log", "worst_tensor_cosine": 0.999,
                       "triton_calls": 24, "triton_chunks": [128], "preset_chunk": 256,
                       "pass": True}  # fmt: skip
                (tmp_path / "model_check.json").write_text(json.dumps([row]))
                codes[label] = 0
            elif label == "timings":
                rows = _timing_rows(setup)
                gpu.write_csv(rows, tmp_path / "ssd_cuda.csv")
                summary = gpu.compare(rows, setup)
                (tmp_path / "ssd_cuda_summary.json").write_text(json.dumps(summary))
                codes[label] = 0
            elif label == "warm-up":
                codes[label] = 0
            elif label == "train":
                row = {"check": "train-resume", "device": "cuda: Fake GPU",
                       "rng_key": "cuda_rng", "max_loss_gap": 2e-7, "control_gap": 1e-2,
                       "tol": 1e-4, "pass": True}  # fmt: skip
                (tmp_path / "train_check.json").write_text(json.dumps(row))
                codes[label] = 0
            elif label == "pytest":
                (tmp_path / "pytest_ssd_triton.xml").write_text(
                    '<testsuites><testsuite tests="90" failures="0" errors="0" skipped="20">'
                    "</testsuite></testsuites>"
                )
                codes[label] = 0
        return codes

    monkeypatch.setattr(gpu_check, "run_processes", fake_stages)
    stages = ["kernels", "model", "timings", "pytest"]
    assert gpu_check.gpu_check(stages) == 1  # fp16 timed out
    assert sorted(p.name for p in tmp_path.glob("kernels_*")) == [
        "kernels_bf16.csv", "kernels_fp16.csv", "kernels_fp32.csv",
    ]  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "kernels_bf16.csv")))
    assert len(rows) == len(kernels.CASES) + 1
    summary = (tmp_path / "summary.txt").read_text()
    print(summary)
    verdicts = ("PASS", "FAIL", "TIMEOUT", "SKIP")
    words = [line.split() for line in summary.splitlines()[1:-1]]
    lines = {w[1]: w[0] for w in words if w and w[0] in verdicts}
    assert lines == {"env": "PASS", "kernels-fp32": "PASS", "kernels-bf16": "PASS",
                     "kernels-fp16": "TIMEOUT", "model-130m-fp32": "PASS", "timings": "PASS",
                     "pytest": "PASS", "train-resume": "PASS"}  # fmt: skip
    assert "paper: more than 10x faster than FlashAttention-2 at 32K" in summary
    assert summary.splitlines()[-1] == "gpu-check: FAIL"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["device"] == "Fake GPU" and not report["pass"]
    assert (tmp_path / "gpu_check.log").read_text().count("PASS") >= 5
    assert not math.isnan(report["wall_s"])
    assert os.path.exists(tmp_path / "env.json")


def test_timings_code_path_runs_on_cpu(monkeypatch):
    """run_timings and warm_up end to end at tiny sizes on the CPU (CUDA calls mocked):
    every path, forward and forward + backward, a row each, nothing raised."""
    from dataclasses import replace

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    setup = replace(gpu.gpu_setup(), device="cpu", dtype="float32", batch=1, nheads=2,
                    headdim=16, dstate=16, lengths=(64, 128), states=(16, 32),
                    state_length=64)  # fmt: skip
    rows = gpu.run_timings(setup, log=lambda _: None)
    assert len(rows) == 2 * 2 * 3 + 2 * 2 * 2  # lengths x passes x paths, states x passes x 2
    assert all(r["status"].startswith("ok") and r["time_s"] > 0 for r in rows), rows
    assert {r["sweep"] for r in rows} == {"length", "length_fwd_bwd", "state", "state_fwd_bwd"}
    cmp = gpu.compare(rows, setup)
    assert all(v > 0 for v in cmp["vs_sdpa"].values())
    gpu.warm_up(setup, log=lambda _: None)


def test_train_resume_check_on_cpu(tmp_path):
    """The GPU check's training stage, run on the CPU (where dropout draws from the CPU
    RNG): killed and resumed equals uninterrupted, and the control with another RNG state
    does not, so the check can fail."""
    assert gpu_check.stage_train(device="cpu", out=tmp_path) == 0
    report = json.loads((tmp_path / "train_check.json").read_text())
    assert report["max_loss_gap"] <= report["tol"] < report["control_gap"], report
    assert report["device"].startswith("cpu") and report["rng_key"] == "rng"
