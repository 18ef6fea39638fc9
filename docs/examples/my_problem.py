"""A user's own problem for ``metagrad interactive --problem my_problem:problem`` (run from this folder).

Any flax model (here with BatchNorm and dropout), any data, an optax optimizer whose hyperparameters
come from ``optax.inject_hyperparams`` (so that the dashboard and agents can set them between steps).
"""

import flax.linen as nn
import numpy as np
import optax

import metagrad as mg


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], 4, 4, 1))
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(4)(x.reshape((x.shape[0], -1)))


def problem() -> mg.TrainingProblem:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 1.5
    y = rng.integers(0, 4, 1200).astype(np.int32)
    x = (centers[y] + rng.normal(size=(1200, 16))).astype(np.float32)
    data = mg.from_arrays(x, y, num_classes=4, name="my-blobs")
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3, weight_decay=1e-4)
    return mg.TrainingProblem(SmallCNN(), optimizer, data, num_steps=2000, batch_size=32)
