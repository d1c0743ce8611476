"""`aotlib.native`'s C kernels against their torch forms, forward + backward, side by side.

    python -m aotlib.bench native [--rounds 20] [--threads 1]

At the shapes the cpu preset's Mamba-2 trains (batch 32, length 128, d_model 128: the conv
over 384 channels in groups [256, 64, 64] of a (b, l, 648) projection's output, the gated
norm over 256, the residual norm over 128, the chunked SSD with 8 heads of 32, N = 64 and
chunks of 32), the LM head + loss of every model (N = V = 4096 rows and classes, d = 128),
and the SSD at `python -m aotlib.bench ssd`'s 4K point (b = 2, 8 heads of 64, N = Q = 64;
its kernels are `ssd_cpu.c`'s, the rest of its work is torch's matmuls either way). Each
round times the kernels and then the torch forms (in `aotlib.native.off()`), forward and
backward (the inputs are leaves, so nothing but the layer is timed), in CPU time of this
process; printed are the median times, the median of the per-round ratios, and the largest
difference between the two forms' outputs and gradients relative to their scale (float32
rounding, ~1e-7).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from aotlib import native
from aotlib.bench.against import fwd_bwd, max_rel_diff, training_inputs
from aotlib.bench.ssd import Setup, model_shape_setup, setup_for
from aotlib.mamba2 import GatedRMSNorm, causal_conv_silu
from aotlib.models import linear_cross_entropy
from aotlib.ssd_grad import chunked_ssd_function

Case = Callable[[], list[torch.Tensor]]  # one forward + backward: outputs and gradients


def conv_case() -> Case:
    # x B C: a strided slice of the projection's output (z | x B C | dt), as in the block
    xbc = torch.randn(32, 128, 648)[..., 256:640].requires_grad_(True)
    conv = torch.nn.Conv1d(384, 384, 4, groups=384, padding=3)
    douts = [torch.randn(32, 128, s) for s in (256, 64, 64)]

    def run() -> list[torch.Tensor]:
        xbc.grad = None
        conv.zero_grad()
        parts = causal_conv_silu(xbc, conv, [256, 64, 64])
        torch.autograd.backward(list(parts), douts)
        return [*parts, xbc.grad, conv.weight.grad, conv.bias.grad]

    return run


def norm_case(d: int, gated: bool) -> Case:
    x, z = torch.randn(32, 128, d, requires_grad=True), torch.randn(32, 128, d, requires_grad=True)
    weight, dout = (torch.rand(d) + 0.5).requires_grad_(True), torch.randn(32, 128, d)

    def run() -> list[torch.Tensor]:
        x.grad = z.grad = weight.grad = None
        out = GatedRMSNorm.apply(x, z if gated else None, weight, d, 1e-5)
        out.backward(dout)
        return [out, x.grad, weight.grad] + ([z.grad] if gated else [])

    return run


def head_case() -> Case:
    h = torch.randn(4096, 128, requires_grad=True)
    W = (torch.randn(4096, 128) * 0.05).requires_grad_(True)
    targets = torch.randint(4096, (4096,))

    def run() -> list[torch.Tensor]:
        h.grad = W.grad = None
        loss = linear_cross_entropy(h, W, targets)
        loss.backward()
        return [loss, h.grad, W.grad]

    return run


def ssd_case(setup: Setup) -> Case:
    """The chunked SSD's forward + backward (`python -m aotlib.bench ssd`'s inputs at
    `setup`'s first training length, as `python -m aotlib.bench against` runs it)."""
    inp, dy = training_inputs(setup, setup.train_lengths[0])
    return fwd_bwd(chunked_ssd_function, inp, dy, setup.chunk)


CASES = {
    "conv + SiLU (b=32, l=128, c=384)": conv_case,
    "gated RMSNorm (d=256)": lambda: norm_case(256, gated=True),
    "residual RMSNorm (d=128)": lambda: norm_case(128, gated=False),
    "LM head + loss (N=V=4096, d=128)": head_case,
    "SSD (b=32, l=128, p=32, N=64, Q=32)": lambda: ssd_case(model_shape_setup(setup_for())),
    "SSD (b=2, l=4096, p=N=Q=64)": lambda: ssd_case(replace(setup_for(), train_lengths=(4096,))),
}


def timed(run: Case, torch_form: bool) -> tuple[float, list[torch.Tensor]]:
    """CPU seconds of one forward + backward, and its results."""
    with native.off() if torch_form else contextlib.nullcontext():
        t0 = time.process_time()
        out = run()
        return time.process_time() - t0, out


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m aotlib.bench native", description=doc)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any(native.library(name) is None for name in ("mamba2_cpu", "lm_head_cpu", "ssd_cpu")):
        print("aotlib.native: no kernels here (no C compiler, or AOTLIB_NATIVE=0)")
        return 1
    torch.manual_seed(0)
    print(f"CPU time per forward + backward, median of {args.rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'':36} {'kernel ms':>10} {'torch ms':>10} {'kernel/torch':>13} {'max rel diff':>13}")
    for name, make in CASES.items():
        run = make()
        for torch_form in (False, True):  # warm-up: the build, the allocator
            timed(run, torch_form)
        kernel, torch_ms, ratios = [], [], []
        for _ in range(args.rounds):
            tk, out_k = timed(run, False)
            tt, out_t = timed(run, True)
            kernel.append(tk)
            torch_ms.append(tt)
            ratios.append(tk / tt)
        diff = max_rel_diff(out_k, out_t)
        print(
            f"{name:36} {statistics.median(kernel) * 1e3:10.2f} "
            f"{statistics.median(torch_ms) * 1e3:10.2f} {statistics.median(ratios):13.3f} "
            f"{diff:13.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
