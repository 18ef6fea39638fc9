"""What an adaptation costs: wall time of its compiled program and XLA's memory analysis of it.

The figures HyperFlow is judged by (arXiv 2504.15323 reports its adaptation at
a small fraction of fine-tuning's memory and compute): every adaptation method
is jit-compiled once, timed over single episodes, and its memory read from the
compiled program (``temp + output`` bytes: what the call allocates beyond its
inputs; ``argument`` bytes: its inputs).
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np


def compiled_cost(fn, calls) -> dict:
    """Wall time of jitted ``fn`` over the argument tuples ``calls`` (compiled and warmed up on the first) and XLA's
    memory analysis of that program.

    Returns ``seconds_median``, ``seconds_mean``, ``first_call_seconds``
    (compilation included), ``alloc_bytes`` (``temp + output``: activations,
    gradients, intermediate parameters), ``argument_bytes`` and ``peak_bytes``
    (their sum).
    """
    jitted = jax.jit(fn)
    mem = jitted.lower(*calls[0]).compile().memory_analysis()
    tic = time.perf_counter()
    jax.block_until_ready(jitted(*calls[0]))
    first_call = time.perf_counter() - tic
    times = []
    for call in calls:
        call = jax.device_put(call)
        tic = time.perf_counter()
        jax.block_until_ready(jitted(*call))
        times.append(time.perf_counter() - tic)
    return {"seconds_median": float(np.median(times)), "seconds_mean": float(np.mean(times)),
            "first_call_seconds": first_call, "alloc_bytes": int(mem.temp_size_in_bytes + mem.output_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "peak_bytes": int(mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes)}


def cost_per_episode(fn, args, tasks, num_timed: int) -> dict:
    """:func:`compiled_cost` of one single-episode call ``fn(*args, support_x, support_y)``, timed over
    ``num_timed`` episodes of ``tasks`` (``{"support_x", "support_y"}``, leading axis: episodes)."""
    sx, sy = tasks["support_x"], tasks["support_y"]
    return compiled_cost(fn, [(*args, sx[i % len(sx)], sy[i % len(sy)]) for i in range(num_timed)])


def best_cost(fn, args, tasks, num_timed: int, convolutions=None) -> dict:
    """:func:`cost_per_episode`, or with ``convolutions`` (names of
    :data:`metagrad.hyperflow.bias.CONVOLUTIONS`) that of ``fn(..., convolution=name)`` for each name, every figure
    the best of them (each method timed at its fastest and its memory at its leanest), the figures of each under
    ``"by_convolution"``."""
    if not convolutions:
        return cost_per_episode(fn, args, tasks, num_timed)
    per = {name: cost_per_episode(functools.partial(fn, convolution=name), args, tasks, num_timed)
           for name in convolutions}
    best = {k: min(c[k] for c in per.values()) for k in next(iter(per.values()))}
    return {**best, "by_convolution": per}
