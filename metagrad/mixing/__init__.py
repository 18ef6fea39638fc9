"""Online data mixing: domain weights updated during training by Dynamic Gradient Alignment.

Fan, Grangier, Ablin, "Dynamic Gradient Alignment for Online Data Mixing",
arXiv 2410.02498 (2024); :mod:`.dga` holds the update rule, the mixing problem
and the importance-sampling baseline.
"""

from . import dga
from .dga import (
    DGA, MixingProblem, alignment_scores, check_simplex, dga_update, exponentiated_gradient,
    importance_sampling_weights, sample_domains,
)

__all__ = [
    "DGA", "MixingProblem", "alignment_scores", "check_simplex", "dga_update", "exponentiated_gradient",
    "importance_sampling_weights", "sample_domains", "dga",
]
