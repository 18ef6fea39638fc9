"""Data selection by MGD on MNIST-1D with 30% of training labels flipped.

    python experiments/data_selection.py [--quick | --smoke] [--out experiments/results/data_selection]

MGD optimizes one weight per training example against a clean validation set;
the top 70% by weight are kept and fresh models (3 seeds) are trained on them.
Baselines: full data, a random subset of the same size, small-loss filtering.
The flipped-label mask is used only to report what each selection removed.
MGD checkpoints every meta-step under <out>/mgd_checkpoints and a rerun
resumes there (--fresh starts over).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import optax

import metagrad as mg
from metagrad.apps import data_selection as app
from metagrad.mgd import checkpoint_folder, run_settings
from metagrad.report import format_table, pyplot, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage (a pipeline check for tests; no goal is judged)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data_selection"))
    parser.add_argument("--meta-steps", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--fresh", action="store_true", help="discard the MGD checkpoints in --out/mgd_checkpoints")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        num_steps, meta_steps, hidden, seeds = 20, 2, (8,), (0,)
    elif args.quick:
        num_steps, meta_steps, hidden, seeds = 100, 5, (32,), (0, 1)
    else:
        num_steps, meta_steps, hidden, seeds = 500, args.meta_steps, (64, 64), (0, 1, 2)
    data = mg.mnist1d(num_samples=1000, num_val=200) if args.smoke else mg.mnist1d()  # smoke: 600 training examples
    noisy, flipped = app.flip_labels(data, args.noise, seed=0)
    base = mg.TrainingProblem(mg.MLP(hidden=hidden), optax.sgd(0.03, momentum=0.9), noisy, num_steps=num_steps,
                              lr_schedule=None)
    checkpoint_dir = checkpoint_folder(args.out, fresh=args.fresh, settings=run_settings(args))
    out = app.select_data(base, noisy, flipped, keep_fraction=args.keep, meta_steps=meta_steps, seeds=seeds,
                          meta_optimizer=optax.adam(0.05), checkpoint_dir=checkpoint_dir, progress=not args.no_progress)
    methods = out["methods"]
    mgd_mean = np.mean(methods["MGD selection"]["test_accuracy"])
    baselines = max(np.mean(m["test_accuracy"]) for name, m in methods.items() if name != "MGD selection")
    report = {"setting": {"noise": args.noise, "keep_fraction": args.keep, "num_steps": num_steps,
                          "meta_steps": meta_steps, "seeds": list(seeds), "model": f"MLP{hidden}"},
              **out, "goal_met": bool(mgd_mean > baselines), "smoke": args.smoke}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "result.json"), report)

    rows = []
    for name, m in methods.items():
        acc = np.asarray(m["test_accuracy"])
        rows.append((name, m["kept"], f"{acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f}",
                     f"{np.mean(m['test_loss']):.4f}", f"{m['flipped_removed_fraction']:.3f}"))
    print(format_table(("method", "kept", "test acc (mean ± sd)", "test loss", "flipped removed"), rows))
    print(f"mean MGD weight: flipped {out['mean_weight_flipped']:.3f}, clean {out['mean_weight_clean']:.3f}")
    print(f"goal (MGD subset above every baseline): {'met' if report['goal_met'] else 'NOT met'}"
          + (" (smoke run: sizes too small for the goal to mean anything)" if args.smoke else ""))

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    weights = np.asarray(out["weights"])
    bins = np.linspace(0, 1, 31)
    ax1.hist(weights[~flipped], bins=bins, alpha=0.7, label="clean labels")
    ax1.hist(weights[flipped], bins=bins, alpha=0.7, label="flipped labels")
    ax1.set(xlabel="learned data weight", ylabel="examples", title="MGD data weights")
    ax1.legend()
    names = list(methods)
    means = [np.mean(methods[n]["test_accuracy"]) for n in names]
    errs = [np.std(methods[n]["test_accuracy"], ddof=1) if len(seeds) > 1 else 0 for n in names]
    ax2.bar(range(len(names)), means, yerr=errs, capsize=4)
    ax2.set_xticks(range(len(names)), names, rotation=15)
    ax2.set(ylabel="test accuracy", title=f"{len(seeds)} fresh training seeds", ylim=(min(means) - 0.05, max(means) + 0.03))
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "data_selection.png"), dpi=120)
    print(f"wrote {args.out}/result.json and data_selection.png")


if __name__ == "__main__":
    main()
