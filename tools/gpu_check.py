"""`make gpu-check`: the first run on a CUDA machine, one command, under 8 minutes.

It runs with the machine's own python, torch and triton; no virtual environment, no
network, no pytest or pandas needed (the Makefile target sets PYTHONPATH to the repo):

    make gpu-check                      # or: PYTHONPATH=. python3 tools/gpu_check.py
    python3 tools/gpu_check.py --only kernels model
    python3 tools/gpu_check.py --compile-only [--arch 90] [--dtype fp32 bf16 fp16]  # no GPU

Stages in subprocesses, each with its own time limit inside a 7 min 45 s budget (a
process that hangs is killed, reported TIMEOUT, and the next stage runs); progress is
printed as it goes and everything lands in results/gpu/:

  env      versions and device                                     env.json
  checks   side by side (correctness only, so sharing the GPU is harmless):
   kernels   the Triton kernels compiled, float32/bfloat16/float16, kernels_<dtype>.csv
             4 processes each (Triton compiles on the CPU):
             `aotlib.bench.kernels.CASES` against the float64
             reference (output, final state, every gradient) in
             NaN-filled buffers, plus a bit-identical backward
   model     a Mamba-2 130m-shaped model (chunk 256), loss and every   model_check.json
             gradient, Triton against the chunked path (fp32, bf16)
   train     aotlib.train on CUDA: a tiny Mamba-2 with dropout killed  train_check.json
             and resumed ends as the uninterrupted run (needs tqdm,
             pandas, tokenizers; skipped without them)
   warm-up   the timed kernels compiled into Triton's disk cache
  timings  alone on the GPU: SSD forward and forward+backward against  ssd_cuda.csv
           causal SDPA (FlashAttention-2) and the chunked path, 512 to  ssd_cuda_summary.json
           32K tokens and N = 16..256, the paper's claims beside
  pytest   tests/test_ssd_triton.py compiled, if pytest is installed   pytest_ssd_triton.xml
           (optional: skipped without pytest or time)

Then one PASS / FAIL / TIMEOUT / SKIP line per check (summary.txt, gpu_check.json) and
the whole output in gpu_check.log; the exit status is 0 only if every required check
passed. Without a CUDA device it says so and exits 1, having written nothing.

`--compile-only` needs no GPU: it compiles every kernel for NVIDIA targets (sm_80, sm_90)
with `triton.compile` and reports the shared memory each needs, which catches compile
errors and tiles too big for the chip before a GPU is ever used (the unit tests run it).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import aotlib` without installing it
OUT = ROOT / "results" / "gpu"
# Shared memory per block (bytes) the compiled kernels may use, by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Tensors that carry the input dtype; everything else the kernels touch is float32.
IO_POINTERS = {"x_ptr", "dy_ptr", "dx_ptr", "y_ptr", "u_ptr", "v_ptr", "B_ptr", "C_ptr"}
IO_POINTERS |= {"dt_ptr", "A_ptr", "D_ptr", "carry_in_ptr"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Processes per dtype for the kernel checks: Triton compiles each kernel variant on the
# CPU at its first launch (~1-3 s, ~120 variants per dtype), so 3 x 4 processes share
# the machine's cores; the model check and the timings' warm-up run beside them.
SHARDS = 4
BUDGET_S = 465.0  # the whole check: 7 min 45 s


class Stage(NamedTuple):
    name: str
    limit_s: float  # its own time limit
    reserve_s: float  # kept back for it while earlier stages run (0: optional)


STAGES = [
    Stage("env", 90, 20),
    # kernels and model, side by side (correctness only: sharing the GPU is harmless),
    # with the timings' warm-up compiling their kernels into Triton's disk cache
    Stage("checks", 240, 0),
    Stage("timings", 150, 90),  # alone on the GPU
    Stage("pytest", 120, 0),
]
# What each stage writes (cleared first, so no stale file passes for a fresh one).
OUTPUTS = ["env.json", "model_check.json", "train_check.json", "ssd_cuda.csv",
           "ssd_cuda_summary.json", "pytest_ssd_triton.xml", "summary.txt", "gpu_check.json",
           "gpu_check.log"]  # fmt: skip
OUTPUTS += [f"kernels_{d}.csv" for d in DTYPES]


def ptxas_report(ptx: str, arch: int) -> str:
    """Registers and spills of one kernel from Triton's bundled ptxas (-v), or ''."""
    import re
    import tempfile

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # Triton targets sm_90a
        cmd = [str(ptxas), "-v", "--gpu-name", gpu, f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'} B"


def compile_only(archs: list[int], dtypes: list[str], chunks: list[int], spills: bool) -> int:
    """Compile each kernel with the launchers' tile choices; 0 if all fit on chip.

    spills: also run ptxas -v on each kernel and print its registers and spilled bytes
    (spills cost speed, not correctness: reported, never failed).
    """
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (see aotlib.ssd_triton)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import aotlib.ssd_triton as st

    if st.INTERPRETED:
        print("triton was imported in interpreter mode; run this in a fresh process")
        return 1

    def build(kernel, constexprs: dict, dtype: str, arch: int, warps: int, stages: int):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {}
        for name in names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (dtype if name in IO_POINTERS else "fp32")
            else:
                sig[name] = "i32"
        src = ASTSource(kernel, sig, constexprs=constexprs)
        opts = {"num_warps": warps, "num_stages": stages}
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)

    failures = 0
    p, n = 64, 64  # the benchmark's head dim and state size (the largest tiles)
    for arch in archs:
        for dtype in dtypes:
            for Q in chunks:
                launches = [(st._chunk_cumsum_kernel, {"BLOCK_Q": max(16, Q)}, 4, 1)]
                t = st._tiles(Q, p, n, "state")
                by_name = {str(d).split(".")[-1]: p for d, p in st.DOT_PRECISION.items()}
                dot = by_name.get(DTYPES[dtype], "tf32")  # as the launchers choose
                for from_end in (True, False):
                    ce = {"FROM_END": from_end, "DOT": dot, "BLOCK_Q": t.BLOCK_Q}
                    ce |= {"BLOCK_P": t.BLOCK_P, "BLOCK_N": t.BLOCK_N}
                    launches.append((st._chunk_state_kernel, ce, t.num_warps, t.num_stages))
                for kernel, kind, extra in [
                    (st._chunk_scan_kernel, "scan", {"HAS_D": True}),
                    (st._chunk_scan_bwd_dx_kernel, "bwd", {"HAS_D": True}),
                    (st._chunk_scan_bwd_dbdc_kernel, "bwd", {}),
                ]:
                    t = st._tiles(Q, p, n, kind)
                    ce = extra | {"BLOCK_Q": t.BLOCK_Q, "BLOCK_P": t.BLOCK_P, "BLOCK_N": t.BLOCK_N}
                    ce["DOT"] = dot
                    launches.append((kernel, ce, t.num_warps, t.num_stages))
                for reverse in (False, True):
                    ce = {"HAS_CARRY_IN": True, "REVERSE": reverse, "BLOCK": 1024}
                    launches.append((st._state_passing_kernel, ce, 4, 1))
                for kernel, ce, warps, stages in launches:
                    name = kernel.fn.__name__
                    try:
                        compiled = build(kernel, ce, dtype, arch, warps, stages)
                        shared = compiled.metadata.shared
                    except Exception as err:  # report every failure, not just the first
                        print(f"FAIL sm_{arch} {dtype} Q={Q} {name}: {type(err).__name__}: {err}")
                        failures += 1
                        continue
                    ok = shared <= SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
                    failures += not ok
                    print(
                        f"{'ok  ' if ok else 'FAIL'} sm_{arch} {dtype} Q={Q:<3} {name:28s} "
                        f"shared {shared / 1024:6.1f} KiB "
                        + (ptxas_report(compiled.asm["ptx"], arch) if spills else ""),
                        flush=True,
                    )
    print(f"compile-only: {failures} failure(s)")
    return 1 if failures else 0


