"""How an image entry looks on Linux: POSIX type, mode, owner, device number,
symlink target and the NTFS metadata xattrs.

Shared by the FUSE mount (:mod:`cimfs.mount.fs`) and the kernel (EROFS)
index (:mod:`cimfs.erofs`) so both engines show the same tree.  Needs no
pyfuse3.
"""

from __future__ import annotations

import os
import stat as S
import struct
from typing import NamedTuple

from ..errors import CimError
from ..layout import ntfs
from ..metadata import FileAttributes


def fs_name(name: str) -> bytes | None:
    """A stored name as the bytes the kernel sees, or None when no POSIX
    directory entry can carry it (a hostile image)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return None
    return name.encode("utf-8", "surrogatepass")


class Options:
    """``-o uid=,gid=,umask=`` apply to entries without WSL metadata."""

    def __init__(self, uid: int | None = None, gid: int | None = None, umask: int | None = None):
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.umask = 0o222 if umask is None else umask


def map_symlink_target(rp: ntfs.ReparsePoint) -> str:
    """**[choice]** An NT symlink / mount point target as a POSIX path.

    Relative targets keep their shape with ``/`` for ``\\``; a drive-absolute
    ``C:\\x`` (with or without ``\\??\\``) becomes ``/mnt/c/x``, as WSL shows
    Windows drives; UNC ``\\\\server\\share\\x`` (or ``\\??\\UNC\\server\\share\\x``)
    becomes ``//server/share/x``; a rooted ``\\x`` becomes ``/x``.  LX symlinks
    are returned exactly as stored.
    """
    target = rp.target or ""
    if rp.tag == ntfs.IO_REPARSE_TAG_LX_SYMLINK:
        return target
    if target.startswith("\\??\\"):
        target = target[4:]
    if target.upper().startswith("UNC\\"):
        target = "\\\\" + target[4:]
    if len(target) >= 2 and target[1] == ":" and target[0].isascii() and target[0].isalpha():
        rest = target[2:].lstrip("\\/")
        return f"/mnt/{target[0].lower()}" + ("/" + rest.replace("\\", "/") if rest else "")
    return target.replace("\\", "/")


_KIND_OF_TAG = {
    ntfs.IO_REPARSE_TAG_LX_FIFO: S.S_IFIFO,
    ntfs.IO_REPARSE_TAG_LX_CHR: S.S_IFCHR,
    ntfs.IO_REPARSE_TAG_LX_BLK: S.S_IFBLK,
    ntfs.IO_REPARSE_TAG_AF_UNIX: S.S_IFSOCK,
    ntfs.IO_REPARSE_TAG_LX_SYMLINK: S.S_IFLNK,
    ntfs.IO_REPARSE_TAG_SYMLINK: S.S_IFLNK,
    ntfs.IO_REPARSE_TAG_MOUNT_POINT: S.S_IFLNK,
}
_LX_SPECIAL_TYPES = (S.S_IFIFO, S.S_IFCHR, S.S_IFBLK, S.S_IFSOCK)


def lx_metadata(ea_buffer: bytes) -> ntfs.LxMetadata:
    """The WSL ``$LX*`` metadata in an EA buffer; raises CimError/ValueError/struct.error when damaged."""
    if not ea_buffer:
        return ntfs.LxMetadata()
    return ntfs.parse_lx_eas(ntfs.unpack_eas(ea_buffer))


class PosixView(NamedTuple):
    mode: int  # type and permission bits
    uid: int
    gid: int
    rdev: int  # os.makedev() value, 0 unless a device


def posix_view(st, lx: ntfs.LxMetadata, options: Options) -> PosixView:
    """Type, mode, owner and device number of an entry (``st`` from ``Image.stat``)."""
    tag = st.reparse_tag if st.reparse_data else 0
    kind = _KIND_OF_TAG.get(tag)
    if kind is None or (st.is_dir and kind != S.S_IFLNK):
        kind = S.S_IFDIR if st.is_dir else S.S_IFREG
    if kind == S.S_IFREG and lx.mode is not None and S.S_IFMT(lx.mode) in _LX_SPECIAL_TYPES:
        kind = S.S_IFMT(lx.mode)  # WSL metadata naming a special file without its reparse tag
    if kind == S.S_IFLNK:
        mode = S.S_IFLNK | 0o777
    elif lx.mode is not None:
        mode = kind | (lx.mode & 0o7777)
    else:
        perm = (0o777 if kind == S.S_IFDIR else 0o666) & ~options.umask
        if kind == S.S_IFREG and st.attributes & FileAttributes.READONLY:
            perm &= ~0o222
        mode = kind | perm
    uid = options.uid if lx.uid is None else lx.uid
    gid = options.gid if lx.gid is None else lx.gid
    if kind in (S.S_IFCHR, S.S_IFBLK) and lx.rdev_major is not None:
        rdev = os.makedev(lx.rdev_major & 0xFFFFFFFF, (lx.rdev_minor or 0) & 0xFFFFFFFF)
    else:
        rdev = 0
    return PosixView(mode, uid, gid, rdev)


def _target_bytes(text: str) -> bytes:
    """An LX target's undecodable bytes (surrogateescape) as they were; a
    lone UTF-16 surrogate of an NT target as names are (surrogatepass)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def symlink_target(reparse_data: bytes) -> bytes | None:
    """The symlink target as bytes, or None when no POSIX symlink can carry it;
    raises CimError/ValueError/struct.error when the reparse buffer is damaged."""
    target = map_symlink_target(ntfs.parse_reparse(reparse_data))
    raw = _target_bytes(target) if isinstance(target, str) else bytes(target)
    if not raw or b"\0" in raw:
        return None
    return raw


