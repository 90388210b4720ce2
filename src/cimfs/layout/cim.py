"""The byte layout of a standard CIM (spec §2–§14): the one place that packs and
unpacks CIM structures.  The reader and the writer both stand on it.

Unpackers raise ``CimFormatError`` for anything that does not fit: callers hand
them untrusted bytes.
"""

from __future__ import annotations

import codecs
import itertools
import operator
import os
import re
import struct
import sys
import uuid
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import CimFormatError

MAGIC = b"cimfile0"

FILE_TYPE_FILESYSTEM = 0
FILE_TYPE_REGION = 1
FILE_TYPE_OBJECTID = 2

# [choice] we write 2.0, the oldest version current Windows reads; we read 2.x and 3.x.
WRITE_VERSION = (2, 0)
READ_MAJOR_VERSIONS = (2, 3)

REGION_METADATA = 0
REGION_DATA = 1
REGION_SMALL_DATA = 2
REGION_TYPE_NAMES = {REGION_METADATA: "metadata", REGION_DATA: "data", REGION_SMALL_DATA: "small data"}

# Alignment of objects inside each kind of region (spec §4: data 4096, small
# data 8).  [choice] Small data is 512-aligned (a multiple of 8), so an EROFS
# index with 512-byte blocks addresses every object in place (cimfs.erofs);
# the stdlib image grows 1.3 % (3.1 % over squashfs instead of 1.8 %).
REGION_ALIGNMENT = {REGION_METADATA: 8, REGION_DATA: 4096, REGION_SMALL_DATA: 512}

MAX_REGIONS = 65536
MAX_REGION_BYTE_OFFSET = (1 << 48) - 1
MAX_STREAM_LENGTH = (1 << 48) - 1
FILE_TABLE_CAPACITY = 1024
#: FileIDs are 32-bit, so no image has more file tables than this.
MAX_FILE_TABLES = ((1 << 32) - 1 + FILE_TABLE_CAPACITY - 1) // FILE_TABLE_CAPACITY
#: A stored name (file or stream) is at most this many UTF-16 code units, as on NTFS.
MAX_NAME_UNITS = 255
FILE_RECORD_SIZE = 96
UPCASE_TABLE_SIZE = 65536 * 2

STREAM_TYPE_DATA = 0
STREAM_TYPE_LINK_TABLE = 1
STREAM_TYPE_PE_IMAGE = 2

# File record flags (spec §9) and the Win32 attributes they stand for.
FLAG_READONLY = 0x1
FLAG_HIDDEN = 0x2
FLAG_SYSTEM = 0x4
FLAG_ARCHIVE = 0x8
FLAG_SPARSE = 0x10
FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_HIDDEN = 0x2
FILE_ATTRIBUTE_SYSTEM = 0x4
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_ARCHIVE = 0x20
FILE_ATTRIBUTE_NORMAL = 0x80
FILE_ATTRIBUTE_SPARSE_FILE = 0x200
FILE_ATTRIBUTE_REPARSE_POINT = 0x400
_FLAG_TO_ATTRIBUTE = (
    (FLAG_READONLY, FILE_ATTRIBUTE_READONLY),
    (FLAG_HIDDEN, FILE_ATTRIBUTE_HIDDEN),
    (FLAG_SYSTEM, FILE_ATTRIBUTE_SYSTEM),
    (FLAG_ARCHIVE, FILE_ATTRIBUTE_ARCHIVE),
    (FLAG_SPARSE, FILE_ATTRIBUTE_SPARSE_FILE),
)

FILETIME_UNIX_EPOCH = 116444736000000000

