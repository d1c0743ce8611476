"""`python -m aotlib.bench NAME [options]`: run one benchmark (each has --help)."""

from __future__ import annotations

import importlib
import sys

from aotlib.memory import keep_freed_memory

# name -> module with a `main(argv) -> int`; imported only when asked for, so one
# benchmark's imports (triton, torch.compile) never slow down or break another.
BENCHMARKS = {
    "ssd": "aotlib.bench.ssd",
    "gpu": "aotlib.bench.gpu",
    "train": "aotlib.bench.train",
    "against": "aotlib.bench.against",
    "native": "aotlib.bench.native",
    "memory": "aotlib.bench.memory",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        names = " | ".join(BENCHMARKS)
        print(f"usage: python -m aotlib.bench {{{names}}} [options]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    keep_freed_memory()  # as `python -m aotlib` trains: freed memory is reused (aotlib.memory)
    sys.argv = [f"python -m aotlib.bench {name}", *rest]  # argparse's usage line
    return importlib.import_module(BENCHMARKS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