#: ntfs-3g's names of the NTFS metadata xattrs (read by name, not listed).
NTFS_XATTRS = (
    b"system.ntfs_attrib",
    b"system.ntfs_attrib_be",
    b"system.ntfs_crtime",
    b"system.ntfs_crtime_be",
    b"system.ntfs_times",
    b"system.ntfs_times_be",
    b"system.ntfs_acl",
    b"system.ntfs_reparse_data",
    b"system.ntfs_ea",
)


_DIRECTORY = int(FileAttributes.DIRECTORY)


def ntfs_xattrs_main(st) -> list[tuple[bytes, bytes]]:
    """(name, value) of the NTFS metadata xattrs without the ``_be`` and
    ``crtime`` forms (their bytes are in the others), absent ones left out:
    ``ntfs_xattr(st, name)`` for those names, in one pass."""
    out = [
        (b"system.ntfs_attrib", struct.pack("<I", int(st.attributes) | (_DIRECTORY if st.is_dir else 0))),
        (
            b"system.ntfs_times",
            struct.pack("<4Q", st.creation_time, st.last_write_time, st.last_access_time, st.change_time),
        ),
    ]
    if st.security_descriptor:
        out.append((b"system.ntfs_acl", st.security_descriptor))
    if st.reparse_data:
        out.append((b"system.ntfs_reparse_data", st.reparse_data))
    if st.ea_buffer:
        out.append((b"system.ntfs_ea", st.ea_buffer))
    return out


def ntfs_xattr(st, name: bytes) -> bytes | None:
    """The value of the NTFS metadata xattr ``name`` (one of NTFS_XATTRS), or None."""
    attrib = st.attributes | (FileAttributes.DIRECTORY if st.is_dir else 0)
    if name == b"system.ntfs_attrib":
        return struct.pack("<I", attrib)
    if name == b"system.ntfs_attrib_be":
        return struct.pack(">I", attrib)
    if name == b"system.ntfs_crtime":
        return struct.pack("<Q", st.creation_time)
    if name == b"system.ntfs_crtime_be":
        return struct.pack(">Q", st.creation_time)
    if name == b"system.ntfs_times":
        # ntfs-3g's order: creation, last write, last access, change
        return struct.pack("<4Q", st.creation_time, st.last_write_time, st.last_access_time, st.change_time)
    if name == b"system.ntfs_times_be":
        return struct.pack(">4Q", st.creation_time, st.last_write_time, st.last_access_time, st.change_time)
    if name == b"system.ntfs_acl":
        return st.security_descriptor or None
    if name == b"system.ntfs_reparse_data":
        return st.reparse_data or None
    if name == b"system.ntfs_ea":
        return st.ea_buffer or None
    return None


DAMAGED = (CimError, ValueError, struct.error)
