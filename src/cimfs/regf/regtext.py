"""Registry hives as ``.reg`` text, in the "Windows Registry Editor Version 5.00"
format regedit exports, so registries can be compared with ordinary tools.

The format, as regedit writes it:

- a header line ``Windows Registry Editor Version 5.00`` and a blank line;
- each key as ``[<full path>]``, its values, then a blank line, keys in
  pre-order (a key before its subkeys), subkeys and values in the hive's
  stored order;
- a value as ``"name"=<data>``, or ``@=<data>`` for the default (unnamed)
  value; ``\\`` and ``"`` in names and strings escaped with a backslash;
- REG_SZ as ``"text"``, a 4-byte REG_DWORD as ``dword:%08x``, REG_BINARY as
  ``hex:`` and every other type as ``hex(<type in lowercase hex>):``, bytes as
  two lowercase hex digits separated by commas, lines wrapped once they reach
  77 columns with a ``,\\`` ending and a two-space indent (25 bytes a
  continuation line: at most 80 columns);
- CRLF line ends, in UTF-16LE with a byte order mark.

[choice]s where regedit's own output would lose bytes or has no equivalent:

- a REG_SZ that is not clean UTF-16LE text ending in one NUL (odd size, no
  terminator, a NUL before its end, a lone surrogate, a CR or LF, which
  regedit writes raw and breaks the line) is written as ``hex(1):`` so that
  the exact bytes survive;
- a differencing hive's tombstone value is written ``"name"=-`` and a
  tombstone key ``[-<path>]``, the deletions of the .reg syntax; other layer
  semantics (supersede, inherit class) have no .reg form and are not shown;
- ``encoding="utf-8"`` writes the same text in UTF-8 without a byte order
  mark, for tools that do not read UTF-16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .errors import HiveFormatError
from .layout import MAX_DEPTH, REG_BINARY, REG_DWORD, REG_SZ, TOMBSTONE

if TYPE_CHECKING:  # annotations only
    from .reader import Key

HEADER = "Windows Registry Editor Version 5.00"
WRAP_AT = 77  # regedit ends a hex line once it reaches this many columns
CONTINUATION = "  "


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _clean_string(data: bytes) -> str | None:
    """REG_SZ data as text when regedit's ``"..."`` form keeps every byte, else None."""
    if len(data) % 2 or not data.endswith(b"\0\0"):
        return None  # regedit would write the text and a re-import would add the terminator
    body = data[:-2]
    try:
        text = body.decode("utf-16-le", "strict")
    except UnicodeDecodeError:
        return None
    if "\0" in text or "\r" in text or "\n" in text:
        return None
    return text


def _hex(prefix_len: int, type_text: str, data: bytes) -> str:
    """``type_text`` followed by ``data`` as comma-separated hex, wrapped as regedit wraps it; ``prefix_len``
    is the width of what precedes it on the first line (``"name"=``)."""
    out = [type_text]
    column = prefix_len + len(type_text)
    last = len(data) - 1
    for i, b in enumerate(data):
        out.append(f"{b:02x}")
        if i == last:
            break
        out.append(",")
        column += 3
        if column >= WRAP_AT:
            out.append("\\\r\n" + CONTINUATION)
            column = len(CONTINUATION)
    return "".join(out)


def value_line(name: str, type_: int, data: bytes, tombstone: bool = False) -> str:
    """One value as regedit writes it (without the line end)."""
    head = "@=" if name == "" else f'"{escape(name)}"='
    if tombstone:
        return head + "-"
    if type_ == REG_SZ:
        text = _clean_string(data)
        if text is not None:
            return f'{head}"{escape(text)}"'
    if type_ == REG_DWORD and len(data) == 4:
        return f"{head}dword:{int.from_bytes(data, 'little'):08x}"
    type_text = "hex:" if type_ == REG_BINARY else f"hex({type_:x}):"
    return head + _hex(len(head), type_text, data)


def key_lines(path: str, key: Key) -> Iterator[str]:
    """A key's block: ``[path]`` (``[-path]`` for a tombstone key), its values, a blank line."""
    if key.layer_semantics == TOMBSTONE:
        yield f"[-{path}]"
        yield ""
        return
    yield f"[{path}]"
    for v in key.values():
        yield value_line(v.name, v.type, b"" if v.tombstone else v.data, v.tombstone)
    yield ""


def export_lines(key: Key, prefix: str, label: str = "<hive>") -> Iterator[str]:
    """The .reg lines of ``key`` and everything below it; ``prefix`` is ``key``'s full path.  A key reached
    twice (a cycle in a damaged hive's lists) or nested deeper than 512 is a :class:`HiveFormatError`
    naming ``label``."""
    yield HEADER
    yield ""
    seen = set()
    stack = [(prefix, key, 0)]
    while stack:
        path, k, depth = stack.pop()
        if k.offset in seen:
            raise HiveFormatError(label, k.offset, "key reached twice (a cycle in the key lists)")
        seen.add(k.offset)
        yield from key_lines(path, k)
        if k.layer_semantics == TOMBSTONE or not k.subkey_count:
            continue
        if depth >= MAX_DEPTH:
            raise HiveFormatError(label, k.offset, f"keys nested deeper than {MAX_DEPTH}")
        stack.extend((f"{path}\\{c.name}", c, depth + 1) for c in reversed(k.subkeys()))


def encode(lines: Iterable[str], encoding: str = "utf-16") -> Iterator[bytes]:
    """The lines with CRLF ends, as UTF-16LE after a byte order mark (regedit) or as UTF-8."""
    if encoding in ("utf-16", "utf-16-le", "utf16"):
        yield b"\xff\xfe"
        codec = "utf-16-le"
    elif encoding in ("utf-8", "utf8"):
        codec = "utf-8"
    else:
        raise ValueError(f"unknown encoding {encoding!r} (utf-16 or utf-8)")
    for line in lines:
        yield (line + "\r\n").encode(codec, "surrogatepass")


def export_reg(key: Key, prefix: str, encoding: str = "utf-16") -> bytes:
    """The whole .reg file of ``key``'s subtree as bytes."""
    return b"".join(encode(export_lines(key, prefix), encoding))
