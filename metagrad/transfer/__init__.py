"""Learning transfer: a recorded training trajectory moved onto a new initialization through permutation symmetry.

Chijiwa, "Transferring Learning Trajectories of Neural Networks", ICLR 2024
(GMT and FGMT); :mod:`.matching` holds the permutation specs, the gradient
matching and the transfer itself.
"""

from . import matching
from .matching import (
    FGMT_PATHS, NonFiniteGradientError, PermutationSpec, TransferResult, UnsupportedModelError, apply_permutation,
    check_spec, coordinate_ascent, cost_matrix, fgmt, gmt, identity_permutation, inverse_permutation,
    match_gradients, naive_transfer, oracle, permutation_spec, problem_gradient, random_permutation,
    reestimate_batch_stats, transfer_params,
)

__all__ = [
    "FGMT_PATHS", "NonFiniteGradientError", "PermutationSpec", "TransferResult", "UnsupportedModelError",
    "apply_permutation", "check_spec", "coordinate_ascent", "cost_matrix", "fgmt", "gmt", "identity_permutation",
    "inverse_permutation", "match_gradients", "naive_transfer", "oracle", "permutation_spec", "problem_gradient",
    "random_permutation", "reestimate_batch_stats", "transfer_params", "matching",
]
