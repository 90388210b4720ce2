"""The FUSE file system: a read-only view of one image, built on the public reader.

Images never change, so everything the kernel may cache it caches for a long
time: entries (negative ones too), attributes and page contents
(``keep_cache``); directory listings carry attributes (pyfuse3 always answers
readdirplus), so ``ls -l``/``find``/``tar`` need no extra lookups.

Every operation goes through :func:`_op`: a ``CimError`` from the library
becomes ``EIO`` (or its own errno), and so does any other exception, logged
once — a hostile image fails the one request, never the daemon.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as S
from collections import OrderedDict

import pyfuse3
import trio

from ..errors import CimError, CimFormatError
from ..layout import ntfs
from ..metadata import filetime_to_ns
from .view import DAMAGED, Options, fs_name, lx_metadata, map_symlink_target, ntfs_xattr, posix_view, symlink_target  # noqa: F401

log = logging.getLogger("cimfs.mount")

#: Seconds the kernel may keep entries and attributes (the image is immutable).
CACHE_SECONDS = 86400.0
#: Attributes kept in the daemon (the kernel keeps its own copies as well).
ATTR_CACHE_SIZE = 200_000
#: Files up to this size are pushed into the kernel's page cache when first
#: opened (notify_store), saving the read round trips that follow.
PUSH_MAX = 256 * 1024
#: Distinct EA buffers whose parsed WSL metadata is kept.
LX_SEEN_MAX = 4096
#: Largest alternate stream served through getxattr (Linux's XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 65536

#: Reads that must wait for the disk run in up to this many threads at once.
READ_THREADS = 8

_MAX_LOGGED = 50


def _ns(filetime: int) -> int:
    return filetime_to_ns(filetime) if filetime else 0


_fs_name = fs_name


def _op(fn):
    """Run one FUSE operation; turn every failure into an errno for that request."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except CimFormatError as e:
            self._note(fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except CimError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:  # noqa: BLE001 - a bug or a hostile image must not stop the daemon
            self._note(fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _erofs(self, *args, **kwargs):
    raise pyfuse3.FUSEError(errno.EROFS)


class CimFs(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, image, options: Options | None = None):
        super().__init__()
        self.image = image
        self.options = options or Options()
        self.root = image.root_id
        self._attrs: OrderedDict[int, pyfuse3.EntryAttributes] = OrderedDict()
        self._lx_seen: dict[bytes, ntfs.LxMetadata] = {}  # EA buffer -> its parsed WSL metadata
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}  # opendir handle -> entries
        self._open: dict[int, object] = {}  # open handle -> stream descriptor
        self._next_fh = 1
        self._logged = 0
        # notify_store works (cleared on ENOSYS).  Not for a remote image: the
        # push reads in the event loop, which must not wait for the network.
        self._push = getattr(image, "storage", None) is None
        self._pushed: set[int] = set()
        self._limiter = trio.CapacityLimiter(READ_THREADS)
        self._buf = bytearray(1 << 20)
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0  # a negative entry: the kernel remembers the name is absent
        neg.entry_timeout = CACHE_SECONDS
        self._negative = neg

    def _note(self, op: str, e: BaseException) -> None:
        if self._logged < _MAX_LOGGED:
            self._logged += 1
            log.warning("%s failed: %s: %s", op, type(e).__name__, e)
            if self._logged == _MAX_LOGGED:
                log.warning("further failures are not logged")

    # FileID <-> inode: the root must be pyfuse3.ROOT_INODE, so swap it with FileID 1.
    def _swap(self, n: int) -> int:
        if n == pyfuse3.ROOT_INODE:
            return self.root
        return pyfuse3.ROOT_INODE if n == self.root else n

    _fid = _ino = _swap

    # ------------------------------------------------------------ attributes
    def entry(self, fid: int) -> pyfuse3.EntryAttributes:
        a = self._attrs.get(fid)
        if a is None:
            a = self._make_entry(fid)
            self._attrs[fid] = a
            if len(self._attrs) > ATTR_CACHE_SIZE:
                self._attrs.popitem(last=False)
        return a

    def _lx(self, fid: int, ea_buffer: bytes) -> ntfs.LxMetadata:
        # Images made from one tree repeat a handful of EA buffers (the same
        # owner and mode): parsing each once saves ~30 % of an entry's cost.
        lx = self._lx_seen.get(ea_buffer)
        if lx is not None:
            return lx
        try:
            lx = lx_metadata(ea_buffer)
        except DAMAGED as e:
            self._note(f"EA buffer of FileID {fid}", e)
            return ntfs.LxMetadata()
        if len(self._lx_seen) >= LX_SEEN_MAX:
            self._lx_seen.clear()
        self._lx_seen[ea_buffer] = lx
        return lx

    def attributes(self, fid: int) -> tuple:
        """``(mode, nlink, uid, gid, rdev, size, blocks, atime_ns, mtime_ns, ctime_ns, birthtime_ns)`` of an
        entry as Linux sees it: computed here once, packed by each engine (pyfuse3 objects, wire bytes)."""
        st = self.image.stat(fid)
        lx = self._lx(fid, st.ea_buffer)
        view = posix_view(st, lx, self.options)
        mode, kind = view.mode, S.S_IFMT(view.mode)
        if kind == S.S_IFDIR:
            nlink = 2 + sum(1 for e in self.image.scandir(fid) if _is_dir(self.image, e.file_id))
        else:
            nlink = max(1, st.nlink)
        if kind == S.S_IFLNK:
            target = self._target(fid, st.reparse_data)
            size = len(target) if target is not None else 0
            blocks = 0
        elif kind == S.S_IFREG:
            size = st.size
            blocks = 0 if st.is_sparse else (st.size + 511) // 512
        else:
            size = blocks = 0
        return (
            mode,
            nlink,
            view.uid,
            view.gid,
            view.rdev,
            size,
            blocks,
            _ns(st.last_access_time),
            _ns(st.last_write_time),
            _ns(st.change_time),
            _ns(st.creation_time),
        )

    def _make_entry(self, fid: int) -> pyfuse3.EntryAttributes:
        mode, nlink, uid, gid, rdev, size, blocks, atime, mtime, ctime, birth = self.attributes(fid)
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(fid)
        a.generation = 0
        a.entry_timeout = a.attr_timeout = CACHE_SECONDS
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev = mode, nlink, uid, gid, rdev
        a.st_size, a.st_blocks, a.st_blksize = size, blocks, 4096
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns, a.st_birthtime_ns = atime, mtime, ctime, birth
        return a

    def _target(self, fid: int, reparse_data: bytes) -> bytes | None:
        try:
            return symlink_target(reparse_data)
        except DAMAGED as e:
            self._note(f"reparse buffer of FileID {fid}", e)
            return None

    @_op
    def getattr(self, inode, ctx=None):
        return self.entry(self._fid(inode))

    @_op
    def lookup(self, parent_inode, name, ctx=None):
        parent = self._fid(parent_inode)
        if name == b".":
            return self.entry(parent)
        if name == b"..":
            # Only asked for when a handle outlives its dentry (NFS export);
            # the record's parent is the directory of the first link.
            up = self.image.stat(parent).parent_file_id if parent != self.root else self.root
            return self.entry(up or self.root)
        try:
            text = name.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return self._negative
        if "\\" in text or ":" in text:
            return self._negative
        fid = self.image.child(parent, text)
        if fid is None:
            return self._negative
        return self.entry(fid)

    @_op
    def readlink(self, inode, ctx=None):
        fid = self._fid(inode)
        st = self.image.stat(fid)
        if not S.S_ISLNK(self.entry(fid).st_mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        target = self._target(fid, st.reparse_data)
        if target is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return target

    # ------------------------------------------------------------ directories
    @_op
    def opendir(self, inode, ctx=None):
        fid = self._fid(inode)
        entries = []
        for e in self.image.scandir(fid):
            raw = _fs_name(e.name)
            if raw is not None:
                entries.append((raw, e.file_id))
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = entries
        return fh

    @_op
    def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            raw, fid = entries[i]
            try:
                attrs = self.entry(fid)
            except Exception as e:  # noqa: BLE001 - a damaged entry is left out; the rest stays listed
                self._note("readdir", e)
                continue
            if not pyfuse3.readdir_reply(token, raw, attrs, i + 1):
                return

    @_op
    def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # ------------------------------------------------------------ files
    @_op
    def open(self, inode, flags, ctx=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        fid = self._fid(inode)
        if not S.S_ISREG(self.entry(fid).st_mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        desc = self.image.stream_descriptor(fid)
        if self._push and fid not in self._pushed and 0 < desc.length <= PUSH_MAX:
            self._pushed.add(fid)
            try:
                pyfuse3.notify_store(inode, 0, self.image.read_at(desc, 0, desc.length))
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    self._push = False
            except CimError:
                pass  # the reads that follow report it (EIO)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = desc
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        desc = self._open.get(fh)
        if desc is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            # What the page cache holds is read inline into one reused buffer:
            # pyfuse3 sends the reply before any other request runs, so
            # sharing it is safe, and a cached read costs no allocation and no
            # thread hand-off.  What would wait for the disk goes to a thread
            # with its own buffer, and the loop serves other requests meanwhile.
            if size > len(self._buf):
                self._buf = bytearray(size)
            view = memoryview(self._buf)[:size]
            n = self.image.readinto_at(desc, off, view, nowait=True)
            want = min(size, max(0, desc.length - off))
            if n >= want:
                return view[:n]
            own = bytearray(want)
            own[:n] = view[:n]
            rest = memoryview(own)[n:]
            m = await trio.to_thread.run_sync(self.image.readinto_at, desc, off + n, rest, limiter=self._limiter)
            return memoryview(own)[: n + m]
        except CimFormatError as e:
            self._note("read", e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except CimError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:  # noqa: BLE001
            self._note("read", e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_op
    def release(self, fh):
        self._open.pop(fh, None)

    @_op
    def statfs(self, ctx=None):
        s = pyfuse3.StatvfsData()
        total = sum(size for size, _ in self.image.stored_sizes().values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = self.image.file_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255 * 3  # 255 UTF-16 units, up to 3 UTF-8 bytes each
        return s

    # ------------------------------------------------------------ extended attributes
    # ntfs-3g's names.  Like ntfs-3g, listxattr shows the alternate streams
    # (user.*) only: the system.ntfs_* values are read by name, so cp -a,
    # rsync -X and tar --xattrs copy streams and do not trip over them.
    def _system_xattr(self, fid: int, name: bytes) -> bytes | None:
        return ntfs_xattr(self.image.stat(fid), name)

    @_op
    def listxattr(self, inode, ctx=None):
        out = []
        for name in self.image.streams(self._fid(inode)):
            raw = name.encode("utf-8", "surrogatepass")
            if raw and b"\0" not in raw:
                out.append(b"user." + raw)
        return out

    @_op
    def getxattr(self, inode, name, ctx=None):
        fid = self._fid(inode)
        if name.startswith(b"user."):
            stream = name[5:].decode("utf-8", "surrogatepass")
            if not stream:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            try:
                size = self.image.stream_size(fid, stream)
            except CimError as e:
                if isinstance(e, CimFormatError):
                    raise
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            if size > XATTR_SIZE_MAX:
                raise pyfuse3.FUSEError(errno.E2BIG)
            return self.image.read_at(fid, 0, size, stream)
        value = self._system_xattr(fid, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    # ------------------------------------------------------------ read-only
    setattr = setxattr = removexattr = write = create = _op(_erofs)
    mkdir = mknod = symlink = link = unlink = rmdir = rename = _op(_erofs)

    @_op
    def fsync(self, fh, datasync):
        return None  # nothing is ever dirty

    @_op
    def fsyncdir(self, fh, datasync):
        return None


def _is_dir(image, fid: int) -> bool:
    try:
        record = getattr(image, "record", None)  # cheaper than stat when the reader has it
        return record(fid).is_dir if record is not None else image.stat(fid).is_dir
    except CimError:
        return False
