"""WSL's POSIX metadata in an image: ``$LX*`` EAs and LX reparse points.

Owns the file kinds (``DIR``, ``FILE``, ``SYMLINK`` ...) and the reparse tags
of spec §18/§19, the mapping of a scanned node to the ``FileMetadata`` that
stores its mode, owner, device and times as WSL does (:func:`node_metadata`,
:func:`plain_file_metadata`), the comparison an incremental import uses
(:func:`metadata_matches`), and the way back: how an image entry appears as
a POSIX file (:class:`PosixInfo`, :func:`posix_info`).  The EA and reparse
bytes themselves are packed by :mod:`cimfs.layout.ntfs`.
"""

from __future__ import annotations

import os
import stat as S
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cimfs

from ..errors import CimError
from ..layout import cim, ntfs
from .names import FILETIME_UNIX_EPOCH, filetime_to_ns, ns_to_filetime

if TYPE_CHECKING:
    from ..reader import Stat
    from .scan import Node


# --------------------------------------------------------------------- kinds
DIR, FILE, SYMLINK, FIFO, CHR, BLK, SOCK = "dir", "file", "symlink", "fifo", "chr", "blk", "sock"
_KIND_OF_FMT = {
    S.S_IFDIR: DIR,
    S.S_IFREG: FILE,
    S.S_IFLNK: SYMLINK,
    S.S_IFIFO: FIFO,
    S.S_IFCHR: CHR,
    S.S_IFBLK: BLK,
    S.S_IFSOCK: SOCK,
}
FMT_OF_KIND = {v: k for k, v in _KIND_OF_FMT.items()}


# Reparse tags of spec §18/§19 (fixed numbers; the blobs are packed by cimfs.layout.ntfs).
TAG_MOUNT_POINT = 0xA0000003
TAG_SYMLINK = 0xA000000C
TAG_LX_SYMLINK = 0xA000001D
TAG_AF_UNIX = 0x80000023
TAG_LX_FIFO = 0x80000024
TAG_LX_CHR = 0x80000025
TAG_LX_BLK = 0x80000026
SPECIAL_TAGS = {FIFO: TAG_LX_FIFO, CHR: TAG_LX_CHR, BLK: TAG_LX_BLK, SOCK: TAG_AF_UNIX}
_KIND_OF_TAG = {v: k for k, v in SPECIAL_TAGS.items()}


# --------------------------------------------------------------------- metadata mapping
_EA_CACHE: dict[tuple, bytes] = {}


def _lx_ea_buffer(mode: int, uid: int, gid: int, rdev: tuple | None) -> bytes:
    """A tree has few distinct (mode, owner) combinations: pack each EA chain once."""
    key = (mode, uid, gid, rdev)
    ea = _EA_CACHE.get(key)
    if ea is None:
        n = ntfs
        kw = dict(mode=mode, uid=uid, gid=gid)
        if rdev is not None:
            kw.update(rdev_major=rdev[0], rdev_minor=rdev[1])
        ea = _EA_CACHE[key] = n.pack_eas(n.lx_eas(**kw))
    return ea


_FA_DIRECTORY, _FA_SPARSE_FILE, _FA_REPARSE_POINT = 0x10, 0x200, 0x400  # plain ints: IntFlag math is slow per entry
_FLAG_READONLY, _FLAG_SPARSE = cim.FLAG_READONLY, cim.FLAG_SPARSE  # FileRecord.flags


def plain_file_metadata(st: os.stat_result) -> cimfs.FileMetadata:
    """What :func:`node_metadata` gives a regular, not sparse, file scanned
    with this stat, without building its Node (the bulk of any tree)."""
    mt = st.st_mtime_ns // 100 + FILETIME_UNIX_EPOCH  # ns_to_filetime, inline: once per file of a tree
    ea = _EA_CACHE.get((st.st_mode, st.st_uid, st.st_gid, None)) or _lx_ea_buffer(
        st.st_mode, st.st_uid, st.st_gid, None
    )
    return cimfs.FileMetadata(
        0,
        st.st_size,
        mt,
        mt,
        st.st_ctime_ns // 100 + FILETIME_UNIX_EPOCH,
        st.st_atime_ns // 100 + FILETIME_UNIX_EPOCH,
        b"",
        b"",
        ea,
    )


def plain_file_metadata_consistent(st: os.stat_result) -> cimfs.FileMetadata:
    """:func:`plain_file_metadata` for a consistent image (see :func:`node_metadata`)."""
    mt = st.st_mtime_ns // 100 + FILETIME_UNIX_EPOCH
    ea = _EA_CACHE.get((st.st_mode, st.st_uid, st.st_gid, None)) or _lx_ea_buffer(
        st.st_mode, st.st_uid, st.st_gid, None
    )
    return cimfs.FileMetadata(0, st.st_size, mt, mt, mt, mt, b"", b"", ea)


def writes_consistent(w) -> bool:
    """Whether the writer ``w`` makes a consistent image (``cimfs.create(..., consistent=True)``)."""
    return bool(getattr(w, "consistent", False))


