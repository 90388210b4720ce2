"""Helpers for the loops that build or read a whole tree at once."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector for a bulk loop.

    An import allocates one long-lived node, record and name per entry and
    no reference cycles (measured: 53 unreachable objects over a 60 000-file
    tree), so every collection the allocations trigger only re-scans the
    growing tree: 0.1-0.2 s of a 1.4 s create.  Reference counting still
    frees everything as usual; the previous state comes back afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
