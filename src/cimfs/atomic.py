"""Files published whole or not at all.

Every output that a reader might open while it is being written (an EROFS
index, a layer tar, a store's JSON, an image archive) is written under a
temporary name beside its final one and renamed into place once complete;
whatever goes wrong, the temporary file is removed, so no partial output is
ever visible under the final name.  The ``.NAME.<hex>.tmp`` form is the one
``cimfs gc`` recognises as a leftover of a killed writer.  A temporary file is
created with ``O_EXCL | O_NOFOLLOW`` (:func:`open_new`): a name planted in a
directory others can write -- a symlink to a file of root's, a file of theirs
-- makes the write fail, never lands it elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import stat


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


def fsync_together(fds: list[int]) -> None:
    """Make several files durable at once: each ``fsync`` waits for a journal
    commit (ext4, xfs), and fsyncs issued together share one, so a commit's
    region and object ID files cost about one flush instead of one each
    (a fork: 4 files, ~4 ms of waiting instead of ~15 on this machine's
    disk).  Returns once every file is durable; raises the first error."""
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    import threading  # start-up time: only a commit with several files needs it

    errors: list[OSError] = []

    def sync(fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=sync, args=(fd,)) for fd in fds[1:]]
    for t in threads:
        t.start()
    sync(fds[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def temp_name(path: str, *, dir_fd: int | None = None) -> str:
    """A fresh hidden name in ``path``'s directory (same file system: rename
    is atomic); with ``dir_fd``, ``path`` is a plain name in that directory
    and so is the result."""
    import secrets  # start-up time (hashlib's OpenSSL): the reading commands import this module for fsync_dir

    if dir_fd is not None:
        return f".{path}.{secrets.token_hex(6)}.tmp"
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


def open_new(path: str, mode: int = 0o644, *, dir_fd: int | None = None, readable: bool = False) -> int:
    """A descriptor of a file created now at ``path`` (relative to ``dir_fd``
    when given): never an existing file, never through a symlink."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, mode, dir_fd=dir_fd)


@contextlib.contextmanager
def replacing(path: str, *, dir_fd: int | None = None):
    """Yield a temporary name beside ``path`` (create it with
    :func:`open_new`, or ``open(tmp, "xb")``): on a clean exit it replaces
    ``path``; on any exception it is removed and the exception goes on.
    With ``dir_fd``, both are names in that directory (so a directory
    renamed meanwhile cannot redirect the rename).  Durability (fsync) is
    the caller's: it knows how the file was written."""
    tmp = temp_name(path, dir_fd=dir_fd)
    try:
        yield tmp
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _remove_own(tmp, dir_fd)
        raise


def _remove_own(path: str, dir_fd: int | None) -> None:
    """Remove a temporary file this process may have made: not a symlink or
    another user's file planted at its name (creating it failed then)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path, dir_fd=dir_fd)
        if not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid():
            os.unlink(path, dir_fd=dir_fd)
