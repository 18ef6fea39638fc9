"""metagrad: differentiate, steer and reuse training runs in JAX.

The shared core: the Problem contract (:mod:`.problem`), metaparameters as
plugins (:mod:`.meta`), data (:mod:`.data`), models (:mod:`.models`), the
supervised problem (:mod:`.training`), metagradient descent (:mod:`.mgd`), the
trajectory format (:mod:`.trajectory`) and the one resumable store
(:mod:`.store`). The systems: :mod:`.apps` (MGD applications), :mod:`.mixing`
(DGA), :mod:`.interactive`, :mod:`.transfer` and :mod:`.hyperflow`.
"""

from . import data, hyperflow, meta, mixing, models, problem, trajectory, transfer, workloads
from .data import (Dataset, batch_indices, fashion_mnist, from_arrays, from_tfds, load_dataset, mnist1d, read_idx,
                   standardized)
from .meta import (DataWeights, LogLRSchedule, LRSchedule, Metaparameter, Poison, ProblemInfo, StepContext,
                   project_to_simplex)
from .hyperflow import HyperFlow
from .mixing import DGA, MixingProblem
from .models import CNN1D, MLP, Classifier, ResidualCNN
from .problem import FunctionProblem, Problem, check_problem, stream_key, train, train_and_evaluate
from .training import TrainingProblem, shard_last_axis
from .trajectory import Trajectory, record_trajectory

__all__ = [
    "CNN1D", "Classifier", "DGA", "DataWeights", "Dataset", "FunctionProblem", "HyperFlow", "LRSchedule", "LogLRSchedule",
    "MLP", "load_dataset", "standardized",
    "Metaparameter", "MixingProblem", "Poison", "Problem", "ProblemInfo", "ResidualCNN", "StepContext", "TrainingProblem",
    "Trajectory", "batch_indices", "check_problem", "data", "fashion_mnist", "from_arrays", "from_tfds", "hyperflow", "meta",
    "mixing", "mnist1d", "models", "problem", "project_to_simplex", "read_idx", "record_trajectory", "shard_last_axis",
    "stream_key", "train", "train_and_evaluate", "trajectory", "transfer", "workloads",
]
