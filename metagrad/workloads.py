"""Named reference workloads: problems that benchmarks and experiments share, built in one place.

Each is an ordinary :class:`metagrad.TrainingProblem`; a benchmark that
compares strategies on "the MNIST-1D MLP" builds it here, so two benchmarks
always measure the same problem.
"""

from __future__ import annotations

import optax

from .data import fashion_mnist, mnist1d, standardized
from .meta import DataWeights, LRSchedule
from .models import MLP, ResidualCNN
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


def fashion_mnist_problem(model, num_steps: int, *, batch_size: int = 256, learning_rate: float = 0.05,
                          max_train: int | None = None) -> TrainingProblem:
    """``model`` on Fashion-MNIST at full size (50,000 train / 10,000 val / 10,000 test, standardized), momentum
    SGD (0.9); metaparameters: a per-step learning rate and per-example data weights; metaobjective: the
    validation loss. ``max_train`` keeps a slice of the training split."""
    return TrainingProblem(
        model, optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=0.9),
        standardized(fashion_mnist(max_train=max_train)), num_steps=num_steps, batch_size=batch_size,
        lr_schedule=LRSchedule(num_steps, learning_rate), data_weights=DataWeights(),
    )


def fashion_mnist_mlp(num_steps: int, hidden=(256, 256), **kwargs) -> TrainingProblem:
    """MLP 784-256-256-10 on full-size Fashion-MNIST (:func:`fashion_mnist_problem`)."""
    return fashion_mnist_problem(MLP(hidden=tuple(hidden)), num_steps, **kwargs)


def fashion_mnist_cnn(num_steps: int, channels=(16, 32, 64), **kwargs) -> TrainingProblem:
    """The residual BatchNorm CNN (:class:`~metagrad.models.ResidualCNN`) on full-size Fashion-MNIST."""
    return fashion_mnist_problem(ResidualCNN(channels=tuple(channels)), num_steps, **kwargs)


WORKLOADS = {"mnist1d_mlp": mnist1d_mlp, "fashion_mnist_mlp": fashion_mnist_mlp,
             "fashion_mnist_cnn": fashion_mnist_cnn}
