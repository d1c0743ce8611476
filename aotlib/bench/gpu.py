"""SSD on a GPU: Triton against FlashAttention and the PyTorch path, and a Mamba-2 130m check.

    python -m aotlib.bench gpu [--quick] [--out results/gpu]       (what `make gpu-check` runs)

On a CPU the benchmark's goal is the chunked path's FLOP rate (`aotlib.bench.ssd`); on a
GPU it is the paper's (Fig. 10, A100): SSD faster than FlashAttention-2 from about 2K
tokens, about 6x at 16K, more than 10x at 32K, and nearly flat in the state size N.
Timed here, forward and forward + backward, on the same inputs (b=2, h=8, p=64, g=1,
Q=64, bfloat16; N=64 unless swept), lengths 512..32K and N=16..256 at 4K:

- ssd:     the public `aotlib.ssd.ssd` (backend "auto": the Triton kernels on CUDA);
- chunked: the pure-PyTorch chunked path on the same GPU;
- sdpa:    causal `scaled_dot_product_attention` with q = k = v of shape (b, h, l, p),
           on PyTorch's FlashAttention-2 backend when it takes these inputs (the CSV
           says which backend ran).

Each time is the best of repeated calls after warm-up (`aotlib.bench.ssd.time_call`).
The measured ratios are printed beside the paper's claims; they are measurements, not
pass/fail targets: the paper timed its own kernels on an A100.

`model_check` runs a Mamba-2 model shaped like the paper's 130M one (24 layers,
d_model 768, N = 128, P = 64, chunk 256) forward and backward through the Triton path
and through the chunked PyTorch path, and compares the loss and every gradient.

Only torch (and triton) are needed: no pandas, no pytest. The CSV has the columns of
`aotlib.bench.ssd.COLUMNS` (sweep "length"/"state" forward, "length_fwd_bwd"/
"state_fwd_bwd" forward + backward), so notebook 02 draws it beside the CPU panel.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aotlib.bench.ssd import COLUMNS, Setup, make_inputs, path_call, ssd_flops, time_call
from aotlib.paths import ROOT

PATHS = ("ssd", "chunked", "sdpa")
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
STATES = (16, 32, 64, 128, 256)
# Mamba-2 paper, Fig. 10 (A100 80GB): SSD time against FlashAttention-2's.
PAPER_CLAIMS = [
    ("faster than FlashAttention-2 from 2K", 2048, 1.0),
    ("about 6x faster than FlashAttention-2 at 16K", 16384, 6.0),
    ("more than 10x faster than FlashAttention-2 at 32K", 32768, 10.0),
]


def gpu_setup(quick: bool = False) -> Setup:
    lengths = LENGTHS[:4] if quick else LENGTHS
    states = (16, 64) if quick else STATES
    return Setup(device="cuda", dtype="bfloat16", lengths=lengths, states=states,
                 paths=PATHS)  # fmt: skip


def environment() -> dict[str, Any]:
    """Versions and the device: what a GPU result must be read with."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": torch.cuda.get_device_name(0),
            "device_count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        }
    return env


# ---------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------


def _flash_only():
    """Restrict SDPA to the FlashAttention backend where this torch can say so."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    except ImportError:
        return nullcontext()


def sdpa_call(inp: dict, backward: bool, backend: str) -> Callable[[], object]:
    """Causal attention on q = k = v = x as (b, h, l, p); with backward, dq dk dv too."""
    x = inp["x"]
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_(backward) for _ in range(3))
    dy = torch.randn_like(q) if backward else None
    context = _flash_only if backend == "flash" else nullcontext

    def call():
        with context():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                out.backward(dy)
                q.grad = k.grad = v.grad = None

    return call


def ssd_call(path: str, inp: dict, chunk: int, backward: bool) -> Callable[[], object]:
    """The public ssd or the chunked path; with backward, the gradients of every input."""
    if not backward:
        return path_call(path, inp, chunk)
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    forward = path_call(path, leaves, chunk)
    dy = torch.randn_like(leaves["x"])

    def call():
        forward().backward(dy)
        for v in leaves.values():
            v.grad = None

    return call


def sdpa_backend(setup: Setup) -> str:
    """'flash' if the FlashAttention backend takes the benchmark's inputs, else 'default'."""
    inp = make_inputs(setup, 256, setup.dstate)
    try:
        sdpa_call(inp, backward=False, backend="flash")()
        torch.cuda.synchronize()
        return "flash"
    except RuntimeError:
        return "default"


