"""Learning-rate schedule optimization by MGD, against a grid of the usual schedule families.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.3:
MGD over the knots of a piecewise-linear schedule, minimizing the validation loss
of the final model, compared with a grid search over standard schedules.
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import optax

from ..meta import LRSchedule
from ..mgd import mgd
from ..problem import train_and_evaluate
from ..progress import progress_bar
from ..training import TrainingProblem
from .common import seconds_per_training_run


def schedule(family: str, peak: float, warmup_fraction: float, num_steps: int) -> np.ndarray:
    """Per-step learning rates of a standard family: ``constant``, ``linear`` or ``cosine``
    (linear warmup over ``warmup_fraction`` of the run, then a decay to zero)."""
    t = np.arange(num_steps, dtype=np.float64)
    if family == "constant":
        return np.full(num_steps, peak)
    warmup = max(int(round(warmup_fraction * num_steps)), 1)
    ramp = peak * np.minimum((t + 1) / warmup, 1.0)
    progress = np.clip((t - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
    if family == "linear":
        decay = 1.0 - progress
    elif family == "cosine":
        decay = 0.5 * (1.0 + np.cos(np.pi * progress))
    else:
        raise ValueError(f"unknown schedule family {family!r}; use 'constant', 'linear' or 'cosine'.")
    return np.where(t < warmup, ramp, peak * decay)


def default_grid(peaks=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), warmups=(0.05, 0.25)) -> list[dict]:
    """Constant schedules at each peak, and warmup + linear / cosine decay at each peak and warmup."""
    grid = [{"family": "constant", "peak": p, "warmup_fraction": 0.0} for p in peaks]
    for family in ("linear", "cosine"):
        grid += [{"family": family, "peak": p, "warmup_fraction": w} for p in peaks for w in warmups]
    return grid


def per_step_problem(problem: TrainingProblem) -> TrainingProblem:
    """The same problem with a per-step LR schedule (any schedule can then be given exactly)."""
    return dataclasses.replace(problem, lr_schedule=LRSchedule(problem.num_steps, 0.0))


def grid_search(problem: TrainingProblem, grid=None, *, progress: bool = True) -> list[dict]:
    """Train and score every schedule of ``grid`` the same way (sorted by validation loss)."""
    grid = default_grid() if grid is None else grid
    exact = per_step_problem(problem)
    rows = []
    for spec in progress_bar(grid, desc="grid", disable=not progress):
        lrs = schedule(spec["family"], spec["peak"], spec["warmup_fraction"], problem.num_steps)
        metrics = train_and_evaluate(exact, {"lr_schedule": jnp.asarray(lrs, problem.param_dtype)})
        rows.append({**spec, **metrics})
    return sorted(rows, key=lambda r: r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf)


def optimize_lr_schedule(problem: TrainingProblem, *, meta_steps: int = 50, meta_optimizer=None, initial_lr=None,
                         k: int = 8, checkpoint_dir=None, progress: bool = True) -> dict:
    """MGD on the problem's piecewise-linear schedule from a flat start; returns metrics and the MGD log.

    The schedule returned is the best by validation loss among those visited;
    its test metrics are those of a fresh training run under it.
    """
    if problem.lr_schedule is None:
        raise ValueError("the problem has no lr_schedule metaparameter: give lr_schedule=LRSchedule(num_knots, init).")
    meta0 = problem.init_meta()
    if initial_lr is not None:
        meta0["lr_schedule"] = jnp.full_like(meta0["lr_schedule"], initial_lr)
    tic = time.perf_counter()
    result = mgd(lambda m: problem.value_and_metagrad(m, k=k), meta0,
                 optimizer=meta_optimizer or optax.adam(0.01), num_meta_steps=meta_steps,
                 project=problem.project_meta, checkpoint_dir=checkpoint_dir, progress=progress)
    mgd_seconds = time.perf_counter() - tic
    if result.resumed_from:  # the wall clock saw only this run's part; the log has every meta-step's time
        mgd_seconds = float(sum(h["seconds"] for h in result.history))
    return {
        "initial": train_and_evaluate(problem, meta0),
        "final": train_and_evaluate(problem, result.best_meta),
        "initial_knots": np.asarray(meta0["lr_schedule"]).tolist(),
        "learned_knots": np.asarray(result.best_meta["lr_schedule"]).tolist(),
        "history": result.history,
        "mgd_seconds": mgd_seconds,
        "resumed_from_meta_step": result.resumed_from,
        "seconds_per_training_run": seconds_per_training_run(problem, meta0),
    }
