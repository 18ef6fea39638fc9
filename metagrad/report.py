"""Results a person can read: short text tables and JSON files."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np


def format_table(header, rows) -> str:
    """Right-aligned columns; floats with 4 significant decimals."""
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4f}"
        return str(x)

    text = [[cell(x) for x in header]] + [[cell(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in text]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array__"):
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return x


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)


def mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist()}


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def changed_settings(saved: dict, settings: dict) -> list:
    """The keys whose values differ between two settings dicts (either side may lack a key), sorted."""
    return sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))


def source_fingerprint(*packages) -> str:
    """A short SHA-256 of the Python source of ``packages`` (imported packages or modules; a package counts every
    ``.py`` file under its folder, in sorted order), which tells results computed by other code apart."""
    digest = hashlib.sha256()
    for package in packages:
        root = os.path.dirname(package.__file__)
        files = ([package.__file__] if not package.__file__.endswith("__init__.py") else
                 sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")))
        for path in files:
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def library_source_fingerprint() -> str:
    """:func:`source_fingerprint` of the ``metagrad`` and ``replay`` packages."""
    import replay

    import metagrad

    return source_fingerprint(metagrad, replay)


class FinishedParts:
    """The finished parts of a long experiment, kept in one JSON file so a rerun skips them.

    ``get(key)`` returns a part saved by an earlier (possibly killed) run, or
    ``None``; ``put(key, value)`` saves one the moment it is done (written to a
    temporary file, then renamed, so a kill never leaves a torn file);
    ``clear()`` removes the file once the whole result is written. The
    ``settings`` (a JSON-able dict of what defines the run) are stored with the
    parts, together with a fingerprint of the ``metagrad`` and ``replay``
    source (``"library_source"``; the experiment script itself is not part of
    it, so a run that failed after its long parts can be fixed and resumed): a
    rerun with other settings or library code is refused rather than mixing
    two runs, and ``fresh=True`` discards what an earlier run left.
    """

    def __init__(self, path: str, settings: dict, *, fresh: bool = False):
        self.path = path
        self.settings = json.loads(json.dumps(_jsonable({**settings,
                                                          "library_source": library_source_fingerprint()})))
        self.parts: dict = {}
        if fresh and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
                saved_settings, parts = saved["settings"], saved["parts"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path} is not a readable record of finished parts ({err}): pass --fresh to start "
                                 "over, or delete the file.") from err
            if saved_settings != self.settings:
                changed = changed_settings(saved_settings, self.settings)
                what = ("other metagrad/replay source code" if changed == ["library_source"] else
                        f"other settings ({', '.join(changed)})")
                raise ValueError(f"{path} holds the finished parts of a run with {what}: pass --fresh to discard "
                                 "them, or choose another --out.")
            self.parts = parts

    def get(self, key: str):
        return self.parts.get(key)

    def put(self, key: str, value) -> None:
        self.parts[key] = json.loads(json.dumps(_jsonable(value)))
        self._write()

    def _write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": self.settings, "parts": self.parts}, f)
        os.replace(tmp, self.path)

    def drop(self, key: str) -> None:
        """Forget one part (e.g. a loop's progress once its result is saved as a part of its own)."""
        if key in self.parts:
            del self.parts[key]
            self._write()

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def tree_to_json(tree) -> list:
    """A pytree's leaves as nested lists, for JSON (float32 values survive the round trip exactly)."""
    import jax

    return [np.asarray(a).tolist() for a in jax.tree.leaves(tree)]


def tree_from_json(leaves: list, template, what: str):
    """The inverse of :func:`tree_to_json`: numpy leaves with the structure, shapes and dtypes of ``template``.

    A record that does not fit the template (another model or loop) raises a ``ValueError`` that starts with
    ``what`` (the record's name) and says to start over with ``--fresh``.
    """
    import jax

    like, treedef = jax.tree.flatten(template)
    if len(leaves) != len(like):
        raise ValueError(f"{what} holds {len(leaves)} arrays, this run {len(like)}: pass --fresh to start over.")
    restored = []
    for value, t in zip(leaves, like):
        array = np.asarray(value, dtype=t.dtype)
        if array.shape != t.shape:
            raise ValueError(f"{what} holds an array of shape {array.shape} where this run has {t.shape}: pass "
                             "--fresh to start over.")
        restored.append(array)
    return jax.tree.unflatten(treedef, restored)


class LoopProgress:
    """The progress of one long loop, kept as a part of a :class:`FinishedParts` record so a killed run resumes
    mid-loop instead of from its start (e.g. the meta-training of a drift network: over an hour on a CPU).

    The loop calls ``load(template)`` once: ``None``, or the ``(done, state, history)`` an earlier run saved, with
    ``state`` a pytree of the template's structure, shapes and dtypes (float32 values survive JSON exactly, so the
    resumed loop continues bit for bit). It then calls ``save(done, state, history, last=...)`` after each unit of
    work; the record is written at most every ``every_seconds`` and always when ``last``. ``seconds`` is the loop's
    time, the earlier runs' included (counted up to their last save); ``earlier_seconds`` those earlier runs' share.
    """

    def __init__(self, finished: FinishedParts, key: str, *, every_seconds: float = 30.0):
        self.finished, self.key, self.every_seconds = finished, key, every_seconds
        self.resumed_from, self.earlier_seconds = 0, 0.0
        self._tic, self._last_save = time.perf_counter(), -float("inf")

    @property
    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self._tic

    def load(self, template):
        self._tic = time.perf_counter()
        saved = self.finished.get(self.key)
        if saved is None:
            return None
        state = tree_from_json(saved["leaves"], template, f"{self.finished.path}: the saved progress of {self.key!r}")
        self.resumed_from, self.earlier_seconds = int(saved["done"]), float(saved["seconds"])
        return self.resumed_from, state, list(saved["history"])

    def save(self, done: int, state, history, *, last: bool = False) -> None:
        now = time.perf_counter()
        if not last and now - self._last_save < self.every_seconds:
            return
        self._last_save = now
        self.finished.put(self.key, {"done": int(done), "seconds": self.seconds, "history": list(history),
                                     "leaves": tree_to_json(state)})
