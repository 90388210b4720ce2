"""The FUSE file system: a read-only view of one image, built on the public reader.

Images never change, so everything the kernel may cache it caches for an
hour: entries, attributes and page contents (``keep_cache``).
"""

from __future__ import annotations

import errno
import os
import stat as S
import struct

import pyfuse3

from .. import CimError, CimFormatError, filetime_to_ns
from ..layout import ntfs
from ..layout.cim import FILE_ATTRIBUTE_DIRECTORY

CACHE_SECONDS = 3600.0
_EROFS = pyfuse3.FUSEError(errno.EROFS)


class Options:
    """``-o uid=,gid=,umask=`` apply to entries without WSL metadata."""

    def __init__(self, uid: int | None = None, gid: int | None = None, umask: int | None = None):
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.umask = 0o222 if umask is None else umask


def map_symlink_target(rp: ntfs.ReparsePoint) -> str:
    """[choice] NT symlink / mount point targets as POSIX paths: relative targets
    keep their shape with ``/``; drive-absolute ``C:\\x`` becomes ``/mnt/c/x`` (as
    WSL shows Windows drives); UNC ``\\\\server\\share`` becomes ``//server/share``;
    a rooted ``\\x`` becomes ``/x``."""
    target = rp.target or ""
    if rp.tag == ntfs.IO_REPARSE_TAG_LX_SYMLINK:
        return target
    if target.startswith("\\??\\"):
        target = target[4:]
    if target.upper().startswith("UNC\\"):
        target = "\\\\" + target[4:]
    if len(target) >= 2 and target[1] == ":" and target[0].isalpha():
        rest = target[2:].lstrip("\\/")
        return f"/mnt/{target[0].lower()}" + ("/" + rest.replace("\\", "/") if rest else "")
    return target.replace("\\", "/")


_SPECIAL = {
    ntfs.IO_REPARSE_TAG_LX_FIFO: S.S_IFIFO,
    ntfs.IO_REPARSE_TAG_LX_CHR: S.S_IFCHR,
    ntfs.IO_REPARSE_TAG_LX_BLK: S.S_IFBLK,
    ntfs.IO_REPARSE_TAG_AF_UNIX: S.S_IFSOCK,
    ntfs.IO_REPARSE_TAG_LX_SYMLINK: S.S_IFLNK,
    ntfs.IO_REPARSE_TAG_SYMLINK: S.S_IFLNK,
    ntfs.IO_REPARSE_TAG_MOUNT_POINT: S.S_IFLNK,
}


def _ns(filetime: int) -> int:
    return max(0, filetime_to_ns(filetime)) if filetime else 0


