"""MGD on a learning-rate schedule vs a grid of 30 standard schedules, on several data sets with one set of defaults.

    python experiments/lr_schedule.py [--data mnist1d fashion_mnist PATH.npz ...] [--model mlp|cnn]
                                      [--out experiments/results/lr_schedule] [--smoke]

Each data set runs ``metagrad.apps.lr_schedule.run_on_data`` (what ``metagrad lr-schedule`` runs) with the
defaults of ``ScheduleSearch`` unchanged, into ``<out>/<data set>/`` (its own resumable store, result.json and
PNG); this script adds ``<out>/summary.json``, ``<out>/lr_schedule.png`` and a table. A data set that is not in
this repository: ``experiments/datasets/sklearn_digits.py`` writes scikit-learn's digits as an npz.
"""

from __future__ import annotations

import os

import numpy as np

from metagrad.apps import lr_schedule as app
from metagrad.apps.common import data_set_folder, data_sets_parser, goals_line
from metagrad.report import format_table, pyplot, write_json


def main():
    parser = data_sets_parser(__doc__, os.path.join(os.path.dirname(__file__), "results", "lr_schedule"), "lr-schedule")
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
        print(app.report_table(reports[name]))

    summary = {"model": args.model, "num_steps": args.num_steps, "smoke": args.smoke,
               "search": next(iter(reports.values()))["search"],
               "data_sets": {name: {"data": r["data"], "dataset": r["dataset"], "methods": r["methods"],
                                    "goals": r["goals"], "best_grid": r["best_grid"],
                                    "learned_knots": r["learned_knots"], "mgd_answer": r["mgd_answer"],
                                    "cost_in_training_runs": r["cost_in_training_runs"], "seconds": r["seconds"]}
                             for name, r in reports.items()}}
    write_json(os.path.join(args.out, "summary.json"), summary)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], reports.items()):
        T = len(r["learned_schedule"])
        best = r["best_grid"]
        ax.plot(np.arange(T), app.schedule(best["family"], best["peak"], best["warmup_fraction"], T),
                label=f"best grid ({best['family']} {best['peak']})")
        ax.plot(np.arange(T), r["learned_schedule"], label="MGD")
        m, g = r["methods"]["mgd"], r["methods"]["best_grid"]
        ax.set(title=f"{name}: test loss {m['test_loss']:.3f} (MGD) vs {g['test_loss']:.3f}", xlabel="step",
               ylabel="learning rate", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_schedule.png"), dpi=120)

    rows = []
    for name, r in reports.items():
        for method in ("mgd", "best_grid", "initial"):
            m = r["methods"][method]
            rows.append((name, method, f"{m['val_loss']:.4f} ± {m['val_loss_std']:.4f}",
                         f"{m['test_loss']:.4f} ± {m['test_loss_std']:.4f}", f"{m['test_accuracy']:.4f}"))
    print(format_table(("data", "schedule", "val loss", "test loss", "test acc"), rows))
    for name, r in reports.items():
        print(f"{name}: " + goals_line(r["goals"], args.smoke))
    print(f"wrote {args.out}/summary.json and lr_schedule.png")


if __name__ == "__main__":
    main()