COMMON_HEADER = struct.Struct("<8sIBBHIIQ")  # 32
REGION_HEADER = struct.Struct("<8sIBBHIIQHBBI")  # 40
OBJECTID_HEADER = struct.Struct("<8sIBBHIIQHBBIII")  # 48
OBJECTID_ENTRY = struct.Struct("<Q24sQ")  # 40
REGION_SET = struct.Struct("<16sHHI")  # 24
FILESYSTEM_HEADER = struct.Struct("<8sIBBHIIQ16sHHIQIHH")  # 72
FILESYSTEM_OBJECT = struct.Struct("<QQII")  # 24
FILE_TABLE_DIR_ENTRY = struct.Struct("<QHHI")  # 16
FILE_RECORD = struct.Struct("<HHIQQQQQQQQQQIHH")  # 96
STREAM = struct.Struct("<QQ")  # 16
PE_IMAGE = struct.Struct("<QQIHH")  # 24
PE_MAPPING = struct.Struct("<II")  # 8
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
LINK_TABLE_HEADER = struct.Struct("<II")

DIGEST_SIZE = 24
assert FILE_RECORD.size == FILE_RECORD_SIZE and FILESYSTEM_HEADER.size == 72


def load_upcase_table() -> bytes:
    """The fixed upcase table cimfs writes into new images and sorts their names
    with: Windows' own (``RtlUpcaseUnicodeChar``; spec §7 [choice], made by
    tools/gen_upcase.py).  An image read or forked uses the table it stores."""
    # read beside this module, not through importlib.resources: that import
    # (pathlib, zipfile, tempfile) was a fifth of every command's start-up
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "upcase.bin"), "rb") as f:
        data = f.read()
    assert len(data) == UPCASE_TABLE_SIZE
    return data


# ---------------------------------------------------------------- offsets
def region_offset(region_index: int, byte_offset: int) -> int:
    return (region_index << 48) | byte_offset


def split_region_offset(ro: int) -> tuple[int, int]:
    return ro >> 48, ro & MAX_REGION_BYTE_OFFSET


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) & ~(alignment - 1)


# ---------------------------------------------------------------- headers
class RegionSet(NamedTuple):
    id: uuid.UUID
    count: int  # type: ignore[assignment]  # the format's name; it hides tuple.count, which nothing here calls

    def pack(self) -> bytes:
        return REGION_SET.pack(self.id.bytes_le, self.count, 0, 0)

    def file_name(self, kind: str, index: int) -> str:
        """``region_<guid>_<i>`` or ``objectid_<guid>_<i>`` (spec §1)."""
        return f"{kind}_{self.id}_{index}"


def unpack_region_set(buf: bytes, off: int) -> RegionSet:
    raw, count, _, _ = REGION_SET.unpack_from(buf, off)
    return RegionSet(uuid.UUID(bytes_le=raw), count)


def _check_common(buf: bytes, file_type: int, what: str) -> tuple[int, int]:
    if len(buf) < COMMON_HEADER.size:
        raise CimFormatError(f"{what} is truncated ({len(buf)} bytes)")
    magic, _hlen, ftype, _r1, _r2, major, minor, _r3 = COMMON_HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CimFormatError(f"{what} has bad magic {magic!r}")
    if ftype != file_type:
        raise CimFormatError(f"{what} has file type {ftype}, expected {file_type}")
    if major not in READ_MAJOR_VERSIONS:
        raise CimFormatError(f"{what} has unsupported format version {major}.{minor}")
    return major, minor


class FilesystemHeader(NamedTuple):
    version: tuple[int, int]
    region_set: RegionSet
    filesystem_offset: int
    parent_sets: tuple[RegionSet, ...]


def pack_filesystem_header(own: RegionSet, filesystem_offset: int, parents: list[RegionSet]) -> bytes:
    head = FILESYSTEM_HEADER.pack(
        MAGIC,
        FILESYSTEM_HEADER.size,
        FILE_TYPE_FILESYSTEM,
        0,
        0,
        *WRITE_VERSION,
        0,
        own.id.bytes_le,
        own.count,
        0,
        0,
        filesystem_offset,
        0,
        0,
        len(parents),
    )
    return head + b"".join(p.pack() for p in parents)


