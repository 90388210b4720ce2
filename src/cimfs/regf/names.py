"""Key and value names in hives: Windows' one-to-one upcase (``upcase``), the lh hash, name encodings
(compressed Latin-1 or UTF-16LE) and the order of subkey lists.

Windows sorts and compares hive names with RtlUpcaseUnicodeChar: one UTF-16 code unit in, one out.  That
is the table new CIM images carry too (``layout/upcase.bin``, made by tools/gen_upcase.py from Windows 10's
table; notes §1.6), so hives and images share one table, built into a translation map at first use and
independent of the running Python's Unicode database.  Code units outside the BMP (surrogate pairs) map to
themselves, as in Windows.
"""

from __future__ import annotations

import array
import sys

from ..layout.cim import load_upcase_table

_table: dict[int, int] | None = None


def _build_table() -> dict[int, int]:
    windows = array.array("H")
    windows.frombytes(load_upcase_table())
    if sys.byteorder != "little":
        windows.byteswap()
    return {cu: up for cu, up in enumerate(windows) if cu != up}


def upcase(name: str) -> str:
    """``name`` upper-cased as Windows compares registry names (RtlUpcaseUnicodeChar, code unit by code unit)."""
    global _table
    if _table is None:
        _table = _build_table()
    return name.translate(_table)


def lh_hash(upname: str) -> int:
    """The lh list hash of an already upper-cased name: h = 37*h + code unit, mod 2^32."""
    h = 0
    if upname.isascii() or max(upname) < "\U00010000":
        for ch in upname:
            h = (h * 37 + ord(ch)) & 0xFFFFFFFF
        return h
    units = array.array("H", upname.encode("utf-16-le", "surrogatepass"))
    if sys.byteorder != "little":
        units.byteswap()
    for cu in units:
        h = (h * 37 + cu) & 0xFFFFFFFF
    return h


def encode_name(name: str) -> tuple[bytes, bool]:
    """The stored bytes of a name and whether they are compressed (Latin-1: every character below U+0100,
    the Windows convention) rather than UTF-16LE."""
    try:
        return name.encode("latin-1"), True
    except UnicodeEncodeError:
        return name.encode("utf-16-le", "surrogatepass"), False


def decode_name(raw, compressed: bool) -> str:
    """A stored name as text; UTF-16 names keep unpaired surrogates (``surrogatepass``). Raises
    UnicodeDecodeError on an odd byte count (the caller turns it into a HiveFormatError)."""
    if compressed:
        return bytes(raw).decode("latin-1")
    return bytes(raw).decode("utf-16-le", "surrogatepass")


def utf16_bytes(name: str) -> int:
    """The length of ``name`` in UTF-16 bytes (what the Max*NameLen fields count)."""
    if name.isascii() or max(name, default="\0") < "\U00010000":
        return 2 * len(name)
    return len(name.encode("utf-16-le", "surrogatepass"))


def order_key(upnames) -> object:
    """The sort key putting upper-cased names in code-unit order (Windows' list order).  Python compares
    code points, which differs from code-unit order only for characters beyond the BMP."""
    if all(u.isascii() or max(u, default="\0") < "\U00010000" for u in upnames):
        return None
    return lambda u: u.encode("utf-16-be", "surrogatepass")
