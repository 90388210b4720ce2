"""The names of a layer store's own files, and what makes a directory a store.

Light on purpose (nothing but ``os``): ``cimfs gc`` asks whether its directory
is a store before it loads the store's machinery (start-up time).
"""

from __future__ import annotations

import os

REFS_FILE = "refs.json"
LAYERS_DIR = "layers"
LOCK_FILE = "lock"
JOURNAL_FILE = "journal.json"
STORE_VERSION = 1


def is_store(path: str) -> bool:
    """A layer store: refs.json, or the journal of a first import that was killed."""
    return any(os.path.lexists(os.path.join(path, n)) for n in (REFS_FILE, JOURNAL_FILE))
