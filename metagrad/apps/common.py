"""Pieces the applications share: timing a training run, averaging metagradients over seeds."""

from __future__ import annotations

import time

import jax


def seconds_per_training_run(problem, meta, repeats: int = 2) -> float:
    """Wall time of one compiled training run of ``problem`` (best of ``repeats`` after a warm-up)."""
    jax.block_until_ready(problem.train(meta))
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(problem.train(meta))
        best = min(best, time.perf_counter() - tic)
    return best


def mean_value_and_metagrad(problem, meta, seeds, **kwargs):
    """``(mean value, mean metagradient)`` of ``problem``'s run over the training ``seeds``.

    Optimizing the average over several training seeds makes a metaparameter
    (a poison, a data selection) hold for the training run's randomness rather
    than for one fixed run. The seed enters the step as a traced value
    (:meth:`~metagrad.training.TrainingProblem.value_and_metagrad_at_seed`), so
    all seeds share one compilation.
    """
    total_value, total_grad = 0.0, None
    for seed in seeds:
        value, grad = problem.value_and_metagrad_at_seed(meta, seed, **kwargs)
        total_value = total_value + value
        total_grad = grad if total_grad is None else jax.tree.map(lambda a, b: a + b, total_grad, grad)
    n = len(seeds)
    return total_value / n, jax.tree.map(lambda g: g / n, total_grad)