class CimFs(pyfuse3.Operations):
    def __init__(self, image, options: Options | None = None):
        super().__init__()
        self.image = image
        self.options = options or Options()
        self.root = image.root_id
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._open: dict[int, object] = {}  # fh -> stream descriptor
        self._dirs: dict[int, list] = {}
        self._next_fh = 1

    # FileID <-> inode: the root must be pyfuse3.ROOT_INODE; swap it with FileID 1.
    def _fid(self, inode: int) -> int:
        if inode == pyfuse3.ROOT_INODE:
            return self.root
        return pyfuse3.ROOT_INODE if inode == self.root else inode

    def _ino(self, fid: int) -> int:
        return self._fid(fid)  # the swap is its own inverse

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except CimError as e:
            code = errno.EIO if isinstance(e, CimFormatError) else (e.errno or errno.EIO)
            raise pyfuse3.FUSEError(code) from None

    # ------------------------------------------------------------ attributes
    def _entry(self, fid: int) -> pyfuse3.EntryAttributes:
        a = self._attrs.get(fid)
        if a is None:
            a = self._attrs[fid] = self._guard(self._make_entry, fid)
        return a

    def _make_entry(self, fid: int) -> pyfuse3.EntryAttributes:
        st = self.image.stat(fid)
        lx = ntfs.parse_lx_eas(ntfs.unpack_eas(st.ea_buffer)) if st.ea_buffer else ntfs.LxMetadata()
        kind = _SPECIAL.get(st.reparse_tag, S.S_IFDIR if st.is_dir else S.S_IFREG)
        if st.is_dir and kind != S.S_IFLNK:
            kind = S.S_IFDIR  # a directory symlink or junction shows as a link, other tags keep it a directory
        if lx.mode is not None:
            # WSL metadata: its permission bits always; its type unless the
            # record says otherwise (a directory stays a directory).
            ftype = S.S_IFMT(lx.mode) if S.S_IFMT(lx.mode) and kind != S.S_IFDIR else kind
            mode = ftype | (lx.mode & 0o7777)
        elif kind == S.S_IFLNK:
            mode = S.S_IFLNK | 0o777
        else:
            mode = kind | ((0o777 if kind == S.S_IFDIR else 0o666) & ~self.options.umask)
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(fid)
        a.generation = 0
        a.entry_timeout = a.attr_timeout = CACHE_SECONDS
        a.st_mode = mode
        a.st_nlink = st.nlink + (1 + sum(1 for e in self.image.scandir(fid) if self.image.record(e.file_id).is_dir) if kind == S.S_IFDIR else 0)
        a.st_uid = self.options.uid if lx.uid is None else lx.uid
        a.st_gid = self.options.gid if lx.gid is None else lx.gid
        a.st_rdev = os.makedev(lx.rdev_major or 0, lx.rdev_minor or 0) if lx.rdev_major is not None else 0
        if S.S_ISLNK(mode) and st.reparse_data:
            a.st_size = len(os.fsencode(map_symlink_target(ntfs.parse_reparse(st.reparse_data))))
        else:
            a.st_size = st.size
        a.st_blksize = 4096
        a.st_blocks = 0 if st.is_sparse else (st.size + 511) // 512
        a.st_atime_ns = _ns(st.last_access_time)
        a.st_mtime_ns = _ns(st.last_write_time)
        a.st_ctime_ns = _ns(st.change_time)
        a.st_birthtime_ns = _ns(st.creation_time)
        return a

    async def getattr(self, inode, ctx=None):
        return self._entry(self._fid(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        try:
            text = name.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        parent = self._fid(parent_inode)
        if text == ".":
            return self._entry(parent)
        if text == "..":
            return self._entry(self._guard(lambda: self.image.record(parent).parent_file_id) or self.root)
        if not text or "\\" in text or ":" in text:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fid = self._guard(self.image.child, parent, text)
        if fid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(fid)

    async def readlink(self, inode, ctx):
        st = self._guard(self.image.stat, self._fid(inode))
        if not st.reparse_data:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            return os.fsencode(map_symlink_target(ntfs.parse_reparse(st.reparse_data)))
        except CimError:
            raise pyfuse3.FUSEError(errno.EIO) from None

    # ------------------------------------------------------------ directories
    async def opendir(self, inode, ctx):
        fid = self._fid(inode)
        entries = self._guard(self.image.scandir, fid)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, fid = entries[i]
            try:
                attrs = self._entry(fid)
            except pyfuse3.FUSEError:
                continue  # a damaged entry is left out; the rest stays readable
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogatepass"), attrs, i + 1):
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # ------------------------------------------------------------ files
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _EROFS
        fid = self._fid(inode)
        desc = self._guard(self.image.stream_descriptor, fid)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = desc
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        desc = self._open.get(fh)
        if desc is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return self._guard(self.image.read_at, desc, off, size)

    async def release(self, fh):
        self._open.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        total = 0
        for name, _ in self.image.region_names:
            try:
                total += os.path.getsize(os.path.join(self.image.directory, name))
            except OSError:
                pass
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.image.file_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255 * 3
        return s

    # ------------------------------------------------------------ extended attributes
    def _xattrs(self, fid: int) -> dict[bytes, object]:
        st = self._guard(self.image.stat, fid)
        out: dict[bytes, object] = {
            b"system.ntfs_attrib": struct.pack("<I", st.attributes | (FILE_ATTRIBUTE_DIRECTORY if st.is_dir else 0)),
            b"system.ntfs_crtime": struct.pack("<Q", st.creation_time),
            # [choice] order: creation, last write, last access, change
            b"system.ntfs_times": struct.pack("<4Q", st.creation_time, st.last_write_time, st.last_access_time, st.change_time),
        }
        if st.security_descriptor:
            out[b"system.ntfs_acl"] = st.security_descriptor
        if st.reparse_data:
            out[b"system.ntfs_reparse_data"] = st.reparse_data
        if st.ea_buffer:
            out[b"system.ntfs_ea"] = st.ea_buffer
        for name in self._guard(self.image.streams, fid):
            out[b"user." + name.encode("utf-8", "surrogatepass")] = name  # read lazily
        return out

    async def listxattr(self, inode, ctx):
        return list(self._xattrs(self._fid(inode)))

    async def getxattr(self, inode, name, ctx):
        fid = self._fid(inode)
        value = self._xattrs(fid).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if isinstance(value, str):  # an alternate stream
            size = self._guard(self.image.stream_size, fid, value)
            if size > 65536:
                raise pyfuse3.FUSEError(errno.E2BIG)
            return self._guard(self.image.read_at, fid, 0, size, value)
        return value

    # ------------------------------------------------------------ read-only
    async def setattr(self, *a, **k):
        raise _EROFS

    async def setxattr(self, *a, **k):
        raise _EROFS

    async def removexattr(self, *a, **k):
        raise _EROFS

    async def write(self, *a, **k):
        raise _EROFS

    async def create(self, *a, **k):
        raise _EROFS

    async def mkdir(self, *a, **k):
        raise _EROFS

    async def mknod(self, *a, **k):
        raise _EROFS

    async def symlink(self, *a, **k):
        raise _EROFS

    async def link(self, *a, **k):
        raise _EROFS

    async def unlink(self, *a, **k):
        raise _EROFS

    async def rmdir(self, *a, **k):
        raise _EROFS

    async def rename(self, *a, **k):
        raise _EROFS

