"""The region-file I/O layer of the reader: finding an image's region files
beside it, opening them (regular files only, never following a symbolic link,
never blocking on a FIFO put in their place), mapping them for metadata and
reading file contents with ``pread``.  (:mod:`cimfs.remote` is the same layer
for images behind fsspec URLs.)  docs/MOUNT.md ("Trust") says why links are
refused and where cimfs follows its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

from .errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError, CimFormatError
from .layout import cim


def find_region_file(directory: str, name: str) -> str | None:
    """The path of ``name`` in ``directory``, matched case-insensitively when
    the exact name is absent (images written on Windows may use upper case)."""
    exact = os.path.join(directory, name)
    if os.path.lexists(exact):  # a link is found (and then refused when opened), not looked past
        return exact
    lowered = name.lower()
    try:
        for entry in os.listdir(directory):
            if entry.lower() == lowered:
                return os.path.join(directory, entry)
    except OSError:
        return None
    return None


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
)


def _open_regular(path: str, what: str, is_image: bool = False) -> int:
    """A descriptor of ``path`` opened read-only, refused unless it is a
    regular file.  ``O_NOFOLLOW``: a region file swapped for a symbolic link
    (to a file the caller may read and its owner may not) must not be served
    as the image's data.  ``O_NONBLOCK``: a FIFO (or device) put where an
    image's file belongs must fail here, not block the reader -- or a mount
    daemon, and with it every later request -- forever.  The .cim itself is
    the caller's argument (CimError); a region file is part of the image
    (CimFormatError)."""

    def fail(code, reason):
        return CimError(code, reason, path) if is_image else CimFormatError(reason, path)

    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise fail(ERROR_FILE_NOT_FOUND, f"{what} not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise fail(E_INVALIDARG, f"{what} is a symbolic link (not followed)") from None
        raise fail(ERROR_FILE_NOT_FOUND, f"cannot open {what}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise fail(ERROR_FILE_NOT_FOUND, f"cannot stat {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise fail(E_INVALIDARG, f"{what} is {kind}")
    return fd


def private_directory_problem(directory: str) -> str | None:
    """Why links in ``directory`` are not the caller's own doing (None: they
    are): it must be a directory owned by the caller and writable by no one
    else, as a merged view's private directory is (then only the caller, or
    root, made its links)."""
    try:
        st = os.lstat(directory)
    except OSError as e:
        return f"cannot stat its directory: {e.strerror or e}"
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        return "its directory is not a directory"
    if st.st_uid != uid:
        return f"its directory is owned by uid {st.st_uid}, not by uid {uid}"
    if st.st_mode & 0o022:
        return f"its directory is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def resolve_private_link(path: str, what: str) -> str:
    """The target of ``path``, a link cimfs made in its own private directory
    (checked here), followed one level only: the target is then opened with
    ``O_NOFOLLOW`` like any region file, so a link it points to is refused."""
    why = private_directory_problem(os.path.dirname(path))
    if why:
        raise CimFormatError(f"{what} is a symbolic link (not followed: {why})", path)
    try:
        target = os.readlink(path)
    except OSError as e:
        raise CimFormatError(f"cannot read the link {what}: {e.strerror or e}", path) from None
    return os.path.join(os.path.dirname(path), target)


def read_regular(path: str, what: str, limit: int | None = None) -> bytes:
    """The bytes of ``path`` (at most ``limit``), opened as :func:`_open_regular` does."""
    fd = _open_regular(path, what)
    with open(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit)


class _Region:
    """One region file: mapped for the small metadata objects, read with
    ``pread`` for file contents (so streaming a large file neither grows the
    process's resident set nor faults on a file truncated under it)."""

    __slots__ = ("path", "size", "map", "region_type", "index", "fd")

    def __init__(self, path: str, what: str, private_links: bool = False):
        if private_links and os.path.islink(path):
            path = resolve_private_link(path, what)
        self.path = path
        self.fd = _open_regular(path, what)
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size < cim.REGION_HEADER.size:
                raise CimFormatError(f"{what} is truncated ({self.size} bytes)", path)
            try:
                self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError, OverflowError) as e:
                raise CimFormatError(f"{what} of {self.size} bytes cannot be mapped ({e})", path) from None
            self.index, self.region_type = cim.unpack_region_header(self.map[: cim.REGION_HEADER.size], what)
        except BaseException:
            os.close(self.fd)
            raise

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while len(data) < length:  # short reads only at a (changed) end of file
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise CimFormatError(f"region file ended at {offset + len(data)} (was it truncated?)", self.path)
            data += more
        return data