def run_timings(setup: Setup, log: Callable[[str], None] = print) -> list[dict]:
    """Rows of aotlib.bench.ssd.COLUMNS: every path, forward and forward + backward."""
    rows: list[dict] = []
    backend = sdpa_backend(setup)
    log(f"sdpa backend: {backend}")
    meta = {
        "device": "cuda", "device_name": torch.cuda.get_device_name(0),
        "dtype": setup.dtype, "threads": torch.get_num_threads(), "batch": setup.batch,
        "nheads": setup.nheads, "headdim": setup.headdim, "chunk": setup.chunk,
    }  # fmt: skip
    sweeps = [("length", l, setup.dstate) for l in setup.lengths]
    sweeps += [("state", setup.state_length, n) for n in setup.states]
    for sweep, seqlen, dstate in sweeps:
        inp = make_inputs(setup, seqlen, dstate)
        for backward in (False, True):
            name = f"{sweep}_fwd_bwd" if backward else sweep
            for path in setup.paths:
                if path == "sdpa" and sweep == "state":
                    continue  # attention has no state size
                row = {"sweep": name, "path": path, "seqlen": seqlen, "dstate": dstate, **meta}
                try:
                    if path == "sdpa":
                        call = sdpa_call(inp, backward, backend)
                        row["status"] = "ok" if backend == "flash" else "ok: default backend"
                    else:
                        call = ssd_call(path, inp, setup.chunk, backward)
                        row["status"] = "ok"
                    grad = torch.enable_grad() if backward else torch.inference_mode()
                    with grad:
                        call()  # untimed: a first call may compile (time_call would keep
                        torch.cuda.synchronize()  # a first call over 10 s as the time)
                        row["time_s"] = time_call(call, "cuda", budget_s=0.25, warmup_s=0.1)
                    if path != "sdpa" and not backward:
                        row["gflops"] = ssd_flops(setup, seqlen, dstate) / row["time_s"] / 1e9
                except Exception as err:  # out of memory, a compile error: a row, not a crash
                    row["status"] = f"error: {type(err).__name__}: {str(err)[:120]}"
                    row["time_s"] = math.nan
                    torch.cuda.empty_cache()
                rows.append(row)
                shown = f"{row['time_s'] * 1e3:9.3f} ms" if row["status"].startswith("ok") else ""
                log(f"{name:15s} l={seqlen:<6d} N={dstate:<4d} {path:8s} {shown} {row['status']}")
        del inp
        torch.cuda.empty_cache()
    return rows


def warm_up(setup: Setup, log: Callable[[str], None] = print) -> None:
    """Run the ssd path once at every timed shape, forward and backward: Triton compiles
    each kernel variant into its disk cache, so the timings that follow (in another
    process, `make gpu-check`) measure kernels, not the compiler."""
    sweeps = [(l, setup.dstate) for l in setup.lengths]
    sweeps += [(setup.state_length, n) for n in setup.states]
    for seqlen, dstate in sweeps:
        inp = make_inputs(setup, seqlen, dstate)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ssd_call("ssd", inp, setup.chunk, backward=False)()
        ssd_call("ssd", inp, setup.chunk, backward=True)()
        torch.cuda.synchronize()
        log(f"warm-up l={seqlen:<6d} N={dstate:<4d} {time.perf_counter() - t0:6.1f} s")


def _time(rows: list[dict], sweep: str, path: str, seqlen: int, dstate: int) -> float:
    for r in rows:
        if (r["sweep"], r["path"], r["seqlen"], r["dstate"]) == (sweep, path, seqlen, dstate):
            return r.get("time_s", math.nan) if r["status"].startswith("ok") else math.nan
    return math.nan


