"""The intervention log: one JSON line per event, written (and flushed) as the run goes.

Line kinds:

- ``{"kind": "header", "spec": {...}, ...}``: how to rebuild the run's problem;
- ``{"kind": "intervention", "seq", "command", "args", "step", "branch"}``: a
  command that took effect before step ``step`` on branch ``branch``;
- ``{"kind": "end", "step", "branch", "fingerprint", ...}``: where the run ended
  and a SHA-256 of its final parameters and optimizer state.

Replaying the interventions in order, each at its step, reproduces the run
(:func:`metagrad.interactive.replay_log.replay_log`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading

import jax
import numpy as np

from .wire import dumps


def fingerprint(tree) -> str:
    """SHA-256 over the bytes, shapes and dtypes of every leaf of a pytree (bitwise identity check)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class InterventionLog:
    """Appends JSON lines to a new file ``path`` (or keeps them in memory only when ``path`` is ``None``).

    An existing file is never overwritten: ``FileExistsError`` says so (an earlier run's log stays whole).
    ``keep_in_memory=False``: lines go to the file only (for long streams such as per-step metrics);
    ``max_records``: memory keeps the most recent lines only (the file keeps all)."""

    def __init__(self, path: str | None, *, keep_in_memory: bool = True, max_records: int | None = None):
        self.path = path
        self.keep_in_memory = keep_in_memory
        self.records: collections.deque = collections.deque(maxlen=max_records)
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            try:
                self._file = open(path, "x")
            except FileExistsError:
                raise FileExistsError(f"{path} holds an earlier run's intervention log; it is never overwritten: "
                                      "write this run's log to a new path.") from None

    def write(self, record: dict) -> None:
        with self._lock:
            if self.keep_in_memory:
                self.records.append(record)
            if self._file is not None:
                self._file.write(dumps(record) + "\n")
                self._file.flush()

    def interventions(self) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r.get("kind") == "intervention"]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_log(path: str) -> tuple[dict, list[dict], dict | None]:
    """``(header, interventions, end)`` of a log file; ``end`` is ``None`` for a run that did not finish."""
    header, interventions, end = None, [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not a JSON line ({err}); the log is damaged there.") from err
            kind = record.get("kind")
            if kind == "header":
                header = record
            elif kind == "intervention":
                interventions.append(record)
            elif kind == "end":
                end = record
    if header is None:
        raise ValueError(f"{path} has no header line: it is not an intervention log written by metagrad interactive.")
    return header, interventions, end
