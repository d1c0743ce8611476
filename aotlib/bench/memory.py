"""The chunked SSD's training path with freed memory kept for reuse, against fresh mappings.

    python -m aotlib.bench memory [--length 65536] [--rounds 4]

Runs one forward+backward (`bench against`'s) in child processes that alternate between
glibc's two policies (`aotlib.memory.keep_freed_memory`): fresh, glibc's default, where
every block of 32 MB or more is mapped afresh, then faulted in and zeroed by the kernel on
first write; kept, where the heap keeps what is freed. Each child sets its policy before
it makes its inputs, warms up with two calls (the kept heap grows to fit), then times
three in user and system CPU time, with their page faults. Prints each policy's medians
and the median of the per-round ratios of CPU time, kept / fresh. (Switching policies
within one process is no A/B: a heap grown under one serves the other's requests.) The
long-sequence sweep's shape (batch 2, 8 heads of 64, N = 64, chunk 64) at --length.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch

from aotlib.memory import keep_freed_memory

POLICIES = ("fresh", "kept")


def child(policy: str, length: int) -> dict[str, float]:
    """Median user and system seconds and page faults of three calls under `policy`."""
    if policy == "kept" and not keep_freed_memory():
        raise SystemExit("keeping freed memory needs glibc on Linux")
    import aotlib.ssd_grad
    from aotlib.bench.against import fwd_bwd, training_inputs
    from aotlib.bench.ssd import setup_for

    torch.set_num_threads(1)
    setup = setup_for("cpu", threads=1)
    inp, dy = training_inputs(setup, length)
    call = fwd_bwd(aotlib.ssd_grad.chunked_ssd_function, inp, dy, setup.chunk)
    for _ in range(2):  # warm: the kept heap grows to fit
        call()
    rows = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF)
        call()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                     after.ru_minflt - before.ru_minflt))  # fmt: skip
    user, system, faults = (statistics.median(r[i] for r in rows) for i in range(3))
    return dict(user=user, system=system, faults=faults)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.splitlines()[0]
    p = argparse.ArgumentParser(prog="python -m aotlib.bench memory", description=doc)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.length)))
        return 0
    print(f"length {args.length}, the long-sequence sweep's shape, one thread; "
          f"{args.rounds} rounds of a child per policy")  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in POLICIES}
    for _ in range(args.rounds):
        for name in POLICIES:
            cmd = [sys.executable, "-m", "aotlib.bench.memory", "--child", name,
                   "--length", str(args.length)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    for name, rows in runs.items():
        user, system, faults = (statistics.median(r[k] for r in rows)
                                for k in ("user", "system", "faults"))  # fmt: skip
        print(f"  {name:5s} median user {user:.3f} s, system {system:.3f} s, "
              f"page faults {faults:.0f}")  # fmt: skip
    total = [{name: r["user"] + r["system"] for name, r in zip(POLICIES, pair)}
             for pair in zip(*runs.values())]  # fmt: skip
    ratio = statistics.median(t["kept"] / t["fresh"] for t in total)
    print(f"CPU time kept / fresh (median of rounds): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
