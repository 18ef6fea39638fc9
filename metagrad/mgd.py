"""Metagradient descent: an optax optimizer over metaparameters, with projection and resumable state.

Engstrom, Ilyas, Chen, Feldmann, Moses, Madry, "Optimizing ML Training with
Metagradient Descent", arXiv 2503.13751 (2025): metagradients from REPLAY feed a
first-order optimizer over the metaparameters, and each update is projected back
to the feasible set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import jax.numpy as jnp
import optax

from replay.errors import NonFiniteMetagradError
from replay.trees import nonfinite_paths

from .problem import Problem
from .problem import value_and_metagrad as problem_value_and_metagrad
from .progress import progress_bar
from .store import RunStore

logger = logging.getLogger("metagrad")


@dataclasses.dataclass
class MGDResult:
    """The outcome of :func:`mgd`: final and best metaparameters and the per-meta-step log."""

    meta: dict
    best_meta: dict
    best_value: float
    history: list[dict]
    resumed_from: int = 0


class MGDCheckpointer:
    """MGD's state after every meta-step, as pytree checkpoints ``"mgd"`` of a :class:`~metagrad.store.RunStore`.

    A killed run restarted on the same store continues at the next meta-step;
    an unreadable latest checkpoint falls back to the one before it (with a
    warning), so no finished work is lost to a torn write.
    """

    NAME = "mgd"

    def __init__(self, store):
        self.store = store if isinstance(store, RunStore) else RunStore(store)
        self.directory = self.store.directory

    def save(self, meta_step: int, state, history: list[dict]) -> None:
        self.store.save_tree(self.NAME, meta_step, state, {"log": history})

    def restore(self, like):
        """The latest readable ``(meta_step, state, history)``, or ``None`` when there is no checkpoint."""
        restored = self.store.restore_tree(self.NAME, like)
        if restored is None:
            return None
        step, state, metadata = restored
        return step, state, list(metadata["log"])

    def close(self):
        self.store.close()


def checkpoint_folder(out_dir: str, *, fresh: bool = False, settings: dict | None = None) -> str:
    """``out_dir/mgd_checkpoints``: the :class:`~metagrad.store.RunStore` where a script's MGD run saves every meta-step.

    ``fresh=True`` discards an earlier run's checkpoints there first. With
    ``settings`` (a JSON-able dict of what defines the run) stored beside them,
    reopening with other settings raises :class:`~metagrad.store.SettingsMismatchError`
    instead of silently resuming a different run.
    """
    folder = os.path.join(out_dir, "mgd_checkpoints")
    RunStore(folder, settings, fresh=fresh).close()
    return folder


def run_settings(args, ignore=("out", "fresh", "no_progress", "poison", "func", "eval_seeds", "meta_steps"), *,
                 extendable: bool = True) -> dict:
    """The parsed command-line options that define an MGD run (the ``settings`` of its store).

    The number of meta-steps is left out, so a rerun with more of them extends
    the saved run, unless ``extendable=False`` (e.g. when the meta-optimizer's
    step schedule depends on it, so more meta-steps would be another run).
    """
    ignore = set(ignore) - ({"meta_steps"} if not extendable else set())
    return {k: v for k, v in sorted(vars(args).items()) if k not in ignore}


def _tree_norm(tree) -> float:
    return float(optax.global_norm(tree))


def mgd(
    value_and_metagrad: Callable,
    meta0=None,
    *,
    optimizer: optax.GradientTransformation,
    num_meta_steps: int,
    project: Callable | None = None,
    checkpoint_dir: str | None = None,
    store: RunStore | None = None,
    progress: bool = True,
    callback: Callable | None = None,
    pass_meta_step: bool = False,
    metagrad_options: dict | None = None,
) -> MGDResult:
    """Minimize a metaobjective by projected first-order steps on its metagradient.

    Args:
      value_and_metagrad: ``meta -> (value, grad)``, e.g. ``problem.value_and_metagrad``;
        or any :class:`metagrad.Problem`, whose metagradient REPLAY computes
        (with ``metagrad_options``, e.g. ``{"k": 8}``), whose ``init_meta()`` is
        the default ``meta0`` and whose ``project_meta`` the default ``project``.
      meta0: initial metaparameters (a pytree of float arrays).
      optimizer: an optax optimizer over the metaparameters (e.g. ``optax.adam(1e-2)``).
      num_meta_steps: total meta-steps (a resumed run does only the missing ones).
      project: maps metaparameters back to their feasible set after each update.
      checkpoint_dir: when given, state is saved there after every meta-step and
        a restarted call resumes from it (a :class:`~metagrad.store.RunStore` in that folder).
      store: the :class:`~metagrad.store.RunStore` to save into instead (its settings already checked).
      progress: show a progress bar.
      callback: called as ``callback(meta_step, meta, record)`` after each meta-step.
      pass_meta_step: call ``value_and_metagrad(meta, meta_step)`` instead, e.g.
        to draw fresh training seeds at each meta-step as a function of its
        index (so a resumed run sees the same seeds).

    Each log record has ``meta_step``, ``objective`` (at the metaparameters before
    the step), ``metagrad_norm`` and ``seconds``. A non-finite metagradient raises
    :class:`~replay.NonFiniteMetagradError` naming the meta-step; the checkpoint
    of the last good meta-step stays on disk.
    """
    if isinstance(value_and_metagrad, Problem):
        problem, options = value_and_metagrad, dict(metagrad_options or {})
        meta0 = problem.init_meta() if meta0 is None else meta0
        project = project or problem.project_meta
        if hasattr(problem, "value_and_metagrad"):
            value_and_metagrad = lambda m: problem.value_and_metagrad(m, **options)  # noqa: E731
        else:
            value_and_metagrad = lambda m: problem_value_and_metagrad(problem, m, **options)  # noqa: E731
    elif metagrad_options:
        raise ValueError("metagrad_options apply when value_and_metagrad is a Problem; pass them to your function.")
    if meta0 is None:
        raise ValueError("give meta0, the initial metaparameters (or pass a Problem, whose init_meta() is used).")
    if not isinstance(num_meta_steps, int) or num_meta_steps < 0:
        raise ValueError(f"num_meta_steps must be an integer >= 0, got {num_meta_steps!r}.")
    project = project or (lambda m: m)
    meta = project(meta0)
    opt_state = optimizer.init(meta)
    history: list[dict] = []
    best_meta, best_value = meta, float("inf")
    start = 0
    if store is not None and checkpoint_dir is not None:
        raise ValueError("give either store= or checkpoint_dir=, not both.")
    checkpointer = MGDCheckpointer(store if store is not None else checkpoint_dir) if (store or checkpoint_dir) else None
    if checkpointer is not None:
        saved = checkpointer.restore({"meta": meta, "opt_state": opt_state, "best_meta": meta,
                                      "best_value": jnp.asarray(best_value)})
        if saved is not None:
            start, state, history = saved
            meta, opt_state, best_meta = state["meta"], state["opt_state"], state["best_meta"]
            best_value = float(state["best_value"])
            logger.info("MGD: resumed from meta-step %d in %s", start, checkpointer.directory)
    try:
        bar = progress_bar(range(start, num_meta_steps), total=num_meta_steps, initial=start,
                           desc="MGD", disable=not progress)
        for i in bar:
            tic = time.perf_counter()
            value, grad = value_and_metagrad(meta, i) if pass_meta_step else value_and_metagrad(meta)
            value = float(value)
            bad = nonfinite_paths(grad)
            if bad:
                where = f"; the last good state is saved in {checkpointer.directory}" if checkpointer else ""
                raise NonFiniteMetagradError(
                    f"meta-step {i}: the metagradient holds NaN or inf at {', '.join(bad[:4])}{where}. "
                    "Lower the meta learning rate or tighten the projection.",
                    paths=bad,
                )
            if value < best_value:
                best_value, best_meta = value, meta
            updates, opt_state = optimizer.update(grad, opt_state, meta)
            meta = project(optax.apply_updates(meta, updates))
            record = {"meta_step": i, "objective": value, "metagrad_norm": _tree_norm(grad),
                      "seconds": time.perf_counter() - tic}
            history.append(record)
            bar.set_postfix(objective=f"{value:.4f}", grad_norm=f"{record['metagrad_norm']:.2e}")
            if checkpointer is not None:
                checkpointer.save(i + 1, {"meta": meta, "opt_state": opt_state, "best_meta": best_meta,
                                          "best_value": jnp.asarray(best_value)}, history)
            if callback is not None:
                callback(i, meta, record)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return MGDResult(meta=meta, best_meta=best_meta, best_value=best_value, history=history, resumed_from=start)
