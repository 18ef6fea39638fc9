"""The hyperparameters a run can set between steps: those of the ``optax.inject_hyperparams`` state in its
optimizer state, outermost or inside a chain (``optax.chain(optax.clip_by_global_norm(1.0),
optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))`` keeps its injected state second in a tuple).
"""

from __future__ import annotations


def _is_injected(node) -> bool:
    return isinstance(getattr(node, "hyperparams", None), dict)


def injected_hyperparams(opt_state) -> dict | None:
    """The ``hyperparams`` dict of the first ``inject_hyperparams`` state in ``opt_state`` (``None``: none)."""
    if _is_injected(opt_state):
        return opt_state.hyperparams
    if isinstance(opt_state, tuple):
        for child in opt_state:
            found = injected_hyperparams(child)
            if found is not None:
                return found
    return None


def with_hyperparams(opt_state, hyperparams: dict):
    """``opt_state`` with the ``hyperparams`` of its first ``inject_hyperparams`` state replaced."""
    if _is_injected(opt_state):
        return opt_state._replace(hyperparams=hyperparams)
    if isinstance(opt_state, tuple):
        children = list(opt_state)
        for i, child in enumerate(children):
            if injected_hyperparams(child) is not None:
                children[i] = with_hyperparams(child, hyperparams)
                return type(opt_state)(*children) if hasattr(opt_state, "_fields") else tuple(children)
    raise ValueError("this optimizer state holds no optax.inject_hyperparams state")
