"""MGD data selection under label noise vs full data, random, small-loss and gradient-similarity subsets,
on several data sets with one set of defaults.

    python experiments/data_selection.py [--data mnist1d fashion_mnist PATH.npz ...] [--label-noise 0.3]
                                         [--out experiments/results/data_selection] [--smoke]

Each data set runs ``metagrad.apps.data_selection.run_on_data`` (what ``metagrad select-data`` runs) with the
defaults of ``SubsetSearch`` unchanged, into ``<out>/<data set>_<model>/`` (its own resumable store,
result.json and PNG); this script adds ``<out>/summary.json`` and a table.
"""

from __future__ import annotations

import os

from metagrad.apps import data_selection as app
from metagrad.apps.common import data_set_folder, data_sets_parser, goals_line
from metagrad.report import format_table, write_json


def main():
    parser = data_sets_parser(__doc__, os.path.join(os.path.dirname(__file__), "results", "data_selection"), "select-data")
    parser.add_argument("--label-noise", type=float, default=0.3)
    args = parser.parse_args()
    if not 0 <= args.label_noise < 1:
        parser.error("--label-noise must be in [0, 1)")
    reports = {}
    for data in ["mnist1d"] if args.smoke else args.data:
        name, folder = data_set_folder(data, args.out, args.model)
        print(f"== {data} ({args.model}, {args.label_noise:.0%} labels flipped) -> {folder}")
        reports[name] = app.run_on_data(data, folder, label_noise=args.label_noise, model=args.model,
                                        smoke=args.smoke, fresh=args.fresh, progress=not args.no_progress)
        print(app.report_table(reports[name]))

    keys = ("data", "dataset", "methods", "goals", "kept", "mgd_answer", "mean_weight_flipped", "mean_weight_clean",
            "seconds")
    summary = {"model": args.model, "label_noise": args.label_noise, "smoke": args.smoke,
               "search": next(iter(reports.values()))["search"],
               "data_sets": {name: {k: r[k] for k in keys} for name, r in reports.items()}}
    write_json(os.path.join(args.out, "summary.json"), summary)
    rows = [(name, app.LABELS[method], f"{m['test_accuracy']:.4f} ± {m['test_accuracy_std']:.4f}",
             f"{m['test_loss']:.4f}", f"{m.get('flipped_removed_fraction', 0):.3f}")
            for name, r in reports.items() for method, m in r["methods"].items()]
    print(format_table(("data", "subset", "test acc", "test loss", "flipped removed"), rows))
    for name, r in reports.items():
        print(f"{name}: " + goals_line(r["goals"], args.smoke))
    print(f"wrote {args.out}/summary.json (and each data set's result.json and data_selection.png)")


if __name__ == "__main__":
    main()
