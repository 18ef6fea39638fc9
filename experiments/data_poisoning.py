"""Indiscriminate data poisoning by MGD on MNIST-1D: a 2.5% robustness audit.

    python experiments/data_poisoning.py [--quick | --smoke] [--out experiments/results/data_poisoning]

MGD perturbs 2.5% of the training inputs (L-inf radius eps, kept in the data's
range) to maximize validation loss. The inputs are by default those with the
largest metagradient at zero perturbation (--choose influence: the first-order
gain of an L-inf step, averaged over training seeds 20000-20003); --choose
random takes a random 2.5%. By default every meta-step averages the
metagradient over --seeds-per-step *new* training seeds (10000, 10001, ...: an
expectation over the training run's randomness); --seeds-per-step 0 averages
over the fixed seeds 0 .. --attack-seeds - 1 instead. Models are then retrained
from --eval-seeds fresh seeds (100, 101, ...: never used by the attack) and
scored on the untouched test split; each drop is the mean of the paired
per-seed drops, with its standard error. The attack checkpoints every meta-step
under <out>/mgd_checkpoints and a rerun resumes there (--fresh starts over);
--poison FILE skips the attack and re-scores a saved poison_delta.npy (on
the examples in the poison_indices.npy beside it).
Baselines with the same budget: random perturbations (corners of the L-inf
ball) and flipping the labels of the same examples.

The audited setup (--model, --batch-size, --lr) is by default the metasmoother
1-D CNN 8-8 with average pooling (SGD momentum 0.9, LR 0.03, batch 128, 500
steps) attacked for 60 meta-steps at step eps/8 plus 40 whose step anneals from
eps/16 to eps/160 (--refine-steps); --model mlp is MLP 64-64 (120 meta-steps,
no annealing).
"""

from __future__ import annotations

import argparse
import os

import optax

import metagrad as mg
from metagrad.apps import poisoning
from metagrad.mgd import checkpoint_folder, run_settings


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage (a pipeline check for tests; no goal is judged)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_poisoning"))
    parser.add_argument("--eps", type=float, default=2.0)
    parser.add_argument("--meta-steps", type=int, default=None, help="default: 60 (cnn), 120 (mlp)")
    parser.add_argument("--attack-seeds", type=int, default=8, help="fixed attack seeds (with --seeds-per-step 0)")
    parser.add_argument("--seeds-per-step", type=int, default=4, help="fresh training seeds per meta-step (0: fixed)")
    parser.add_argument("--final-step-fraction", type=float, default=1.0,
                        help="signed step decays linearly from eps/8 to this fraction of it")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="meta-steps after --meta-steps whose step anneals from eps/16 to eps/160 "
                             "(default: 40 (cnn), 0 (mlp))")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="cnn",
                        help="audited model: a 1-D CNN 8-8 with average pooling (metasmoother, default) or MLP 64-64")
    parser.add_argument("--batch-size", type=int, default=128, help="audited setup's batch size")
    parser.add_argument("--lr", type=float, default=0.03, help="audited setup's LR (SGD, momentum 0.9)")
    parser.add_argument("--choose", choices=("random", "influence"), default="influence",
                        help="poisoned inputs: a random 2.5%% or those with the largest metagradient (seeds 20000-20003)")
    parser.add_argument("--eval-seeds", type=int, default=10,
                        help="fresh retraining seeds 100, 101, ... (--quick: 3, --smoke: 2)")
    parser.add_argument("--poison", help="re-score this saved poison_delta.npy instead of running the attack")
    parser.add_argument("--fresh", action="store_true", help="discard the attack checkpoints in --out/mgd_checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        num_steps, hidden, meta_steps, attack_seeds, seeds_per_step = 20, (8,), 1, 1, 1
        refine_steps = 1 if args.refine_steps is None else args.refine_steps
    elif args.quick:
        num_steps, hidden, meta_steps, attack_seeds, seeds_per_step = 100, (32,), 5, 2, 2
        refine_steps = 2 if args.refine_steps is None else args.refine_steps
    else:
        num_steps, hidden = 500, (64, 64)
        meta_steps = args.meta_steps or (60 if args.model == "cnn" else 120)
        attack_seeds, seeds_per_step = args.attack_seeds, args.seeds_per_step
        refine_steps = args.refine_steps if args.refine_steps is not None else (40 if args.model == "cnn" else 0)
    args.meta_steps = meta_steps  # the run's settings record the meta-steps it takes, defaults resolved
    settings = run_settings(args, extendable=not poisoning.schedule_depends_on_meta_steps(args.final_step_fraction,
                                                                                          refine_steps))
    checkpoint_dir = None if args.poison else checkpoint_folder(args.out, fresh=args.fresh, settings=settings)
    if args.model == "cnn":
        channels = (2,) if args.smoke else (4,) if args.quick else (8, 8)
        model, model_desc = mg.CNN1D(channels=channels), f"CNN1D{channels} avg pooling"
    else:
        model, model_desc = mg.MLP(hidden=hidden), f"MLP{hidden}"
    data = mg.mnist1d(num_samples=1000, num_val=200) if args.smoke else mg.mnist1d()  # smoke: 600 training examples
    base = mg.TrainingProblem(model, optax.sgd(args.lr, momentum=0.9), data,
                              num_steps=num_steps, batch_size=args.batch_size, lr_schedule=None)
    eval_seeds = tuple(range(100, 100 + (2 if args.smoke else 3 if args.quick else args.eval_seeds)))
    saved_delta, saved_indices = poisoning.load_poison(args.poison) if args.poison else (None, None)
    report = poisoning.audit(base, fraction=0.025, eps=args.eps, meta_steps=meta_steps,
                             attack_seeds=tuple(range(attack_seeds)), seeds_per_step=seeds_per_step or None,
                             final_step_fraction=args.final_step_fraction, refine_steps=refine_steps,
                             eval_seeds=eval_seeds,
                             checkpoint_dir=checkpoint_dir, progress=not args.no_progress, choose=args.choose,
                             poison_delta=saved_delta, poison_indices=saved_indices)
    if args.poison is not None:
        report["poison_source"] = os.path.abspath(args.poison)
    drop = report["drop_points"]["MGD poison"]
    report["goal_met"] = bool(drop >= 10 and report["ratio_to_best_baseline"] >= 3)
    report["smoke"] = args.smoke
    report["model"] = (f"{model_desc}, SGD momentum 0.9, LR {args.lr}, batch {args.batch_size}, "
                       f"{num_steps} steps")
    poisoning.write_audit_report(report, args.out)
    print(poisoning.audit_table(report))
    print(f"MGD drop {drop:.1f} points, {report['ratio_to_best_baseline']:.2f}x the best baseline; "
          f"goal (>= 10 points and >= 3x): {'met' if report['goal_met'] else 'NOT met'}"
          + (" (smoke run: sizes too small for the goal to mean anything)" if args.smoke else ""))
    print(f"wrote {args.out}/report.json and poisoning.png")


if __name__ == "__main__":
    main()
