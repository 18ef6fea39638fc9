"""The ``metagrad`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys


def _demo(args) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {name: getattr(args, name) for name in ("num_steps", "meta_steps", "k", "seed")
                 if getattr(args, name) is not None}
    config = dataclasses.replace(config, **overrides)
    report = run_demo(args.out, config, progress=not args.no_progress, resume=not args.fresh)
    return 0 if report["final"]["val_loss"] <= report["initial"]["val_loss"] else 1


def _load_dataset(spec: str):
    from . import data as data_lib

    if spec == "mnist1d":
        return data_lib.mnist1d()
    if spec.endswith(".npz"):
        import numpy as np

        arrays = np.load(spec)
        missing = {"x", "y"} - set(arrays.files)
        if missing:
            raise SystemExit(f"{spec} must hold arrays 'x' and 'y' (integer labels); missing {sorted(missing)}.")
        return data_lib.from_arrays(arrays["x"].astype("float32"), arrays["y"].astype("int32"), name=spec)
    if spec.startswith("tfds:"):
        return data_lib.from_tfds(spec[len("tfds:"):])
    raise SystemExit(f"unknown dataset {spec!r}: use 'mnist1d', a .npz file with arrays x and y, or 'tfds:NAME'.")


def _audit_poison(args) -> int:
    import optax

    from .apps import poisoning
    from .mgd import checkpoint_folder, run_settings
    from .models import CNN1D, MLP
    from .training import TrainingProblem

    dataset = _load_dataset(args.data)
    if args.model == "cnn":
        model = CNN1D(channels=tuple(args.channels), num_classes=dataset.num_classes)
    else:
        model = MLP(hidden=tuple(args.hidden), num_classes=dataset.num_classes)
    base = TrainingProblem(model,
                           optax.sgd(args.lr, momentum=0.9), dataset, num_steps=args.num_steps,
                           batch_size=min(args.batch_size, dataset.num_train), lr_schedule=None)
    saved_delta, saved_indices = poisoning.load_poison(args.poison) if args.poison else (None, None)
    settings = run_settings(args, extendable=not poisoning.schedule_depends_on_meta_steps(args.final_step_fraction,
                                                                                          args.refine_steps))
    report = poisoning.audit(base, fraction=args.fraction, eps=args.eps, meta_steps=args.meta_steps,
                             attack_seeds=tuple(range(args.attack_seeds)),
                             seeds_per_step=args.seeds_per_step or None,
                             final_step_fraction=args.final_step_fraction, refine_steps=args.refine_steps,
                             eval_seeds=tuple(range(1000, 1000 + args.eval_seeds)), choose=args.choose,
                             checkpoint_dir=None if args.poison else checkpoint_folder(args.out, fresh=args.fresh,
                                                                                       settings=settings),
                             progress=not args.no_progress,
                             poison_delta=saved_delta, poison_indices=saved_indices)
    report["dataset"] = args.data
    if args.poison is not None:
        report["poison_source"] = os.path.abspath(args.poison)
    poisoning.write_audit_report(report, args.out)
    print(poisoning.audit_table(report))
    print(f"wrote {os.path.join(args.out, 'report.json')} and {os.path.join(args.out, 'poisoning.png')}")
    return 0


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

    audit = sub.add_parser("audit-poison", help="how far can poisoning a few training inputs lower test accuracy? (MGD)")
    audit.add_argument("--data", default="mnist1d", help="'mnist1d', a .npz with arrays x and y, or 'tfds:NAME'")
    audit.add_argument("--out", default="poison_audit")
    audit.add_argument("--fraction", type=float, default=0.025, help="fraction of training inputs perturbed")
    audit.add_argument("--eps", type=float, default=2.0, help="L-inf bound of each perturbation")
    audit.add_argument("--meta-steps", type=int, default=120)
    audit.add_argument("--attack-seeds", type=int, default=4,
                       help="fixed training seeds the attack averages over (with --seeds-per-step 0)")
    audit.add_argument("--seeds-per-step", type=int, default=4,
                       help="fresh training seeds (10000, 10001, ...) drawn at every meta-step; 0: use --attack-seeds")
    audit.add_argument("--final-step-fraction", type=float, default=1.0,
                       help="the signed step decays linearly from eps/8 to this fraction of it")
    audit.add_argument("--refine-steps", type=int, default=0,
                       help="meta-steps after --meta-steps whose step anneals linearly from eps/16 to eps/160")
    audit.add_argument("--eval-seeds", type=int, default=10, help="fresh training seeds for the evaluation")
    audit.add_argument("--choose", choices=("random", "influence"), default="influence",
                       help="which inputs to poison: a random subset, or those with the largest metagradient")
    audit.add_argument("--poison", help="re-score this saved poison_delta.npy instead of running the attack (on the "
                       "examples in poison_indices.npy beside it; without that file they are chosen again)")
    audit.add_argument("--fresh", action="store_true", help="discard the attack checkpoints in --out/mgd_checkpoints")
    audit.add_argument("--num-steps", type=int, default=500)
    audit.add_argument("--batch-size", type=int, default=128)
    audit.add_argument("--lr", type=float, default=0.03)
    audit.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                       help="audited model: an MLP (--hidden) or a 1-D CNN with average pooling (--channels)")
    audit.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    audit.add_argument("--channels", type=int, nargs="+", default=[8, 8], help="CNN channels per layer")
    audit.add_argument("--no-progress", action="store_true")
    audit.set_defaults(func=_audit_poison)

    from .interactive.cli import add_interactive_parser, add_replay_log_parser

    add_interactive_parser(sub)  # metagrad interactive
    add_replay_log_parser(sub)  # metagrad replay-log LOG
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
