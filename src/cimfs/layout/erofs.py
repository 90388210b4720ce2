"""The EROFS on-disk layout (Linux ``fs/erofs/erofs_fs.h``, Documentation/filesystems/erofs.rst).

Only the uncompressed subset the kernel index of an image needs: the
superblock with its extra-device table, extended inodes, inline and shared
xattrs, chunk indexes and directory blocks.  Every EROFS byte cimfs writes is
packed here; :mod:`cimfs.erofs` decides what goes where.
"""

from __future__ import annotations

import struct

SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

# i_format: bit 0 = inode version (0 compact, 1 extended), bits 1-3 = data layout.
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
DATALAYOUT_FLAT_PLAIN = 0
DATALAYOUT_FLAT_INLINE = 2
DATALAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
#: A chunk index entry naming a hole.
NULL_ADDR = 0xFFFFFFFF

XATTR_INDEX_USER = 1
XATTR_INDEX_TRUSTED = 4
XATTR_PREFIXES = {XATTR_INDEX_USER: b"user.", XATTR_INDEX_TRUSTED: b"trusted."}
XATTR_VALUE_MAX = 0xFFFF  # e_value_size is 16 bits
XATTR_NAME_MAX = 0xFF

# Directory entry file types (the generic FT_* values).
FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
NAME_LEN = 255

#: The inode slot: nid = (byte offset - meta_blkaddr * block size) / 32.
INODE_SLOT = 32

SUPER_BLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")  # 128
DEVICE_SLOT = struct.Struct("<64sII56s")  # 128
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")  # 32
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")  # 64
XATTR_IBODY_HEADER = struct.Struct("<IB7s")  # 12
XATTR_ENTRY = struct.Struct("<BBH")  # 4
CHUNK_INDEX = struct.Struct("<HHI")  # 8
DIRENT = struct.Struct("<QHBB")  # 12

assert SUPER_BLOCK.size == 128 and DEVICE_SLOT.size == 128 and INODE_EXTENDED.size == 64
assert INODE_COMPACT.size == 32 and DIRENT.size == 12


