"""Files published whole or not at all.

Every output that a reader might open while it is being written (an EROFS
index, a layer tar, a store's JSON, an image archive) is written under a
temporary name beside its final one and renamed into place once complete;
whatever goes wrong, the temporary file is removed, so no partial output is
ever visible under the final name.  The ``.NAME.<hex>.tmp`` form is the one
``cimfs gc`` recognises as a leftover of a killed writer.
"""

from __future__ import annotations

import contextlib
import os


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A fresh hidden name in ``path``'s directory (same file system: rename is atomic)."""
    import secrets  # start-up time (hashlib's OpenSSL): the reading commands import this module for fsync_dir

    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary name beside ``path``: on a clean exit it replaces
    ``path``; on any exception it is removed and the exception goes on.
    Durability (fsync) is the caller's: it knows how the file was written."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
