"""Pieces the applications share: timing a training run, averaging metagradients and metrics over seeds."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import replay


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


def fresh_training_seeds(meta_step: int, per_step: int, start: int) -> list[int]:
    """The training seeds of meta-step ``meta_step`` when every meta-step draws ``per_step`` new ones
    (a function of the index, so a resumed run sees the same seeds)."""
    return [start + meta_step * per_step + j for j in range(per_step)]


def evaluate_at_seed(problem, meta, seed: int) -> dict:
    """``problem.evaluate`` of a run under ``meta`` from training seed ``seed``, compiled once for every seed.

    The seed enters the step as a traced ``meta["seed"]`` (as in
    :meth:`~metagrad.training.TrainingProblem.value_and_metagrad_at_seed`), so
    evaluating many seeds does not recompile the training run.
    """
    state0 = problem.initial_state_for_seed(seed)
    seeded = {**meta, "seed": jnp.asarray(seed, jnp.int32)}
    return problem.evaluate(replay.advance(problem.step, state0, seeded, 0, problem.num_steps))


def mean_and_std(rows: list[dict], keys=("val_loss", "test_loss", "test_accuracy")) -> dict:
    """``{key: mean, key_std: standard deviation}`` over ``rows`` (one dict of metrics per seed)."""
    out = {}
    for key in keys:
        values = np.asarray([r[key] for r in rows], np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


SMOKE_TRAIN_EXAMPLES, SMOKE_NUM_STEPS = 512, 40


def problem_on_data(data: str, *, model: str, optimizer, num_steps: int, batch_size: int, smoke: bool = False,
                    label_noise: float = 0.0, **problem_kwargs):
    """``(dataset, problem)``: the dataset ``data`` (:func:`metagrad.data.load_dataset`, standardized) and a
    :class:`~metagrad.training.TrainingProblem` of the default ``model`` (:func:`metagrad.models.model_named`)
    on it, as every application's command builds them. ``smoke`` cuts the training split and the steps to a
    pipeline check's size."""
    from ..data import load_dataset
    from ..models import model_named
    from ..training import TrainingProblem

    dataset = load_dataset(data)
    if smoke:
        dataset = dataset.with_train(dataset.x_train[:SMOKE_TRAIN_EXAMPLES], dataset.y_train[:SMOKE_TRAIN_EXAMPLES])
        num_steps = min(num_steps, SMOKE_NUM_STEPS)
    problem = TrainingProblem(model_named(model, dataset.input_shape, dataset.num_classes), optimizer, dataset,
                              num_steps=num_steps, batch_size=min(batch_size, dataset.num_train), **problem_kwargs)
    return dataset, problem


def describe_dataset(dataset) -> dict:
    """Split sizes and input shape, for a result file."""
    return {"name": dataset.name, "train": dataset.num_train, "val": len(dataset.y_val), "test": len(dataset.y_test),
            "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes}


def goals_line(goals: dict, smoke: bool = False) -> str:
    """``"name met, name NOT met"`` for an application's ``goals`` dict (a smoke run says no goal is judged)."""
    return (", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in goals.items())
            + (" (smoke run: no goal is judged)" if smoke else ""))


def data_sets_parser(description: str, default_out: str, command: str):
    """The options of an experiment script that runs one application on several data sets: ``--data`` (each
    as ``metagrad <command> --data`` takes it), ``--model``, ``--smoke``, ``--out``, ``--fresh``,
    ``--no-progress``; the script adds its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["mnist1d", "fashion_mnist"],
                        help=f"data sets, each as metagrad {command} --data takes it")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--smoke", action="store_true", help="every stage at the smallest size, on MNIST-1D only")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--fresh", action="store_true", help="discard earlier runs in --out")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def data_set_folder(data: str, out: str, model: str) -> tuple[str, str]:
    """``(name, folder)`` of data set ``data``'s run in an experiment's ``out``: ``<out>/<name>_<model>``."""
    import os

    name = os.path.splitext(os.path.basename(data))[0].replace("tfds:", "tfds_")
    return name, os.path.join(out, f"{name}_{model}")