def sniff_file_type(buf: bytes) -> int | None:
    """The file type (``FILE_TYPE_*``) of a file whose first bytes are ``buf``,
    or None when they do not start like a CIM file (too short, other magic)."""
    if len(buf) < COMMON_HEADER.size or buf[: len(MAGIC)] != MAGIC:
        return None
    return COMMON_HEADER.unpack_from(buf, 0)[2]


def filesystem_header_length(buf: bytes) -> int:
    """Bytes the filesystem header takes with its parent region sets, from its
    fixed part (``buf`` holds at least ``FILESYSTEM_HEADER.size`` bytes)."""
    if len(buf) < FILESYSTEM_HEADER.size:
        raise CimFormatError(f"filesystem file is truncated ({len(buf)} bytes)")
    return FILESYSTEM_HEADER.size + FILESYSTEM_HEADER.unpack_from(buf, 0)[15] * REGION_SET.size


REGION_FILE_NAME = re.compile(r"^(region|objectid)_([0-9a-fA-F-]{36})_(\d+)$", re.IGNORECASE)
"""Names of region and object ID files (spec §1): kind, set id, index."""


def unpack_filesystem_header(buf: bytes) -> FilesystemHeader:
    version = _check_common(buf, FILE_TYPE_FILESYSTEM, "filesystem file")
    if len(buf) < FILESYSTEM_HEADER.size:
        raise CimFormatError(f"filesystem file is truncated ({len(buf)} bytes)")
    f = FILESYSTEM_HEADER.unpack_from(buf, 0)
    own = unpack_region_set(buf, COMMON_HEADER.size)
    fs_offset, parent_count = f[12], f[15]
    end = FILESYSTEM_HEADER.size + parent_count * REGION_SET.size
    if len(buf) < end:
        raise CimFormatError(f"filesystem file lists {parent_count} parent region sets but is only {len(buf)} bytes")
    parents = tuple(unpack_region_set(buf, FILESYSTEM_HEADER.size + i * REGION_SET.size) for i in range(parent_count))
    return FilesystemHeader(version, own, fs_offset, parents)


def pack_region_header(index: int, region_type: int) -> bytes:
    return REGION_HEADER.pack(
        MAGIC, REGION_HEADER.size, FILE_TYPE_REGION, 0, 0, *WRITE_VERSION, 0, index, region_type, 0, 0
    )


def unpack_region_header(buf: bytes, what: str) -> tuple[int, int]:
    """Returns (index, region type)."""
    _check_common(buf, FILE_TYPE_REGION, what)
    if len(buf) < REGION_HEADER.size:
        raise CimFormatError(f"{what} is truncated")
    f = REGION_HEADER.unpack_from(buf, 0)
    return f[8], f[9]


def pack_objectid_file(index: int, region_type: int, entries: Iterable[tuple[int, bytes, int]]) -> bytes:
    """``entries`` (any iterable, consumed once) are (length, digest, byte
    offset), already sorted by (length, digest)."""
    pack = OBJECTID_ENTRY.pack
    body = bytearray()  # grown in place: no list of a million small bytes objects
    for n, d, o in entries:
        body += pack(n, d, o)
    head = OBJECTID_HEADER.pack(
        MAGIC,
        OBJECTID_HEADER.size,
        FILE_TYPE_OBJECTID,
        0,
        0,
        *WRITE_VERSION,
        0,
        index,
        region_type,
        0,
        0,
        OBJECTID_HEADER.size,
        len(body) // OBJECTID_ENTRY.size,
    )
    return head + body


def unpack_objectid_header(buf, what: str) -> tuple[int, int]:
    """Returns (table offset, count), checked against the buffer's size."""
    _check_common(buf, FILE_TYPE_OBJECTID, what)
    if len(buf) < OBJECTID_HEADER.size:
        raise CimFormatError(f"{what} is truncated")
    f = OBJECTID_HEADER.unpack_from(buf, 0)
    table, count = f[12], f[13]
    if table + count * OBJECTID_ENTRY.size > len(buf):
        raise CimFormatError(f"{what}: {count} entries at {table} run past the end of the file")
    return table, count


