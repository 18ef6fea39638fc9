"""Reverse-over-reverse vs forward-over-reverse differentiation of the step's inner gradient.

    python experiments/benchmarks/inner_grad_modes.py
    python experiments/benchmarks/inner_grad_modes.py --steps 2000 --hidden 1024 1024
    python experiments/benchmarks/inner_grad_modes.py --smoke    # smallest sizes, a pipeline check

Same problem as ``replay_vs_peers.py`` (MLP 40-256-256-10 on MNIST-1D, batch 128,
momentum SGD, metagradient of test loss w.r.t. a per-step LR and per-example
data weights), built with ``TrainingProblem(inner_grad="reverse")`` and with
``inner_grad="forward_over_reverse"`` (:func:`replay.mixed_mode_grad`, Kemaev et
al., ICML 2025). In one process, alternating the two modes on every repeat, it
times: a forward step, a 16-step REPLAY leaf (recompute + step VJPs), and a whole
REPLAY metagradient (k = 16); the table gives each mode's best time and the
ratio forward-over-reverse / reverse, and checks the two metagradients agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="T of the whole-metagradient row")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--leaf", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes that run every row (tests): --steps 160 --hidden 8 --leaf 4, 1 repeat")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "inner_grad_modes.json"))
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.hidden, args.leaf, args.repeats = 160, [8], 4, 1
    if args.steps < 100 + 10 * args.leaf:
        parser.error(f"--steps must be at least 100 + 10 x --leaf = {100 + 10 * args.leaf} (the timed forward steps "
                     f"and leaves start at step 100), got {args.steps}")

    import jax
    import jax.numpy as jnp

    import replay
    from metagrad.report import format_table, write_json
    from metagrad import workloads
    from replay.trees import partition

    base = workloads.mnist1d_mlp(args.steps, args.hidden)
    problems = {mode: dataclasses.replace(base, inner_grad=mode) for mode in ("reverse", "forward_over_reverse")}
    meta = base.init_meta()
    start = replay.advance(base.step, base.init_state(), meta, 0, 100)
    ct_state = jax.tree.map(jnp.ones_like, partition(start)[0])
    ct_meta = jax.tree.map(jnp.zeros_like, partition(meta)[0])

    def calls(problem):
        return {
            f"{args.leaf * 10} forward steps": lambda: replay.advance(problem.step, start, meta, 100,
                                                                              100 + 10 * args.leaf),
            f"10 leaves of {args.leaf} steps": lambda: [
                replay.compiled.backprop_leaf(problem.step, args.leaf, start, meta, 100, args.leaf, ct_state, ct_meta)
                for _ in range(10)],
            f"metagradient T={args.steps} (k=16)": lambda: problem.value_and_metagrad(meta, k=16),
        }

    table = {mode: calls(p) for mode, p in problems.items()}
    outputs = {mode: {name: jax.block_until_ready(fn()) for name, fn in fns.items()} for mode, fns in table.items()}
    times = {mode: {name: [] for name in fns} for mode, fns in table.items()}
    for _ in range(args.repeats):
        for mode, fns in table.items():
            for name, fn in fns.items():
                tic = time.perf_counter()
                jax.block_until_ready(fn())
                times[mode][name].append(time.perf_counter() - tic)

    name = f"metagradient T={args.steps} (k=16)"
    g_rev, g_mix = outputs["reverse"][name][1], outputs["forward_over_reverse"][name][1]
    agreement = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_mix)))
    rows = []
    for name in table["reverse"]:
        rev, mix = min(times["reverse"][name]), min(times["forward_over_reverse"][name])
        rows.append([name, rev, mix, mix / rev])
    print(format_table(["call", "reverse s", "fwd-over-rev s", "ratio"], rows))
    print(f"max relative difference of the two metagradients: {agreement:.2e}")
    write_json(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "devices": str(jax.devices()),
                          "hidden": args.hidden, "steps": args.steps, "leaf": args.leaf, "repeats": args.repeats,
                          "smoke": args.smoke,
                          "rows": [dict(zip(["call", "reverse_s", "forward_over_reverse_s", "ratio"], r)) for r in rows],
                          "times": times, "metagradient_max_relative_difference": agreement})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
