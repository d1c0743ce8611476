"""GPU check for the Triton SSD kernels: the engine behind `make gpu-check`.

On a CUDA machine (under 5 minutes):
  1. pytest tests/test_ssd_triton.py compiled (TRITON_INTERPRET unset, gpu tests included);
  2. the SSD benchmark at GPU lengths (`python -m aotlib.bench ssd --device cuda`);
  3. writes results/gpu/gpu_check.json (device name, versions, test counts, benchmark
     targets) next to the benchmark CSV results/gpu/ssd_cuda.csv.
Without CUDA it says so and exits with status 1.

`--compile-only` needs no GPU: it compiles every kernel for NVIDIA targets (sm_80, sm_90)
with `triton.compile` and reports the shared memory each needs, which catches compile
errors and tiles too big for the chip before a GPU is ever used (the unit tests run it).

    python tools/gpu_check.py
    python tools/gpu_check.py --compile-only [--arch 90] [--dtype fp32 bf16]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "gpu"
# Shared memory per block (bytes) the compiled kernels may use, by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Tensors that carry the input dtype; everything else the kernels touch is float32.
IO_POINTERS = {"x_ptr", "dy_ptr", "dx_ptr", "y_ptr", "u_ptr", "v_ptr", "B_ptr", "C_ptr"}
IO_POINTERS |= {"dt_ptr", "A_ptr", "D_ptr", "carry_in_ptr"}
# Time limits of the two steps (the whole check is meant to take under 5 minutes).
TESTS_TIMEOUT_S = 180
BENCH_TIMEOUT_S = 150


def compile_only(archs: list[int], dtypes: list[str], chunks: list[int]) -> int:
    """Compile each kernel with the launchers' tile choices; 0 if all fit on chip."""
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
                for from_end in (True, False):
                    ce = {"FROM_END": from_end, "BLOCK_Q": t.BLOCK_Q}
                    ce |= {"BLOCK_P": t.BLOCK_P, "BLOCK_N": t.BLOCK_N}
                    launches.append((st._chunk_state_kernel, ce, t.num_warps, t.num_stages))
                for kernel, kind, extra in [
                    (st._chunk_scan_kernel, "scan", {"HAS_D": True}),
                    (st._chunk_scan_bwd_dx_kernel, "bwd", {"HAS_D": True}),
                    (st._chunk_scan_bwd_dbdc_kernel, "bwd", {}),
                ]:
                    t = st._tiles(Q, p, n, kind)
                    ce = extra | {"BLOCK_Q": t.BLOCK_Q, "BLOCK_P": t.BLOCK_P, "BLOCK_N": t.BLOCK_N}
                    launches.append((kernel, ce, t.num_warps, t.num_stages))
                for reverse in (False, True):
                    ce = {"HAS_CARRY_IN": True, "REVERSE": reverse, "BLOCK": 1024}
                    launches.append((st._state_passing_kernel, ce, 4, 1))
                for kernel, ce, warps, stages in launches:
                    name = kernel.fn.__name__
                    try:
                        shared = build(kernel, ce, dtype, arch, warps, stages).metadata.shared
                    except Exception as err:  # report every failure, not just the first
                        print(f"FAIL sm_{arch} {dtype} Q={Q} {name}: {type(err).__name__}: {err}")
                        failures += 1
                        continue
                    ok = shared <= SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
                    failures += not ok
                    print(
                        f"{'ok  ' if ok else 'FAIL'} sm_{arch} {dtype} Q={Q:<3} {name:28s} "
                        f"shared {shared / 1024:6.1f} KiB",
                        flush=True,
                    )
    print(f"compile-only: {failures} failure(s)")
    return 1 if failures else 0


def _pytest_counts(junit: Path) -> dict:
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} | {"time_s": float(suite.get("time", 0))}


def _run(cmd: list[str], env: dict, timeout_s: float) -> int:
    """Run a step, streaming its output; a step past its time limit returns 124."""
    print("$", " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout_s:.0f} s", flush=True)
        return 124


def gpu_check() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA device and none is visible (torch.cuda.is_available() is "
            "False). On a machine without a GPU, run `make test` (the Triton kernels are "
            "tested there under TRITON_INTERPRET=1) or `python tools/gpu_check.py "
            "--compile-only`.",
            file=sys.stderr,
        )
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    print(f"device: {report['device']}", flush=True)

    junit = OUT / "pytest_ssd_triton.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    cmd += ["-rfEs", f"--junitxml={junit}", "tests/test_ssd_triton.py"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", "4"]  # Triton compiles on the CPU: four workers share the work
    t0 = time.perf_counter()
    tests = _run(cmd, env, TESTS_TIMEOUT_S)
    report["pytest"] = {"returncode": tests, "wall_s": time.perf_counter() - t0}
    if junit.exists():
        report["pytest"] |= _pytest_counts(junit)

    cmd = [sys.executable, "-m", "aotlib.bench", "ssd", "--device", "cuda", "--out", str(OUT)]
    cmd += ["--json", str(OUT / "bench_summary.json")]
    t0 = time.perf_counter()
    bench = _run(cmd, env, BENCH_TIMEOUT_S)
    report["bench"] = {"returncode": bench, "wall_s": time.perf_counter() - t0}
    summary = OUT / "bench_summary.json"
    if summary.exists():
        report["bench"] |= json.loads(summary.read_text())
        summary.unlink()
    report["csv"] = "results/gpu/ssd_cuda.csv"

    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT / 'gpu_check.json'}")
    ok = tests == 0 and bench == 0
    print("gpu-check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="no GPU: compile kernels")
    parser.add_argument("--arch", type=int, nargs="*", default=[80, 90])
    parser.add_argument("--dtype", nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--chunk", type=int, nargs="*", default=[16, 64, 128])
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.arch, args.dtype, args.chunk)
    return gpu_check()


if __name__ == "__main__":
    sys.exit(main())