# ---------------------------------------------------------------- filesystem object, file tables
class FilesystemObject(NamedTuple):
    upcase_offset: int
    file_table_directory_offset: int
    file_table_count: int
    root_file_id: int


def pack_filesystem_object(o: FilesystemObject) -> bytes:
    return FILESYSTEM_OBJECT.pack(*o)


def unpack_filesystem_object(buf) -> FilesystemObject:
    return FilesystemObject(*FILESYSTEM_OBJECT.unpack_from(buf, 0))


class FileTableEntry(NamedTuple):
    offset: int
    count: int  # type: ignore[assignment]  # the format's name; it hides tuple.count, which nothing here calls
    entry_size: int


def pack_file_table_directory(entries: list[FileTableEntry]) -> bytes:
    return b"".join(FILE_TABLE_DIR_ENTRY.pack(e.offset, e.count, e.entry_size, 0) for e in entries)


def unpack_file_table_entry(buf, index: int) -> FileTableEntry:
    return FileTableEntry(*FILE_TABLE_DIR_ENTRY.unpack_from(buf, index * FILE_TABLE_DIR_ENTRY.size)[:3])


def file_table_record_total(buf, count: int) -> int:
    """The sum of the record counts of ``count`` directory entries, each capped at FILE_TABLE_CAPACITY."""
    cap = FILE_TABLE_CAPACITY
    return sum(min(e[1], cap) for e in FILE_TABLE_DIR_ENTRY.iter_unpack(buf[: count * FILE_TABLE_DIR_ENTRY.size]))


def unpack_file_table_directory(buf, count: int) -> list[FileTableEntry]:
    return [FileTableEntry(*FILE_TABLE_DIR_ENTRY.unpack_from(buf, i * 16)[:3]) for i in range(count)]


# ---------------------------------------------------------------- streams and records
class Stream(NamedTuple):
    """A stream descriptor (spec §10)."""

    offset: int  # RegionOffset of the data (or link table / PE image object)
    length: int
    type: int = STREAM_TYPE_DATA
    sparse: bool = False

    def pack(self) -> bytes:
        return STREAM.pack(self.offset, self.packed_length())

    def packed_length(self) -> int:
        return self.length | (self.type << 48) | (int(self.sparse) << 56)


def placeholder_stream_word(length: int) -> int:
    """The packed length word of ``Stream(0, length, STREAM_TYPE_DATA, sparse=True)``:
    a file whose contents are still being copied reads as zeros until then."""
    return length | (STREAM_TYPE_DATA << 48) | (1 << 56)


EMPTY_STREAM = Stream(0, 0)


def unpack_stream(offset: int, packed: int) -> Stream:
    return _tuple_new(Stream, (offset, packed & MAX_STREAM_LENGTH, (packed >> 48) & 0xFF, bool((packed >> 56) & 1)))


# tuple.__new__ directly: a NamedTuple's own __new__ is a Python function, a
# third of the cost of reading a record in a walk
_tuple_new = tuple.__new__


class FileRecord(NamedTuple):
    flags: int = 0
    ea_length: int = 0
    reparse_tag: int = 0
    creation_time: int = 0
    last_write_time: int = 0
    change_time: int = 0
    last_access_time: int = 0
    stream: Stream = EMPTY_STREAM
    security_descriptor_offset: int = 0
    ea_offset: int = 0
    reparse_offset: int = 0
    stream_table_offset: int = 0
    parent_file_id: int = 0

    @property
    def is_dir(self) -> bool:
        return self.stream.type == STREAM_TYPE_LINK_TABLE

    def attributes(self) -> int:
        attrs = 0
        for flag, attr in _FLAG_TO_ATTRIBUTE:
            if self.flags & flag:
                attrs |= attr
        if self.is_dir:
            attrs |= FILE_ATTRIBUTE_DIRECTORY
        if self.reparse_offset:
            attrs |= FILE_ATTRIBUTE_REPARSE_POINT
        return attrs or FILE_ATTRIBUTE_NORMAL