def align(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def pack_super_block(
    *,
    blkszbits: int,
    root_nid: int,
    inos: int,
    build_time: int,
    build_time_nsec: int,
    blocks: int,
    meta_blkaddr: int,
    xattr_blkaddr: int,
    uuid: bytes,
    volume_name: bytes,
    feature_incompat: int,
    extra_devices: int,
    devt_slotoff: int,
) -> bytes:
    if not 0 <= root_nid <= 0xFFFF:
        raise ValueError(f"root nid {root_nid} does not fit the superblock")
    return SUPER_BLOCK.pack(
        MAGIC,
        0,
        0,
        blkszbits,
        0,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        uuid,
        volume_name[:16],
        feature_incompat,
        0,
        extra_devices,
        devt_slotoff,
        0,
        0,
        0,
        0,
        0,
        bytes(23),
    )


def unpack_super_block(raw: bytes) -> dict:
    f = SUPER_BLOCK.unpack_from(raw, SUPER_OFFSET)
    names = (
        "magic",
        "checksum",
        "feature_compat",
        "blkszbits",
        "sb_extslots",
        "root_nid",
        "inos",
        "build_time",
        "build_time_nsec",
        "blocks",
        "meta_blkaddr",
        "xattr_blkaddr",
        "uuid",
        "volume_name",
        "feature_incompat",
        "u1",
        "extra_devices",
        "devt_slotoff",
    )
    return dict(zip(names, f))


def pack_device_slot(tag: bytes, blocks: int) -> bytes:
    return DEVICE_SLOT.pack(tag[:64], blocks, 0, bytes(56))


def inode_format(datalayout: int, layout: int = INODE_LAYOUT_EXTENDED) -> int:
    return layout | (datalayout << 1)


def pack_inode_extended(
    *,
    datalayout: int,
    xattr_icount: int,
    mode: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
    mtime: int,
    mtime_nsec: int,
    nlink: int,
) -> bytes:
    return INODE_EXTENDED.pack(
        inode_format(datalayout),
        xattr_icount,
        mode & 0xFFFF,
        0,
        size,
        i_u & 0xFFFFFFFF,
        ino & 0xFFFFFFFF,
        uid & 0xFFFFFFFF,
        gid & 0xFFFFFFFF,
        mtime & 0xFFFFFFFFFFFFFFFF,
        mtime_nsec,
        nlink,
        bytes(16),
    )


def chunk_format(chunkbits: int, blkszbits: int) -> int:
    """``i_u`` of a chunk-based inode: chunk size = block size << (format & 0x1F)."""
    extra = chunkbits - blkszbits
    if not 0 <= extra <= CHUNK_FORMAT_BLKBITS_MASK:
        raise ValueError(f"chunk size 2^{chunkbits} with blocks of 2^{blkszbits}")
    return CHUNK_FORMAT_INDEXES | extra


def pack_chunk_indexes(entries) -> bytes:
    """``entries``: (device id, block address) per chunk; NULL_ADDR for a hole."""
    return b"".join(CHUNK_INDEX.pack(0, dev, blk) for dev, blk in entries)


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(): what ``i_u.rdev`` holds."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)


def pack_xattr_entry(index: int, name: bytes, value: bytes) -> bytes:
    """One xattr entry (inline or shared), padded to 4 bytes."""
    if len(name) > XATTR_NAME_MAX or len(value) > XATTR_VALUE_MAX:
        raise ValueError("xattr name or value too long for EROFS")
    raw = XATTR_ENTRY.pack(len(name), index, len(value)) + name + value
    return raw + bytes(align(len(raw), 4) - len(raw))


def pack_xattr_ibody(shared_ids, entries: bytes) -> tuple[bytes, int]:
    """The inline xattr body (header, shared ids, packed entries) and its
    ``i_xattr_icount``; (b"", 0) when the inode has none."""
    shared_ids = list(shared_ids)
    if not shared_ids and not entries:
        return b"", 0
    body = (
        XATTR_IBODY_HEADER.pack(0, len(shared_ids), bytes(7))
        + b"".join(struct.pack("<I", i) for i in shared_ids)
        + entries
    )
    icount = (len(body) - XATTR_IBODY_HEADER.size) // 4 + 1
    if icount > 0xFFFF:
        raise ValueError("inline xattrs too large for EROFS")
    return body, icount


def pack_directory(entries, block_size: int) -> bytes:
    """Directory blocks for ``entries`` ((name bytes, nid, file type), sorted by
    name, "." and ".." included).  Each block holds its dirents, then their
    names; the last block is not padded (the directory's size ends there)."""
    blocks: list[bytes] = []
    i, n = 0, len(entries)
    while i < n:
        j, used = i, 0
        while j < n and used + DIRENT.size + len(entries[j][0]) <= block_size:
            used += DIRENT.size + len(entries[j][0])
            j += 1
        if j == i:
            raise ValueError(f"name {entries[i][0]!r} does not fit a directory block")
        heads, names = [], []
        nameoff = DIRENT.size * (j - i)
        for name, nid, ftype in entries[i:j]:
            heads.append(DIRENT.pack(nid, nameoff, ftype, 0))
            names.append(name)
            nameoff += len(name)
        block = b"".join(heads) + b"".join(names)
        if j < n:
            block += bytes(block_size - len(block))
        blocks.append(block)
        i = j
    return b"".join(blocks)


def directory_size(name_lengths, block_size: int) -> int:
    """The size :func:`pack_directory` gives entries with these name lengths (same order)."""
    full, used = 0, 0
    for n in name_lengths:
        if used + DIRENT.size + n > block_size:
            full += 1
            used = 0
        used += DIRENT.size + n
    return full * block_size + used


def unpack_directory(data: bytes, block_size: int) -> list[tuple[bytes, int, int]]:
    """(name, nid, file type) of every entry in directory blocks (for checks)."""
    out = []
    for start in range(0, len(data), block_size):
        block = data[start : start + block_size]
        nid, nameoff, ftype, _ = DIRENT.unpack_from(block, 0)
        count = nameoff // DIRENT.size
        heads = [DIRENT.unpack_from(block, k * DIRENT.size) for k in range(count)]
        for k, (nid, off, ftype, _) in enumerate(heads):
            end = heads[k + 1][1] if k + 1 < count else len(block)
            name = block[off:end]
            if k + 1 == count:
                name = name.split(b"\0", 1)[0]
            out.append((name, nid, ftype))
    return out
