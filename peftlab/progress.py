"""Progress bars: silenced on the processes that should not print and inside `silenced()` (a
Trainer with disable_tqdm, for the bars of the work it calls, such as EVA's data pass), configured
by tqdm's own environment variables (TQDM_DISABLE=1, TQDM_MININTERVAL, ...) everywhere else."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from tqdm.auto import tqdm

_silent = [False]


def progress(*args: Any, quiet: bool = False, **kwargs: Any) -> tqdm:
    # an explicit disable=False would override TQDM_DISABLE, so disable is passed only to silence
    return tqdm(*args, dynamic_ncols=True, **kwargs, **({"disable": True} if quiet or _silent[0] else {}))


@contextmanager
def silenced(silent: bool = True) -> Iterator[None]:
    """While inside, every progress bar is quiet (when `silent`)."""
    before, _silent[0] = _silent[0], silent or _silent[0]
    try:
        yield
    finally:
        _silent[0] = before