def attributes_to_flags(attributes: int) -> int:
    a = int(attributes)
    return (
        (a & 0x7)
        | (FLAG_ARCHIVE if a & FILE_ATTRIBUTE_ARCHIVE else 0)
        | (FLAG_SPARSE if a & FILE_ATTRIBUTE_SPARSE_FILE else 0)
    )


def pack_file_record(r: FileRecord) -> bytes:
    s = r.stream
    return FILE_RECORD.pack(
        r.flags,
        r.ea_length,
        r.reparse_tag,
        r.creation_time,
        r.last_write_time,
        r.change_time,
        r.last_access_time,
        s.offset,
        s.packed_length(),
        r.security_descriptor_offset,
        r.ea_offset,
        r.reparse_offset,
        r.stream_table_offset,
        r.parent_file_id,
        0,
        0,
    )


def pack_new_file_record(
    flags: int,
    ea_length: int,
    reparse_tag: int,
    creation_time: int,
    last_write_time: int,
    change_time: int,
    last_access_time: int,
    stream_offset: int,
    stream_word: int,
    security_descriptor_offset: int,
    ea_offset: int,
    reparse_offset: int,
) -> bytes:
    """A new file's record from its fields, with no stream table and its
    parent FileID still 0 (both patched by :func:`record_with`): the hot path
    of an import packs without building a FileRecord and a Stream first."""
    return FILE_RECORD.pack(
        flags,
        ea_length,
        reparse_tag,
        creation_time,
        last_write_time,
        change_time,
        last_access_time,
        stream_offset,
        stream_word,
        security_descriptor_offset,
        ea_offset,
        reparse_offset,
        0,
        0,
        0,
        0,
    )


_RECORD_STREAM_AT = 40  # u64 offset + u64 length/type word of the default stream
_RECORD_STREAM_TABLE_AT = 80  # u64 stream table offset
_RECORD_PARENT_AT = 88  # u32 parent FileID
_U64 = struct.Struct("<Q")
# The byte of a record holding its stream's sparse flag: bit 56 of the
# little-endian length word is bit 0 of the word's byte 7.
_RECORD_SPARSE_BYTE = _RECORD_STREAM_AT + 8 + 7


def record_with(
    packed: bytes,
    *,
    parent_file_id: int | None = None,
    stream_table_offset: int | None = None,
    stream: Stream | None = None,
) -> bytes:
    """A packed file record with its parent FileID, stream table offset and/or
    default stream replaced (a million records are patched, not re-packed)."""
    buf = bytearray(packed)
    if stream is not None:
        STREAM.pack_into(buf, _RECORD_STREAM_AT, stream.offset, stream.packed_length())
    if parent_file_id is not None:
        U32.pack_into(buf, _RECORD_PARENT_AT, parent_file_id)
    if stream_table_offset is not None:
        _U64.pack_into(buf, _RECORD_STREAM_TABLE_AT, stream_table_offset)
    return bytes(buf)


def set_record_parent(buf: bytearray, at: int, parent_file_id: int) -> None:
    """The record packed at ``at`` in ``buf`` gets its parent FileID."""
    U32.pack_into(buf, at + _RECORD_PARENT_AT, parent_file_id)


def fill_copied_stream(buf: bytearray, at: int, offset: int) -> None:
    """The record packed at ``at`` in ``buf`` gets its contents: its
    placeholder stream (:func:`placeholder_stream_word`) now points at
    ``offset`` and is no longer sparse."""
    _U64.pack_into(buf, at + _RECORD_STREAM_AT, offset)
    buf[at + _RECORD_SPARSE_BYTE] &= 0xFE


def unpack_file_record(buf, offset: int = 0) -> FileRecord:
    """``buf`` holds at least 96 bytes from ``offset`` (shorter records are zero-filled by the caller)."""
    f = FILE_RECORD.unpack_from(buf, offset)
    return _tuple_new(
        FileRecord,
        (f[0], f[1], f[2], f[3], f[4], f[5], f[6], unpack_stream(f[7], f[8]), f[9], f[10], f[11], f[12], f[13]),
    )


