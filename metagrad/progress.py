"""Progress display for long host-side loops (tqdm)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable, *, total=None, initial=0, desc=None, disable=False):
    """A tqdm bar on stderr; quiet when ``disable`` is set."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, file=sys.stderr,
                dynamic_ncols=True, leave=True)
