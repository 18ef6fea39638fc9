"""MGD on the transformer language model's learning-rate schedule vs a grid of 30 standard schedules (AdamW).

    python experiments/lm_schedule.py --corpus DIR [--config small] [--num-steps N] [--seq-len L]
                                      [--target-domain DOMAIN] [--out experiments/results/lm_schedule]
                                      [--quick | --smoke] [--fresh]

Runs ``metagrad.lm.run_lm_schedule`` (Engstrom et al., arXiv 2503.13751, Sec. 5.3): the corpus built by
``metagrad corpus build --out DIR``, every domain trained on, clip + AdamW whose learning rate the schedule
sets; ``--out`` is the run's resumable store and gets ``result.json`` and ``lr_schedule.png``. ``--quick``:
fewer steps and meta-steps, into ``<out>_quick`` unless ``--out`` is given; ``--smoke``: every stage at the
smallest size (on a small synthetic corpus unless ``--corpus`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from metagrad.apps import lr_schedule as app
from metagrad.apps.common import goals_line
from metagrad.lm import schedule as lm_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "lm_schedule")
QUICK = {"num_steps": 150, "search": dataclasses.replace(lm_schedule.LM_SEARCH, meta_steps=10)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="a corpus folder built by `metagrad corpus build --out DIR` "
                                         "(default ./metagrad_corpus; a smoke run without it uses a synthetic one)")
    parser.add_argument("--config", default="small", help="the transformer's named size (tiny, small, medium, large)")
    parser.add_argument("--num-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step, spread over the domains")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes the model reads per window")
    parser.add_argument("--target-domain", help="the domain whose validation loss MGD minimizes (default: all)")
    parser.add_argument("--out", help=f"the run's folder (default {os.path.relpath(DEFAULT_OUT)}, with --quick "
                                      "the same + _quick)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['num_steps']} steps, "
                                                             f"{QUICK['search'].meta_steps} meta-steps")
    parser.add_argument("--smoke", action="store_true", help="every stage at the smallest size (tests)")
    parser.add_argument("--fresh", action="store_true", help="discard an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num_steps < 1 or args.batch_size < 1 or args.seq_len < 1:
        parser.error("--num-steps, --batch-size and --seq-len must be >= 1")
    if args.quick and args.smoke:
        parser.error("give --quick or --smoke, not both")
    out = args.out or (DEFAULT_OUT + "_quick" if args.quick else DEFAULT_OUT)
    corpus = args.corpus if args.corpus or args.smoke else "metagrad_corpus"
    sizes = {"num_steps": args.num_steps, "search": lm_schedule.LM_SEARCH, **(QUICK if args.quick else {})}
    tic = time.perf_counter()
    report = lm_schedule.run_lm_schedule(corpus, out, config=args.config, batch_size=args.batch_size,
                                         seq_len=args.seq_len, target_domain=args.target_domain, smoke=args.smoke,
                                         fresh=args.fresh, progress=not args.no_progress, **sizes)
    best = report["best_grid"]
    print(f"{report['config']} transformer ({report['parameters']} parameters), {report['num_steps']} steps of "
          f"{report['batch_size']} x {report['seq_len']} bytes; objective: {report['objective']}")
    print(f"best of {len(report['grid'])} grid schedules: {best['family']}, peak {best['peak']}, warmup "
          f"{best['warmup_fraction']}; MGD's answer: {report['mgd_answer']} ({report['search']['meta_steps']} "
          "meta-steps)")
    print(app.report_table(report))
    print(goals_line(report["goals"], args.smoke))
    print(f"wrote {out}/result.json and lr_schedule.png ({time.perf_counter() - tic:.0f} s)")
    return report


if __name__ == "__main__":
    main()
