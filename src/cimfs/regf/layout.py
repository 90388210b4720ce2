"""The byte layout of Windows registry hive files ("regf"): every struct format and
constant, and the few pure functions over raw bytes (checksum, default security
descriptor).  The reader, the writer and the merge stand on it; nothing else in
``cimfs.regf`` knows a field offset.  Facts: /work/shared/regf-notes.md §1.
"""

from __future__ import annotations

import struct
from functools import reduce
from operator import xor

from .errors import HiveFormatError

NONE = 0xFFFFFFFF  # "no cell" in every offset field
BASE_BLOCK_SIZE = 4096  # file offset of hive-bins data (rel offset 0)
BIN_ALIGN = 4096
HBIN_HEADER_SIZE = 32
MAX_HIVE_BINS = 0x7FFFF000  # [choice] cell offsets stay below 2^31 (Windows' cell index keeps bit 31 for volatile)
CELL_ALIGN = 8

# ---- base block ----------------------------------------------------------------------------------------------
REGF = b"regf"
# sig, seq1, seq2, last-written, major, minor, file type, format, root, length, clustering, file name,
# RmId, LogId, flags, TmId, "rmtm", last-reorganized, "OfRg", offreg flags
BASE_HEAD = struct.Struct("<4sIIQIIIIIII64s16s16sI16s4sQ4sI")
CHECKSUM_OFFSET = 508
CHECKSUM = struct.Struct("<I")
OFFREG_SERIALIZED_OFFSET = 512  # FILETIME, written 0 (as System_Delta)
FILE_NAME_CHARS = 31  # the tail of the path plus a NUL fill the 64 bytes
FILE_TYPE_PRIMARY = 0
FILE_FORMAT_DIRECT = 1
MAJOR = 1
MINORS = (3, 4, 5, 6)  # [choice] the versions read and written (notes §2.4)
HIVE_FLAG_KTM_LOCKED = 0x1
HIVE_FLAG_LAYERED = 0x2  # "layered keys supported" (differencing hive)
OFRG = b"OfRg"

# ---- hive bin --------------------------------------------------------------------------------------------------
HBIN = b"hbin"
HBIN_HEAD = struct.Struct("<4sIIQQI")  # sig, rel offset, size, reserved, timestamp, spare

CELL_SIZE = struct.Struct("<i")  # negative: allocated; positive: free

# ---- key node nk ------------------------------------------------------------------------------------------------
NK = b"nk"
# sig, flags, last-written, access bits, layer byte, spare, parent, #subkeys, #volatile, subkey list,
# volatile list, #values, value list, sk, class, maxname|userflags<<16, maxclass, maxvaluename,
# maxvaluedata, workvar, name length, class length
NK_HEAD = struct.Struct("<2sHQBBHIIIIIIIIIIIIIIHH")
(
    NKF_SIG,
    NKF_FLAGS,
    NKF_TIME,
    NKF_ACCESS,
    NKF_LAYER,
    NKF_SPARE,
    NKF_PARENT,
    NKF_NSUB,
    NKF_NVOL,
    NKF_SUBLIST,
    NKF_VOLLIST,
    NKF_NVAL,
    NKF_VALLIST,
    NKF_SK,
    NKF_CLASS,
    NKF_MAXNAME,
    NKF_MAXCLASS,
    NKF_MAXVALNAME,
    NKF_MAXVALDATA,
    NKF_WORKVAR,
    NKF_NAMELEN,
    NKF_CLASSLEN,
) = range(22)
KEY_VOLATILE = 0x1
KEY_HIVE_EXIT = 0x2
KEY_HIVE_ENTRY = 0x4
KEY_NO_DELETE = 0x8
KEY_SYM_LINK = 0x10
KEY_COMP_NAME = 0x20
KEY_PREDEF_HANDLE = 0x40
KEY_VIRTUAL_SOURCE = 0x80
KEY_VIRTUAL_TARGET = 0x100
KEY_VIRTUAL_STORE = 0x200
KEY_NEVER_ON_DISK = KEY_VOLATILE | KEY_HIVE_EXIT
ROOT_FLAGS = KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME  # 0x2c, every Windows/offreg/hivex root
MAX_KEY_NAME_CHARS = 255
MAX_DEPTH = 512  # Windows' limit on key nesting

