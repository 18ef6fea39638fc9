"""Results a person can read: short text tables and JSON files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from .store import LoopProgress, RunStore, changed_settings, jsonable  # noqa: F401 - re-exported


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




def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(jsonable(payload), f, indent=2)


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


def plot_line(ax, x, y, *, short: int | None = 30, **kwargs):
    """``ax.plot(x, y, **kwargs)``, with markers on a short series, so that a single point (a line of length
    zero, otherwise invisible) or a few still show: ``"o"`` for one point, ``"."`` up to ``short`` points
    (``None``: at any length), unless ``kwargs`` names a marker."""
    n = len(y)
    if (short is None or n <= short) and "marker" not in kwargs:
        kwargs["marker"] = "o" if n == 1 else "."
    return ax.plot(x, y, **kwargs)


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


class FinishedParts(RunStore):
    """The finished parts of a long experiment, in a :class:`~metagrad.store.RunStore`, so a rerun skips them.

    ``path`` names the store's folder (a ``.json`` suffix is dropped, so older
    callers' paths still work). The ``settings`` are stored with a fingerprint
    of the ``metagrad`` and ``replay`` source (``"library_source"``; the
    experiment script itself is not part of it, so a run that failed after its
    long parts can be fixed and resumed): a rerun with other settings or library
    code is refused rather than mixing two runs, and ``fresh=True`` discards what
    an earlier run left. ``clear()`` removes the folder once the whole result is written.
    """

    def __init__(self, path: str, settings: dict, *, fresh: bool = False):
        folder = path[:-len(".json")] if path.endswith(".json") else path
        super().__init__(folder, {**settings, "library_source": library_source_fingerprint()}, fresh=fresh)
        self.path = self.directory

    def clear(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
