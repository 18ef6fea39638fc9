"""Named reference workloads: problems that benchmarks and experiments share, built in one place.

Each is an ordinary :class:`metagrad.TrainingProblem`; a benchmark that
compares strategies on "the MNIST-1D MLP" builds it here, so two benchmarks
always measure the same problem.
"""

from __future__ import annotations

import optax

from .data import mnist1d
from .meta import DataWeights, LRSchedule
from .models import MLP
from .training import TrainingProblem


def mnist1d_mlp(num_steps: int, hidden=(256, 256), *, learning_rate: float = 0.05) -> TrainingProblem:
    """MLP 40-256-256-10 (``hidden``) on MNIST-1D, batch 128, momentum SGD (0.9); metaparameters: a per-step
    learning rate and per-example data weights; metaobjective: the test loss. REPLAY's benchmark problem
    (``experiments/benchmarks/replay_vs_peers.py``, ``replay_long_run.py``, ``inner_grad_modes.py``)."""
    return TrainingProblem(
        MLP(hidden=tuple(hidden)), optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=0.9),
        mnist1d(), num_steps=num_steps, batch_size=128, lr_schedule=LRSchedule(num_steps, learning_rate),
        data_weights=DataWeights(), objective_split="test",
    )
