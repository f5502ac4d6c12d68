"""Progress bars for transfers, only where a person watches (huggingface_hub's habit).

A bar appears when stderr is a terminal, ``COMPILE_CACHE_PROGRESS`` is not 0 and tqdm is importable; otherwise the
callback does nothing. The callback takes the number of bytes just transferred, like a store's ``progress``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .stores.base import Progress

__all__ = ["progress_bar", "bars_enabled"]


def bars_enabled(setting: bool = True) -> bool:
    """``setting`` is ``Settings.progress`` (COMPILE_CACHE_PROGRESS); a bar also needs a terminal."""
    return setting and sys.stderr.isatty()


def _noop(n: int) -> None:
    pass


@contextmanager
def progress_bar(total: int | None, desc: str, *, enabled: bool) -> Iterator[Progress]:
    """Yield a byte-count callback that drives a bar on stderr (``enabled``: see :func:`bars_enabled`)."""
    if not enabled:
        yield _noop
        return
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar, same behaviour
        yield _noop
        return
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