# ---------------------------------------------------------------------------
# Stages (each runs in its own process: `gpu_check.py --stage NAME`)
# ---------------------------------------------------------------------------


def stage_env() -> int:
    """Print one JSON line: versions and device, or why there is no CUDA device (exit 3)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        import torch
    except ImportError as err:
        print(json.dumps(info | {"has_cuda": False, "why": f"torch is not importable: {err}"}))
        return 3
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        why = f"torch {torch.__version__} ({build}) sees no CUDA device"
        print(json.dumps(info | {"has_cuda": False, "why": why}))
        return 3
    from aotlib.bench.gpu import environment

    info |= environment()
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
        info["nvidia_smi"] = subprocess.run(
            query, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    print(json.dumps(info | {"has_cuda": True}))
    return 0


KERNEL_FIELDS = ["case", "dtype", "tensor", "max_err", "mean_err", "tol", "pass", "seconds"]


def stage_kernels(dtype_name: str, shard: int) -> int:
    """Every SHARDS-th case of `aotlib.bench.kernels.CASES` compiled in one dtype, from
    `shard`; a CSV row per output and gradient (shard 0 also checks determinism)."""
    from aotlib import ssd_triton
    from aotlib.bench import kernels

    if ssd_triton.INTERPRETED:
        print("triton runs in interpreter mode (TRITON_INTERPRET set?): not a GPU check")
        return 1
    cases = kernels.CASES[shard::SHARDS]
    path = _kernel_part(dtype_name, shard)
    failures = run_kernel_cases(cases, "cuda", dtype_name, path, deterministic=shard == 0)
    return 1 if failures else 0


def _kernel_part(dtype_name: str, shard: int) -> Path:
    return OUT / f"kernels_{dtype_name}.part{shard}.csv"


def run_kernel_cases(
    cases: list, device: str, dtype_name: str, path: Path, deterministic: bool = True
) -> int:
    """Run the cases (and the determinism check), writing rows as they finish; failures."""
    import torch

    from aotlib import ssd_triton
    from aotlib.bench import kernels

    ssd_triton.NAN_FILL = True  # an element a kernel forgets to write fails
    dtype = getattr(torch, DTYPES[dtype_name])
    failures = 0
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KERNEL_FIELDS)
        writer.writeheader()
        for case in cases:
            t0 = time.perf_counter()
            try:
                errors = kernels.check_case(case, device, dtype)
            except Exception as err:  # a compile or launch error fails this case only
                seconds = time.perf_counter() - t0
                writer.writerow({"case": case.name, "dtype": dtype_name, "tensor": "error",
                                 "pass": False, "seconds": f"{seconds:.1f}"})  # fmt: skip
                print(f"{case.name:18s} ERROR {type(err).__name__}: {str(err)[:300]}", flush=True)
                failures += 1
                continue
            seconds = time.perf_counter() - t0
            for e in errors:
                writer.writerow({
                    "case": case.name, "dtype": dtype_name, "tensor": e.tensor,
                    "max_err": f"{e.max_err:.3e}", "mean_err": f"{e.mean_err:.3e}",
                    "tol": f"{e.tol:.0e}", "pass": e.ok, "seconds": f"{seconds:.1f}",
                })  # fmt: skip
            f.flush()
            bad = [e for e in errors if not e.ok]
            worst = max(errors, key=lambda e: e.max_err / e.tol)
            print(
                f"{case.name:18s} {'ok  ' if not bad else 'FAIL'} worst {worst.tensor} "
                f"{worst.max_err:.1e} (tol {worst.tol:.0e}) {seconds:5.1f} s"
                + (f"  failed: {', '.join(e.tensor for e in bad)}" if bad else ""),
                flush=True,
            )
            failures += bool(bad)
        if deterministic:
            same = kernels.backward_is_deterministic(device, dtype)
            writer.writerow({"case": "backward-deterministic", "dtype": dtype_name,
                             "tensor": "all", "pass": same})  # fmt: skip
            print(f"{'backward-deterministic':18s} {'ok' if same else 'FAIL'}", flush=True)
            failures += not same
    return failures


def merge_kernel_parts() -> None:
    """kernels_<dtype>.part<i>.csv -> kernels_<dtype>.csv, in case order."""
    for d in DTYPES:
        parts = [_kernel_part(d, i) for i in range(SHARDS) if _kernel_part(d, i).exists()]
        if not parts:
            continue
        rows = [row for part in parts for row in csv.DictReader(open(part))]
        with open(OUT / f"kernels_{d}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=KERNEL_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        for part in parts:
            part.unlink()


TRAIN_NEEDS = ("tqdm", "pandas", "tokenizers")  # aotlib.train's imports beyond torch
TRAIN_TOL = 1e-4  # largest |loss difference| of an exact resumption


def stage_train(device: str = "cuda", out: Path | None = None) -> int:
    """`aotlib.train.train` on the device: a tiny Mamba-2 with dropout killed (SIGKILL) at
    step 6 and resumed from its step-4 checkpoint must end with the uninterrupted run's
    losses, which needs the device's RNG state (dropout's) in the checkpoint. A control
    resumes with that state replaced by another: its losses must move, or the check
    could not have failed. Writes train_check.json.

    Within TRAIN_TOL, not bit-equal: on CUDA the embedding backward sums with atomics.
    """
    import tempfile

    import torch

    from aotlib.checkpoint import load_checkpoint, save_checkpoint
    from aotlib.data import DataConfig
    from aotlib.models import model_config
    from aotlib.train import TrainConfig, train

    data = DataConfig(corpus="primes", options=(("digits", 2), ("n_train", 240), ("n_val", 40)))
    cfg = TrainConfig(
        model=model_config("mamba2", "xs", dropout=0.1), data=data, steps=8, batch_size=8,
        warmup=2, eval_every=4, checkpoint_every=4, eval_windows=16,
    )  # fmt: skip
    key = "cuda_rng" if device == "cuda" else "rng"

    def losses(result: dict) -> list[float]:
        return [h["train_loss"] for h in result["history"]] + [result["final_val_loss"]]

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: Path(tmp) / name for name in ("ref", "resumed", "control")}
        ref = train(cfg, runs["ref"], device=device, progress=False)
        script = (
            "import json, sys\nfrom aotlib.train import TrainConfig, train\n"
            "cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))\n"
            "train(cfg, sys.argv[2], device=sys.argv[3], progress=False)\n"
        )
        env = os.environ | {"AOTLIB_KILL_AT_STEP": "6"}
        for name in ("resumed", "control"):
            args = [json.dumps(cfg.to_dict()), str(runs[name]), device]
            killed = subprocess.run([sys.executable, "-c", script, *args], env=env, timeout=300)
            print(f"{name}: killed at step 6, exit {killed.returncode}", flush=True)
        ckpt = runs["control"] / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        if device == "cuda":
            torch.cuda.manual_seed(12345)
            state[key] = torch.cuda.get_rng_state()
        else:
            state[key] = torch.Generator().manual_seed(12345).get_state()
        save_checkpoint(ckpt, state)
        resumed = train(cfg, runs["resumed"], device=device, progress=False)
        control = train(cfg, runs["control"], device=device, progress=False)
    gap = max(abs(a - b) for a, b in zip(losses(ref), losses(resumed)))
    control_gap = max(abs(a - b) for a, b in zip(losses(ref), losses(control)))
    ok = gap <= TRAIN_TOL < control_gap and ref["provenance"]["device"].startswith(device)
    report = {
        "check": "train-resume", "device": ref["provenance"]["device"], "rng_key": key,
        "max_loss_gap": gap, "control_gap": control_gap, "tol": TRAIN_TOL,
        "losses_ref": losses(ref), "losses_resumed": losses(resumed), "pass": ok,
    }  # fmt: skip
    print(json.dumps(report), flush=True)
    (out or OUT).mkdir(parents=True, exist_ok=True)
    ((out or OUT) / "train_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


def train_check(code, ran: bool, missing: list[str]) -> Check:
    if not ran:
        why = f"needs {', '.join(missing)} (aotlib.train's imports), not installed"
        return Check("train-resume", "SKIP", why, required=False)
    path = OUT / "train_check.json"
    if not path.exists():
        return Check("train-resume", "TIMEOUT" if code is None else "FAIL", "no train_check.json")
    r = json.loads(path.read_text())
    detail = (
        f"{r['device']}: killed at step 6, resumed: max |loss gap| {r['max_loss_gap']:.1e} "
        f"(tol {r['tol']:.0e}); with another {r['rng_key']} state: {r['control_gap']:.1e}"
    )
    return Check("train-resume", "PASS" if r["pass"] else "FAIL", detail)


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


class Log:
    """Print and keep every line (written to gpu_check.log at the end)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)
            print(line, flush=True)


