"""REPLAY vs a plain training run on the demo problem: wall time and peak memory, side by side.

Each configuration runs in its own process so its peak resident memory is its
own; the table gives times and memory as ratios to the plain training run of
the same T, measured in this one invocation.

    python experiments/benchmarks/replay_demo_problem.py            # T = 1,000 and 10,000
    python experiments/benchmarks/replay_demo_problem.py --steps 1000 --ks 4 16
    python experiments/benchmarks/replay_demo_problem.py --smoke    # smallest sizes, a pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def worker(kind: str, num_steps: int, k: int, repeats: int, smoke: bool = False) -> dict:
    import jax

    import replay
    from metagrad.demo import DemoConfig
    from metagrad import data as data_lib
    from metagrad.meta import LRSchedule
    from metagrad.models import MLP
    from metagrad.training import TrainingProblem
    import optax

    cfg = DemoConfig()
    problem = TrainingProblem(
        MLP(hidden=cfg.hidden), optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9),
        data_lib.mnist1d(num_samples=1000, num_val=200) if smoke else data_lib.mnist1d(), num_steps=num_steps,
        batch_size=cfg.batch_size, lr_schedule=LRSchedule(cfg.num_knots, 0.05),
    )
    meta = problem.init_meta()
    state0 = problem.init_state()
    baseline_mb = _rss_mb()
    if kind == "train":
        run = lambda: jax.block_until_ready(problem.objective(problem.train(meta), meta))  # noqa: E731
    else:
        run = lambda: jax.block_until_ready(problem.value_and_metagrad(meta, k=k))  # noqa: E731
    tic = time.perf_counter()
    run()
    first = time.perf_counter() - tic
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    out = {"kind": kind, "num_steps": num_steps, "k": k, "first_call_s": first, "seconds": min(times),
           "peak_rss_mb": _rss_mb(), "baseline_rss_mb": baseline_mb, "state_bytes": replay.tree_bytes(state0)}
    if kind == "replay":
        stats, _ = replay.simulate(replay.kary_plan(num_steps, k, k), num_steps, leaf_size=k)
        out.update(step_evaluations=stats.total_step_evaluations, peak_live_states=stats.peak_live_states)
    else:
        out.update(step_evaluations=num_steps, peak_live_states=1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "replay_demo_problem.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every row (tests): --steps 40 --ks 4 --repeats 1, 600 "
                             "training examples")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "T", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.ks, args.repeats = [40], [4], 1
    if args.worker:
        kind, T, k = args.worker
        print(json.dumps(worker(kind, int(T), int(k), args.repeats, args.smoke)))
        return
    rows = []
    for T in args.steps:
        for kind, k in [("train", 0)] + [("replay", k) for k in args.ks]:
            command = [sys.executable, __file__, "--worker", kind, str(T), str(k), "--repeats", str(args.repeats)]
            proc = subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"kind": kind, "num_steps": T, "k": k,
                             "error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  done {kind} T={T} k={k}: {rows[-1]['seconds']:.2f}s", file=sys.stderr)
    unit = {r["num_steps"]: r for r in rows if r["kind"] == "train" and "error" not in r}
    header = f"{'run':<14}{'T':>7}{'time s':>9}{'x train':>9}{'step evals':>12}{'live states':>12}{'peak RSS MB':>13}{'x train':>9}{'RSS-base MB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        name = "train" if r["kind"] == "train" else f"REPLAY k={r['k']}"
        if "error" in r:
            print(f"{name:<14}{r['num_steps']:>7}  failed: {r['error']}")
            continue
        u = unit.get(r["num_steps"])
        if u is None:  # the plain training run of this T failed: no ratios
            print(f"{name:<14}{r['num_steps']:>7}{r['seconds']:>9.2f}  (no training run to compare with)")
            continue
        print(f"{name:<14}{r['num_steps']:>7}{r['seconds']:>9.2f}{r['seconds'] / u['seconds']:>9.2f}"
              f"{r['step_evaluations']:>12}{r['peak_live_states']:>12}{r['peak_rss_mb']:>13.0f}"
              f"{r['peak_rss_mb'] / u['peak_rss_mb']:>9.2f}{r['peak_rss_mb'] - r['baseline_rss_mb']:>13.0f}")
    from metagrad.report import write_json

    write_json(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "steps": args.steps, "ks": args.ks,
                          "repeats": args.repeats, "smoke": args.smoke, "rows": rows})
    print(f"wrote {args.out}")
    failed = [r for r in rows if "error" in r]
    if failed:  # a broken configuration fails the command (after the others are written)
        sys.exit(f"{len(failed)} of {len(rows)} runs failed: "
                 + "; ".join(f"{r['kind']} T={r['num_steps']} k={r['k']}: {r['error']}" for r in failed))


if __name__ == "__main__":
    main()
