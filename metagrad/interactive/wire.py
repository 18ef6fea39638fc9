"""Strict JSON for everything the control server sends: a non-finite number travels as ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity``, which no JSON parser in a
browser accepts, and Starlette's responses refuse them with a 500. A run that
diverged is exactly when a user needs the API, so every response body and
WebSocket message goes through :func:`finite` first: NaN, +inf and -inf
become ``null`` (numpy scalars and arrays become plain numbers and lists).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (recursively through dicts, lists, tuples)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.generic):
        return finite(value.item())
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    return value


def dumps(value: Any) -> str:
    """Strict JSON text of ``value`` (no ``NaN`` or ``Infinity`` literals)."""
    return json.dumps(finite(value), allow_nan=False)
