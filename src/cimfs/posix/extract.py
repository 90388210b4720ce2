"""Extracting an image (or a subtree) into a local directory, safely.

Owns :class:`Extractor`: the walk that makes every directory, link and
special file without ever following a link out of DEST (each directory
opened relative to its parent with O_NOFOLLOW, each file created with
O_EXCL|O_NOFOLLOW), the forked writer processes that create the plain
files (:class:`_FileWriters`), hard links made once every first name
exists, directory metadata set last, and sparse files written with holes.
:class:`ExtractReport` collects what could not be made.
"""

from __future__ import annotations

import collections
import functools
import os
import stat as S
from typing import Callable, NamedTuple

import cimfs

from .. import workers
from ..bulk import paused_gc
from ..errors import E_INVALIDARG, ERROR_FILE_EXISTS, ERROR_INVALID_NAME, CimError
from .lx import (
    BLK,
    CHR,
    DIR,
    FIFO,
    FILE,
    FMT_OF_KIND,
    SOCK,
    SYMLINK,
    PosixInfo,
    _FA_SPARSE_FILE,
    _FLAG_READONLY,
    _FLAG_SPARSE,
    _lx_of_eas,
    posix_info,
)
from .names import FILETIME_UNIX_EPOCH, _split, filetime_to_ns, name_from_image
from .scan import CHUNK

SPARSE_BLOCK = 4096  # an all-zero block of this size becomes a hole


# --------------------------------------------------------------------- extraction
class ExtractReport:
    def __init__(self, warn: Callable[[str], None] | None = None):
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._warn = warn or (lambda m: None)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self._warn(msg)

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)
        self._warn(msg)


def _safe_local_name(name: str) -> str | None:
    """The local name of an image name, or None when it cannot be one.

    [choice] A name with a lone UTF-16 surrogate (NTFS allows them) has no
    UTF-8 form; any byte form chosen for it would not come back the same
    through ``cimfs create`` (which takes UTF-8 names only), so the entry is
    skipped and reported, never mapped to bytes."""
    local = name_from_image(name)
    if local in ("", ".", "..") or "/" in local or "\0" in local:
        return None
    if not local.isascii():
        try:
            local.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return local


def _local_target(target: str | None, rel: str) -> str:
    """A symlink target as a local path, or a CimError naming the entry."""
    if not target:  # None: the reparse buffer holds no target (its tag is not a link's)
        reason = "is empty" if target == "" else "could not be read from its reparse buffer"
        raise CimError(E_INVALIDARG, f"symlink target {reason}; not extracted", rel)
    if "\0" in target:
        raise CimError(E_INVALIDARG, "symlink target contains a NUL character; not extracted", rel)
    if not target.isascii():
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            raise CimError(E_INVALIDARG, f"symlink target {target!r} has a lone surrogate with no local form; "
                                         "not extracted", rel) from None
    return target


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirChain:
    """Directories below DEST, opened one step at a time with O_NOFOLLOW;
    the open path is kept, so neighbours in a walk share their common part
    (about one open per directory instead of a walk from DEST).  At most
    ``_OPEN`` descriptors are held whatever the depth: the shallowest are
    closed, and opened again from DEST when the walk comes back to them."""

    _OPEN = 64

    def __init__(self, dest_fd: int):
        self._parts: list[str] = []
        self._fds: list[int | None] = [dest_fd]  # the caller's; never closed here
        self._closed = 0  # _fds[1:_closed + 1] are closed (None); the rest are open

    def open(self, parts) -> int:
        mine, fds = self._parts, self._fds
        same, n = 0, min(len(parts), len(mine))
        while same < n and parts[same] == mine[same]:
            same += 1
        while len(mine) > same:
            mine.pop()
            fd = fds.pop()
            if fd is not None:
                os.close(fd)
        if self._closed >= len(fds):
            self._closed = len(fds) - 1
        if fds[-1] is None:
            # the common part ends in a closed directory: open it again from DEST
            del fds[1:], mine[:]
            self._closed = same = 0
        for p in parts[same:]:
            fds.append(os.open(p, _DIR_FLAGS, dir_fd=fds[-1]))
            mine.append(p)
            if len(fds) - 1 - self._closed > self._OPEN:
                self._closed += 1
                os.close(fds[self._closed])
                fds[self._closed] = None
        return fds[-1]

    def close(self) -> None:
        for fd in self._fds[1:]:
            if fd is not None:
                os.close(fd)
        del self._fds[1:], self._parts[:]
        self._closed = 0


