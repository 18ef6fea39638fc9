"""REPLAY: exact metagradients through whole training runs.

A training run is ``state_{t+1} = step(state_t, meta, t)``; :func:`value_and_metagrad`
returns ``objective(state_T, meta)`` and its exact gradient with respect to ``meta``
(and optionally ``state_0``), storing only O(k log_k T) states (Engstrom et al.,
"Optimizing ML Training with Metagradient Descent", arXiv 2503.13751).
This package knows nothing about models or data.
"""

from .api import check_objective, check_step, value_and_metagrad
from .compiled import advance, as_pytree_function
from .errors import (
    DivergenceError,
    MemoryBudgetError,
    NonFiniteMetagradError,
    ReplayError,
    StepSignatureError,
)
from .mixed_mode import mixed_mode_grad
from .plan import (
    Advance, Backprop, Free, Objective, PlanStats, binomial_plan, kary_plan, live_state_bound, simulate, tree_depth,
)
from .storage import Storage, TieredStore
from .strategies import Binomial, FullUnroll, Remat, Replay, Strategy, choose_k, execute
from .trees import tree_bytes

__all__ = [
    "Advance", "advance", "as_pytree_function", "Backprop", "Binomial", "DivergenceError", "Free", "FullUnroll", "MemoryBudgetError",
    "NonFiniteMetagradError", "Objective", "PlanStats", "Remat", "Replay", "ReplayError",
    "StepSignatureError", "Storage", "Strategy", "TieredStore", "binomial_plan", "check_objective", "check_step",
    "choose_k", "execute",
    "kary_plan", "live_state_bound", "mixed_mode_grad", "simulate", "tree_bytes", "tree_depth", "value_and_metagrad",
]
