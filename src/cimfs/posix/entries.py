"""Making one entry of an image on disk, never following a link out of DEST.

Owns :class:`_EntryMaker`, which makes one entry in an open local directory
and gives it its metadata: a file with its data (holes kept where the image
marks it sparse, :func:`_write_sparse`), a directory, a symlink, a FIFO,
socket or device node, replacing what is in the way, and owner, mode and
times set without following a link.  Also the pieces every maker of local
entries shares: :class:`_DirChain` (directories below DEST opened one
O_NOFOLLOW step at a time), the checks that give an image name or link
target its local form (:func:`_safe_local_name`, :func:`_local_target`) and
:class:`ExtractReport` (what could not be made).  What is made where, and
when, is decided by the walk in :mod:`.extract`.
"""

from __future__ import annotations

import errno
import functools
import os
import stat as S
from collections.abc import Callable
from typing import NamedTuple

import cimfs

from ..errors import E_INVALIDARG, ERROR_FILE_EXISTS, ERROR_INVALID_NAME, CimError
from ..layout.cim import MAX_REGION_BYTE_OFFSET, REGION_HEADER, STREAM_TYPE_DATA
from .lx import (
    _FA_SPARSE_FILE,
    _FLAG_READONLY,
    _FLAG_SPARSE,
    BLK,
    CHR,
    FIFO,
    FMT_OF_KIND,
    SOCK,
    SYMLINK,
    PosixInfo,
    _lx_of_eas,
    posix_info,
)
from .names import FILETIME_UNIX_EPOCH, name_from_image
from .scan import CHUNK

SPARSE_BLOCK = 4096  # an all-zero block of this size becomes a hole


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


_NOT_NAMES = ("", ".", "..")


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
            raise CimError(
                E_INVALIDARG, f"symlink target {target!r} has a lone surrogate with no local form; not extracted", rel
            ) from None
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
                closing = fds[self._closed]
                assert closing is not None  # _fds[_closed + 1:] are open
                os.close(closing)
                fds[self._closed] = None
        top = fds[-1]
        assert top is not None  # the last is open: made so above
        return top

    def close(self) -> None:
        for fd in self._fds[1:]:
            if fd is not None:
                os.close(fd)
        del self._fds[1:], self._parts[:]
        self._closed = 0


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

