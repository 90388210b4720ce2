"""The region-file I/O layer of the reader: finding an image's region files
beside it, opening them (regular files only, never blocking on a FIFO put in
their place), mapping them for metadata and reading file contents with
``pread``.  (:mod:`cimfs.remote` is the same layer for images behind fsspec
URLs.)
"""

from __future__ import annotations

import mmap
import os
import stat

from .errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError, CimFormatError
from .layout import cim


def find_region_file(directory: str, name: str) -> str | None:
    """The path of ``name`` in ``directory``, matched case-insensitively when
    the exact name is absent (images written on Windows may use upper case)."""
    exact = os.path.join(directory, name)
    if os.path.exists(exact):
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


def _open_regular(path: str, what: str, is_image: bool = False) -> int:
    """A descriptor of ``path`` opened read-only, refused unless it is a
    regular file.  ``O_NONBLOCK``: a FIFO (or device) put where an image's
    file belongs must fail here, not block the reader -- or a mount daemon,
    and with it every later request -- forever.  The .cim itself is the
    caller's argument (CimError); a region file is part of the image
    (CimFormatError)."""

    def fail(code, reason):
        return CimError(code, reason, path) if is_image else CimFormatError(reason, path)

    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise fail(ERROR_FILE_NOT_FOUND, f"{what} not found") from None
    except OSError as e:
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


class _Region:
    """One region file: mapped for the small metadata objects, read with
    ``pread`` for file contents (so streaming a large file neither grows the
    process's resident set nor faults on a file truncated under it)."""

    __slots__ = ("path", "size", "map", "region_type", "index", "fd")

    def __init__(self, path: str, what: str):
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