#: :func:`record_kinds`' answers besides a plain file's length.
KIND_DIRECTORY = -2
KIND_OTHER = -1
# A record's default stream's length/type word, reparse offset and stream table offset.
_RECORD_KIND = struct.Struct("<48xQ16xQQ")
_unpack_kind = _RECORD_KIND.unpack_from


def record_kinds(buf, slots: Iterable[int], entry_size: int) -> list[int]:
    """What the records at ``slots`` of a file table (``buf``, entries of
    ``entry_size`` bytes; the caller has checked each slot's 96 bytes lie in
    it) are, without a FileRecord each: a plain file's default stream length
    (no reparse point, no alternate streams, a stream that is neither a link
    table nor stored sparse), ``KIND_DIRECTORY`` for a directory, else
    ``KIND_OTHER``.  A walk that hands plain files on needs no more of them.
    One comprehension over C iterators: no Python call per record."""
    return [
        KIND_DIRECTORY
        if (word >> 48) & 0xFF == STREAM_TYPE_LINK_TABLE
        else KIND_OTHER
        if reparse or stream_table or (word >> 56) & 1
        else word & MAX_STREAM_LENGTH
        for word, reparse, stream_table in map(
            _unpack_kind, itertools.repeat(buf), map(operator.mul, slots, itertools.repeat(entry_size))
        )
    ]


def file_record_kind(rec: FileRecord) -> int:
    """:func:`record_kinds`' answer for a record already unpacked."""
    if rec.is_dir:
        return KIND_DIRECTORY
    if rec.reparse_offset or rec.stream_table_offset or rec.stream.sparse:
        return KIND_OTHER
    return rec.stream.length


def pack_blob(payload: bytes) -> bytes:
    """Security descriptors and reparse buffers are stored as u16 length + bytes (spec §13)."""
    return U16.pack(len(payload)) + payload


# ---------------------------------------------------------------- link tables (spec §11, §12)
def encode_name(name: str) -> bytes:
    return name.encode("utf-16-le", "surrogatepass")


def pack_directory_table(names: list[str], file_ids: list[int]) -> bytes:
    """A directory's link table: ``names`` in the image's sort order and their FileIDs."""
    return pack_link_table(names, struct.pack(f"<{len(file_ids)}I", *file_ids))


