"""A 2.5% MGD poisoning audit on several data sets with one set of defaults, against same-budget baselines.

    python experiments/data_poisoning.py [--data mnist1d fashion_mnist PATH.npz ...] [--model mlp|cnn]
                                         [--out experiments/results/data_poisoning] [--smoke]

Each data set runs ``metagrad.apps.poisoning.run_on_data`` (what ``metagrad audit-poison`` runs) with the
defaults of ``PoisonAttack`` unchanged (L-inf radius 2 feature scales, per-feature valid range, influence
choice of the inputs, 60 + 40 signed meta-steps over fresh training seeds, retraining on 10 fresh seeds) into
``<out>/<data set>_<model>/`` (its own resumable store, result.json, PNG and the poison); this script adds
``<out>/summary.json``, ``<out>/poisoning.png`` and a table. A data set that is not in this repository:
``experiments/datasets/sklearn_digits.py`` writes scikit-learn's digits as an npz.
"""

from __future__ import annotations

import os

from metagrad.apps import poisoning as app
from metagrad.apps.common import data_set_folder, data_sets_parser, goals_line
from metagrad.report import format_table, pyplot, write_json


def main():
    parser = data_sets_parser(__doc__, os.path.join(os.path.dirname(__file__), "results", "data_poisoning"), "audit-poison")
    parser.add_argument("--num-steps", type=int, default=500)
    args = parser.parse_args()
    if args.num_steps < 1:
        parser.error("--num-steps must be >= 1")
    datasets = ["mnist1d"] if args.smoke else args.data
    reports = {}
    for data in datasets:
        name, folder = data_set_folder(data, args.out, args.model)
        print(f"== {data} ({args.model}) -> {folder}")
        reports[name] = app.run_on_data(data, folder, model=args.model, num_steps=args.num_steps, smoke=args.smoke,
                                        fresh=args.fresh, progress=not args.no_progress)
        print(app.audit_table(reports[name]))

    summary = {"model": args.model, "num_steps": args.num_steps, "smoke": args.smoke,
               "attack": next(iter(reports.values()))["attack"],
               "data_sets": {name: {key: r[key] for key in ("data", "dataset", "methods", "drop_points",
                                                           "drop_points_sem", "best_baseline",
                                                           "ratio_to_best_baseline", "goals", "attack_seconds")}
                             for name, r in reports.items()}}
    write_json(os.path.join(args.out, "summary.json"), summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], reports.items()):
        names = list(r["methods"])
        ax.bar(range(len(names)), [r["methods"][n]["test_accuracy"] for n in names],
               yerr=[r["methods"][n]["test_accuracy_std"] for n in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(title=f"{name}: MGD -{r['drop_points']['mgd']:.1f} points ({r['ratio_to_best_baseline']:.1f}x)",
               ylabel="test accuracy (fresh seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "poisoning.png"), dpi=120)

    rows = []
    for name, r in reports.items():
        for method, m in r["methods"].items():
            drop = "-" if method == "clean" else f"{r['drop_points'][method]:.1f} ± {r['drop_points_sem'][method]:.1f}"
            rows.append((name, method, f"{m['test_accuracy']:.4f} ± {m['test_accuracy_std']:.4f}",
                         f"{m['test_loss']:.4f}", drop))
    print(format_table(("data", "training set", "test acc", "test loss", "drop (points)"), rows))
    for name, r in reports.items():
        print(f"{name}: MGD {r['ratio_to_best_baseline']:.2f}x the best baseline ({r['best_baseline']}); "
              + goals_line(r["goals"], args.smoke))
    print(f"wrote {args.out}/summary.json and poisoning.png")


if __name__ == "__main__":
    main()
