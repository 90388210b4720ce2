"""The FUSE requests of a read-only image answered straight on ``/dev/fuse``.

libfuse (through pyfuse3) still mounts and unmounts; the requests are read
and answered here, in a few threads, without pyfuse3's request loop and trio:
a request costs one ``readv`` and one ``writev`` plus its handler (pyfuse3 and
trio spent ~60 µs of CPU per request on their own, more than most handlers).

It also asks the kernel for fewer requests than pyfuse3 can: OPEN and OPENDIR
are refused with ENOSYS, which a kernel that offers ``FUSE_NO_OPEN_SUPPORT`` /
``FUSE_NO_OPENDIR_SUPPORT`` takes as "no open, release or flush messages ever,
keep the page cache, cache directory listings" — READ carries the inode, which
is all this file system needs.  A tree walk then costs one READDIRPLUS per page
of a listing and one READ per small file.

Small files a reader is about to read are pushed into the page cache ahead
of it (NOTIFY_STORE): when READs arrive for files in listing order (tar, cp -r,
a walk reading everything), the next small files of that directory are stored
before the reply, and their reads never reach the daemon.  Random access
pushes nothing.

Handlers run one at a time (a lock around the image's metadata); a READ's data
copy runs outside it, so a read waiting for the disk or the network stalls
only its own thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as S
import struct
import threading
from typing import Any

import pyfuse3

from ..errors import CimError, CimFormatError
from . import opstats
from .fs import CACHE_SECONDS, PUSH_MAX, CimFs
from .view import fs_name as _fs_name

log = logging.getLogger("cimfs.mount")

# Opcodes (linux/fuse.h).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY = 27, 28, 29, 30, 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, COPY_FILE_RANGE = 42, 43, 44, 45, 47
_NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT))
_WRITES = frozenset(
    (
        SETATTR,
        SYMLINK,
        MKNOD,
        MKDIR,
        UNLINK,
        RMDIR,
        RENAME,
        LINK,
        WRITE,
        SETXATTR,
        REMOVEXATTR,
        CREATE,
        FALLOCATE,
        RENAME2,
        COPY_FILE_RANGE,
    )
)

# INIT flags.
ASYNC_READ, EXPORT_SUPPORT, DO_READDIRPLUS = 1 << 0, 1 << 4, 1 << 13
NO_OPEN_SUPPORT, PARALLEL_DIROPS, MAX_PAGES, CACHE_SYMLINKS, NO_OPENDIR_SUPPORT = (
    1 << 17,
    1 << 18,
    1 << 22,
    1 << 23,
    1 << 24,
)
FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR = 1 << 1, 1 << 3

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_PREFIX = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, and their nanoseconds
ATTR_OUT_PREFIX = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
DIRENT = struct.Struct("<QQII")
READ_IN = struct.Struct("<QQI")  # fh, offset, size
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
KSTATFS = struct.Struct("<QQQQQIIII6I")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
NOTIFY_STORE = 4
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid, offset, size, padding

PROTOCOL_MINOR = 31  # what this module speaks: max_pages, no-open, no-opendir, cached symlinks
OLDEST_MINOR = 23  # 64-byte INIT reply; older features (no-open, max_pages) are used only when offered
MAX_PAGES_WANTED = 256  # 1 MiB READs
MAX_WRITE = 4096  # read-only: only bounds the request buffer the kernel insists on
REQUEST_BUFFER = 68 * 1024  # a lookup name, an xattr name; SETXATTR values beyond it fail E2BIG (read-only anyway)
THREADS = 4
THREADS_REMOTE = 8  # reads of a remote image wait on the network
_VALID = int(CACHE_SECONDS)
_NS = 1_000_000_000
_LISTINGS_KEPT = 4096
_ENTRIES_KEPT = 200_000
#: Read-ahead across files: how many small files, and how many bytes, are
#: pushed at once; a READ at most this many entries past the last one read
#: (or pushed) counts as walking the listing forward.
PUSH_FILES = 32
PUSH_BYTES = 2 << 20
PUSH_SLACK = 8


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def fuse_fd() -> int | None:
    """The process's one descriptor of ``/dev/fuse`` (libfuse opened it, or
    fusermount3 passed it), or None when there is not exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


