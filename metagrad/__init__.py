"""metagrad: differentiate, steer and reuse training runs in JAX."""

from . import data, hyperflow, meta, mixing, models, trajectory, transfer
from .data import Dataset, batch_indices, from_arrays, from_tfds, mnist1d
from .meta import DataWeights, LRSchedule, Poison, project_to_simplex
from .hyperflow import HyperFlow
from .mixing import DGA, MixingProblem
from .models import CNN1D, MLP
from .training import TrainingProblem, shard_last_axis
from .trajectory import Trajectory, record_trajectory

__all__ = [
    "CNN1D", "DGA", "HyperFlow", "DataWeights", "Dataset", "LRSchedule", "MLP", "MixingProblem", "Poison", "TrainingProblem", "Trajectory", "shard_last_axis", "record_trajectory", "trajectory", "transfer",
    "batch_indices", "data", "hyperflow", "from_arrays", "from_tfds", "meta", "mixing", "mnist1d", "models", "project_to_simplex",
]
