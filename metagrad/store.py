"""The one resumable store: a run folder that MGD, experiments, drifts and interactive checkpoints all save into.

A :class:`RunStore` is a folder::

    <directory>/settings.json       what defines the run, written once and compared on every reopen
    <directory>/parts.json          finished parts of a long job (JSON values), saved the moment each is done
    <directory>/trees/<name>/<n>/   pytree checkpoints (orbax), e.g. MGD's state after meta-step n

Every write is atomic (a temporary file renamed into place; orbax's own
finalize-then-rename for trees), so a kill never leaves a torn record, and an
unreadable latest tree falls back to the one before it. Reopening a store with
other settings raises :class:`SettingsMismatchError` naming the settings that
differ, instead of silently mixing two runs; ``fresh=True`` discards what an
earlier run left. Errors name the library's arguments (``fresh``,
``directory``); the command line translates them into its flags.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import jax
import numpy as np

logger = logging.getLogger("metagrad")

__all__ = ["LoopProgress", "RunStore", "SettingsMismatchError", "StoreError", "changed_settings", "jsonable"]


class StoreError(ValueError):
    """A store that cannot be used as asked (unreadable, or another run's)."""


class SettingsMismatchError(StoreError):
    """The store holds a run with other settings; ``changed`` lists the settings that differ."""

    def __init__(self, message: str, changed: list):
        super().__init__(message)
        self.changed = changed


def jsonable(x):
    """``x`` with arrays and NumPy scalars turned into lists and Python numbers (for JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array__"):
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return x


_MISSING = "(not set)"


def changed_settings(saved: dict, settings: dict, prefix: str = "") -> list:
    """``(name, saved value, new value)`` of every setting that differs between two settings dicts, sorted by name;
    nested dicts are compared key by key (``"mgd.meta_lr"``), a key either side lacks is ``"(not set)"``."""
    changed = []
    for key in sorted(set(saved) | set(settings)):
        old, new = saved.get(key, _MISSING), settings.get(key, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append((f"{prefix}{key}", old, new))
    return changed


_TREE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _write_json_atomically(path: str, payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


class RunStore:
    """A resumable run folder (see the module docstring).

    Args:
      directory: the folder (created when missing).
      settings: a JSON-able dict of what defines the run. Stored on first use;
        a later open with different settings raises :class:`SettingsMismatchError`.
        ``None`` skips the check.
      fresh: discard everything an earlier run left in ``directory`` first.
    """

    SETTINGS, PARTS, TREES = "settings.json", "parts.json", "trees"

    def __init__(self, directory: str, settings: dict | None = None, *, fresh: bool = False):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise StoreError(f"{self.directory} is a file, not a folder: give directory= a folder path.")
        if fresh and os.path.isdir(self.directory):
            for name in (self.SETTINGS, self.PARTS, self.TREES):
                path = os.path.join(self.directory, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(self.directory, exist_ok=True)
        self.settings = None if settings is None else json.loads(json.dumps(jsonable(settings)))
        self._check_settings()
        self._parts = self._read_parts()
        self._managers: dict = {}

    # ----------------------------------------------------------------- settings
    def _check_settings(self) -> None:
        if self.settings is None:
            return
        path = os.path.join(self.directory, self.SETTINGS)
        saved = self._read_json(path) if os.path.exists(path) else None
        if saved is not None and saved != self.settings and self.holds_work():
            changed = changed_settings(saved, self.settings)
            details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise SettingsMismatchError(
                f"{self.directory} holds a run with other settings ({details}{more}): pass fresh=True to discard "
                "it, or give another directory.", [name for name, _, _ in changed])
        if saved != self.settings:
            _write_json_atomically(path, self.settings)

    def holds_work(self) -> bool:
        """Whether an earlier run saved anything here (parts or trees)."""
        if os.path.exists(os.path.join(self.directory, self.PARTS)):
            return True
        trees = os.path.join(self.directory, self.TREES)
        return os.path.isdir(trees) and any(os.listdir(os.path.join(trees, n)) for n in os.listdir(trees)
                                            if os.path.isdir(os.path.join(trees, n)))

    def _read_json(self, path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise StoreError(f"{path} is unreadable ({err}): pass fresh=True to start over, "
                             "or give another directory.") from err

    # ----------------------------------------------------------------- finished parts (JSON)
    def _read_parts(self) -> dict:
        path = os.path.join(self.directory, self.PARTS)
        if not os.path.exists(path):
            return {}
        parts = self._read_json(path)
        if not isinstance(parts, dict):
            raise StoreError(f"{path} is not a record of finished parts: pass fresh=True to start over.")
        return parts

    def get(self, key: str, default=None):
        """A part an earlier (possibly killed) run saved, or ``default``."""
        return self._parts.get(key, default)

    def put(self, key: str, value) -> None:
        """Save one finished part (JSON-able) the moment it is done."""
        self._parts[key] = json.loads(json.dumps(jsonable(value)))
        _write_json_atomically(os.path.join(self.directory, self.PARTS), self._parts)

    def drop(self, key: str) -> None:
        """Forget one part or tree (e.g. a loop's progress once its result is a part of its own)."""
        if key in self._parts:
            del self._parts[key]
            _write_json_atomically(os.path.join(self.directory, self.PARTS), self._parts)
        manager = self._managers.pop(key, None)
        if manager is not None:
            manager.close()
        shutil.rmtree(os.path.join(self.directory, self.TREES, key), ignore_errors=True)

    def keys(self) -> list:
        return sorted(self._parts)

    # ----------------------------------------------------------------- pytree checkpoints (orbax)
    def _manager(self, name: str, max_to_keep: int | None = 2):
        import orbax.checkpoint as ocp

        if not _TREE_NAME.fullmatch(name) or set(name) == {"."}:
            raise StoreError(f"tree name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter "
                             "or digit.")
        if name not in self._managers:
            self._managers[name] = ocp.CheckpointManager(
                os.path.join(self.directory, self.TREES, name),
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
        return self._managers[name]

    def save_tree(self, name: str, step: int, tree, metadata=None, *, max_to_keep: int | None = 2) -> None:
        """Save pytree ``tree`` (and JSON ``metadata``) as checkpoint ``step`` of ``name`` (atomic)."""
        import orbax.checkpoint as ocp

        manager = self._manager(name, max_to_keep)
        manager.save(int(step), args=ocp.args.Composite(tree=ocp.args.StandardSave(tree),
                                                        metadata=ocp.args.JsonSave(jsonable(metadata or {}))))
        manager.wait_until_finished()

    def tree_steps(self, name: str) -> list:
        """The saved checkpoint steps of ``name``, oldest first."""
        folder = os.path.join(self.directory, self.TREES, name)
        if not os.path.isdir(folder):
            return []
        return sorted(self._manager(name).all_steps())

    def restore_tree(self, name: str, like, step: int | None = None):
        """``(step, tree, metadata)`` of the latest readable checkpoint of ``name`` (or of ``step``), or ``None``.

        ``like`` is a pytree of the structure, shapes and dtypes to restore. An
        unreadable checkpoint (a torn write) is skipped with a warning, falling
        back to the one before it.
        """
        import orbax.checkpoint as ocp

        steps = self.tree_steps(name)
        if step is not None:
            steps = [s for s in steps if s == step]
        errors = []
        for s in reversed(steps):
            try:
                restored = self._manager(name).restore(s, args=ocp.args.Composite(
                    tree=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like)),
                    metadata=ocp.args.JsonRestore()))
            except Exception as err:  # a torn or corrupt checkpoint, or another structure: try the one before
                logger.warning("checkpoint %d of %r in %s is unreadable (%s); trying an earlier one",
                               s, name, self.directory, err)
                errors.append(f"step {s}: {type(err).__name__}: {err}")
                continue
            return s, restored.tree, restored.metadata
        if errors:
            raise StoreError(f"every checkpoint of {name!r} in {self.directory} is unreadable "
                             f"({'; '.join(errors)}): pass fresh=True to start afresh, or give another directory.")
        return None

    def loop(self, key: str, *, every_seconds: float = 30.0) -> "LoopProgress":
        """The :class:`LoopProgress` of a long loop saved under ``key``."""
        return LoopProgress(self, key, every_seconds=every_seconds)

    def close(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()
            manager.close()
        self._managers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LoopProgress:
    """The progress of one long loop in a :class:`RunStore`, so a killed run resumes mid-loop, bit for bit.

    The loop calls ``load(template)`` once: ``None``, or the ``(done, state, history)``
    an earlier run saved (``state`` a pytree of the template's structure, shapes and
    dtypes, restored exactly by orbax). It then calls ``save(done, state, history,
    last=...)`` after each unit of work; the state is written at most every
    ``every_seconds`` and always when ``last``. ``seconds`` is the loop's time, the
    earlier runs' included (up to their last save); ``earlier_seconds`` their share.
    """

    def __init__(self, store: RunStore, key: str, *, every_seconds: float = 30.0):
        self.store, self.key, self.every_seconds = store, key, every_seconds
        self.resumed_from, self.earlier_seconds = 0, 0.0
        self._tic, self._last_save = time.perf_counter(), -float("inf")

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self._tic

    def load(self, template):
        self._tic = time.perf_counter()
        restored = self.store.restore_tree(self.key, template)
        if restored is None:
            return None
        _, state, meta = restored
        self.resumed_from, self.earlier_seconds = int(meta["done"]), float(meta["seconds"])
        return self.resumed_from, state, list(meta["history"])

    def save(self, done: int, state, history, *, last: bool = False) -> None:
        now = time.perf_counter()
        if not last and now - self._last_save < self.every_seconds:
            return
        self._last_save = now
        self.store.save_tree(self.key, int(done), state,
                             {"done": int(done), "seconds": self.seconds, "history": list(history)})