def pack_link_table(names: list[str], values: list[bytes] | bytes) -> bytes:
    """``names`` already in the image's sort order; ``values`` packed (4 or 16
    bytes each), as a list or already joined."""
    count = len(names)
    value_bytes = values if isinstance(values, bytes) else b"".join(values)
    name_base = 8 + len(value_bytes) + 4 * count
    # Each name is its length in UTF-16 units (u16), then the units: written
    # as one string, the length as a character, encoded in one call.  That
    # holds while every character is one unit; a name beyond the BMP (two
    # units per character) takes the per-name path.
    text = "".join([chr(len(name)) + name for name in names])
    name_bytes = text.encode("utf-16-le", "surrogatepass")
    if len(name_bytes) == 2 * len(text):
        offsets = list(itertools.accumulate([2 + 2 * len(name) for name in names[:-1]], initial=name_base))
    else:
        offsets = []
        chunks = []
        pos = name_base
        for name in names:
            raw = encode_name(name)
            offsets.append(pos)
            chunks.append(U16.pack(len(raw) // 2))
            chunks.append(raw)
            pos += 2 + len(raw)
        name_bytes = b"".join(chunks)
    body = value_bytes + struct.pack(f"<{count}I", *offsets[:count]) + name_bytes
    return LINK_TABLE_HEADER.pack(8 + len(body), count) + body


_NAME_SLICE = 4096
#: Link tables longer than this have their names checked before their entries are built.
_PRECHECK_BYTES = 1 << 20


def unpack_link_table(buf, value_size: int, what: str) -> tuple[list[str], list]:
    """Returns (names, raw values) with every offset and length checked.

    Values are ints (FileIDs) for ``value_size`` 4 and Streams for 16.
    """
    size = len(buf)
    if size < 8:
        raise CimFormatError(f"{what}: link table of {size} bytes is too short")
    length, count = LINK_TABLE_HEADER.unpack_from(buf, 0)
    if length > size or length < 8:
        raise CimFormatError(f"{what}: link table claims {length} bytes, {size} available")
    if count > (length - 8) // (value_size + 4):
        raise CimFormatError(f"{what}: link table claims {count} entries, more than its {length} bytes hold")
    # Names are at most MAX_NAME_UNITS long and, as a writer lays them out,
    # do not overlap: their lengths must add up to no more than the table
    # holds, so decoding a table never yields more text than its bytes
    # (entries all pointing at one long name would otherwise decode into
    # thousands of copies from a small image).
    offsets_at = 8 + value_size * count
    room = length - offsets_at - 4 * count
    if length > _PRECHECK_BYTES:
        # A large table is checked a slice of offsets at a time before
        # anything per entry is built: a count that fits only because the
        # region file is sparse meets an empty name (a hole) in its first
        # slice, at no cost.  (A small table costs little either way.)
        total = 0
        for first in range(0, count, _NAME_SLICE):
            k = min(_NAME_SLICE, count - first)
            for off in struct.unpack_from(f"<{k}I", buf, offsets_at + 4 * first):
                if off + 2 > length:
                    raise CimFormatError(f"{what}: name offset {off} outside the link table")
                units = buf[off] | buf[off + 1] << 8
                if units == 0 or units > MAX_NAME_UNITS:
                    raise CimFormatError(f"{what}: a stored name of {units} UTF-16 units (1 to {MAX_NAME_UNITS})")
                total += 2 + 2 * units
            if total > room:
                raise CimFormatError(f"{what}: names overlap (their lengths add up to more than the link table holds)")
    values: list
    if value_size == 4:
        values = _u32s(buf, 8, count)
    else:
        raw = struct.unpack_from(f"<{2 * count}Q", buf, 8)
        values = [unpack_stream(raw[2 * i], raw[2 * i + 1]) for i in range(count)]
    offsets = _u32s(buf, offsets_at, count)
    names = _names_in_one_decode(buf, offsets, length, room)
    if names is not None:
        return names, values
    mv = memoryview(buf)
    names = []
    total = 0
    decoded: dict[int, str] = {}  # by offset: a name several entries share is decoded once
    for off in offsets:  # one by one: finds and names what is wrong
        if off + 2 > length:
            raise CimFormatError(f"{what}: name offset {off} outside the link table")
        units = U16.unpack_from(buf, off)[0]
        if units > MAX_NAME_UNITS:
            raise CimFormatError(f"{what}: a stored name of {units} UTF-16 units (1 to {MAX_NAME_UNITS})")
        total += 2 + 2 * units
        if total > room:
            raise CimFormatError(f"{what}: names overlap (their lengths add up to more than the link table holds)")
        end = off + 2 + 2 * units
        if end > length:
            raise CimFormatError(f"{what}: name at {off} runs past the link table")
        name = decoded.get(off)
        if name is None:
            name = decoded[off] = bytes(mv[off + 2 : end]).decode("utf-16-le", "surrogatepass")
            if not name or name in (".", "..") or _BAD_STORED_NAME.search(name):
                raise CimFormatError(f"{what}: stored name {name[:60]!r} is not a valid name")
        names.append(name)
    return names, values


def _u32s(buf, at: int, count: int) -> list[int]:
    """``count`` little-endian u32s at ``at`` (the caller has checked they lie
    in ``buf``).  A cast view where the machine is little-endian: a format
    string per count would be compiled again for most directories (the
    struct module keeps 100)."""
    view = memoryview(buf)
    if _LITTLE_ENDIAN and view.format == "B":
        return view[at : at + 4 * count].cast("I").tolist()
    return list(struct.unpack_from(f"<{count}I", buf, at))


_LITTLE_ENDIAN = sys.byteorder == "little" and struct.calcsize("I") == 4


def _names_in_one_decode(buf, offsets, length: int, room: int) -> list[str] | None:
    """The names of a well-formed link table, from one UTF-16 decode of its
    name area (a directory's names are one run of length-prefixed strings),
    each length read as the character it decodes to.  None when anything is
    unusual (a bad offset or length, a name that is not valid, a surrogate
    pair, an odd offset): the caller then reads name by name."""
    if not offsets:
        return []
    base = min(offsets)
    if max(offsets) + 2 > length:
        return None
    n = (length - base) & ~1
    text = _utf16_decode(memoryview(buf)[base : base + n], "surrogatepass")[0]
    if len(text) * 2 != n:  # a surrogate pair became one character: indexes would shift
        return None
    # Every length is checked before any name is cut out of the text: entries
    # sharing one 65 535-unit name would otherwise copy it once per entry.
    starts = [(off - base) >> 1 for off in offsets]
    lengths = [ord(text[i]) for i in starts]
    if max(lengths) > MAX_NAME_UNITS or 2 * (sum(lengths) + len(lengths)) > room:
        return None  # overlapping or too long: the careful path says which
    # Every offset even: each (off - base) less twice its start is its low
    # bit (0 or 1), so they add up to 0 only when none is odd.  Sums, not a
    # generator per entry.
    if base & 1 or sum(offsets) - base * len(offsets) != 2 * sum(starts):
        return None
    names = [text[i + 1 : i + 1 + units] for i, units in zip(starts, lengths)]
    # A name running past the table (past ``text``, which ends where the
    # table does: offsets are even) comes out of its slice short; none does
    # when the names' lengths add up to their claimed units.
    if sum(map(len, names)) != sum(lengths):
        return None
    if "" in names or "." in names or ".." in names or _BAD_STORED_NAME.search("".join(names)):
        return None
    return names


_utf16_decode = codecs.utf_16_le_decode  # bytes.decode looks the codec up and calls a Python wrapper

# Names that would make a path ambiguous (separators, the stream colon, NUL)
# are corrupt; other characters Windows forbids are read as they are.
_BAD_STORED_NAME = re.compile(r"[\x00\\/:]")


def pack_stream_table(names: list[str], streams: list[Stream]) -> bytes:
    table = pack_link_table(names, [s.pack() for s in streams])
    return U32.pack(len(table)) + table


# ---------------------------------------------------------------- PE image streams (spec §14)
class PeImage(NamedTuple):
    data_offset: int
    data_length: int
    image_length: int
    mappings: tuple[tuple[int, int], ...]  # (file offset, delta), sorted by file offset


def unpack_pe_image(buf, what: str) -> PeImage:
    if len(buf) < PE_IMAGE.size:
        raise CimFormatError(f"{what}: PE image object truncated")
    data_offset, data_length, image_length, count, _flags = PE_IMAGE.unpack_from(buf, 0)
    if len(buf) < PE_IMAGE.size + count * PE_MAPPING.size:
        raise CimFormatError(f"{what}: PE image object lists {count} mappings past its end")
    raw = struct.unpack_from(f"<{2 * count}I", buf, PE_IMAGE.size)
    mappings = tuple((raw[2 * i], raw[2 * i + 1]) for i in range(count))
    if any(mappings[i][0] > mappings[i + 1][0] for i in range(count - 1)):
        raise CimFormatError(f"{what}: PE image mappings are not in file-offset order")
    return PeImage(data_offset, data_length & ~(1 << 63), image_length, mappings)


def pe_image_with_data_offset(buf, data_offset: int) -> bytes:
    """A PE image object (header and mappings) pointing at ``data_offset``
    instead (a merged image renumbers its sources' regions)."""
    return U64.pack(data_offset) + bytes(buf[8:])


def pe_image_object_size(count: int) -> int:
    return PE_IMAGE.size + count * PE_MAPPING.size
