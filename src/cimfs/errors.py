"""The library's exception types and the HRESULT codes of the Win32 API.

Every failure the library reports is a :class:`CimError`, carrying the HRESULT
the Win32 ``cimfs.h`` call would return, the path involved and the reason in
words.  Anything wrong *inside* an image being read is a :class:`CimFormatError`.
"""

from __future__ import annotations

import errno as _errno


def HRESULT_FROM_WIN32(code: int) -> int:
    return 0x80070000 | code if code else 0


E_INVALIDARG = 0x80070057
E_ACCESSDENIED = 0x80070005
E_OUTOFMEMORY = 0x8007000E
E_HANDLE = HRESULT_FROM_WIN32(6)  # ERROR_INVALID_HANDLE: a closed or foreign handle
ERROR_FILE_NOT_FOUND = HRESULT_FROM_WIN32(2)
ERROR_PATH_NOT_FOUND = HRESULT_FROM_WIN32(3)
ERROR_SHARING_VIOLATION = HRESULT_FROM_WIN32(32)
ERROR_FILE_EXISTS = HRESULT_FROM_WIN32(80)
ERROR_INVALID_NAME = HRESULT_FROM_WIN32(123)
ERROR_DIR_NOT_EMPTY = HRESULT_FROM_WIN32(145)
ERROR_ALREADY_EXISTS = HRESULT_FROM_WIN32(183)
ERROR_FILE_CORRUPT = HRESULT_FROM_WIN32(1392)

# So that callers who catch OSError and look at .errno get something sensible.
_ERRNO = {
    E_INVALIDARG: _errno.EINVAL,
    E_ACCESSDENIED: _errno.EACCES,
    E_OUTOFMEMORY: _errno.ENOMEM,
    E_HANDLE: _errno.EBADF,
    ERROR_FILE_NOT_FOUND: _errno.ENOENT,
    ERROR_PATH_NOT_FOUND: _errno.ENOENT,
    ERROR_SHARING_VIOLATION: _errno.EBUSY,
    ERROR_FILE_EXISTS: _errno.EEXIST,
    ERROR_INVALID_NAME: _errno.EINVAL,
    ERROR_DIR_NOT_EMPTY: _errno.ENOTEMPTY,
    ERROR_ALREADY_EXISTS: _errno.EEXIST,
    ERROR_FILE_CORRUPT: _errno.EIO,
}


E_FAIL = 0x80004005
E_NOTIMPL = 0x80004001  # a newer CimFS feature whose on-disk layout is not public
_ERRNO[E_NOTIMPL] = _errno.EOPNOTSUPP
ERROR_DISK_FULL = HRESULT_FROM_WIN32(112)

_FROM_ERRNO = {
    _errno.ENOENT: ERROR_FILE_NOT_FOUND,
    _errno.EACCES: E_ACCESSDENIED,
    _errno.EPERM: E_ACCESSDENIED,
    _errno.EROFS: E_ACCESSDENIED,
    _errno.EEXIST: ERROR_FILE_EXISTS,
    _errno.ENOSPC: ERROR_DISK_FULL,
    _errno.EDQUOT: ERROR_DISK_FULL,
    _errno.ENOMEM: E_OUTOFMEMORY,
}


def hresult_from_oserror(e: OSError) -> int:
    """The HRESULT Windows would report for the failure behind an OSError."""
    return _FROM_ERRNO.get(e.errno or 0, E_FAIL)  # errno 0 and None: no mapping


class CimError(OSError):
    """A failed CimFS operation: ``.hresult``, ``.filename`` (path) and ``.strerror`` (reason)."""

    strerror: str  # always given (OSError's may be None)

    def __init__(self, hresult: int, reason: str, path: str | None = None):
        super().__init__(_ERRNO.get(hresult, _errno.EIO), reason, path)
        self.hresult = hresult

    def __str__(self) -> str:
        if self.filename is not None:
            return f"{self.filename}: {self.strerror}"
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, tuple]:
        return (type(self), (self.hresult, self.strerror, self.filename))


class CimFormatError(CimError):
    """The image being read is corrupt, truncated or of an unsupported version."""

    def __init__(self, reason: str, path: str | None = None, hresult: int = ERROR_FILE_CORRUPT):
        super().__init__(hresult, reason, path)

    def __reduce__(self) -> tuple[object, tuple]:
        return (type(self), (self.strerror, self.filename, self.hresult))
