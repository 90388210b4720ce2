"""Image-relative paths and the names inside them (spec §11, §15).

Paths are ``\\`` separated (``/`` accepted), a leading separator is allowed and
``""`` is the root.  ``dir\\file:stream`` names an alternate data stream.
Names sort and compare case-insensitively through an image's upcase table.
"""

from __future__ import annotations

import array
import re
import sys

from .errors import ERROR_INVALID_NAME, CimError

MAX_NAME_UNITS = 255
MAX_PATH_UNITS = 32767
# A path of at most this many code points is short enough in UTF-16 (a code
# point takes at most two units); only a longer one needs measuring.
PATH_CHECK_FROM = MAX_PATH_UNITS // 2

_SEPARATORS = re.compile(r"[\\/]+")
# A surrogate code point in a str is a UTF-16 surrogate that is not part of a
# pair (a pair is one code point): other readers cannot sort such a name, so
# it would hide its neighbours in a link table.
_BAD_CHARS = re.compile(r'[\x00-\x1f\\/:*?"<>|\ud800-\udfff]')


def utf16_units(s: str) -> int:
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def name_is_valid(name: str) -> bool:
    """What :func:`check_name` accepts, as a bool (for a fast path that
    hands anything else to the checked one)."""
    return (
        bool(name)
        and name != "."
        and name != ".."
        and not _BAD_CHARS.search(name)
        and (len(name) <= MAX_NAME_UNITS // 2 or utf16_units(name) <= MAX_NAME_UNITS)
    )


def check_name(name: str, path: str, what: str = "name") -> None:
    if not name:
        raise CimError(ERROR_INVALID_NAME, f"empty {what} component", path)
    if name in (".", ".."):
        raise CimError(ERROR_INVALID_NAME, f"{what} component {name!r} is not allowed", path)
    bad = _BAD_CHARS.search(name)
    if bad:
        if "\ud800" <= bad.group() <= "\udfff":
            raise CimError(
                ERROR_INVALID_NAME,
                f"{what} {name!r} contains the unpaired UTF-16 surrogate U+{ord(bad.group()):04X}",
                path,
            )
        raise CimError(ERROR_INVALID_NAME, f"{what} {name!r} contains the invalid character {bad.group()!r}", path)
    if len(name) > MAX_NAME_UNITS // 2 and utf16_units(name) > MAX_NAME_UNITS:
        raise CimError(
            ERROR_INVALID_NAME, f"{what} {name[:40]!r}... is longer than {MAX_NAME_UNITS} UTF-16 units", path
        )


def check_path_length(path: str) -> None:
    """A whole path is at most MAX_PATH_UNITS UTF-16 units (spec §15): the
    readers of other tools refuse longer ones."""
    if utf16_units(path) > MAX_PATH_UNITS:
        raise CimError(ERROR_INVALID_NAME, f"path is longer than {MAX_PATH_UNITS} UTF-16 units", path[:80] + "...")


def split_path(path: str, allow_stream: bool = False, strict: bool = True) -> tuple[list[str], str | None]:
    """Split and validate an image path; returns (components, stream name or None).

    ``strict=False`` is for looking names up in an image: a reader lists names
    with characters Windows would not create (control characters, ``*?<>|"``)
    as they are stored, so it must be able to find them again by path."""
    if not isinstance(path, str):
        raise CimError(ERROR_INVALID_NAME, f"path must be a str, not {type(path).__name__}", repr(path))
    if len(path) > MAX_PATH_UNITS // 2:
        check_path_length(path)
    parts = [p for p in _SEPARATORS.split(path) if p]
    check = check_name if strict else _check_lookup_name
    stream = None
    if allow_stream and parts and ":" in parts[-1]:
        last, _, stream = parts[-1].partition(":")
        # "name:stream:$DATA" is the fully qualified form of "name:stream".
        if stream.upper().endswith(":$DATA"):
            stream = stream[:-6]
        parts[-1] = last
        check(stream, path, "stream name")
    for p in parts:
        check(p, path)
    return parts, stream


def split_stream(path: str) -> tuple[str, str | None]:
    """``dir/file:stream`` -> (``dir/file``, ``stream``); a path without a stream -> (path, None).
    ``name:stream:$DATA`` is the fully qualified form of ``name:stream``."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    last = parts[-1]
    if ":" in last:
        name, _, stream = last.partition(":")
        if stream.upper().endswith(":$DATA"):
            stream = stream[:-6]
        parts[-1] = name
        return "/".join(parts), stream
    return path, None


def _check_lookup_name(name: str, path: str, what: str = "name") -> None:
    if not name or name in (".", ".."):
        check_name(name, path, what)  # raises: empty, "." and ".." never name an entry
    if "\0" in name:
        raise CimError(ERROR_INVALID_NAME, f"{what} {name!r} contains the invalid character '\\x00'", path)


def join_path(parts) -> str:
    return "\\".join(parts)


class NameFolder:
    """Case folding through one upcase table: ``key(name)`` sorts like the image.

    A BMP code unit maps through the table; a supplementary code point stays
    as it is.  Python compares str by code point, which is exactly the order of
    spec §11 once BMP characters are mapped.
    """

    _cache: dict[bytes, NameFolder] = {}

    def __init__(self, table: bytes):
        units = array.array("H")
        units.frombytes(table)
        if sys.byteorder != "little":
            units.byteswap()
        self._table = bytes(table)  # little-endian, as stored
        self._units = units
        self._map: dict[int, int] | None = None  # built at the first name that needs it
        # ASCII names are by far the most common: fold them with str.upper's
        # fast path when the table agrees with it for ASCII.
        self._ascii_upper = all(units[c] == ord(chr(c).upper()) for c in range(128))

    def _build_map(self) -> dict[int, int]:
        """The units the table changes (~1 000 of 65 536, in ~20 blocks of
        256), found a block at a time against the identity's bytes: a walk of
        every unit took ~10 ms, paid by every command that opened an image,
        even when all its names were ASCII."""
        units = self._units
        identity = bytearray(512)  # units hi*256 .. hi*256+255, little-endian
        identity[0::2] = bytes(range(256))
        changed: dict[int, int] = {}
        for hi in range(min(256, (len(units) + 255) // 256)):
            identity[1::2] = bytes((hi,)) * 256
            chunk = self._table[hi * 512 : hi * 512 + 512]
            if chunk != identity[: len(chunk)]:
                start = hi * 256
                changed.update((start + i, u) for i, u in enumerate(units[start : start + 256]) if u != start + i)
        self._map = changed
        return changed

    @classmethod
    def for_table(cls, table: bytes) -> NameFolder:
        folder = cls._cache.get(table)
        if folder is None:
            folder = cls._cache[bytes(table)] = cls(table)
        return folder

    def key(self, name: str) -> str:
        if self._ascii_upper and name.isascii():
            return name.upper()
        return name.translate(self._map if self._map is not None else self._build_map())


_default_folder: NameFolder | None = None


def fold_key():
    """:func:`fold_name` as a bound method (a loop over many names skips a call layer)."""
    global _default_folder
    if _default_folder is None:
        from .layout.cim import load_upcase_table  # start-up time: loaded at the first non-ASCII name

        _default_folder = NameFolder.for_table(load_upcase_table())
    return _default_folder.key


def fold_name(name: str) -> str:
    """The case-insensitive key of ``name`` under the upcase table cimfs writes
    into new images: two names with equal keys collide in one directory."""
    return (_default_folder.key if _default_folder is not None else fold_key())(name)