def compare(rows: list[dict], setup: Setup) -> dict[str, Any]:
    """Speed-ups (other path's time / ssd's) and the paper's claims beside them."""
    n = setup.dstate
    out: dict[str, Any] = {"vs_sdpa": {}, "vs_chunked": {}, "claims": []}
    for sweep in ("length", "length_fwd_bwd"):
        for l in setup.lengths:
            ssd_t = _time(rows, sweep, "ssd", l, n)
            out["vs_sdpa"][f"{sweep}@{l}"] = _time(rows, sweep, "sdpa", l, n) / ssd_t
            out["vs_chunked"][f"{sweep}@{l}"] = _time(rows, sweep, "chunked", l, n) / ssd_t
    for claim, at, factor in PAPER_CLAIMS:
        if at not in setup.lengths:
            continue
        for sweep in ("length", "length_fwd_bwd"):
            measured = out["vs_sdpa"][f"{sweep}@{at}"]
            if factor == 1.0:  # "from 2K": at every length from there on
                longer = [out["vs_sdpa"][f"{sweep}@{l}"] for l in setup.lengths if l >= at]
                holds = all(r > 1.0 for r in longer)
            else:
                holds = measured >= factor
            out["claims"].append({"claim": claim, "pass": sweep, "measured": measured,
                                  "reproduced": bool(holds)})  # fmt: skip
    states = [s for s in setup.states]
    if len(states) >= 2:
        t = [_time(rows, "state", "ssd", setup.state_length, s) for s in (states[0], states[-1])]
        out["state_growth"] = {"from": states[0], "to": states[-1], "time_ratio": t[1] / t[0]}
    return out


def format_comparison(cmp: dict[str, Any], setup: Setup) -> str:
    lines = ["speed-up of ssd (Triton) = other path's time / ssd's time:"]
    lines.append(f"{'length':>8s} {'vs sdpa fwd':>12s} {'fwd+bwd':>9s} {'vs chunked fwd':>15s} "
                 f"{'fwd+bwd':>9s}")  # fmt: skip
    for l in setup.lengths:
        v = [cmp[k][f"{s}@{l}"] for k in ("vs_sdpa", "vs_chunked")
             for s in ("length", "length_fwd_bwd")]  # fmt: skip
        lines.append(f"{l:8d} {v[0]:12.2f} {v[1]:9.2f} {v[2]:15.2f} {v[3]:9.2f}")
    lines.append("the paper (Fig. 10, its own kernels, A100) beside this measurement:")
    for c in cmp["claims"]:
        verdict = "yes" if c["reproduced"] else "no"
        lines.append(f"  {c['claim']:52s} {c['pass']:15s} measured {c['measured']:6.2f}x  "
                     f"reproduced: {verdict}")  # fmt: skip
    if "state_growth" in cmp:
        g = cmp["state_growth"]
        lines.append(f"  nearly flat in N: ssd time N={g['to']} / N={g['from']} at "
                     f"l={setup.state_length}: {g['time_ratio']:.2f}")  # fmt: skip
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


# ---------------------------------------------------------------------------
# A Mamba-2 130m-shaped model through both paths
# ---------------------------------------------------------------------------

# Pass lines of the model check, by precision: loss relative difference at most, global
# gradient cosine similarity at least. fp32: the Triton dots are TF32 (~5e-4 relative
# rounding), the chunked path's matmuls fp32; bf16 autocast: both round to bf16 (2^-8).
MODEL_LIMITS = {"fp32": (1e-3, 0.999), "bf16-autocast": (1e-2, 0.99)}


