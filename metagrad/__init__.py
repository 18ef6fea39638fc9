"""metagrad: differentiate, steer and reuse training runs in JAX."""

from . import data, meta, models
from .data import Dataset, batch_indices, from_arrays, from_tfds, mnist1d
from .meta import DataWeights, LRSchedule, Poison, project_to_simplex
from .models import CNN1D, MLP
from .training import TrainingProblem

__all__ = [
    "CNN1D", "DataWeights", "Dataset", "LRSchedule", "MLP", "Poison", "TrainingProblem",
    "batch_indices", "data", "from_arrays", "from_tfds", "meta", "mnist1d", "models", "project_to_simplex",
]