def node_metadata(node: Node, consistent: bool = False) -> cimfs.FileMetadata:
    """The image metadata of a scanned entry.  ``consistent``: [choice] for
    a consistent image, change time and last access time are the last write
    time: reading a tree moves atimes and ``touch -a``, chmod or a copy move
    ctimes, so neither is the tree's content (mksquashfs keeps mtime alone)."""
    attrs = 0
    reparse = b""
    rdev = tuple(node.rdev) if node.kind in (CHR, BLK) else None
    eas = _lx_ea_buffer(node.mode, node.uid, node.gid, rdev)
    if node.kind == DIR:
        attrs = _FA_DIRECTORY
    elif node.kind == SYMLINK:
        assert node.target is not None  # a scanned symlink always has its target
        reparse = ntfs.pack_lx_symlink_reparse(node.target)
    elif node.kind in (FIFO, CHR, BLK, SOCK):
        reparse = ntfs.pack_lx_special_reparse(SPECIAL_TAGS[node.kind])
    if reparse:
        attrs |= _FA_REPARSE_POINT
    if node.kind == FILE and node.sparse:
        attrs |= _FA_SPARSE_FILE
    mt = ns_to_filetime(node.mtime_ns)
    return cimfs.FileMetadata(
        attributes=attrs,
        file_size=node.size if node.kind == FILE else 0,
        creation_time=ns_to_filetime(node.btime_ns) if node.btime_ns is not None else mt,
        last_write_time=mt,
        change_time=mt if consistent else ns_to_filetime(node.ctime_ns),
        last_access_time=mt if consistent else ns_to_filetime(node.atime_ns),
        ea_buffer=eas,
        reparse_data=reparse,
    )


_ATTR_MASK = 0x1 | 0x2 | 0x4 | 0x10 | 0x20 | 0x200 | 0x400


def metadata_matches(meta: cimfs.FileMetadata, st: Stat, scan_times: bool = True) -> bool:
    """Whether an image entry (Stat) already holds exactly this metadata.
    ``scan_times=False`` (a consistent import, which does not take them from
    the source): change and last access times are not compared, so an entry
    of a parent written otherwise is kept as it is."""
    return (
        (meta.attributes & _ATTR_MASK) == (st.attributes & _ATTR_MASK)
        and meta.creation_time == st.creation_time
        and meta.last_write_time == st.last_write_time
        and (not scan_times or (meta.change_time == st.change_time and meta.last_access_time == st.last_access_time))
        and bytes(meta.ea_buffer) == bytes(st.ea_buffer)
        and bytes(meta.reparse_data) == bytes(st.reparse_data)
        and bytes(meta.security_descriptor) == bytes(st.security_descriptor)
        and (st.is_dir or meta.file_size == st.size)
    )


@dataclass
class PosixInfo:
    kind: str
    mode: int  # full st_mode
    uid: int
    gid: int
    rdev: tuple[int, int]
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    size: int
    target: str | None  # symlink target
    link_has_children: bool = False


def _link_target(n, st) -> str | None:
    """The POSIX symlink target of an LX symlink, NT symlink or mount point."""
    rp = n.parse_reparse(st.reparse_data)
    if st.reparse_tag == TAG_LX_SYMLINK:
        return rp.target  # parse_reparse decodes it (UTF-8, surrogateescape)
    name = rp.print_name or rp.substitute_name or ""
    if name.startswith("\\??\\"):
        name = name[4:]
    return name.replace("\\", "/")


_LX_OF_EAS: dict[bytes, ntfs.LxMetadata | None] = {}  # most entries of an image share a few EA buffers


def _lx_of_eas(ea_buffer: bytes):
    lx = _LX_OF_EAS.get(ea_buffer, _LX_OF_EAS)
    if lx is _LX_OF_EAS:
        try:
            lx = ntfs.parse_lx_eas(ntfs.unpack_eas(ea_buffer))
        except (ValueError, CimError):
            lx = None
        if len(_LX_OF_EAS) >= 4096:
            _LX_OF_EAS.clear()
        _LX_OF_EAS[bytes(ea_buffer)] = lx
    return lx


def posix_info(st: Stat) -> PosixInfo:
    """How an image entry appears as a POSIX file (type, mode, owner, device, times)."""
    n = ntfs
    lx = _lx_of_eas(st.ea_buffer) if st.ea_buffer else None
    tag = st.reparse_tag if st.reparse_data else 0
    target = None
    kind = DIR if st.is_dir else FILE
    link_tags = (TAG_LX_SYMLINK, TAG_SYMLINK, TAG_MOUNT_POINT)
    if tag in link_tags:
        try:
            target = _link_target(n, st)
            kind = SYMLINK
        except (ValueError, CimError):
            target = None
    elif tag and not st.is_dir:
        kind = _KIND_OF_TAG.get(tag, FILE)
    defaults = {DIR: 0o755, FILE: 0o644, SYMLINK: 0o777}
    perm = defaults.get(kind, 0o644)
    if kind == FILE and st.attributes & 0x1:
        perm = 0o444
    uid = gid = 0
    rdev = (0, 0)
    if lx is not None:
        mode = getattr(lx, "mode", None)
        if mode is not None:
            perm = mode & 0o7777
        uid = getattr(lx, "uid", None) or 0
        gid = getattr(lx, "gid", None) or 0
        if getattr(lx, "rdev_major", None) is not None:
            rdev = (lx.rdev_major, getattr(lx, "rdev_minor", None) or 0)
    return PosixInfo(
        kind=kind,
        mode=FMT_OF_KIND[kind] | perm,
        uid=uid,
        gid=gid,
        rdev=rdev,
        atime_ns=filetime_to_ns(st.last_access_time),
        mtime_ns=filetime_to_ns(st.last_write_time),
        ctime_ns=filetime_to_ns(st.change_time),
        btime_ns=filetime_to_ns(st.creation_time),
        size=st.size if kind == FILE else 0,
        target=target,
        link_has_children=(kind == SYMLINK and st.is_dir),
    )
