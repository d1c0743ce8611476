"""Command line: `python -m aotlib {train,arrow,grid,check} ...`.

python -m aotlib train --arch gpt --lang fr --direction backward
python -m aotlib arrow --arch gpt --lang fr --seeds 0 1
python -m aotlib grid primes linear --shard 0/2     # a notebook's runs, half of them
python -m aotlib check results/cpu/gpt-fr-forward-*.json  # retrain stored results, compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aotlib.arrow import paired_bootstrap, seed_spread
from aotlib.checkpoint import load_json
from aotlib.experiments import GRIDS, both_directions, lm_config
from aotlib.memory import keep_freed_memory
from aotlib.mqar import MQARConfig, get_mqar_result, mqar_result_path, train_mqar
from aotlib.results import claim, get_result, result_path, train_again
from aotlib.train import TrainConfig, train


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    p.add_argument("--arch", default="gpt", choices=["gpt", "lstm", "gru", "mamba2"])
    p.add_argument("--size", default=None, help="model size preset (see aotlib.models.SIZES)")
    p.add_argument("--lang", default="fr")
    p.add_argument("--corpus", default=None, help="bible (default), cc100, or a text path")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "bpe-reversed"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, direction: str, seed: int):
    over = {"steps": args.steps} if args.steps else {}
    return lm_config(
        args.scale,
        arch=args.arch,
        lang=args.lang,
        direction=direction,
        seed=seed,
        size=args.size,
        context=args.context,
        tokenizer=args.tokenizer,
        corpus=args.corpus,
        **over,
    )


def _train_grid_run(cfg, scale: str, progress: bool) -> str:
    """Train (or load) one run of a grid; its one-line summary."""
    if isinstance(cfg, MQARConfig):
        r = get_mqar_result(cfg, scale, progress=progress)
        return f"{mqar_result_path(cfg, scale).name}: test accuracy {r['test_accuracy']:.3f}"
    r = get_result(cfg, scale, progress=progress)
    return f"{result_path(cfg, scale).name}: {r['final_val_loss']:.4f}"


def check(path: Path, tol: float, progress: bool) -> bool:
    """Train the run stored at `path` (a language-model or an MQAR run) again
    (`aotlib.results.train_again`) and print its final numbers beside the stored ones;
    whether each is within `tol` (absolute)."""
    stored = load_json(path)
    if "test_accuracy" in stored:
        cfg, run, names = MQARConfig(**stored["config"]), train_mqar, ("test_loss", "test_accuracy")
    else:
        cfg, run, names = TrainConfig.from_dict(stored["config"]), train, ("final_val_loss",)
    try:
        again = train_again(stored, cfg, run, progress)
    except ValueError as err:
        raise SystemExit(f"{path}: {err}") from err
    ok = True
    for name in names:
        diff = abs(again[name] - stored[name])
        ok &= diff <= tol
        same = "equal" if diff == 0 else f"{diff:.2g} apart" + ("" if diff <= tol else " (> tol)")
        print(f"{path.name}: {name} stored {stored[name]:.7f}, again {again[name]:.7f}: {same}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aotlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model (resumes if interrupted)")
    _common(t)
    t.add_argument("--direction", default="forward", choices=["forward", "backward"])
    t.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("arrow", help="train both directions and print delta with its interval")
    _common(a)
    a.add_argument("--seeds", type=int, nargs="+", default=[0])
    g = sub.add_parser("grid", help="train every missing run of the named notebook grids")
    g.add_argument("names", nargs="+", choices=sorted(GRIDS))
    g.add_argument("--scale", default="cpu", choices=["smoke", "cpu", "paper"])
    g.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="train stored results again and compare their numbers")
    c.add_argument("paths", nargs="+", type=Path, help="result files (results/<scale>/*.json)")
    c.add_argument("--tol", type=float, default=1e-5, help="largest difference taken as equal")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    keep_freed_memory()  # a training process reuses what it frees (aotlib.memory)

    if args.command == "grid":
        i, n = (int(x) for x in args.shard.split("/"))
        listed: set[str] = set()
        while True:
            # A grid may grow as it is trained (mqar adds each point's second seed once its
            # learning-rate sweep is stored): list it again until a pass adds nothing. The
            # first listing is sharded; runs added later go to every process (a claim
            # keeps two from training the same one).
            runs = [cfg for name in args.names for cfg in GRIDS[name](args.scale)]
            new = [cfg for cfg in runs if cfg.key() not in listed]
            todo = new if listed else new[i::n]
            if not todo:
                return 0
            listed.update(cfg.key() for cfg in runs)
            for cfg in todo:
                # Several `grid` processes may share one list: each run is claimed by a lock.
                with claim(cfg, args.scale) as mine:
                    if not mine:
                        continue
                    print(_train_grid_run(cfg, args.scale, not args.quiet), flush=True)

    if args.command == "check":
        results = [check(path, args.tol, not args.quiet) for path in args.paths]
        return 0 if all(results) else 1

    if args.command == "train":
        cfg = _config(args, args.direction, args.seed)
        r = get_result(cfg, args.scale, progress=not args.quiet)
        print(f"{result_path(cfg, args.scale).name}: val loss {r['final_val_loss']:.4f} nats/token")
        return 0

    deltas = []
    for seed in args.seeds:
        fw_cfg, bw_cfg = both_directions(_config(args, "forward", seed))
        fw = get_result(fw_cfg, args.scale, progress=not args.quiet)
        bw = get_result(bw_cfg, args.scale, progress=not args.quiet)
        d, lo, hi = paired_bootstrap(fw["val_window_losses"], bw["val_window_losses"])
        deltas.append(d)
        print(
            f"seed {seed}: L_FW {fw['final_val_loss']:.4f}  L_BW {bw['final_val_loss']:.4f}  "
            f"delta {100 * d:+.2f}%  (95% CI {100 * lo:+.2f}% .. {100 * hi:+.2f}%)"
        )
    if len(deltas) > 1:
        mean, err = seed_spread(deltas)
        print(f"across {len(deltas)} seeds: delta {100 * mean:+.2f}% +- {100 * err:.2f}% (s.e.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
