"""Data selection by MGD over per-example data weights, against the usual baselines.

Engstrom et al., "Optimizing ML Training with Metagradient Descent", arXiv 2503.13751, Sec. 5.1:
optimize one weight per training example to minimize the loss on a clean
validation set, keep the examples with the largest weights, and train a fresh
model on them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from ..data import Dataset
from ..meta import DataWeights
from ..mgd import mgd
from ..problem import train_and_evaluate
from ..training import TrainingProblem
from .common import mean_value_and_metagrad


def flip_labels(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """Give a random ``fraction`` of training examples a different random label; return the mask of flipped ones."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    n = dataset.num_train
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    y = np.array(dataset.y_train)
    shift = rng.integers(1, dataset.num_classes, n)
    y[flipped] = (y[flipped] + shift[flipped]) % dataset.num_classes
    return dataset.with_train(dataset.x_train, y), flipped


def subset(dataset: Dataset, indices) -> Dataset:
    indices = np.asarray(indices)
    return dataset.with_train(dataset.x_train[indices], dataset.y_train[indices])


def train_and_score(base: TrainingProblem, dataset: Dataset, seed: int) -> dict:
    """Train a fresh model (seed ``seed``) on ``dataset`` with ``base``'s model, optimizer and steps."""
    problem = dataclasses.replace(base, data=dataset, seed=seed, data_weights=None, poison=None)
    return train_and_evaluate(problem)


def optimize_data_weights(problem: TrainingProblem, *, meta_steps: int, meta_optimizer=None, k: int = 8,
                          extra_seeds=(), checkpoint_dir=None, progress: bool = True):
    """MGD over ``problem``'s data weights (validation loss as the metaobjective); returns the MGD result.

    ``extra_seeds`` adds training runs with other seeds whose metagradients are averaged in.
    """
    if problem.data_weights is None:
        raise ValueError("the problem has no data_weights metaparameter: give data_weights=DataWeights().")
    seeds = (problem.seed, *extra_seeds)
    return mgd(lambda meta: mean_value_and_metagrad(problem, meta, seeds, k=k), problem.init_meta(),
               optimizer=meta_optimizer or optax.adam(0.05), num_meta_steps=meta_steps,
               project=problem.project_meta, checkpoint_dir=checkpoint_dir, progress=progress)


def small_loss_indices(base: TrainingProblem, dataset: Dataset, keep: int, seed: int = 0) -> np.ndarray:
    """Keep the ``keep`` training examples with the lowest loss under a model trained on all of them."""
    problem = dataclasses.replace(base, data=dataset, seed=seed, data_weights=None, poison=None)
    params = problem.train(problem.init_meta())["params"]
    logits = problem.logits(params, jnp.asarray(dataset.x_train))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(dataset.y_train)))
    return np.argsort(losses)[:keep]


def top_weight_indices(weights, keep: int) -> np.ndarray:
    return np.argsort(-np.asarray(weights), kind="stable")[:keep]


def select_data(base: TrainingProblem, noisy: Dataset, flipped: np.ndarray, *, keep_fraction: float,
                meta_steps: int, seeds=(0, 1, 2), meta_optimizer=None, k: int = 8, checkpoint_dir=None,
                progress: bool = True) -> dict:
    """Compare MGD selection with full data, a random subset and small-loss filtering.

    Every method trains fresh models with ``seeds`` on its subset; ``flipped``
    (the label noise) is used only to report what each selection removed.
    ``checkpoint_dir`` makes the MGD run resumable (see :func:`~metagrad.mgd.mgd`).
    """
    keep = int(round(keep_fraction * noisy.num_train))
    weighted = dataclasses.replace(base, data=noisy, data_weights=DataWeights(), poison=None)
    result = optimize_data_weights(weighted, meta_steps=meta_steps, meta_optimizer=meta_optimizer, k=k,
                                   checkpoint_dir=checkpoint_dir, progress=progress)
    weights = np.asarray(result.best_meta["data_weights"])
    rng = np.random.default_rng(1234)
    selections = {
        "full data": np.arange(noisy.num_train),
        "random subset": np.sort(rng.choice(noisy.num_train, keep, replace=False)),
        "small-loss filter": np.sort(small_loss_indices(base, noisy, keep)),
        "MGD selection": np.sort(top_weight_indices(weights, keep)),
    }
    methods = {}
    for name, idx in selections.items():
        runs = [train_and_score(base, subset(noisy, idx), seed) for seed in seeds]
        removed = np.setdiff1d(np.arange(noisy.num_train), idx)
        methods[name] = {
            "test_accuracy": [r["test_accuracy"] for r in runs],
            "test_loss": [r["test_loss"] for r in runs],
            "kept": int(len(idx)),
            "flipped_removed_fraction": float(flipped[removed].sum() / max(flipped.sum(), 1)),
        }
    return {
        "methods": methods,
        "weights": weights.tolist(),
        "mean_weight_flipped": float(weights[flipped].mean()) if flipped.any() else None,
        "mean_weight_clean": float(weights[~flipped].mean()),
        "history": result.history,
    }
