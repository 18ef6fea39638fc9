"""The ``metagrad`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {name: getattr(args, name) for name in ("num_steps", "meta_steps", "k", "seed")
                 if getattr(args, name) is not None}
    config = dataclasses.replace(config, **overrides)
    report = run_demo(args.out, config, progress=not args.no_progress, resume=not args.fresh)
    return 0 if report["final"]["val_loss"] <= report["initial"]["val_loss"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="metagrad", description="Differentiate, steer and reuse training runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="metagradient descent on an LR schedule on MNIST-1D (built in, offline)")
    demo.add_argument("--out", default="metagrad_demo", help="output folder (default: ./metagrad_demo)")
    demo.add_argument("--quick", action="store_true", help="a reduced size (for CI)")
    demo.add_argument("--num-steps", type=int, help="training steps per run")
    demo.add_argument("--meta-steps", type=int, help="MGD steps")
    demo.add_argument("--k", type=int, help="REPLAY branching factor")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--fresh", action="store_true", help="ignore checkpoints of an earlier run in --out")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
