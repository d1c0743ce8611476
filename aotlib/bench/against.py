"""The chunked SSD's training path against itself at another git revision, side by side.

    python -m aotlib.bench against REV [--length L] [--rounds 20]

Loads `aotlib/ssd_chunks.py` and `aotlib/ssd_grad.py` as they were at REV (`git show`)
into this process next to the working tree's, then alternates one forward+backward of
each (`chunked_ssd_function`, the gradients of every input for one fixed dy) on the same
inputs, timed in this process's CPU time, and prints each one's median and the median of
the per-round ratios: a change's speed-up measured on the same machine at the same moment,
however the shared host's load moves (it moved shares by 15-30% between runs here). It
also says whether y and every gradient are bitwise equal, or how far apart they are
(relative to each tensor's largest entry).

Shape: the cpu preset's Mamba-2 by default (`python -m aotlib.bench ssd --model-shape`:
batch 32, length 128, 8 heads of 32, N = 64, chunk 32); with --length L the long-sequence
sweep's (batch 2, 8 heads of 64, N = 64, chunk 64) at length L. REV must have
`aotlib.ssd_grad.chunked_ssd_function(x, dt, A, B, C, D, S0, chunk_size)`. Each is called
as the models call it, with no initial state and the final state unused (S0=None,
final_state=False), or with a zero S0 where a revision takes no None.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

import aotlib.ssd_grad
from aotlib.bench.ssd import Setup, make_inputs, model_shape_setup, setup_for

ROOT = Path(__file__).resolve().parents[2]  # the repository (git show reads REV there)


def revision_modules(rev: str, folder: Path) -> ModuleType:
    """`aotlib.ssd_grad` as it was at `rev`, with its own `aotlib.ssd_chunks` of `rev`
    (imported under private names, so the working tree's stay as they are)."""
    tag = "".join(ch if ch.isalnum() else "_" for ch in rev)
    names = {"ssd_chunks": f"_at_{tag}_ssd_chunks", "ssd_grad": f"_at_{tag}_ssd_grad"}
    module = None
    for name in ("ssd_chunks", "ssd_grad"):  # ssd_grad imports ssd_chunks
        done = subprocess.run(["git", "show", f"{rev}:aotlib/{name}.py"], cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"git show {rev}:aotlib/{name}.py failed: {done.stderr.strip()}")
        source = done.stdout.replace(
            "from aotlib.ssd_chunks import", f"from {names['ssd_chunks']} import"
        )
        path = folder / f"{names[name]}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(names[name], path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[names[name]] = module
        spec.loader.exec_module(module)
    return module


def called_as_now(old: Callable) -> Callable:
    """A revision's `chunked_ssd_function` with today's arguments: revisions before S0
    could be None (and before `final_state`) are handed a zero S0 instead."""
    if "final_state" in inspect.signature(old).parameters:
        return old

    def function(x, dt, A, B, C, D, S0, chunk_size, final_state=True):
        if S0 is None:
            b, _, h, p = x.shape
            g, n = B.shape[2:]
            S0 = x.new_zeros(b, g, n, h // g * p)
        return old(x, dt, A, B, C, D, S0, chunk_size)

    return function


def training_inputs(setup: Setup, length: int) -> tuple[dict, torch.Tensor]:
    """`python -m aotlib.bench ssd`'s inputs at `length` with D = 1, and a fixed random dy:
    what `fwd_bwd` takes (for `against`, `native` and `memory` alike)."""
    inp = make_inputs(setup, length, setup.dstate)
    inp["D"] = torch.ones(setup.nheads)
    return inp, torch.randn_like(inp["x"])


def fwd_bwd(function: Callable, inp: dict, dy: torch.Tensor, chunk: int) -> Callable[[], list]:
    """One forward+backward of `function` (a `chunked_ssd_function`): [y, grads...], with
    no initial state and the final state unused, as the models run it."""
    function = called_as_now(function)

    def call() -> list:
        leaves = [inp[k].detach().requires_grad_(True) for k in ("x", "dt", "A", "B", "C", "D")]
        x, dt, A, B, C, D = leaves
        y, _ = function(x, dt, A, B, C, D, None, chunk, final_state=False)
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    return call


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest difference between two lists of results, each relative to b's tensor's
    largest entry."""
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m aotlib.bench against", description=doc)
    p.add_argument("rev", help="a git revision (commit, tag, HEAD~1)")
    p.add_argument("--length", type=int, default=None, help="the long-sequence setup at L")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    setup = setup_for("cpu", threads=args.threads)
    if args.length is None:
        setup = model_shape_setup(setup)
    length = args.length or setup.train_lengths[0]
    inp, dy = training_inputs(setup, length)
    shape = f"{setup.nheads} heads of {setup.headdim}, N = {setup.dstate}, chunk {setup.chunk}"
    print(f"batch {setup.batch}, length {length}, {shape}; threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as folder:
        old = revision_modules(args.rev, Path(folder))
    calls = {
        args.rev: fwd_bwd(old.chunked_ssd_function, inp, dy, setup.chunk),
        "working tree": fwd_bwd(aotlib.ssd_grad.chunked_ssd_function, inp, dy, setup.chunk),
    }
    outs = {name: call() for name, call in calls.items()}  # also the warm-up
    worst = max_rel_diff(*outs.values())
    same = all(torch.equal(a, b) for a, b in zip(*outs.values()))
    print(
        "y and every gradient: "
        + ("bitwise equal" if same else f"largest difference {worst:.3g} of the tensor's scale")
    )

    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.process_time()
            call()
            times[name].append(time.process_time() - start)
    base = times[args.rev]
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        med, low = statistics.median(ts) * 1e3, min(ts) * 1e3
        print(f"  {name:14s} median {med:8.2f} ms, min {low:8.2f} ms; "
              f"time / {args.rev}'s (median of rounds) {ratio:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
