"""Cost of FGMT's permutation matching as the MLP widens (learning transfer, Chijiwa, ICLR 2024).

    python experiments/benchmarks/transfer_matching.py
    python experiments/benchmarks/transfer_matching.py --configs 128x40 256x20 512x10 [--paths linear]
    python experiments/benchmarks/transfer_matching.py --smoke    # smallest sizes, a pipeline check

For each ``WIDTHxT``: an MLP 40-W-W-10 on MNIST-1D trained 1,000 steps with SGD
0.05 from seed 0 (the source, recorded at T + 1 points) and a new init (seed 1);
FGMT transfers the trajectory (gradients on 2,048-example minibatches, as in
``experiments/learning_transfer.py``'s ``--grad-batch 2048``), once per matching
path (``tr.fgmt(path=...)``: the straight line and the recorded points, side by
side in one process). The table gives FGMT's wall time (after a
warm-up FGMT at T = 2 that compiles the gradient), the number of linear
assignments solved (scipy's ``linear_sum_assignment``, counted by the solver passed to ``tr.fgmt(assignment=...)``),
their share of the time, and the transferred model's zero-step test accuracy.
Run it at two commits to compare matching code (the accuracy must not change).
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main():
    from metagrad.transfer import FGMT_PATHS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["128x40", "256x20"], help="WIDTHxT pairs")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--paths", nargs="+", default=list(FGMT_PATHS), choices=FGMT_PATHS,
                        help="FGMT's matching paths to time (tr.fgmt's path)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every path (tests): --configs 16x4 --steps 40")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "transfer_matching.json"))
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.steps = ["16x4"], 40

    import jax
    import numpy as np
    import optax

    import metagrad as mg
    from metagrad import transfer as tr
    from metagrad.report import format_table, write_json
    from metagrad.trajectory import record_trajectory

    from scipy.optimize import linear_sum_assignment

    counter = {"calls": 0, "seconds": 0.0}

    def counted(cost, maximize=False):  # FGMT's assignment solver, passed in (``assignment=``), counted and timed
        tic = time.perf_counter()
        out = linear_sum_assignment(cost, maximize=maximize)
        counter["calls"] += 1
        counter["seconds"] += time.perf_counter() - tic
        return out

    data = mg.mnist1d(num_samples=1000, num_val=200) if args.smoke else mg.mnist1d()
    rows = []
    for config in args.configs:
        width, T = (int(v) for v in config.split("x"))

        def problem(seed):
            return mg.TrainingProblem(mg.MLP(hidden=(width, width)), optax.sgd(0.05), data, num_steps=args.steps,
                                      batch_size=128, seed=seed, lr_schedule=None)

        source_problem = problem(0)
        points = [int(s) for s in np.linspace(0, args.steps, T + 1)]
        source = record_trajectory(source_problem, {}, points)
        target_start = problem(1).init_state()["params"]
        spec = tr.permutation_spec(source.initial, apply_fn=source_problem.logits, x=data.x_val[:64])
        grad_fn = tr.problem_gradient(source_problem, batch_size=2048)
        accuracy = jax.jit(lambda p: source_problem.loss_and_accuracy(p, "test")[1])
        tr.fgmt(spec, source, target_start, grad_fn, num_points=3)  # compiles the gradient and the products
        for path in args.paths:
            counter.update(calls=0, seconds=0.0)
            tic = time.perf_counter()
            result = tr.fgmt(spec, source, target_start, grad_fn, path=path, assignment=counted)
            seconds = time.perf_counter() - tic
            rows.append({"width": width, "T": T, "path": path, "fgmt_seconds": seconds, "assignments": counter["calls"],
                         "assignment_seconds": counter["seconds"],
                         "zero_step_test_accuracy": float(accuracy(result.params)),
                         "final_objective": float(result.objective[-1])})
            print(f"width {width}, T {T}, path {path}: {seconds:.1f} s", flush=True)
    print(format_table(("width", "T", "path", "FGMT (s)", "assignments", "in assignment", "zero-step acc"),
                       [(r["width"], r["T"], r["path"], f"{r['fgmt_seconds']:.1f}", r["assignments"],
                         f"{100 * r['assignment_seconds'] / r['fgmt_seconds']:.0f}%",
                         f"{r['zero_step_test_accuracy']:.3f}") for r in rows]))
    write_json(args.out, {"rows": rows, "steps": args.steps, "smoke": args.smoke, "machine": platform.platform(),
                          "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