class _FileWriters:
    """Forked processes that create an extraction's plain files.

    Creating a file is kernel work (inode allocation, the copy, times) that
    one process does one file at a time; two processes do it on two cores.
    The extractor walks the image, makes the directories and the other
    entries, and hands each plain file (no reparse point, no alternate
    streams, not stored sparse, its first name) to a writer, a directory's
    files together; the writer opens the directory from DEST with O_NOFOLLOW
    at every step as the extractor does.  Problems come back at
    :meth:`finish`; a corrupt image ends the writer that meets it.  Forked
    only while the caller runs no other thread.
    """

    _BATCH_FILES = 128
    _FILE_COST = 16 << 10  # a file's creation, as bytes copied in the same time

    @staticmethod
    def available() -> bool:
        return (os.cpu_count() or 1) >= 2 and workers.can_fork()

    def __init__(self, maker: "_EntryMaker", dest_fd: int, count: int = 2):
        self._maker, self._dest_fd, self._count = maker, dest_fd, count
        self._workers: list[workers.Worker] = []
        self._queued = [0] * count
        self._batches: list[list] = [[] for _ in range(count)]
        self._batch_files = [0] * count
        self.done = False

    def _start(self) -> None:
        ctx = workers.fork_context()
        for _ in range(self._count):
            # Job pipes of 1 MiB: the walk runs ahead where files dominate,
            # and what it has sent keeps the writers busy where small
            # directories do and the walk is the slower side (with a 64 KiB
            # pipe the walk blocked 0.3-0.4 s in sends, then each writer
            # waited 0.13-0.23 s for work).
            self._workers.append(workers.Worker(ctx, _file_writer_main, (self._maker, self._dest_fd),
                                                name="cimfs-extract", others=self._workers, pipe_size=1 << 20))

    def add(self, parts: tuple, files: list, size: int, plain_dir: bool) -> int:
        """A directory's plain files, ``[(name in the image, FileID), ...]``,
        to the writer with the least work queued; returns which writer.
        ``plain_dir``: the extractor made the directory where nothing
        changes what a new file gets (see :func:`_dir_is_plain`)."""
        i = min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += size + self._FILE_COST * len(files)
        self._batches[i].append((parts, files, plain_dir))
        self._batch_files[i] += len(files)
        if self._batch_files[i] >= self._BATCH_FILES:
            self._send(i)
        return i

    def set_dir_meta(self, parts: tuple, info: PosixInfo, writer: int | None) -> None:
        """A directory's owner, mode and times, set by ``writer`` (the one that
        has its files: after them) once the extractor has made everything
        else in it, instead of by the extractor at the end on one core."""
        i = writer if writer is not None else min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += self._FILE_COST
        self._batches[i].append((parts, (info.uid, info.gid, info.mode, info.atime_ns, info.mtime_ns)))  # a _DirMeta

    def _send(self, i: int) -> None:
        if self._batches[i]:
            if not self._workers:
                self._start()
            self._workers[i].send(self._batches[i])  # a writer that is gone: finish() says why
            self._batches[i], self._batch_files[i] = [], 0

    def finish(self) -> tuple[list[str], str | None]:
        """Wait for every file; returns (problems, the corrupt image's message or None)."""
        for i in range(self._count):
            self._send(i)
        for w in self._workers:
            w.end()
        problems: list[str] = []
        fatal = None
        for w in self._workers:
            result = w.result()
            if result is None:
                problems.append(f"a file writer process ended unexpectedly (exit code {w.proc.exitcode})")
                continue
            p, f = result
            problems += p
            fatal = fatal or f
        self.done = True  # only now: an interrupted wait leaves abandon() to kill them
        return problems, fatal

    def abandon(self) -> None:
        if self.done:
            return
        self.done = True
        workers.abandon_all(self._workers)


