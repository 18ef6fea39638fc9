"""A 100,000-step exact metagradient under a 256 MB budget for stored states.

    python experiments/benchmarks/replay_long_run.py [--steps 100000] [--budget-mb 256] [--storage device|host|disk]
    python experiments/benchmarks/replay_long_run.py --smoke    # smallest sizes, a pipeline check

Problem as in replay_vs_peers.py (MLP 40-256-256-10, MNIST-1D, batch 128,
momentum SGD, metagradient of test loss w.r.t. per-step LR and per-example
weights). REPLAY derives k from the budget and the measured state size; the
run reports wall time (as a ratio to a plain training run), peak resident
memory, and the plan's recomputation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--budget-mb", type=float, default=256)
    parser.add_argument("--storage", choices=("device", "host", "disk"), default="device")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every stage (tests): --steps 300 --budget-mb 8")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "replay_long_run.json"))
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.budget_mb = 300, 8.0  # 13 states of the 0.6 MB state; REPLAY needs 11
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax
    import numpy as np

    import replay
    from metagrad import workloads

    problem = workloads.mnist1d_mlp(args.steps)
    meta, state0 = problem.init_meta(), problem.init_state()
    budget = int(args.budget_mb * 2**20)
    state_bytes = replay.tree_bytes(state0)
    storage = {"device": replay.Storage(),
               "host": replay.Storage(device_bytes=budget // 8),
               "disk": replay.Storage(device_bytes=budget // 8, host_bytes=budget // 8,
                                      directory=tempfile.mkdtemp(prefix="replay_long_run_"))}[args.storage]
    strategy = replay.Replay(memory_budget_bytes=budget, storage=storage)
    k, leaf = strategy.resolve(args.steps, state0)
    stats = replay.simulate(replay.kary_plan(args.steps, k, leaf), args.steps, leaf_size=leaf)[0]
    jax.block_until_ready(problem.train(meta))  # compile
    tic = time.perf_counter()
    jax.block_until_ready(problem.train(meta))
    train_s = time.perf_counter() - tic
    tic = time.perf_counter()
    value, grad = problem.value_and_metagrad(meta, strategy=strategy)
    jax.block_until_ready(grad)
    replay_s = time.perf_counter() - tic
    result = {
        "machine": platform.platform(), "num_steps": args.steps, "budget_bytes": budget, "storage": args.storage,
        "state_bytes": state_bytes, "k": k, "leaf_size": leaf, "peak_live_states": stats.peak_live_states,
        "stored_state_bytes": stats.peak_live_states * state_bytes, "step_evaluations": stats.total_step_evaluations,
        "train_seconds": train_s, "replay_seconds_incl_compile": replay_s, "ratio_to_train": replay_s / train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "value": float(value),
        "grad_finite": bool(all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad))),
        "smoke": args.smoke,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