# nk +13: bits 0-1 layer semantics, bit 7 inherit class
LAYER_SEMANTICS_MASK = 0x3
LAYER_INHERIT_CLASS = 0x80
MERGE = 0
TOMBSTONE = 1
SUPERSEDE_LOCAL = 2
SUPERSEDE_TREE = 3
LAYER_SEMANTICS_NAMES = {
    MERGE: "merge",
    TOMBSTONE: "tombstone",
    SUPERSEDE_LOCAL: "supersede-local",
    SUPERSEDE_TREE: "supersede-tree",
}

# ---- value vk ---------------------------------------------------------------------------------------------------
VK = b"vk"
VK_HEAD = struct.Struct("<2sHIIIHH")  # sig, name length, data size, data offset/inline, type, flags, spare
VKF_SIG, VKF_NAMELEN, VKF_SIZE, VKF_DATA, VKF_TYPE, VKF_FLAGS, VKF_SPARE = range(7)
VK_CELL = struct.Struct("<i2sHIIIHH")  # a vk with its cell's size field in front (one pack per value written)
VALUE_COMP_NAME = 0x1
VALUE_TOMBSTONE = 0x2
DATA_INLINE = 0x80000000
INLINE_MAX = 4
MAX_VALUE_NAME_CHARS = 16383
MAX_DATA_SIZE = 0x7FFFFFFF

REG_NONE = 0
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_DWORD_LITTLE_ENDIAN = 4
REG_DWORD_BIG_ENDIAN = 5
REG_LINK = 6
REG_MULTI_SZ = 7
REG_RESOURCE_LIST = 8
REG_FULL_RESOURCE_DESCRIPTOR = 9
REG_RESOURCE_REQUIREMENTS_LIST = 10
REG_QWORD = 11
REG_QWORD_LITTLE_ENDIAN = 11
REG_TYPE_NAMES = {
    0: "REG_NONE",
    1: "REG_SZ",
    2: "REG_EXPAND_SZ",
    3: "REG_BINARY",
    4: "REG_DWORD",
    5: "REG_DWORD_BIG_ENDIAN",
    6: "REG_LINK",
    7: "REG_MULTI_SZ",
    8: "REG_RESOURCE_LIST",
    9: "REG_FULL_RESOURCE_DESCRIPTOR",
    10: "REG_RESOURCE_REQUIREMENTS_LIST",
    11: "REG_QWORD",
}

# ---- big data db (minor >= 4) ------------------------------------------------------------------------------------
DB = b"db"
DB_HEAD = struct.Struct("<2sHII")  # sig, #segments, segment list, unused
BIG_DATA_MIN_MINOR = 4
SEGMENT_BYTES = 16344  # data bytes per segment; more than this in one value means db
SEGMENT_CELL = 16352  # every segment, the last included, is allocated this size (as Windows does)
MAX_SEGMENTS = 0xFFFF

# ---- security sk ---------------------------------------------------------------------------------------------------
SK = b"sk"
SK_HEAD = struct.Struct("<2sHIIII")  # sig, reserved, flink, blink, refcount, descriptor length
SKF_SIG, SKF_RESERVED, SKF_FLINK, SKF_BLINK, SKF_REFS, SKF_LEN = range(6)

# ---- subkey lists --------------------------------------------------------------------------------------------------
LI = b"li"
LF = b"lf"
LH = b"lh"
RI = b"ri"
LIST_HEAD = struct.Struct("<2sH")
LEAF_LIMIT = {LF: 511, LH: 511, LI: 1012}  # Windows splits a leaf past these under an ri (notes §1.6)
MAX_LIST_COUNT = 0xFFFF
LH_MIN_MINOR = 5  # lh appears in 1.5; 1.3/1.4 use lf (and li)

_U32 = struct.Struct("<I")
_STRUCTS: dict[int, struct.Struct] = {}


def u32_array(count: int) -> struct.Struct:
    """The struct of ``count`` little-endian uint32 (offset lists, lh/lf pairs)."""
    s = _STRUCTS.get(count)
    if s is None:
        s = _STRUCTS[count] = struct.Struct(f"<{count}I")
    return s


def u32(value: int) -> bytes:
    return _U32.pack(value)