def _file_writer_main(maker: "_EntryMaker", dest_fd: int, batches) -> tuple[list[str], str | None]:
    # Files are created with their final mode (one fchmod fewer each); this
    # process creates nothing else.
    os.umask(0)
    maker.progress = lambda n: None  # counted by the extractor as it hands files out
    problems: list[str] = []
    fatal = None
    chain = _DirChain(dest_fd)
    for batch in batches:
        for item in batch:
            if len(item) == 2:  # a directory's own metadata
                parts, meta = item
                try:
                    maker.set_meta_fd(chain.open(parts), _DirMeta(*meta))
                except OSError as e:
                    problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            parts, files, plain_dir = item
            try:
                dfd = chain.open(parts)
                plain_dir = plain_dir or _dir_is_plain(dfd)
            except OSError as e:
                problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            try:
                recs = maker.image.records([fid for name, fid in files])
            except cimfs.errors.CimFormatError as e:
                fatal = str(e)
                break
            for (name, fid), rec in zip(files, recs):
                try:
                    maker.write_plain(dfd, plain_dir, parts, name, fid, rec)
                except cimfs.errors.CimFormatError as e:
                    fatal = str(e)
                    break
                except CimError as e:
                    problems.append(str(e))
                except OSError as e:
                    problems.append(f"{'/'.join(parts + (name,))}: {e.strerror or e}")
            if fatal is not None:
                break
        if fatal is not None:
            break
    chain.close()
    return problems, fatal


def _dir_is_plain(fd: int) -> bool:
    """Whether a file created in this directory gets exactly the mode given
    to open() (under umask 0) and its creator's uid and gid: no default ACL
    (it, not the umask, would shape the mode), no set-group-ID bit, the
    creator's group (what ``grpid`` mounts hand down)."""
    st = os.fstat(fd)
    if st.st_mode & S.S_ISGID or st.st_gid != os.getegid():
        return False
    try:
        os.getxattr(fd, "system.posix_acl_default")
    except OSError:
        return True
    return False


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _plain_owner(ea: bytes, perm: int) -> tuple[int, int, int]:
    """What :func:`posix_info` gives a plain file or directory with these
    EAs: its permissions (``perm`` without a mode EA), uid and gid."""
    lx = _lx_of_eas(ea) if ea else None
    uid = gid = 0
    if lx is not None:
        if getattr(lx, "mode", None) is not None:
            perm = lx.mode & 0o7777
        uid = getattr(lx, "uid", None) or 0
        gid = getattr(lx, "gid", None) or 0
    return perm, uid, gid


class _DirMeta(NamedTuple):
    """What setting a plain directory's metadata needs of a PosixInfo."""

    uid: int
    gid: int
    mode: int
    atime_ns: int
    mtime_ns: int