def run_processes(cmds: dict[str, list[str]], timeout_s: float, log: Log) -> dict:
    """Run commands side by side, streaming their output; {label: exit code or None}.

    A command still running at the time limit is killed with its process group and
    reported as None (TIMEOUT).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    procs, pumps = {}, []
    for label, cmd in cmds.items():
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        procs[label] = proc

        def pump(proc=proc, label=label):
            for line in proc.stdout:
                log(f"[{label}] {line.rstrip()}")

        pumps.append(threading.Thread(target=pump, daemon=True))
        pumps[-1].start()
    deadline = time.monotonic() + timeout_s
    codes: dict = {}
    for label, proc in procs.items():
        try:
            codes[label] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this driver started
            except ProcessLookupError:
                pass  # it ended just now
            proc.wait()
            codes[label] = None
            log(f"[{label}] TIMEOUT after {timeout_s:.0f} s: killed")
    for thread in pumps:
        thread.join(timeout=5)
    return codes


class Check(NamedTuple):
    name: str
    status: str  # PASS, FAIL, TIMEOUT, SKIP
    detail: str
    required: bool = True


def _stage_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--stage", *args]


def kernels_checks(codes: dict, n_cases: int | None = None) -> list[Check]:
    """One check per dtype from its CSV: every case ran (n_cases + the determinism check)
    and passed, and its processes exited 0. codes: {dtype: [exit code per shard]}, None
    for a process killed at its time limit."""
    if n_cases is None:
        from aotlib.bench.kernels import CASES

        n_cases = len(CASES)
    checks = []
    for d in DTYPES:
        path = OUT / f"kernels_{d}.csv"
        rows = list(csv.DictReader(open(path))) if path.exists() else []
        cases = {r["case"] for r in rows}
        bad = sorted({r["case"] for r in rows if r["pass"] != "True"})
        tensors = [r for r in rows if r["max_err"]]
        worst = max(tensors, key=lambda r: float(r["max_err"]) / float(r["tol"]), default=None)
        detail = f"{len(cases)} of {n_cases + 1} checks ran"
        if worst:
            ratio = float(worst["max_err"]) / float(worst["tol"])
            detail += f"; worst {worst['case']}/{worst['tensor']} at {ratio:.2f} of its tolerance"
        if bad:
            detail += f"; failed: {', '.join(bad)}"
        shards = codes.get(d, [None])
        if None in shards:
            status = "TIMEOUT"
        else:
            ran = not bad and len(cases) == n_cases + 1
            status = "PASS" if ran and all(c == 0 for c in shards) else "FAIL"
        checks.append(Check(f"kernels-{d}", status, detail))
    return checks


def model_checks(code) -> list[Check]:
    path = OUT / "model_check.json"
    if not path.exists():
        return [Check("model-130m", "TIMEOUT" if code is None else "FAIL", "no model_check.json")]
    checks = []
    for r in json.loads(path.read_text()):
        if "error" in r:
            checks.append(Check(r["check"], "FAIL", r["error"]))
            continue
        detail = (
            f"loss {r['loss_triton']:.5f} vs {r['loss_chunked']:.5f} (rel {r['loss_rel_diff']:.1e},"
            f" limit {r['limits']['loss_rel_diff']:.0e}); gradient cosine {r['grad_cosine']:.6f}"
            f" (limit {r['limits']['grad_cosine']}), rel err {r['grad_rel_err']:.1e}, lowest "
            f"{r['worst_tensor']} {r['worst_tensor_cosine']:.4f}; {r['triton_calls']} Triton "
            f"calls at chunk {r['triton_chunks']} for the preset's {r['preset_chunk']}"
        )
        checks.append(Check(r["check"], "PASS" if r["pass"] else "FAIL", detail))
    return checks


def timings_checks(code) -> tuple[list[Check], list[str]]:
    path = OUT / "ssd_cuda_summary.json"
    if not path.exists():
        return [Check("timings", "TIMEOUT" if code is None else "FAIL", "no summary")], []
    summary = json.loads(path.read_text())
    rows = list(csv.DictReader(open(OUT / "ssd_cuda.csv")))
    errors = [r for r in rows if not r["status"].startswith("ok")]
    vs = summary["vs_sdpa"]

    def named(sweep: str) -> str:
        return sweep.replace("length_fwd_bwd", "fwd+bwd").replace("length", "fwd")

    shown = [k for k in ("length@2048", "length@32768", "length_fwd_bwd@32768") if k in vs]
    detail = f"{len(rows)} timings, {len(errors)} errors; ssd speed-up vs SDPA: " + ", ".join(
        f"{named(k)} {vs[k]:.2f}x" for k in shown
    )
    claims = [
        f"paper: {c['claim']} ({named(c['pass'])}): measured {c['measured']:.2f}x, "
        f"reproduced: {'yes' if c['reproduced'] else 'no'}"
        for c in summary["claims"]
    ]
    status = "PASS" if code == 0 and not errors else "FAIL"
    return [Check("timings", status, detail)], claims


def pytest_check(code, ran: bool) -> Check:
    if not ran:
        return Check("pytest", "SKIP", "pytest is not installed (the kernel verdict above does "
                     "not need it)", required=False)  # fmt: skip
    junit = OUT / "pytest_ssd_triton.xml"
    if code is None or not junit.exists():
        status = "TIMEOUT" if code is None else "FAIL"
        return Check("pytest", status, "tests/test_ssd_triton.py did not finish", required=False)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    detail = (f"{n['tests']} tests: {n['failures']} failed, {n['errors']} errors, "
              f"{n['skipped']} skipped")  # fmt: skip
    # A test that fails is a real failure, required or not.
    return Check("pytest", "PASS" if code == 0 else "FAIL", detail, required=code != 0)


def gpu_check(only: list[str]) -> int:
    t_start = time.monotonic()
    log = Log()

    def left(stage: Stage) -> float:
        """This stage's time limit: its own, within what later stages' reserves leave."""
        later = STAGES[STAGES.index(stage) + 1 :]
        reserve = sum(s.reserve_s for s in later if s.name in only)
        return min(stage.limit_s, BUDGET_S - (time.monotonic() - t_start) - reserve)

    # 1. env, before writing anything: is there a CUDA device at all?
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(_stage_cmd("env"), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=STAGES[0].limit_s)  # fmt: skip
        lines = done.stdout.strip().splitlines()
        info = json.loads(lines[-1]) if lines else {}
    except subprocess.TimeoutExpired:
        info = {"has_cuda": False, "why": f"the device query hung for {STAGES[0].limit_s} s"}
    except json.JSONDecodeError:
        why = f"the device query failed: {done.stderr.strip()[-800:]}"
        info = {"has_cuda": False, "why": why}
    if not info.get("has_cuda"):
        print(
            f"gpu-check: no CUDA device: {info.get('why', 'unknown')} (python: {sys.executable})."
            "\nNothing was run or written. On a GPU machine run `make gpu-check` with the "
            "python that has its torch and triton (PYTHON=... make gpu-check); without a GPU, "
            "`make test` runs the Triton kernels under TRITON_INTERPRET=1 and "
            "`python tools/gpu_check.py --compile-only` compiles them for sm_80/sm_90.",
            file=sys.stderr,
        )
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (OUT / name).unlink(missing_ok=True)
    for part in OUT.glob("kernels_*.part*.csv"):
        part.unlink()
    log(f"gpu-check: {sys.executable}; stages {' '.join(only)}; budget {BUDGET_S:.0f} s")
    (OUT / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    checks = [Check("env", "PASS", f"{info['device']} (sm_{info['capability'].replace('.', '')},"
                    f" {info['memory_gib']} GiB), torch {info['torch']}, triton {info['triton']},"
                    f" CUDA {info['cuda']}")]  # fmt: skip
    log(f"PASS env: {checks[0].detail}")
    claims: list[str] = []

    def start(name: str) -> float | None:
        limit = left(next(s for s in STAGES if s.name == name))
        log(f"--- {name}: limit {limit:.0f} s ({time.monotonic() - t_start:.0f} s elapsed)")
        return limit if limit >= 20 else None

    bench = [sys.executable, "-m", "aotlib.bench", "gpu", "--out", str(OUT), "--what"]
    if "kernels" in only or "model" in only:
        cmds = {}
        if "kernels" in only:
            for d in DTYPES:
                for i in range(SHARDS):
                    cmds[f"kernels {d} {i}"] = _stage_cmd(
                        "kernels", "--dtype", d, "--shard", str(i)
                    )
        if "model" in only:
            cmds["model"] = bench + ["model"]
            missing = [m for m in TRAIN_NEEDS if importlib.util.find_spec(m) is None]
            if not missing:
                cmds["train"] = _stage_cmd("train")
        if "timings" in only:
            cmds["warm-up"] = bench + ["warmup"]  # compiles the timings' kernels meanwhile
        limit = start("checks")
        codes = {} if limit is None else run_processes(cmds, limit, log)
        merge_kernel_parts()
        if "kernels" in only:
            shard_codes = {
                d: [codes.get(f"kernels {d} {i}") for i in range(SHARDS)] for d in DTYPES
            }
            checks += kernels_checks(shard_codes)
        if "model" in only:
            checks += model_checks(codes.get("model"))
            checks.append(train_check(codes.get("train"), "train" in cmds, missing))
    if "timings" in only:
        limit = start("timings")
        if limit is None:
            checks.append(Check("timings", "SKIP", "no time left"))
        else:
            code = run_processes({"timings": bench + ["timings"]}, limit, log)["timings"]
            found, claims = timings_checks(code)
            checks += found
    if "pytest" in only:
        have_pytest = importlib.util.find_spec("pytest") is not None
        limit = start("pytest") if have_pytest else None
        if have_pytest and limit is None:
            checks.append(Check("pytest", "SKIP", "no time left", required=False))
        else:
            code = None
            if have_pytest:
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs"]
                cmd += [f"--junitxml={OUT / 'pytest_ssd_triton.xml'}", "tests/test_ssd_triton.py"]
                if importlib.util.find_spec("xdist"):
                    cmd += ["-n", "4"]  # Triton compiles on the CPU: four workers share it
                code = run_processes({"pytest": cmd}, limit, log)["pytest"]
            checks.append(pytest_check(code, have_pytest))

    wall = time.monotonic() - t_start
    ok = all(c.status == "PASS" for c in checks if c.required)
    summary = [f"gpu-check on {info['device']}, {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s"]
    summary += [f"{c.status:7s} {c.name:22s} {c.detail}" for c in checks]
    summary += [f"        {line}" for line in claims]
    summary.append(f"gpu-check: {'PASS' if ok else 'FAIL'}")
    log("")
    for line in summary:
        log(line)
    (OUT / "summary.txt").write_text("\n".join(summary) + "\n")
    report = {"env": info, "wall_s": round(wall, 1), "pass": ok, "claims": claims,
              "checks": [c._asdict() for c in checks]}  # fmt: skip
    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "gpu_check.log").write_text("\n".join(log.lines) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="no GPU: compile kernels")
    parser.add_argument("--arch", type=int, nargs="*", default=[80, 90])
    parser.add_argument("--dtype", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--chunk", type=int, nargs="*", default=[16, 64, 128])
    parser.add_argument("--spills", action="store_true", help="compile-only: ptxas -v report")
    stages = ["kernels", "model", "timings", "pytest"]
    parser.add_argument("--only", nargs="+", choices=stages, default=stages, help="stages")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a stage's process
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.arch, args.dtype, args.chunk, args.spills)
    if args.stage == "env":
        return stage_env()
    if args.stage == "train":
        return stage_train()
    if args.stage == "kernels":
        return stage_kernels(args.dtype[0], args.shard)
    return gpu_check(args.only)


if __name__ == "__main__":
    sys.exit(main())
