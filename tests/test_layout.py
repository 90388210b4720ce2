"""The byte layout module alone: link tables round trip and refuse what is malformed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimfs.errors import CimFormatError
from cimfs.layout import cim

# Valid stored names: no separators, stream colon or NUL; any other character,
# astral ones (two UTF-16 units) and lone surrogates included.
NAME = st.text(st.characters(blacklist_characters="\x00\\/:", blacklist_categories=("Cs",)), min_size=1, max_size=40)
NAME = NAME.filter(lambda n: n not in (".", "..")) | st.sampled_from(["\ud800x", "a\udfff", "\U0001f600.txt"])


@given(st.lists(NAME, max_size=30, unique=True))
def test_directory_table_round_trip(names):
    ids = list(range(5, 5 + len(names)))
    table = cim.pack_directory_table(names, ids)
    assert cim.unpack_link_table(table, 4, "t") == (names, ids)


@pytest.mark.parametrize("bad", [".", "..", "a/b", "a\\b", "a:b", "a\x00b"])
def test_directory_table_refuses_invalid_names(bad):
    table = cim.pack_directory_table(["ok", bad], [1, 2])
    with pytest.raises(CimFormatError, match="not a valid name"):
        cim.unpack_link_table(table, 4, "t")


@settings(max_examples=300)
@given(st.lists(NAME, min_size=1, max_size=8, unique=True), st.data())
def test_directory_table_corrupted_is_refused_or_read(names, data):
    """Any byte changed: a CimFormatError or names and ids, never anything else."""
    table = bytearray(cim.pack_directory_table(names, list(range(1, len(names) + 1))))
    for _ in range(data.draw(st.integers(1, 4))):
        table[data.draw(st.integers(0, len(table) - 1))] = data.draw(st.integers(0, 255))
    try:
        got_names, got_ids = cim.unpack_link_table(bytes(table), 4, "t")
    except CimFormatError:
        return
    assert len(got_names) == len(got_ids)
    for n in got_names:
        assert n and n not in (".", "..") and not any(c in n for c in "\x00\\/:")


def test_name_offsets_out_of_order_or_odd():
    """Offsets need not follow each other (nor be even): read name by name."""
    a, b = "first".encode("utf-16-le"), "second".encode("utf-16-le")
    count = 2
    head = 8 + 4 * count + 4 * count
    off_b = head + 1  # odd
    off_a = off_b + 2 + len(b) + 1  # an odd distance from the first name
    body = (
        struct.pack("<2I", 1, 2)
        + struct.pack("<2I", off_a, off_b)
        + b"\0"
        + struct.pack("<H", 6)
        + b
        + b"\0"
        + struct.pack("<H", 5)
        + a
    )
    table = struct.pack("<2I", 8 + len(body), count) + body
    assert cim.unpack_link_table(table, 4, "t") == (["first", "second"], [1, 2])
