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

import jax
import jax.numpy as jnp
import optax

from replay.errors import NonFiniteMetagradError
from replay.trees import nonfinite_paths

from .progress import progress_bar
from .report import changed_settings

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
    """Saves ``(meta, optimizer state, best meta)`` plus the JSON log after every meta-step with orbax.

    A killed run restarted with the same ``directory`` continues at the next
    meta-step. An unreadable latest checkpoint falls back to the one before it
    (with a warning), so no finished work is lost to a torn write.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, meta_step: int, state, history: list[dict]) -> None:
        ocp = self._ocp
        self.manager.save(
            meta_step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), history=ocp.args.JsonSave({"log": history})),
        )

    def restore(self, like):
        """The latest readable ``(meta_step, state, history)``, or ``None`` when there is no checkpoint."""
        ocp = self._ocp
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)),
                        history=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # a torn or corrupt checkpoint: try the one before
                logger.warning("MGD checkpoint %d in %s is unreadable (%s); trying an earlier one", step, self.directory, err)
                errors.append(f"step {step}: {type(err).__name__}: {err}")
                continue
            return step, restored.state, list(restored.history["log"])
        if errors:
            raise RuntimeError(
                f"every MGD checkpoint in {self.directory} is unreadable ({'; '.join(errors)}): "
                "move that folder away to start afresh, or point checkpoint_dir elsewhere."
            )
        return None

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_folder(out_dir: str, *, fresh: bool = False, settings: dict | None = None) -> str:
    """``out_dir/mgd_checkpoints``: where a script's MGD run saves every meta-step, so a rerun resumes it.

    ``fresh=True`` deletes the checkpoints of an earlier run there first. With
    ``settings`` (a JSON-able dict of what defines the run), they are stored in
    the folder, and a rerun with other settings is refused instead of silently
    resuming a different run.
    """
    import json
    import shutil

    folder = os.path.join(out_dir, "mgd_checkpoints")
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if settings is not None:
        path = os.path.join(folder, "settings.json")
        settings = json.loads(json.dumps(settings))
        saved = None
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
        has_checkpoints = os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))
        if saved is not None and saved != settings and has_checkpoints:
            changed = changed_settings(saved, settings)
            raise ValueError(f"{folder} holds the checkpoints of a run with other settings ({', '.join(changed)}): "
                             "pass --fresh to discard them, or choose another --out.")
        if saved != settings:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                json.dump(settings, f, indent=1)
    return folder


def run_settings(args, ignore=("out", "fresh", "no_progress", "poison", "func", "eval_seeds", "meta_steps"), *,
                 extendable: bool = True) -> dict:
    """The parsed command-line options that define an MGD run (for :func:`checkpoint_folder`).

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
    meta0,
    *,
    optimizer: optax.GradientTransformation,
    num_meta_steps: int,
    project: Callable | None = None,
    checkpoint_dir: str | None = None,
    progress: bool = True,
    callback: Callable | None = None,
    pass_meta_step: bool = False,
) -> MGDResult:
    """Minimize a metaobjective by projected first-order steps on its metagradient.

    Args:
      value_and_metagrad: ``meta -> (value, grad)``, e.g. ``problem.value_and_metagrad``.
      meta0: initial metaparameters (a pytree of float arrays).
      optimizer: an optax optimizer over the metaparameters (e.g. ``optax.adam(1e-2)``).
      num_meta_steps: total meta-steps (a resumed run does only the missing ones).
      project: maps metaparameters back to their feasible set after each update.
      checkpoint_dir: when given, state is saved there after every meta-step and
        a restarted call resumes from it.
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
    if num_meta_steps < 0:
        raise ValueError(f"num_meta_steps must be >= 0, got {num_meta_steps}.")
    project = project or (lambda m: m)
    meta = project(meta0)
    opt_state = optimizer.init(meta)
    history: list[dict] = []
    best_meta, best_value = meta, float("inf")
    start = 0
    checkpointer = MGDCheckpointer(checkpoint_dir) if checkpoint_dir else None
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