def model_check(
    device: str = "cuda",
    batch: int = 2,
    seqlen: int = 1024,
    size: str = "130m",
    seed: int = 0,
    precisions: tuple[str, ...] = ("fp32", "bf16-autocast"),
    fast: str = "auto",
) -> list[dict]:
    """Loss and gradients of a Mamba-2 `size` model, Triton (backend `fast`) against chunked.

    Random token ids (the check is about the arithmetic, not the language); one set of
    weights; fp32, then under bfloat16 autocast as training runs on CUDA. Returns one
    row per precision: losses, relative loss difference, gradient cosine similarity
    (all parameters as one vector, and the lowest per tensor), relative gradient error,
    the Triton calls made and at which chunk size. (The tests run it on a CPU with
    fast="triton": the interpreter, fp32, a small size.)
    """
    from aotlib import ssd_triton
    from aotlib.models import build_model, model_config

    cfg = model_config("mamba2", size, context=seqlen)
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).eval()  # no dropout: both paths see one function
    gen = torch.Generator(device=device).manual_seed(seed)
    windows = torch.randint(cfg.vocab_size, (batch, seqlen + 1), generator=gen, device=device)
    calls: list[int] = []
    real = ssd_triton.ssd_triton

    def counted(*args, **kw):
        calls.append(args[5])  # the chunk size the kernels ran
        return real(*args, **kw)

    def loss_and_grads(backend: str, autocast: bool):
        model.set_ssd_backend(backend)
        model.zero_grad(set_to_none=True)
        dev = torch.device(device).type
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            logits = model(windows[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                 if p.grad is not None}  # fmt: skip
        return float(loss.detach()), grads

    rows = []
    for precision in precisions:
        autocast = precision == "bf16-autocast"
        ssd_triton.ssd_triton = counted
        try:
            calls.clear()
            loss_t, g_t = loss_and_grads(fast, autocast)
            loss_c, g_c = loss_and_grads("chunked", autocast)
        except Exception as err:  # one precision failing still leaves the other's row
            error = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append({"check": f"model-{size}-{precision}", "error": error, "pass": False})
            continue
        finally:
            ssd_triton.ssd_triton = real
        flat_t = torch.cat([g_t[n].flatten() for n in g_c])
        flat_c = torch.cat([g_c[n].flatten() for n in g_c])
        per_tensor = {
            n: float(F.cosine_similarity(g_t[n].flatten(), g_c[n].flatten(), dim=0))
            for n in g_c
            if g_c[n].norm() > 0
        }
        worst = min(per_tensor, key=per_tensor.get)
        rel_loss = abs(loss_t - loss_c) / abs(loss_c)
        cosine = float(F.cosine_similarity(flat_t, flat_c, dim=0))
        max_rel, min_cos = MODEL_LIMITS[precision]
        rows.append({
            "check": f"model-{size}-{precision}", "batch": batch, "seqlen": seqlen,
            "preset_chunk": cfg.chunk_size, "triton_calls": len(calls),
            "triton_chunks": sorted(set(calls)), "loss_triton": loss_t, "loss_chunked": loss_c,
            "loss_rel_diff": rel_loss, "grad_cosine": cosine,
            "grad_rel_err": float((flat_t - flat_c).norm() / flat_c.norm()),
            "worst_tensor": worst, "worst_tensor_cosine": per_tensor[worst],
            "limits": {"loss_rel_diff": max_rel, "grad_cosine": min_cos},
            "pass": bool(calls) and rel_loss <= max_rel and cosine >= min_cos,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths to 4K, two state sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    parser.add_argument(
        "--what", choices=["timings", "model", "warmup", "both"], default="both",
        help="warmup: compile the timed kernels only (no timing)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "warmup":
        warm_up(gpu_setup(args.quick), log=lambda s: print(s, flush=True))
        return 0
    ok = True
    if args.what in ("model", "both"):
        rows = model_check()
        for r in rows:
            print(json.dumps(r))
        (args.out / "model_check.json").write_text(json.dumps(rows, indent=2) + "\n")
        ok &= all(r["pass"] for r in rows)
    if args.what in ("timings", "both"):
        setup = gpu_setup(args.quick)
        rows = run_timings(setup, log=lambda s: print(s, flush=True))
        write_csv(rows, args.out / "ssd_cuda.csv")
        cmp = compare(rows, setup)
        print(format_comparison(cmp, setup))
        (args.out / "ssd_cuda_summary.json").write_text(json.dumps(cmp, indent=2) + "\n")
        ok &= all(r["status"].startswith("ok") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
