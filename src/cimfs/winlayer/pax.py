"""The vocabulary shared by the layer importer and exporter: the PAX records
hcsshim writes (``MSWINDOWS.*``, ``LIBARCHIVE.creationtime``, this project's
``CIMFS.rawreparse``), the layer's top-level names and whiteout prefixes,
PAX time <-> FILETIME conversions, and the ``progress`` callable adapter.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

# ------------------------------------------------------------------ constants
PAX_FILEATTR = "MSWINDOWS.fileattr"
PAX_RAWSD = "MSWINDOWS.rawsd"
PAX_SDDL = "MSWINDOWS.sd"
PAX_MOUNTPOINT = "MSWINDOWS.mountpoint"
PAX_EA_PREFIX = "MSWINDOWS.xattr."
PAX_CREATIONTIME = "LIBARCHIVE.creationtime"
# [choice] our own record: the exact reparse buffer, written on export only when
# the symlink entry's link name would not rebuild the same bytes (or the tag is
# not a symlink / mount point).  Other readers ignore unknown PAX records.
PAX_RAWREPARSE = "CIMFS.rawreparse"

LAYER_TOP_LEVEL = ("Files", "Hives", "UtilityVM")
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

FILETIME_UNIX_EPOCH = 116444736000000000
_FILETIME_MAX = (1 << 64) - 1

IO_REPARSE_TAG_MOUNT_POINT = 0xA0000003
IO_REPARSE_TAG_SYMLINK = 0xA000000C

CHUNK = 1 << 20

Progress = Callable[[int, str], None]


def _ntfs():
    from ..layout import ntfs  # imported late: a sibling module of the library

    return ntfs


# ------------------------------------------------------------------ times
_PAX_TIME = re.compile(r"([-+]?)([0-9]+)(?:\.([0-9]*))?")


def parse_pax_time(text: str) -> int:
    """A PAX time (``[-]sec[.frac]``) as integer nanoseconds, exactly (no float).

    ``-1.5`` is 1.5 s before the epoch (Go's and libarchive's reading).
    """
    m = _PAX_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a PAX time: {text!r}")
    sign, sec, frac = m.groups()
    ns = int(sec) * 1_000_000_000 + int(((frac or "") + "000000000")[:9])
    return -ns if sign == "-" else ns


def format_pax_time(ns: int) -> str:
    """Integer nanoseconds as a PAX time with nine fractional digits."""
    sign = "-" if ns < 0 else ""
    a = abs(ns)
    return f"{sign}{a // 1_000_000_000}.{a % 1_000_000_000:09d}"


def pax_time_to_filetime(text: str) -> int:
    """``sec.nsec`` → FILETIME ticks (sec*10^7 + nsec//100 + 116444736000000000)."""
    ticks = parse_pax_time(text) // 100 + FILETIME_UNIX_EPOCH
    if not 0 <= ticks <= _FILETIME_MAX:
        raise ValueError(f"time {text!r} is outside the FILETIME range")
    return ticks


def filetime_to_pax_time(ticks: int) -> str:
    return format_pax_time((ticks - FILETIME_UNIX_EPOCH) * 100)


# ------------------------------------------------------------------ progress
def _progress_adapter(progress) -> Callable[[int, str], None]:
    """``progress(n, path)``; a callable taking only ``n`` is accepted too."""
    if progress is None:
        return lambda n, path: None
    try:
        sig = inspect.signature(progress)
    except (TypeError, ValueError):
        return progress
    try:
        sig.bind(0, "")
        return progress
    except TypeError:
        pass
    try:
        sig.bind(0)
    except TypeError:
        return progress
    return lambda n, path: progress(n)
