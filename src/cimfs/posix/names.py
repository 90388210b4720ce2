"""Names, paths and times, POSIX side <-> image side.

Owns the WSL escaping of the characters a CIM name cannot hold (stored as
U+F000 + the character), the checks a name must pass to enter an image, the
case-insensitive key (``fold``) collisions are judged by, the splitting and
joining of slash paths, and the conversions between POSIX nanoseconds (and
PAX time strings) and FILETIME ticks.  Pure functions: no I/O.
"""

from __future__ import annotations

import re

from ..errors import ERROR_INVALID_NAME, CimError
from ..names import fold_name

# --------------------------------------------------------------------- times
FILETIME_UNIX_EPOCH = 116444736000000000


def ns_to_filetime(ns: int) -> int:
    """POSIX nanoseconds -> FILETIME ticks (truncated to 100 ns)."""
    return ns // 100 + FILETIME_UNIX_EPOCH


def filetime_to_ns(ft: int) -> int:
    return (ft - FILETIME_UNIX_EPOCH) * 100


def parse_pax_time(text: str) -> int:
    """A PAX time (``[-]sec[.frac]``) as integer nanoseconds, exactly."""
    t = text.strip()
    neg = t.startswith("-")
    if neg or t.startswith("+"):
        t = t[1:]
    sec, _, frac = t.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(f"bad PAX time {text!r}")
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def format_pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    a = abs(ns)
    return f"{sign}{a // 1_000_000_000}.{a % 1_000_000_000:09d}"


# --------------------------------------------------------------------- names
_ESCAPED = '\\:*?"<>|' + "".join(chr(c) for c in range(1, 32))
_TO_IMAGE = {ord(c): 0xF000 + ord(c) for c in _ESCAPED}
_FROM_IMAGE = {v: k for k, v in _TO_IMAGE.items()}


_NEEDS_ESCAPE = re.compile("[" + re.escape(_ESCAPED) + "]")


def name_to_image(name: str) -> str:
    """A POSIX file name as stored in an image (WSL private-use escaping)."""
    return name.translate(_TO_IMAGE) if _NEEDS_ESCAPE.search(name) else name


def name_from_image(name: str) -> str:
    return name if name.isascii() else name.translate(_FROM_IMAGE)  # the escapes are all U+F0xx


def check_image_name(name: str, where: str) -> None:
    if name in ("", ".", ".."):
        raise CimError(ERROR_INVALID_NAME, f"invalid name {name!r}", where)
    if len(name) <= 255 and name.isascii():
        return  # the common case: short enough in any encoding
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        raise CimError(ERROR_INVALID_NAME, "name is not valid UTF-8", where) from None
    if units > 255:
        raise CimError(ERROR_INVALID_NAME, "name is longer than 255 UTF-16 units", where)


fold = fold_name  # case-insensitive key, through the upcase table new images carry (spec §7)


def _split(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p]


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b
