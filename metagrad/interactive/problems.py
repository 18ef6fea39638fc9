"""Run specs: a JSON-able description of a problem, so that a logged run can be rebuilt and replayed.

A spec names the dataset, the model, the optimizer (an optax constructor wrapped
in ``optax.inject_hyperparams``, so every hyperparameter it takes can be set
between steps), the number of steps, batch size and seed -- or, for a user's own
problem, ``{"problem": "module:function"}``: ``function()`` returns a
:class:`~metagrad.TrainingProblem` with any flax model (BatchNorm and dropout
included), any data and an optimizer from ``optax.inject_hyperparams``. The
intervention log's header stores the spec; ``metagrad replay-log`` rebuilds the
problem from it (the module must be importable there too).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys

import numpy as np
import optax

from .. import data as data_lib
from ..meta import DataWeights
from ..models import MLP
from ..problem import check_problem
from ..training import TrainingProblem
from .hyperparams import injected_hyperparams

#: The problem ``metagrad interactive`` runs when given no other: an MLP on MNIST-1D with momentum SGD.
BUILTIN_SPEC = {
    "dataset": {"name": "mnist1d"},
    "model": {"name": "mlp", "hidden": [64, 64]},
    "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 0.05, "momentum": 0.9}},
    "num_steps": 3000,
    "batch_size": 128,
    "seed": 0,
}

OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "rmsprop": optax.rmsprop,
              "lion": optax.lion}


def blobs(num_examples: int = 600, features: int = 8, classes: int = 4, spread: float = 1.5, seed: int = 0):
    """A synthetic classification set: Gaussian clusters around random centers (instant to build; for tests)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * spread
    y = rng.integers(0, classes, num_examples).astype(np.int32)
    x = (centers[y] + rng.normal(size=(num_examples, features))).astype(np.float32)
    return data_lib.from_arrays(x, y, num_classes=classes, seed=seed, name="blobs")


def build_dataset(spec: dict):
    name = spec.get("name")
    args = {k: v for k, v in spec.items() if k != "name"}
    if name == "mnist1d":
        return data_lib.mnist1d(**args)
    if name == "blobs":
        return blobs(**args)
    raise ValueError(f"unknown dataset {name!r} in the run spec: use 'mnist1d' or 'blobs'.")


_BUILT: dict = {}


def build_problem(spec: dict) -> TrainingProblem:
    """The :class:`~metagrad.TrainingProblem` of a spec (per-example data weights on, no LR schedule).

    Memoized on the spec's JSON: the same spec gives the same problem object, so the trainer's
    compiled step (keyed by the problem) is reused by later runs and replays in the process.
    """
    key = json.dumps(spec, sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = _build_problem(copy.deepcopy(spec))
    return _BUILT[key]


class ProblemReferenceError(ValueError):
    """A ``module:function`` reference that does not give a steerable problem (the message says what to change)."""


def load_problem(reference: str) -> TrainingProblem:
    """``function()`` of ``reference`` = ``"module:function"``: a user's own :class:`~metagrad.TrainingProblem`."""
    import importlib

    module_name, sep, function_name = reference.partition(":")
    if not sep or not module_name or not function_name:
        raise ProblemReferenceError(f"--problem takes MODULE:FUNCTION (e.g. my_runs:problem), got {reference!r}")
    if os.getcwd() not in sys.path:  # as `python -m` and uvicorn do: a module in the current folder imports
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ProblemReferenceError(f"cannot import {module_name!r} ({err}): run from its folder or put it on "
                                    "PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ProblemReferenceError(f"{module_name} has no function {function_name!r}")
    problem = function()
    if not isinstance(problem, TrainingProblem):
        try:
            check_problem(problem)
        except TypeError:
            raise ProblemReferenceError(f"{reference}() returned a {type(problem).__name__}: return a "
                                        "metagrad.TrainingProblem (your flax model, optax optimizer and data) or "
                                        "any metagrad.Problem (e.g. a metagrad.FunctionProblem)") from None
    return problem


def _build_problem(spec: dict) -> TrainingProblem:
    if "problem" in spec:
        problem = load_problem(spec["problem"])
        if spec.get("num_steps") is not None:
            problem = dataclasses.replace(problem, num_steps=int(spec["num_steps"]))
        if not isinstance(problem, TrainingProblem):
            return problem
        try:
            return interactive_problem(problem)
        except TypeError as err:
            raise ProblemReferenceError(f"{spec['problem']}(): {err}") from None
    model_spec, opt_spec = spec["model"], spec["optimizer"]
    if model_spec.get("name") != "mlp":
        raise ValueError(f"unknown model {model_spec.get('name')!r} in the run spec: use 'mlp'.")
    data = build_dataset(spec["dataset"])
    model = MLP(hidden=tuple(model_spec.get("hidden", (64, 64))), num_classes=data.num_classes)
    if opt_spec.get("name") not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt_spec.get('name')!r} in the run spec: use one of {sorted(OPTIMIZERS)}.")
    optimizer = optax.inject_hyperparams(OPTIMIZERS[opt_spec["name"]])(**opt_spec.get("hyperparams", {}))
    return interactive_problem(TrainingProblem(model, optimizer, data, num_steps=int(spec["num_steps"]),
                                               batch_size=int(spec["batch_size"]), seed=int(spec["seed"]),
                                               lr_schedule=None))


def interactive_problem(problem: TrainingProblem) -> TrainingProblem:
    """``problem`` made steerable: no LR schedule (the LR lives in the optimizer state) and per-example weights on."""
    probe = problem.optimizer.init({"w": np.zeros((1,), np.float32)})
    if "learning_rate" not in (injected_hyperparams(probe) or {}):
        raise TypeError("an interactive run needs an optimizer built with optax.inject_hyperparams (outermost or "
                        "inside an optax.chain), e.g. optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, "
                        "momentum=0.9), so that its learning rate and other hyperparameters can be set between steps.")
    if problem.poison is not None:
        raise ValueError("interactive runs do not support a poison metaparameter; build the problem without it.")
    if problem.lr_schedule is None and problem.data_weights == _WEIGHTS:
        return problem
    return dataclasses.replace(problem, lr_schedule=None, data_weights=_WEIGHTS)


_WEIGHTS = DataWeights(upper=float("inf"))
