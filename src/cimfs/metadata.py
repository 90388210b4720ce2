"""What a caller says about a file: Win32 attributes, FILETIMEs and NTFS blobs."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .layout.cim import FILETIME_UNIX_EPOCH


class FileAttributes(enum.IntFlag):
    READONLY = 0x1
    HIDDEN = 0x2
    SYSTEM = 0x4
    DIRECTORY = 0x10
    ARCHIVE = 0x20
    NORMAL = 0x80
    SPARSE_FILE = 0x200
    REPARSE_POINT = 0x400


@dataclass(slots=True)  # one per file of an import: no __dict__ to build
class FileMetadata:
    """The metadata argument of ``CimCreateFile`` (``CIMFS_FILE_METADATA``).

    Times are FILETIME ticks (100 ns since 1601-01-01 UTC).  ``reparse_data`` is
    the whole REPARSE_DATA_BUFFER, tag first; ``ea_buffer`` the raw
    FILE_FULL_EA_INFORMATION chain.  The DIRECTORY attribute makes a directory.
    """

    attributes: int = 0
    file_size: int = 0
    creation_time: int = 0
    last_write_time: int = 0
    change_time: int = 0
    last_access_time: int = 0
    security_descriptor: bytes = b""
    reparse_data: bytes = b""
    ea_buffer: bytes = b""

    @property
    def is_dir(self) -> bool:
        return bool(int(self.attributes) & 0x10)  # int, not IntFlag: this is on the per-file hot path


def filetime_from_ns(ns: int) -> int:
    """Unix nanoseconds → FILETIME ticks (100 ns resolution, floor)."""
    return ns // 100 + FILETIME_UNIX_EPOCH


def filetime_to_ns(ticks: int) -> int:
    return (ticks - FILETIME_UNIX_EPOCH) * 100