# How a writer copies a stream from its region file: copy_file_range (a
# reflink where the file system shares extents) until the destination refuses
# it (EXDEV: DEST on another file system than the image, the usual case),
# then sendfile (the same page-cache copy inside the kernel, between any two
# files), and the reader's read/write path where neither is possible.
_COPY_RANGE, _SENDFILE, _BY_READER = 0, 1, 2
_REGION_HEADER_SIZE = REGION_HEADER.size
_KERNEL_COPY_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


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
        self._copy = _COPY_RANGE if hasattr(os, "copy_file_range") else _SENDFILE
        self._region_fds: dict[int, tuple[int, int]] = {}  # region index -> (descriptor, size), as the reader opened it

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

    def set_meta_fd(self, fd: int, info: PosixInfo | _DirMeta) -> None:
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

    def write_plain_files(
        self, dfd: int, plain_dir: bool, parts: tuple, files: list, recs: list, problems: list[str]
    ) -> None:
        """A directory's plain files in a writer process (umask 0): each
        created with its final mode, then its data and times; owner and mode
        only where the new file would not already have them.  The per-file
        work is inline (60 000 files: each step of Python shows); a file that
        cannot be made is a problem named by its path, a corrupt image ends
        the loop (CimFormatError)."""
        owners, ids, owner, copy = self._owners, self._ids, self.owner, self._copy_data
        open_, utime, close, epoch = os.open, os.utime, os.close, FILETIME_UNIX_EPOCH
        for (name, fid), rec in zip(files, recs):
            try:
                # _safe_local_name's answer for the usual ASCII name, inline
                local = (
                    name
                    if name.isascii() and "/" not in name and "\0" not in name and name not in _NOT_NAMES
                    else _safe_local_name(name)
                )
                if local is None:
                    raise CimError(
                        ERROR_INVALID_NAME, f"unsafe name {name!r}, not extracted", "/".join(parts + (name,))
                    )
                flags = rec.flags
                if flags & _FLAG_SPARSE:  # its zero blocks become holes: the general path
                    st = self.image.stat(fid, links=False)
                    self.write_file(dfd, local, fid, st, posix_info(st), "/".join(parts + (name,)))
                    continue
                perm = 0o444 if flags & _FLAG_READONLY else 0o644
                got = owners.get((rec.ea_offset, rec.ea_length, perm))
                perm, uid, gid = got if got is not None else self.owner_of(fid, rec, perm)
                try:
                    fd = open_(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
                except FileExistsError:
                    self.remove(dfd, local, "/".join(parts + (name,)))
                    fd = open_(local, _NEW_FILE_FLAGS, perm, dir_fd=dfd)
                try:
                    stream = rec.stream
                    if stream.length and copy(stream, fd) != stream.length:
                        raise cimfs.errors.CimFormatError("stream shorter than its size", "/".join(parts + (name,)))
                    if owner and ((uid, gid) != ids or not plain_dir):
                        os.fchown(fd, uid, gid)
                    # The set-ID bits given to open() are gone once data is written
                    # (without CAP_FSETID) or the owner changes: set them again.
                    if not plain_dir or perm & 0o6000:
                        os.fchmod(fd, perm)
                    utime(
                        fd,
                        ns=(
                            (rec.last_access_time - epoch) * 100,  # filetime_to_ns, inline
                            (rec.last_write_time - epoch) * 100,
                        ),
                    )
                finally:
                    close(fd)
            except cimfs.errors.CimFormatError:
                raise
            except CimError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{'/'.join(parts + (name,))}: {e.strerror or e}")

    def _copy_data(self, stream, fd: int) -> int:
        """A plain data stream into the new file ``fd``, inside the kernel
        (see ``_COPY_RANGE``): the bytes never pass through Python, and no
        call is spent each file on a copy the destination refuses."""
        length, ro = stream.length, stream.offset
        off = ro & MAX_REGION_BYTE_OFFSET
        # A region met before: the reader's own check (the whole stream inside
        # the file it opened), without its per-call layers.
        known = self._region_fds.get(ro >> 48)
        if (
            known is None
            or not (ro and off >= _REGION_HEADER_SIZE and off + length <= known[1])
            or stream.type != STREAM_TYPE_DATA
            or stream.sparse
        ):
            if self._copy == _BY_READER or stream.type != STREAM_TYPE_DATA or stream.sparse:
                return self.image.copy_stream(stream, fd)
            region, off = self.image._check_stream(stream)  # raises what is wrong
            if region.fd is None:  # a remote image's region
                return self.image.copy_stream(stream, fd)
            known = self._region_fds[ro >> 48] = (region.fd, region.size)
        src = known[0]
        done = 0
        while done < length:
            try:
                if self._copy == _SENDFILE:
                    n = os.sendfile(fd, src, off + done, length - done)
                elif self._copy == _COPY_RANGE:
                    n = os.copy_file_range(src, fd, length - done, off + done)
                else:
                    break
            except OSError as e:
                if e.errno not in _KERNEL_COPY_REFUSED or done:
                    raise
                self._copy += 1  # the next way, for this file and the rest
                continue
            if n <= 0:
                return done  # the region file ended early: the caller names the file
            done += n
        if done == length:
            return done
        return self.image.copy_stream(stream, fd)

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

    def make_node(self, dfd: int, local: str, fid: int, info: PosixInfo, rel: str, warn: Callable[[str], None]) -> None:
        """A symlink, FIFO, socket or device node, then its metadata;
        ``warn`` hears what is made differently (a device without root)."""
        if info.kind == SYMLINK:
            if info.link_has_children and self.image.scandir(fid):
                warn(f"{rel}: is a link in the image; the entries below it are not extracted")
            target = _local_target(info.target, rel)
            self.retry(lambda: os.symlink(target, local, dir_fd=dfd), dfd, local, rel)
            self.set_meta_path(dfd, local, info)
        elif info.kind in (FIFO, SOCK):
            self.retry(lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, dir_fd=dfd), dfd, local, rel)
            self.set_meta_path(dfd, local, info)
        elif info.kind in (CHR, BLK):
            try:
                self.retry(
                    lambda: os.mknod(local, FMT_OF_KIND[info.kind] | 0o600, os.makedev(*info.rdev), dir_fd=dfd),
                    dfd,
                    local,
                    rel,
                )
            except PermissionError:
                warn(f"{rel}: device nodes need root; not created")
                return
            self.set_meta_path(dfd, local, info)

    def make_dir(self, dfd: int, local: str, rel: str, mode: int = 0o700) -> tuple[int | Callable[[], int], bool]:
        """A directory made (``mode``: 0700 until its metadata is set, or its
        final mode where that is what mkdir gives it), or the one already
        there (anything else in the way is replaced): (its descriptor, or a
        function that opens it when made here; made here?)."""
        try:
            os.mkdir(local, mode, dir_fd=dfd)
            return functools.partial(os.open, local, _DIR_FLAGS, dir_fd=dfd), True  # ours: opened if needed
        except FileExistsError:
            pass
        try:
            return os.open(local, _DIR_FLAGS, dir_fd=dfd), False
        except OSError:
            # something that is not a directory (maybe a link) is in the way: replace it
            self.remove(dfd, local, rel)
            os.mkdir(local, 0o700, dir_fd=dfd)
            return os.open(local, _DIR_FLAGS, dir_fd=dfd), False


def _write_sparse(fd: int, buf: bytes, pos: int) -> None:
    """pwrite ``buf`` at ``pos`` leaving all-zero 4 KiB blocks as holes."""
    mv = memoryview(buf)
    zero = bytes(SPARSE_BLOCK)
    i = 0
    n = len(buf)
    while i < n:
        j = i
        # a run of data blocks
        while j < n and mv[j : j + SPARSE_BLOCK] != zero[: min(SPARSE_BLOCK, n - j)]:
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
        while i < n and mv[i : i + SPARSE_BLOCK] == zero[: min(SPARSE_BLOCK, n - i)]:
            i += SPARSE_BLOCK