def inline_data(field: int, size: int) -> bytes:
    """The first ``size`` (<= 4) bytes of an inline data field."""
    return _U32.pack(field)[:size]


def inline_field(data: bytes | bytearray | memoryview) -> int:
    """The data-offset field holding ``data`` (<= 4 bytes) left-aligned."""
    return _U32.unpack(bytes(data).ljust(4, b"\0"))[0]


def checksum(block: bytes | bytearray | memoryview) -> int:
    """The base-block checksum over bytes 0..507, with Windows' 0 and 0xFFFFFFFF substitutions."""
    c = reduce(xor, u32_array(127).unpack_from(block, 0), 0)
    if c == 0xFFFFFFFF:
        return 0xFFFFFFFE
    return c or 1


def pack_base_block(
    *, sequence: int, last_written: int, minor: int, root: int, length: int, file_name: str, flags: int
) -> bytearray:
    block = bytearray(BASE_BLOCK_SIZE)
    name = file_name[-FILE_NAME_CHARS:].encode("utf-16-le", "surrogatepass")[: 2 * FILE_NAME_CHARS]
    BASE_HEAD.pack_into(
        block,
        0,
        REGF,
        sequence,
        sequence,
        last_written,
        MAJOR,
        minor,
        FILE_TYPE_PRIMARY,
        FILE_FORMAT_DIRECT,
        root,
        length,
        1,
        name,
        bytes(16),
        bytes(16),
        flags,
        bytes(16),
        bytes(4),
        0,
        OFRG,
        1,
    )
    CHECKSUM.pack_into(block, CHECKSUM_OFFSET, checksum(block))
    return block


def unpack_base_block(block: bytes | bytearray | memoryview, name: str) -> tuple:
    """The base block's fields; only the signature is checked here (the reader checks the rest)."""
    if len(block) < BASE_BLOCK_SIZE:
        raise HiveFormatError(name, None, f"truncated: {len(block)} bytes, shorter than the 4096-byte base block")
    head = BASE_HEAD.unpack_from(block, 0)
    if head[0] != REGF:
        raise HiveFormatError(name, None, "not a registry hive (no 'regf' signature)")
    return head, CHECKSUM.unpack_from(block, CHECKSUM_OFFSET)[0]


# ---- security descriptors ------------------------------------------------------------------------------------------
_SID = struct.Struct("<BB6s")
_ACL_HEAD = struct.Struct("<BBHHH")
_ACE_HEAD = struct.Struct("<BBHI")
_SD_HEAD = struct.Struct("<BBHIIII")
SE_DACL_PRESENT = 0x0004
SE_SELF_RELATIVE = 0x8000
KEY_ALL_ACCESS = 0xF003F
KEY_READ = 0x20019
CONTAINER_INHERIT_ACE = 0x02


def _sid(authority: int, *subs: int) -> bytes:
    return _SID.pack(1, len(subs), authority.to_bytes(6, "big")) + u32_array(len(subs)).pack(*subs)


def _allow(mask: int, sid: bytes) -> bytes:
    return _ACE_HEAD.pack(0, CONTAINER_INHERIT_ACE, _ACE_HEAD.size + len(sid), mask) + sid


def default_security_descriptor() -> bytes:
    """[choice] A self-relative SD for keys without one: owner Administrators, group SYSTEM, DACL allowing
    full control to Administrators and SYSTEM and read to Users, inherited by subkeys (the shape of the
    descriptors in Windows' own hives; control 0x8004 as in System_Delta)."""
    admins, system, users = _sid(5, 32, 544), _sid(5, 18), _sid(5, 32, 545)
    aces = _allow(KEY_ALL_ACCESS, admins) + _allow(KEY_ALL_ACCESS, system) + _allow(KEY_READ, users)
    acl = _ACL_HEAD.pack(2, 0, _ACL_HEAD.size + len(aces), 3, 0) + aces
    dacl_at = _SD_HEAD.size
    owner_at = dacl_at + len(acl)
    group_at = owner_at + len(admins)
    head = _SD_HEAD.pack(1, 0, SE_SELF_RELATIVE | SE_DACL_PRESENT, owner_at, group_at, 0, dacl_at)
    return head + acl + admins + system