class WireFs(CimFs):
    """A :class:`CimFs` that can also answer the kernel itself (:meth:`run`)."""

    def __init__(self, image, options=None):
        super().__init__(image, options)
        self._packed: dict[int, tuple[bytes, int, int]] = {}  # FileID -> (fuse_entry_out, mode, size)
        self._place: dict[int, tuple[int, int]] = {}  # FileID -> (directory FileID, index in its listing)
        self._walks: dict[int, list[int]] = {}  # directory FileID -> [last index read, last index pushed]
        self._listings: dict[int, list[tuple[bytes, int]]] = {}  # directory FileID -> (name, FileID)
        self._descs: dict[int, object] = {}  # FileID -> stream descriptor of its data
        self._meta = threading.Lock()
        self._no_open = self._no_opendir = False
        self._statfs: bytes | None = None
        self._counts = opstats.wire_counter()
        self._handlers = {
            LOOKUP: self._lookup,
            GETATTR: self._getattr,
            READLINK: self._readlink,
            OPEN: self._open_file,
            OPENDIR: self._open_dir,
            READDIR: self._readdir_plain,
            READDIRPLUS: self._readdir_plus,
            RELEASE: self._nothing,
            RELEASEDIR: self._nothing,
            STATFS: self._statfs_reply,
            GETXATTR: self._getxattr,
            LISTXATTR: self._listxattr,
            DESTROY: self._nothing,
            FSYNC: self._nothing,
            FSYNCDIR: self._nothing,
        }

    # ------------------------------------------------------------ packed attributes
    def _entry_of(self, fid: int) -> tuple[bytes, int, int]:
        got = self._packed.get(fid)
        if got is None:
            mode, nlink, uid, gid, rdev, size, blocks, atime, mtime, ctime, _ = self.attributes(fid)
            ino = self._ino(fid)
            a_s, a_n = divmod(atime, _NS)
            m_s, m_n = divmod(mtime, _NS)
            c_s, c_n = divmod(ctime, _NS)
            attr = ATTR.pack(
                ino,
                size,
                blocks,
                a_s,
                m_s,
                c_s,
                a_n,
                m_n,
                c_n,
                mode,
                nlink,
                uid & 0xFFFFFFFF,
                gid & 0xFFFFFFFF,
                rdev & 0xFFFFFFFF,
                4096,
                0,
            )
            got = (ENTRY_PREFIX.pack(ino, 0, _VALID, _VALID, 0, 0) + attr, mode, size)
            if len(self._packed) >= _ENTRIES_KEPT:
                self._packed.clear()  # the kernel keeps its own copies
            self._packed[fid] = got
        return got

    _NEGATIVE = ENTRY_PREFIX.pack(0, 0, _VALID, 0, 0, 0) + bytes(ATTR.size)

    # ------------------------------------------------------------ handlers (under self._meta)
    def _lookup(self, nodeid: int, arg) -> bytes:
        name = bytes(arg).split(b"\0", 1)[0]
        parent = self._fid(nodeid)
        if name == b".":
            return self._entry_of(parent)[0]
        if name == b"..":
            up = self.image.stat(parent).parent_file_id if parent != self.root else self.root
            return self._entry_of(up or self.root)[0]
        try:
            text = name.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return self._NEGATIVE
        if "\\" in text or ":" in text:
            return self._NEGATIVE
        fid = self.image.child(parent, text)
        return self._NEGATIVE if fid is None else self._entry_of(fid)[0]

    def _getattr(self, nodeid: int, arg) -> bytes:
        entry = self._entry_of(self._fid(nodeid))[0]
        return ATTR_OUT_PREFIX.pack(_VALID, 0, 0) + entry[ENTRY_PREFIX.size :]

    def _readlink(self, nodeid: int, arg) -> bytes:
        return CimFs.readlink.__wrapped__(self, nodeid)

    def _open_file(self, nodeid: int, arg) -> bytes:
        if self._no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # from now on the kernel opens without asking
        if not S.S_ISREG(self._entry_of(self._fid(nodeid))[1]):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return OPEN_OUT.pack(0, FOPEN_KEEP_CACHE, 0)

    def _open_dir(self, nodeid: int, arg) -> bytes:
        if self._no_opendir:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return OPEN_OUT.pack(0, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, 0)

    def _listing(self, fid: int) -> list[tuple[bytes, int]]:
        entries = self._listings.get(fid)
        if entries is None:
            entries = []
            place = self._place
            if len(place) >= _ENTRIES_KEPT:
                place.clear()
                self._walks.clear()
            for e in self.image.scandir(fid):
                raw = _fs_name(e.name)
                if raw is not None:
                    place[e.file_id] = (fid, len(entries))
                    entries.append((raw, e.file_id))
            if len(self._listings) >= _LISTINGS_KEPT:
                self._listings.clear()  # the kernel caches listings itself; this only serves the pages of one
            self._listings[fid] = entries
        return entries

    def _readdir(self, nodeid: int, arg, plus: bool) -> bytes:
        _, start, size = READ_IN.unpack_from(arg)
        entries = self._listing(self._fid(nodeid))
        out, used = [], 0
        for i in range(start, len(entries)):
            raw, fid = entries[i]
            try:
                entry, mode, _ = self._entry_of(fid)
            except Exception as e:  # noqa: BLE001 - a damaged entry is left out; the rest stays listed
                self._note("readdir", e)
                continue
            namelen = len(raw)
            reclen = _pad8(DIRENT.size + namelen) + (len(entry) if plus else 0)
            if used + reclen > size:
                break
            if plus:
                out.append(entry)
            out.append(DIRENT.pack(self._ino(fid), i + 1, namelen, (mode >> 12) & 0xF))
            out.append(raw + bytes(_pad8(namelen) - namelen))
            used += reclen
        return b"".join(out)

    def _readdir_plus(self, nodeid: int, arg) -> bytes:
        return self._readdir(nodeid, arg, True)

    def _readdir_plain(self, nodeid: int, arg) -> bytes:
        return self._readdir(nodeid, arg, False)

    def _nothing(self, nodeid: int, arg) -> bytes:
        return b""

    def _statfs_reply(self, nodeid: int, arg) -> bytes:
        if self._statfs is None:
            total = sum(size for size, _ in self.image.stored_sizes().values())
            self._statfs = KSTATFS.pack(
                (total + 4095) // 4096, 0, 0, self.image.file_count, 0, 4096, 255 * 3, 4096, 0, 0, 0, 0, 0, 0, 0
            )
        return self._statfs

    @staticmethod
    def _sized(value: bytes, arg) -> bytes:
        size = GETXATTR_IN.unpack_from(arg)[0]
        if size == 0:
            return GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise pyfuse3.FUSEError(errno.ERANGE)
        return value

    def _getxattr(self, nodeid: int, arg) -> bytes:
        name = bytes(arg[GETXATTR_IN.size :]).split(b"\0", 1)[0]
        return self._sized(CimFs.getxattr.__wrapped__(self, nodeid, name), arg)

    def _listxattr(self, nodeid: int, arg) -> bytes:
        return self._sized(b"".join(n + b"\0" for n in CimFs.listxattr.__wrapped__(self, nodeid)), arg)

    def _descriptor(self, nodeid: int):
        return self._descriptor_of(self._fid(nodeid))

    def _descriptor_of(self, fid: int):
        desc = self._descs.get(fid)
        if desc is None:
            desc = self.image.stream_descriptor(fid)
            if len(self._descs) >= _LISTINGS_KEPT * 16:
                self._descs.clear()
            self._descs[fid] = desc
        return desc

    def _plan_push(self, nodeid: int) -> list[tuple[int, object, int]]:
        """(inode, descriptor, size) of the small files to push after a READ
        at offset 0 of ``nodeid``: the next ones in its directory's listing,
        when the reads so far walk that listing forward."""
        fid = self._fid(nodeid)
        place = self._place.get(fid)
        if place is None:
            return []
        d, i = place
        walk = self._walks.get(d)
        if walk is None:
            # The first file read here: a walk starts at the listing's first file (an empty one is never read).
            self._walks[d] = walk = [i, i]
            if i != self._first_file(self._listing(d)):
                return []
        else:
            last, pushed = walk
            walk[0] = i
            if not last < i <= max(last, pushed) + PUSH_SLACK or pushed >= i + PUSH_FILES // 2:
                return []
        pushed, entries = walk[1], self._listing(d)
        out: list[tuple[int, Any, int]] = []  # (inode, stream descriptor, size) of each file pushed
        total, j = 0, max(pushed, i) + 1
        while j < len(entries) and len(out) < PUSH_FILES and total < PUSH_BYTES:
            child = entries[j][1]
            j += 1
            try:
                _, mode, size = self._entry_of(child)
                if S.S_ISREG(mode) and 0 < size <= PUSH_MAX:
                    out.append((self._ino(child), self._descriptor_of(child), size))
                    total += size
            except Exception:  # noqa: BLE001, S112 - not pushed; its own READ reports the damage
                continue
        walk[1] = j - 1
        return out

    def _first_file(self, entries) -> int:
        for j, (_, child) in enumerate(entries):
            try:
                _, mode, size = self._entry_of(child)
                if S.S_ISREG(mode) and size:
                    return j
            except Exception:  # noqa: BLE001, S112 - a damaged entry is no file to start at
                continue
        return -1

    def _push_files(self, fd: int, batch, dview) -> None:
        for ino, desc, size in batch:
            try:
                n = self.image.readinto_at(desc, 0, dview[:size])
                os.writev(
                    fd,
                    [
                        OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_STORE_OUT.size + n, NOTIFY_STORE, 0),
                        NOTIFY_STORE_OUT.pack(ino, 0, n, 0),
                        dview[:n],
                    ],
                )
            except CimError:
                continue  # its own READ reports it
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the kernel has forgotten that inode
                if e.errno != errno.ENODEV:
                    self._push = False
                    self._note("push", e)
                return

    # ------------------------------------------------------------ the loop
    def handshake(self, fd: int) -> None:
        """Answer the kernel's INIT (the first request of a new mount)."""
        buf = bytearray(REQUEST_BUFFER)
        while True:
            os.readv(fd, [buf])
            _, opcode, unique = IN_HEADER.unpack_from(buf)[:3]
            if opcode != INIT:
                self._reply(fd, unique, errno.EIO, b"")
                continue
            major, minor, max_readahead, flags = INIT_IN.unpack_from(buf, IN_HEADER.size)
            if major < 7 or (major == 7 and minor < OLDEST_MINOR):
                self._reply(fd, unique, errno.EPROTO, b"")
                raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is older than 7.{OLDEST_MINOR}")
            if major > 7:  # the kernel then sends INIT again, in our version
                self._reply(fd, unique, 0, INIT_OUT.pack(7, PROTOCOL_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0, *[0] * 7))
                continue
            self._no_open = bool(flags & NO_OPEN_SUPPORT)
            self._no_opendir = bool(flags & NO_OPENDIR_SUPPORT)
            want = flags & (ASYNC_READ | EXPORT_SUPPORT | DO_READDIRPLUS | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS)
            minor = min(minor, PROTOCOL_MINOR)
            self._reply(
                fd,
                unique,
                0,
                INIT_OUT.pack(7, minor, max_readahead, want, 16, 12, MAX_WRITE, 1, MAX_PAGES_WANTED, 0, 0, *[0] * 7),
            )
            return

    @staticmethod
    def _reply(fd: int, unique: int, err: int, payload) -> None:
        try:
            if err:
                os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, -err, unique))
            else:
                os.writev(fd, [OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique), payload])
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted and is gone
                raise

    def serve_requests(self, fd: int) -> None:
        """Answer requests until the kernel ends the session (unmounted)."""
        buf = bytearray(REQUEST_BUFFER)
        req = memoryview(buf)
        data = bytearray(MAX_PAGES_WANTED * 4096)
        dview = memoryview(data)
        pview = memoryview(bytearray(PUSH_MAX)) if self._push else None
        handlers, meta, counts, reply = self._handlers, self._meta, self._counts, self._reply
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if e.errno == errno.ENODEV:
                    return
                raise
            if n < IN_HEADER.size:
                return  # end of stream (only a socket standing in for /dev/fuse does that)
            _, opcode, unique, nodeid = IN_HEADER.unpack_from(buf)[:4]
            if counts is not None:
                counts[opcode] = counts.get(opcode, 0) + 1
            if opcode in _NO_REPLY:
                continue
            arg = req[IN_HEADER.size : n]
            err, push = 0, None
            payload: bytes | memoryview = b""
            try:
                if opcode == READ:
                    _, off, size = READ_IN.unpack_from(arg)
                    with meta:
                        desc = self._descriptor(nodeid)
                        if off == 0 and self._push:
                            push = self._plan_push(nodeid)
                    view = dview[:size] if size <= len(data) else memoryview(bytearray(size))
                    payload = view[: self.image.readinto_at(desc, off, view)]
                else:
                    handler = handlers.get(opcode)
                    if handler is None:
                        err = errno.EROFS if opcode in _WRITES else errno.ENOSYS
                    else:
                        with meta:
                            payload = handler(nodeid, arg)
            except pyfuse3.FUSEError as e:
                err = e.errno
            except CimFormatError as e:
                self._note(_name(opcode), e)
                err = errno.EIO
            except CimError as e:
                err = e.errno or errno.EIO
            except Exception as e:  # noqa: BLE001 - a bug or a hostile image must not stop the daemon
                self._note(_name(opcode), e)
                err = errno.EIO
            if push:
                # Before the reply: the reader's next open must find the next file stored.
                self._push_files(fd, push, pview)
            try:
                reply(fd, unique, err, payload)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                self._note("reply", e)

    def run(self, fd: int, threads: int, stopped: threading.Event) -> list[threading.Thread]:
        """Answer INIT, then serve from ``threads`` threads; ``stopped`` is set when the first one ends."""
        self.handshake(fd)

        def worker():
            try:
                self.serve_requests(fd)
            except BaseException as e:  # noqa: BLE001
                log.error("FUSE request loop failed: %s: %s", type(e).__name__, e)
            finally:
                stopped.set()

        pool = [threading.Thread(target=worker, name=f"fuse-{i}", daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        return pool


def _name(opcode: int) -> str:
    return {
        READ: "read",
        LOOKUP: "lookup",
        GETATTR: "getattr",
        READDIRPLUS: "readdir",
        READDIR: "readdir",
        READLINK: "readlink",
        GETXATTR: "getxattr",
        LISTXATTR: "listxattr",
    }.get(opcode, f"opcode {opcode}")
