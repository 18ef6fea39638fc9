"""How the training set's size reaches the compiled programs: first-metagradient time and memory at N examples.

Each size runs in its own process, so its resident memory is its own. For every
N (default 3,000 and 60,000 inputs of 784 features, an MLP 784-64-10, SGD with
momentum, a 5-knot LR schedule, T steps) it records:

* ``first_metagrad_s``: wall time of the first ``value_and_metagrad`` (compilation included);
* ``rss_growth_mb``: resident memory after it, less the memory before the data was made;
* ``data_mb``: the training inputs' own size, and ``rss_growth_per_data_mb``;
* ``device_peak_mb``: the device's peak bytes in use where the backend reports it.

    python experiments/benchmarks/data_size.py                 # 3k and 60k
    python experiments/benchmarks/data_size.py --quick         # 300 and 3k, a few steps
    python experiments/benchmarks/data_size.py --smoke         # 200 and 1k, 4 steps: a pipeline check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

FEATURES = 784


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(num_examples: int, num_steps: int) -> dict:
    import jax
    import numpy as np
    import optax

    import metagrad as mg

    before = _rss_mb()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples + 2000, FEATURES)).astype(np.float32)
    y = rng.integers(0, 10, num_examples + 2000).astype(np.int32)
    data = mg.Dataset(x[:num_examples], y[:num_examples], x[-2000:-1000], y[-2000:-1000], x[-1000:], y[-1000:],
                      num_classes=10, name=f"random{num_examples}")
    del x, y
    problem = mg.TrainingProblem(
        mg.MLP(hidden=(64,)), optax.inject_hyperparams(optax.sgd)(learning_rate=0.05, momentum=0.9), data,
        num_steps=num_steps, batch_size=128, lr_schedule=mg.LRSchedule(5, 0.05))
    meta = problem.init_meta()
    tic = time.perf_counter()
    jax.block_until_ready(problem.value_and_metagrad(meta, k=8))
    first = time.perf_counter() - tic
    after = _rss_mb()
    stats = jax.devices()[0].memory_stats() or {}
    data_mb = num_examples * FEATURES * 4 / 2**20
    return {"num_examples": num_examples, "features": FEATURES, "num_steps": num_steps,
            "first_metagrad_s": first, "rss_before_mb": before, "rss_after_mb": after,
            "rss_growth_mb": after - before, "data_mb": data_mb,
            "rss_growth_per_data_mb": (after - before) / data_mb,
            "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 60000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="300 and 3,000 examples, 20 steps")
    parser.add_argument("--smoke", action="store_true",
                        help="200 and 1,000 examples, 4 steps: a pipeline check (tests)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "data_size.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    sizes, steps = ([200, 1000], 4) if args.smoke else ([300, 3000], 20) if args.quick else (args.sizes, args.steps)
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--steps", str(steps)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"the worker for N={n} failed (exit status {out.returncode}); its output is above")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"N={n:>6}  first metagradient {r['first_metagrad_s']:6.2f} s   RSS growth {r['rss_growth_mb']:7.1f} MB"
              f"   data {r['data_mb']:6.1f} MB   growth/data {r['rss_growth_per_data_mb']:5.2f}", flush=True)
    small, large = rows[0], rows[-1]
    extra = (large["rss_growth_mb"] - small["rss_growth_mb"]) / max(large["data_mb"] - small["data_mb"], 1e-9)
    summary = {"extra_rss_per_extra_data_mb": extra,
               "first_metagrad_ratio": large["first_metagrad_s"] / small["first_metagrad_s"]}
    print(f"growing the data by {large['data_mb'] - small['data_mb']:.1f} MB grew RSS by "
          f"{extra:.2f} MB per MB; first metagradient {summary['first_metagrad_ratio']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "summary": summary, "smoke": args.smoke}, f, indent=1)


if __name__ == "__main__":
    main()
