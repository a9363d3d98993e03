"""Progress bars: silenced on the processes that should not print, configured by tqdm's own
environment variables (TQDM_DISABLE=1, TQDM_MININTERVAL, ...) everywhere else."""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress(*args: Any, quiet: bool = False, **kwargs: Any) -> tqdm:
    # an explicit disable=False would override TQDM_DISABLE, so disable is passed only to silence
    return tqdm(*args, dynamic_ncols=True, **kwargs, **({"disable": True} if quiet else {}))
