"""REPLAY against the other ways to get a metagradient through a training run, on one problem.

    python experiments/benchmarks/replay_vs_peers.py                       # T = 1,000 and 10,000
    python experiments/benchmarks/replay_vs_peers.py --steps 100000 --only replay16 binomial16
    python experiments/benchmarks/replay_vs_peers.py --smoke    # smallest sizes, a pipeline check

Problem (--workload, from metagrad.workloads): an MLP 40-256-256-10 on MNIST-1D, batch 128,
momentum SGD, metagradient of the test loss with respect to a per-step learning rate and
per-example data weights; or full-size Fashion-MNIST (50,000 training images) with an MLP
784-256-256-10 or the residual BatchNorm CNN, batch 256, the validation loss. Memory is read
three ways: peak process RSS, the bytes of the states each strategy stores, and (on an
accelerator) the device allocator's peak. Each strategy runs in its own process (peak resident memory is its
own, capped at --mem-cap-gb; a strategy that exceeds it is reported as out of
memory). Times are the best of --repeats calls after a compiling call, and are
given as ratios to a plain compiled training run of the same T.

Strategies: train (the unit), full unroll (jax.grad through lax.scan), per-step
remat (jax.checkpoint around the step in the scan), equinox's checkpointed
while loop (``equinox.internal.while_loop(kind="checkpointed")`` with as many
checkpoints as REPLAY k=16 keeps states), REPLAY (k-ary tree, k = 4 and 16),
and the binomial plan of the same engine at REPLAY's memory. The ``*_budget``
rows give each strategy the same state budget (--budget-mb, default 128 MB,
about a quarter of a training run's resident memory) the way a user would:
``Replay(memory_budget_bytes=...)`` picks k, ``Binomial(memory_budget_bytes=...)``
its checkpoints, and equinox gets as many checkpoints as REPLAY stores states.
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

STRATEGIES = ("train", "full", "remat", "equinox", "replay4", "replay16", "binomial4", "binomial16",
              "replay_budget", "binomial_budget", "equinox_budget")
# --smoke: the plain run, the k-ary plan and the budgeted binomial plan (a pipeline check, one worker process each;
# not equinox, an optional dependency: the [bench] extra)
SMOKE_STRATEGIES = ("train", "replay4", "binomial_budget")


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _equinox_value_and_grad(problem, checkpoints):
    import equinox.internal as eqxi
    import jax
    import jax.numpy as jnp

    T = problem.num_steps

    @jax.jit
    def value_and_grad(state0, meta):
        def run(meta):
            def body(carry):
                t, state = carry
                return t + 1, problem.step(state, meta, t)

            _, final = eqxi.while_loop(lambda c: c[0] < T, body, (jnp.int32(0), state0), max_steps=T,
                                       kind="checkpointed", checkpoints=checkpoints)
            return problem.objective(final, meta)

        return jax.value_and_grad(run)(meta)

    return value_and_grad


def worker(name: str, num_steps: int, repeats: int, budget_bytes: int, workload: str = "mnist1d_mlp") -> dict:
    import jax

    import replay

    from metagrad import workloads

    problem = workloads.WORKLOADS[workload](num_steps)
    meta, state0 = problem.init_meta(), problem.init_state()
    state_bytes = replay.tree_bytes(state0)
    k16 = replay.simulate(replay.kary_plan(num_steps, 16, 16), num_steps, leaf_size=16)[0]
    info = {"state_bytes": state_bytes}
    if name == "train":
        fn = lambda: problem.objective(problem.train(meta), meta)  # noqa: E731
        info.update(step_evaluations=num_steps, stored_states=1)
    elif name in ("full", "remat"):
        strategy = replay.FullUnroll() if name == "full" else replay.Remat()
        fn = lambda: problem.value_and_metagrad(meta, strategy=strategy)  # noqa: E731
        info.update(step_evaluations=num_steps * (1 if name == "full" else 2), stored_states=num_steps)
    elif name == "equinox":
        checkpoints = k16.peak_live_states
        vg = _equinox_value_and_grad(problem, checkpoints)
        fn = lambda: vg(state0, meta)  # noqa: E731
        info.update(stored_states=checkpoints)
    elif name.endswith("_budget"):
        budgeted = replay.Replay(memory_budget_bytes=budget_bytes)
        k, leaf = budgeted.resolve(num_steps, state0)
        kary = replay.simulate(replay.kary_plan(num_steps, k, leaf), num_steps, leaf_size=leaf)[0]
        if name == "equinox_budget":
            vg = _equinox_value_and_grad(problem, kary.peak_live_states)
            fn = lambda: vg(state0, meta)  # noqa: E731
            info.update(stored_states=kary.peak_live_states)
        else:
            strategy = budgeted if name == "replay_budget" else replay.Binomial(memory_budget_bytes=budget_bytes, leaf_size=leaf)
            stats = replay.simulate(strategy.plan(num_steps, state0)[0], num_steps, leaf_size=leaf)[0]
            fn = lambda: problem.value_and_metagrad(meta, strategy=strategy)  # noqa: E731
            info.update(step_evaluations=stats.total_step_evaluations, stored_states=stats.peak_live_states)
        info.update(k=k, leaf_size=leaf, budget_bytes=budget_bytes)
    elif name.startswith("replay"):
        k = int(name[len("replay"):])
        stats = replay.simulate(replay.kary_plan(num_steps, k, k), num_steps, leaf_size=k)[0]
        fn = lambda: problem.value_and_metagrad(meta, k=k)  # noqa: E731
        info.update(step_evaluations=stats.total_step_evaluations, stored_states=stats.peak_live_states)
    elif name.startswith("binomial"):
        k = int(name[len("binomial"):])
        kary = replay.simulate(replay.kary_plan(num_steps, k, k), num_steps, leaf_size=k)[0]
        strategy = replay.Binomial(checkpoints=max(kary.peak_live_states - 2 - k, 1), leaf_size=k)
        stats = replay.simulate(strategy.plan(num_steps, state0)[0], num_steps, leaf_size=k)[0]
        fn = lambda: problem.value_and_metagrad(meta, strategy=strategy)  # noqa: E731
        info.update(step_evaluations=stats.total_step_evaluations, stored_states=stats.peak_live_states)
    else:
        raise ValueError(name)
    baseline = _rss_mb()
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - tic
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - tic)
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU; an accelerator's allocator peak elsewhere
    return {"strategy": name, "num_steps": num_steps, "first_call_s": first, "seconds": min(times),
            "peak_rss_mb": _rss_mb(), "baseline_rss_mb": baseline, "workload": workload,
            "stored_state_bytes": info["stored_states"] * state_bytes,
            "device_peak_bytes": stats.get("peak_bytes_in_use"), "device": str(jax.devices()[0]), **info}


def _limit_memory(gb):
    def apply():
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return apply


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--only", nargs="+", choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget-mb", type=float, default=128.0, help="state budget of the *_budget rows")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "replay_vs_peers.json"))
    parser.add_argument("--smoke", action="store_true",
                        help=f"the smallest sizes (tests): --steps 40 --budget-mb 6 --repeats 1 --only "
                             f"{' '.join(SMOKE_STRATEGIES)} (unless --only is given)")
    parser.add_argument("--workload", default="mnist1d_mlp",
                        choices=("mnist1d_mlp", "fashion_mnist_mlp", "fashion_mnist_cnn"),
                        help="the problem (metagrad.workloads): the MNIST-1D MLP 256-256, or full-size Fashion-MNIST "
                             "with the MLP 256-256 or the residual BatchNorm CNN 16-32-64")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.budget_mb, args.repeats = [40], 6.0, 1  # 9 states of the 0.6 MB state; REPLAY needs 8
        args.only = args.only or list(SMOKE_STRATEGIES)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats,
                                                   int(args.budget_mb * 2**20), args.workload)))
        return
    names = args.only or STRATEGIES
    if "train" not in names:
        names = ("train",) + tuple(names)
    rows = []
    for T in args.steps:
        for name in names:
            tic = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", name, str(T), "--repeats", str(args.repeats),
                                   "--budget-mb", str(args.budget_mb), "--workload", args.workload],
                                  capture_output=True, text=True, preexec_fn=_limit_memory(args.mem_cap_gb))
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                oom = any(s in proc.stderr for s in ("RESOURCE_EXHAUSTED", "MemoryError", "bad_alloc", "Out of memory")) \
                    or proc.returncode in (-9, 137)
                rows.append({"strategy": name, "num_steps": T,
                             "error": f"out of memory (cap {args.mem_cap_gb} GB)" if oom else err[:200]})
            else:
                rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  {name} T={T}: {time.perf_counter() - tic:.0f}s in all", file=sys.stderr, flush=True)
    unit = {r["num_steps"]: r for r in rows if r["strategy"] == "train" and "error" not in r}
    header = (f"{'strategy':<16}{'T':>8}{'time s':>9}{'x train':>9}{'x remat':>9}{'step evals':>12}"
              f"{'states':>8}{'stored MB':>11}{'peak RSS MB':>13}{'x train':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['strategy']:<16}{r['num_steps']:>8}  {r['error']}")
            continue
        u = unit.get(r["num_steps"])
        remat = next((x for x in rows if x["strategy"] == "remat" and x["num_steps"] == r["num_steps"] and "error" not in x), None)
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
        print(f"{r['strategy']:<16}{r['num_steps']:>8}{r['seconds']:>9.2f}{ratio(r['seconds'], u and u['seconds']):>9}"
              f"{ratio(r['seconds'], remat and remat['seconds']):>9}{str(r.get('step_evaluations', '-')):>12}"
              f"{r['stored_states']:>8}{r['stored_state_bytes'] / 2**20:>11.1f}{r['peak_rss_mb']:>13.0f}"
              f"{ratio(r['peak_rss_mb'], u and u['peak_rss_mb']):>9}")
    from metagrad.report import write_json

    write_json(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "workload": args.workload,
                          "steps": args.steps,
                          "repeats": args.repeats, "budget_mb": args.budget_mb, "smoke": args.smoke, "rows": rows})
    print(f"wrote {args.out}")
    failed = [r for r in rows if "error" in r and not r["error"].startswith("out of memory")]
    if failed:  # a broken strategy fails the command (running out of memory under the cap is a result)
        sys.exit(f"{len(failed)} of {len(rows)} runs failed: "
                 + "; ".join(f"{r['strategy']} T={r['num_steps']}: {r['error']}" for r in failed))


if __name__ == "__main__":
    main()