class _EntryMaker:
    """Makes one entry of the image in an open local directory and gives it
    its metadata, never following a link: a file with its data (holes kept
    where the image marks it sparse), a symlink or a special file, replacing
    what is in the way.  The extractor's walk decides what goes where; this
    makes it, in the walk and (plain files, directory metadata) in the
    writer processes."""

    def __init__(self, image, owner: bool, progress: Callable[[int], None]):
        self.image = image
        self.owner = owner  # restore owners
        self.progress = progress
        self._ids = (os.geteuid(), os.getegid())
        # (EA RegionOffset, length, permissions without a mode EA) -> (permissions,
        # uid, gid): most entries share a few EA buffers, stored once, so
        # their place names them.
        self._owners: dict[tuple[int, int, int], tuple[int, int, int]] = {}

    def remove(self, dfd: int, name: str, rel: str) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if S.S_ISDIR(st.st_mode):
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError:
                raise CimError(ERROR_FILE_EXISTS, "exists in the destination as a non-empty directory", rel) from None
        else:
            os.unlink(name, dir_fd=dfd)

    def retry(self, fn, dfd: int, name: str, rel: str):
        try:
            return fn()
        except FileExistsError:
            self.remove(dfd, name, rel)
            return fn()

    def set_meta_fd(self, fd: int, info: PosixInfo) -> None:
        if self.owner:
            os.fchown(fd, info.uid, info.gid)
        os.fchmod(fd, info.mode & 0o7777)
        os.utime(fd, ns=(info.atime_ns, info.mtime_ns))

    def set_meta_path(self, dfd: int, name: str, info: PosixInfo) -> None:
        """Metadata of a symlink or special file, never following a link."""
        if info.kind == SYMLINK:
            if self.owner:
                os.chown(name, info.uid, info.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(info.atime_ns, info.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            return
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if S.S_IFMT(os.fstat(fd).st_mode) != S.S_IFMT(info.mode):
                raise CimError(ERROR_FILE_EXISTS, "changed while being extracted", name)
            proc = f"/proc/self/fd/{fd}"
            if self.owner:
                os.chown(proc, info.uid, info.gid)
            os.chmod(proc, info.mode & 0o7777)
            os.utime(proc, ns=(info.atime_ns, info.mtime_ns))
        finally:
            os.close(fd)

    def owner_of(self, fid: int, rec, perm: int) -> tuple[int, int, int]:
        """(permissions, uid, gid) of a plain entry, looked up by where its EA
        buffer is stored: most entries share a few, each stored once."""
        key = (rec.ea_offset, rec.ea_length, perm)
        owner = self._owners.get(key)
        if owner is None:
            if len(self._owners) >= 4096:
                self._owners.clear()
            owner = self._owners[key] = _plain_owner(self.image.ea_buffer(fid), perm)
        return owner

    def write_plain(self, dfd: int, plain_dir: bool, parts: tuple, name: str, fid: int, rec) -> None:
        """A plain file in a writer process (umask 0): created with its final
        mode, then its data and times; owner and mode only where the new
        file would not already have them."""
        local = _safe_local_name(name)
        if local is None:
            raise CimError(ERROR_INVALID_NAME, f"unsafe name {name!r}, not extracted", "/".join(parts + (name,)))
        image = self.image
        if rec.flags & _FLAG_SPARSE:  # its zero blocks become holes: the general path
            st = image.stat(fid, links=False)
            self.write_file(dfd, local, fid, st, posix_info(st), "/".join(parts + (name,)))
            return
        perm, uid, gid = self.owner_of(fid, rec, 0o444 if rec.flags & _FLAG_READONLY else 0o644)
        try:
            fd = os.open(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
        except FileExistsError:
            self.remove(dfd, local, "/".join(parts + (name,)))
            fd = os.open(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
        try:
            stream = rec.stream
            if stream.length and image.copy_stream(stream, fd) != stream.length:
                raise cimfs.errors.CimFormatError("stream shorter than its size", "/".join(parts + (name,)))
            chown = self.owner and ((uid, gid) != self._ids or not plain_dir)
            if chown:
                os.fchown(fd, uid, gid)
            # The set-ID bits given to open() are gone once data is written
            # (without CAP_FSETID) or the owner changes: set them again.
            if not plain_dir or perm & 0o6000:
                os.fchmod(fd, perm)
            os.utime(fd, ns=((rec.last_access_time - FILETIME_UNIX_EPOCH) * 100,  # filetime_to_ns, inline
                             (rec.last_write_time - FILETIME_UNIX_EPOCH) * 100))
        finally:
            os.close(fd)

    def write_file(self, dfd, local, fid, st, info, rel) -> None:
        fd = self.retry(lambda: os.open(local, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd), dfd, local, rel)
        try:
            size = st.size
            if size and not st.is_sparse and not st.attributes & _FA_SPARSE_FILE:
                # copy_file_range inside the kernel; region file -> new file,
                # which then has its size: no ftruncate
                n = self.image.copy_stream(fid, fd, progress=self.progress)
                if n != size:
                    raise cimfs.errors.CimFormatError("stream shorter than its size", rel)
            elif size and not st.is_sparse:
                # a file marked sparse keeps its holes: zero blocks are skipped
                with self.image.open(fid) as src:
                    pos = 0
                    while pos < size:
                        buf = src.read(min(CHUNK, size - pos))
                        if not buf:
                            raise cimfs.errors.CimFormatError("stream shorter than its size", rel)
                        _write_sparse(fd, buf, pos)
                        pos += len(buf)
                        self.progress(len(buf))
                os.ftruncate(fd, size)  # holes at the end still count
            elif size:
                self.progress(size)
                os.ftruncate(fd, size)  # all of it a hole
            self.set_meta_fd(fd, info)
        finally:
            os.close(fd)


class _Frame:
    """A directory of an extraction's walk: where it is, what is left of it."""

    __slots__ = ("parts", "info", "plain_dir", "later", "next", "fd", "own", "writer")

    def __init__(self, parts: list[str], info, plain_dir: bool):
        self.parts, self.info, self.plain_dir = parts, info, plain_dir
        self.later: list = []
        self.next = 0
        self.fd: int | None = None
        self.own = True
        self.writer: int | None = None

    def close(self) -> None:
        if self.fd is not None and self.own:
            os.close(self.fd)
        if self.own:
            self.fd = None


class Extractor:
    """Extract an image (or a subtree) into DEST without ever leaving DEST.

    The walk decides what is made where and when; an :class:`_EntryMaker`
    makes each entry, here or in the file writers.  Hard links are found as
    the walk meets a FileID a second time (the format keeps no link counts)
    and made once every first name exists; a directory's metadata is set
    once everything in it is made.
    """

    def __init__(self, image, dest: str, *, restore_owner: bool | None = None,
                 progress: Callable[[int], None] | None = None, warn: Callable[[str], None] | None = None):
        self.image = image
        self.dest = dest
        self._root = os.geteuid() == 0
        self.owner = self._root if restore_owner is None else restore_owner
        self.progress = progress or (lambda n: None)
        self.report = ExtractReport(warn)
        self.streams_skipped = 0
        self._writers: _FileWriters | None = None
        self._first_dir: dict[int, int] = {}              # file FileID -> the directory of its first name
        self._dir_parts: dict[int, tuple] = {}            # directory FileID -> its local path parts
        self._links: list[tuple[tuple, str, int]] = []    # (parts, name, FileID) of later names
        self._first_names: dict[int, dict[int, str]] = {}  # directory FileID -> {FileID: first name}, link pass
        self._moved_first: dict[int, tuple[tuple, str]] = {}  # FileID -> (parts, local) where a copy stands in
        self._make: _EntryMaker | None = None  # for one run()
        self._early_meta: dict[tuple, PosixInfo | _DirMeta] = {}  # directories whose metadata the writers set
        # A directory's mode and times wait for everything in it (a file or
        # link created in it afterwards would change its mtime).
        self._dir_meta: list[tuple[list[str], PosixInfo | _DirMeta]] = []

    # -- public
    def total_bytes(self, path: str = "") -> int:
        total = 0
        seen = set()
        for fid, st in self._iter_stats(path):
            if not st.is_dir and fid not in seen:
                seen.add(fid)
                total += st.size
        return total

    def _iter_stats(self, path):
        img = self.image
        root = img.lookup(path) if path else img.root_id
        st = img.stat(root, links=False)
        yield root, st
        if not st.is_dir:
            return
        stack, seen = [root], {root}
        while stack:
            d = stack.pop()
            for e in img.scandir(d):
                st = img.stat(e.file_id, links=False)
                yield e.file_id, st
                if st.is_dir and e.file_id not in seen and posix_info(st).kind == DIR:
                    seen.add(e.file_id)
                    stack.append(e.file_id)

    def run(self, path: str = "") -> ExtractReport:
        # The walk keeps a record per entry and makes no cycles: collections
        # would only re-scan them (1.6 of 3.6 us per record read).  The
        # writer processes inherit the pause.
        with paused_gc():
            self._make = _EntryMaker(self.image, self.owner, self.progress)
            try:
                return self._run(path)
            finally:
                # dropped while paused: the first collection afterwards would scan them
                self._first_dir, self._dir_parts, self._early_meta, self._make = {}, {}, {}, None
                self._first_names = {}

    def _run(self, path: str) -> ExtractReport:
        img = self.image
        fid = img.lookup(path) if path else img.root_id
        st = img.stat(fid, links=False)
        created = False
        if not os.path.lexists(self.dest):
            os.makedirs(self.dest)
            created = True
        dfd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            info = posix_info(st)
            if st.is_dir and info.kind == DIR:
                if _FileWriters.available():
                    self._writers = _FileWriters(self._make, dfd)
                try:
                    self._walk(dfd, fid, _dir_is_plain(dfd))
                    self._finish(dfd)
                finally:
                    if self._writers is not None:
                        self._writers.abandon()
                        self._writers = None
                if created:
                    self._make.set_meta_fd(dfd, info)
            else:
                name = _split(path)[-1] if path else ""
                local = _safe_local_name(name)
                if local is None:
                    self.report.problem(f"{path}: unsafe name, not extracted")
                else:
                    self._extract_entry(dfd, local, fid, st, [], path)
        finally:
            os.close(dfd)
        if self.streams_skipped:
            self.report.warning(f"{self.streams_skipped} alternate data stream(s) not extracted (POSIX has none)")
        return self.report

    def _finish(self, dest_fd: int) -> None:
        """Once the walk is done: wait for the file writers, make the hard
        links, then give the directories their metadata, deepest first."""
        if self._writers is not None:
            problems, fatal = self._writers.finish()
            for msg in problems:
                self.report.problem(msg)
            if fatal is not None:
                raise cimfs.errors.CimFormatError(fatal)
        chain, sources = _DirChain(dest_fd), _DirChain(dest_fd)
        try:
            relinked = set()
            for parts, name, fid in self._links:
                self._make_link(chain, sources, parts, name, fid)
                if parts in self._early_meta and parts not in relinked:
                    relinked.add(parts)  # a new name changed its times
                    self._dir_meta.append((list(parts), self._early_meta[parts]))
            self._links.clear()
            # Children come before their parent in the list (each was added
            # once its subtree was done).
            for parts, info in self._dir_meta:
                try:
                    self._make.set_meta_fd(chain.open(parts), info)
                except OSError as e:
                    self.report.problem(f"{'/'.join(parts)}: {e.strerror or e}")
            self._dir_meta.clear()
        finally:
            chain.close()
            sources.close()

    def _entry_failed(self, e: Exception, rel: str) -> None:
        """One entry could not be made: a problem of the extraction, named by
        its path; a corrupt image ends it."""
        if isinstance(e, cimfs.errors.CimFormatError):
            raise e
        self.report.problem(str(e) if isinstance(e, CimError) else f"{rel}: {e.strerror or e}")

    def _first_name(self, fid: int) -> tuple[tuple, str] | None:
        """Where the first name of ``fid`` was extracted: (parts, local name)."""
        moved = self._moved_first.get(fid)
        if moved is not None:
            return moved
        dir_id = self._first_dir[fid]
        names = self._first_names.get(dir_id)
        if names is None:
            # Each directory holding first names is listed once for the whole
            # link pass: 100 000 links to the files of one directory cost one
            # listing, not one each.
            names = self._first_names[dir_id] = {}
            for ent in self.image.scandir(dir_id):
                names.setdefault(ent.file_id, ent.name)
        name = names.get(fid)
        local = None if name is None else _safe_local_name(name)
        return None if local is None else (self._dir_parts[dir_id], local)

    def _make_link(self, chain: _DirChain, sources: _DirChain, parts: tuple, name: str, fid: int) -> None:
        """``chain`` opens the new name's directory, ``sources`` the first name's."""
        rel = "/".join(parts + (name,))
        local = _safe_local_name(name)
        if local is None:
            self.report.problem(f"{rel}: unsafe name {name!r}, not extracted")
            return
        try:
            dfd = chain.open(parts)
            first = self._first_name(fid)
            if first is not None:
                try:
                    sfd = sources.open(first[0])
                    self._make.retry(lambda: os.link(first[1], local, src_dir_fd=sfd, dst_dir_fd=dfd,
                                                follow_symlinks=False), dfd, local, rel)
                    return
                except OSError as e:
                    self.report.warning(f"{rel}: could not hard link ({e.strerror}); extracting a copy")
            # the first name was not extracted: this one takes its place
            self._extract_entry(dfd, local, fid, self.image.stat(fid, links=False), list(parts), rel)
            self._moved_first[fid] = (parts, local)
        except (CimError, OSError) as e:
            self._entry_failed(e, rel)

    def _walk(self, dest_fd: int, root_id: int, plain_dir: bool) -> None:
        """Extract directory ``root_id`` into ``dest_fd``, depth first, with
        an explicit stack: no recursion, so any depth works.  A frame keeps
        its directory open while it has entries left; at most
        ``_OPEN_FRAMES`` do (the shallowest are closed and reopened from
        their nearest open ancestor, one O_NOFOLLOW step at a time)."""
        stack = [self._open_dir(dest_fd, root_id, [], plain_dir, None)]
        stack[0].own = False  # DEST is the caller's
        held: collections.deque = collections.deque()  # frames below DEST holding a descriptor, shallowest first
        try:
            while stack:
                frame = stack[-1]
                if frame.next < len(frame.later):
                    entry = frame.later[frame.next]
                    frame.next += 1
                    if frame.fd is None:
                        self._reopen(stack)
                        held.append(frame)
                    child = self._later_entry(frame, *entry)
                    if child is None:
                        continue
                    if frame.next == len(frame.later) and frame.own:
                        # nothing left in it: a chain holds one descriptor, not one per level
                        frame.close()
                        held.pop()  # it was the deepest
                    stack.append(child)
                    if child.fd is not None:
                        held.append(child)
                        if len(held) > self._OPEN_FRAMES:
                            held.popleft().close()
                    continue
                stack.pop()
                if frame.fd is not None and frame.own:
                    frame.close()
                    held.pop()
                if frame.info is not None:
                    self._dir_done(frame)
        finally:
            for frame in stack:
                frame.close()

    _OPEN_FRAMES = 64

    def _reopen(self, stack: list) -> None:
        """Open the top frame's directory again from its nearest open ancestor."""
        frame = stack[-1]
        i = len(stack) - 2
        while stack[i].fd is None:
            i -= 1
        fd = stack[i].fd
        try:
            for p in frame.parts[len(stack[i].parts):]:
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                if fd != stack[i].fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != stack[i].fd:
                os.close(fd)
            raise
        frame.fd = fd

    def _open_dir(self, dfd, dir_id: int, parts: list[str], plain_dir: bool, info) -> "_Frame":
        """Start directory ``dir_id`` (extracted at ``parts``): its plain
        files go to the writers at once, the rest wait in the frame.
        ``dfd`` is its open descriptor, or a function that opens it: a
        directory holding only plain files, all made by the writers, is
        never opened here.  ``plain_dir``: made here below a plain directory
        (see :func:`_dir_is_plain`).  ``info``: its metadata, set once
        everything in it is done (None for DEST)."""
        image, writers, first_dir = self.image, self._writers, self._first_dir
        key = tuple(parts)
        self._dir_parts[dir_id] = key
        plain: list[tuple[str, int]] = []
        plain_bytes = 0
        later: list = []
        frame = _Frame(parts, info, plain_dir)
        # Told apart by the record alone; a plain file's metadata is read by
        # the writer that creates it.
        entries = image.scandir(dir_id)
        for (name, fid), rec in zip(entries, image.records([e.file_id for e in entries])):
            if not rec.is_dir:
                if fid in first_dir:
                    self._links.append((key, name, fid))
                    continue
                first_dir[fid] = dir_id
                if (writers is not None and not rec.reparse_offset and not rec.stream_table_offset
                        and not rec.stream.sparse):
                    plain.append((name, fid))
                    plain_bytes += rec.stream.length
                    continue
            later.append((name, fid, rec))
        if plain:
            frame.writer = writers.add(key, plain, plain_bytes, plain_dir)
            self.progress(plain_bytes)
        if later:
            frame.later = later
            frame.fd = dfd() if callable(dfd) else dfd
        elif not callable(dfd):
            frame.fd = dfd
        return frame

    def _later_entry(self, frame: "_Frame", name: str, fid: int, rec) -> "_Frame | None":
        """One entry of ``frame`` that is not a plain file for the writers;
        returns the frame of a directory to go into."""
        parts = frame.parts
        rel = "/".join(parts + [name])
        local = _safe_local_name(name)
        if local is None:
            self.report.problem(f"{rel}: unsafe name {name!r}, not extracted")
            return None
        try:
            if rec.is_dir and not rec.reparse_offset and not rec.stream_table_offset:
                # a plain directory: what posix_info would say, from the record
                perm, uid, gid = self._make.owner_of(fid, rec, 0o755)
                meta = _DirMeta(uid, gid, S.S_IFDIR | perm, filetime_to_ns(rec.last_access_time),
                                filetime_to_ns(rec.last_write_time))
                return self._enter_subdir(frame.fd, local, fid, meta, parts, rel, frame.plain_dir)
            return self._extract_entry(frame.fd, local, fid, self.image.stat(fid, links=False), parts, rel,
                                       frame.plain_dir)
        except (CimError, OSError) as e:
            self._entry_failed(e, rel)
        return None

    def _extract_entry(self, dfd, local, fid, st, parts, rel, plain_dir: bool = False) -> "_Frame | None":
        """One entry; a directory is made and its frame returned (the caller
        walks it)."""
        info = posix_info(st)
        if st.stream_count:
            self.streams_skipped += st.stream_count
        if info.kind == DIR:
            return self._enter_subdir(dfd, local, fid, info, parts, rel, plain_dir)
        if info.kind == FILE:
            self._make.write_file(dfd, local, fid, st, info, rel)
        elif info.kind == SYMLINK:
            if info.link_has_children and self.image.scandir(fid):
                self.report.warning(f"{rel}: is a link in the image; the entries below it are not extracted")
            target = _local_target(info.target, rel)
            self._make.retry(lambda: os.symlink(target, local, dir_fd=dfd), dfd, local, rel)
            self._make.set_meta_path(dfd, local, info)
        elif info.kind in (FIFO, SOCK):
            self._make.retry(lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, dir_fd=dfd), dfd, local, rel)
            self._make.set_meta_path(dfd, local, info)
        elif info.kind in (CHR, BLK):
            try:
                self._make.retry(lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, os.makedev(*info.rdev),
                                             dir_fd=dfd), dfd, local, rel)
            except PermissionError:
                self.report.warning(f"{rel}: device nodes need root; not created")
                return
            self._make.set_meta_path(dfd, local, info)

    def _enter_subdir(self, dfd, local: str, fid: int, info, parts, rel: str, plain_dir: bool) -> "_Frame | None":
        """A directory: made (or one in the way replaced) and started; its
        metadata (``info``: a PosixInfo or _DirMeta) is set by
        :meth:`_dir_done` once its entries are.  A directory met a second
        time (linked under two names, or a loop) is extracted once: the
        second name is reported, not followed."""
        first = self._dir_parts.get(fid)
        if first is not None:
            where = "/".join(first) or "."
            if tuple(parts[:len(first)]) == first:
                self.report.problem(f"{rel}: directory loop in the image (back to {where}), not followed")
            else:
                self.report.problem(f"{rel}: the same directory as {where} (linked under two names); "
                                    "extracted once, there")
            return None
        child = parts + [local]
        try:
            os.mkdir(local, 0o700, dir_fd=dfd)
            cfd = functools.partial(os.open, local, _DIR_FLAGS, dir_fd=dfd)  # ours: opened if needed
        except FileExistsError:
            plain_dir = False  # not made here: a writer looks at it
            try:
                cfd = os.open(local, _DIR_FLAGS, dir_fd=dfd)
            except OSError:
                # something that is not a directory (maybe a link) is in the way: replace it
                self._make.remove(dfd, local, rel)
                os.mkdir(local, 0o700, dir_fd=dfd)
                cfd = os.open(local, _DIR_FLAGS, dir_fd=dfd)
        try:
            return self._open_dir(cfd, fid, child, plain_dir, info)
        except BaseException:
            if type(cfd) is int:
                os.close(cfd)
            raise

    def _dir_done(self, frame: "_Frame") -> None:
        """Everything in the directory is made (or handed to the writers)."""
        info, child = frame.info, frame.parts
        # Early, by a writer, where nothing is made in it later but hard
        # links (its metadata is then set again) and its mode cannot stop
        # the writers going through it or the links being made.
        if self._writers is not None and (self._root or info.mode & 0o300 == 0o300):
            key = tuple(child)
            self._writers.set_dir_meta(key, info, frame.writer)
            self._early_meta[key] = info
        else:
            self._dir_meta.append((child, info))


def _write_sparse(fd: int, buf: bytes, pos: int) -> None:
    """pwrite ``buf`` at ``pos`` leaving all-zero 4 KiB blocks as holes."""
    mv = memoryview(buf)
    zero = bytes(SPARSE_BLOCK)
    i = 0
    n = len(buf)
    while i < n:
        j = i
        # a run of data blocks
        while j < n and mv[j:j + SPARSE_BLOCK] != zero[: min(SPARSE_BLOCK, n - j)]:
            j += SPARSE_BLOCK
        if j > i:
            end = min(j, n)
            data = mv[i:end]
            off = pos + i
            while data:
                k = os.pwrite(fd, data, off)
                data = data[k:]
                off += k
            i = end
        while i < n and mv[i:i + SPARSE_BLOCK] == zero[: min(SPARSE_BLOCK, n - i)]:
            i += SPARSE_BLOCK
