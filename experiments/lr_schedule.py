"""MGD on a learning-rate schedule vs a grid search over standard schedules (MNIST-1D).

    python experiments/lr_schedule.py [--quick | --smoke] [--out experiments/results/lr_schedule]

Starts MGD from a deliberately poor flat schedule; both methods pick their
schedule by validation loss and are reported on the untouched test split.
MGD checkpoints every meta-step under <out>/mgd_checkpoints and a rerun
resumes there (--fresh starts over).
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np
import optax

import metagrad as mg
from metagrad.apps import lr_schedule as app
from metagrad.mgd import checkpoint_folder, run_settings
from metagrad.report import format_table, pyplot, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage, 3 grid schedules (a pipeline check for tests; "
                             "no goal is judged)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lr_schedule"))
    parser.add_argument("--meta-steps", type=int, default=50)
    parser.add_argument("--fresh", action="store_true", help="discard the MGD checkpoints in --out/mgd_checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    grid = None  # app.default_grid()
    if args.smoke:
        num_steps, knots, meta_steps, hidden = 20, 4, 2, (8,)
        grid = app.default_grid(peaks=(0.05,), warmups=(0.25,))  # one schedule of each family
    elif args.quick:
        num_steps, knots, meta_steps, hidden = 100, 10, 6, (32,)
    else:
        num_steps, knots, meta_steps, hidden = 500, 12, args.meta_steps, (64, 64)
    problem = mg.TrainingProblem(mg.MLP(hidden=hidden),
                                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9),
                                 mg.mnist1d(num_samples=1000, num_val=200) if args.smoke else mg.mnist1d(),
                                 num_steps=num_steps, lr_schedule=mg.LRSchedule(knots, 0.003))
    tic = time.perf_counter()
    grid = app.grid_search(problem, grid, progress=not args.no_progress)
    grid_seconds = time.perf_counter() - tic
    checkpoint_dir = checkpoint_folder(args.out, fresh=args.fresh, settings=run_settings(args))
    mgd_result = app.optimize_lr_schedule(problem, meta_steps=meta_steps, meta_optimizer=optax.adam(0.01),
                                          checkpoint_dir=checkpoint_dir, progress=not args.no_progress)
    unit = mgd_result["seconds_per_training_run"]
    best = grid[0]
    report = {
        "problem": {"model": f"MLP{hidden}", "num_steps": num_steps, "knots": knots, "optimizer": "SGD momentum 0.9"},
        "grid": grid, "grid_size": len(grid), "grid_seconds": grid_seconds,
        "grid_cost_runs": grid_seconds / unit, "mgd_cost_runs": mgd_result["mgd_seconds"] / unit,
        "best_grid": best, **mgd_result,
        "goal_met": mgd_result["final"]["test_loss"] <= best["test_loss"], "smoke": args.smoke,
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "result.json"), report)

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(num_steps)
    learned = np.asarray(problem.lr_schedule.values(jnp.asarray(mgd_result["learned_knots"]), num_steps))
    ax1.plot(steps, app.schedule(best["family"], best["peak"], best["warmup_fraction"], num_steps),
             label=f"best grid ({best['family']}, peak {best['peak']})")
    ax1.plot(steps, learned, label="MGD")
    ax1.plot(steps, np.full(num_steps, mgd_result["initial_knots"][0]), label="MGD start", ls=":")
    ax1.set(xlabel="training step", ylabel="learning rate", title="Schedules")
    ax1.legend()
    ax2.plot([h["objective"] for h in mgd_result["history"]], label="MGD (val loss at each meta-step)")
    ax2.axhline(best["val_loss"], color="k", ls="--", label="best of grid (val loss)")
    ax2.set(xlabel="meta-step", ylabel="validation loss", title="MGD vs grid")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_schedule.png"), dpi=120)

    rows = [("MGD start (flat)", mgd_result["initial"]["val_loss"], mgd_result["initial"]["test_loss"],
             mgd_result["initial"]["test_accuracy"], "-"),
            (f"best grid of {len(grid)}", best["val_loss"], best["test_loss"], best["test_accuracy"],
             f"{report['grid_cost_runs']:.1f}"),
            (f"MGD, {meta_steps} meta-steps", mgd_result["final"]["val_loss"], mgd_result["final"]["test_loss"],
             mgd_result["final"]["test_accuracy"], f"{report['mgd_cost_runs']:.1f}")]
    print(format_table(("schedule", "val loss", "test loss", "test acc", "cost (runs)"), rows))
    print(f"goal (MGD test loss <= best grid test loss): {'met' if report['goal_met'] else 'NOT met'}"
          + (" (smoke run: sizes too small for the goal to mean anything)" if args.smoke else ""))
    print(f"wrote {args.out}/result.json and lr_schedule.png")


if __name__ == "__main__":
    main()
