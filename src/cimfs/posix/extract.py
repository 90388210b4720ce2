"""Extracting an image (or a subtree) into a local directory, safely: the walk.

Owns :class:`Extractor`: the walk that decides what is made where and when
without ever following a link out of DEST (each directory opened relative to
its parent with O_NOFOLLOW), hands plain files to the forked writers
(:mod:`.filewriters`), finds hard links as it meets a FileID a second time and
makes them once every first name exists, and sets directory metadata last.
Each entry is made by an :class:`~.entries._EntryMaker` (:mod:`.entries`).
"""

from __future__ import annotations

import collections
import os
import stat as S
from collections.abc import Callable

import cimfs

from ..bulk import paused_gc
from ..errors import CimError
from ..layout.cim import KIND_DIRECTORY
from .entries import (
    _DIR_FLAGS,
    SPARSE_BLOCK,
    ExtractReport,
    _dir_is_plain,
    _DirChain,
    _DirMeta,
    _EntryMaker,
    _safe_local_name,
)
from .filewriters import _FileWriters
from .lx import DIR, FILE, PosixInfo, posix_info
from .names import _split, filetime_to_ns

__all__ = ["Extractor", "ExtractReport", "SPARSE_BLOCK"]


def _current_umask() -> int | None:
    """This process's umask, read without changing it (Linux 4.7+), or None."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Frame:
    """A directory of an extraction's walk: where it is, what is left of it."""

    __slots__ = ("parts", "info", "plain_dir", "later", "next", "fd", "own", "writer", "times_only")

    def __init__(self, parts: list[str], info, plain_dir: bool):
        self.parts, self.info, self.plain_dir = parts, info, plain_dir
        self.later: list = []
        self.next = 0
        self.fd: int | None = None
        self.own = True
        self.writer: int | None = None
        self.times_only = False  # made with its final mode and owner: only its times are left to set

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

    def __init__(
        self,
        image,
        dest: str,
        *,
        restore_owner: bool | None = None,
        progress: Callable[[int], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.image = image
        self.dest = dest
        self._root = os.geteuid() == 0
        self.owner = self._root if restore_owner is None else restore_owner
        self.progress = progress or (lambda n: None)
        self.report = ExtractReport(warn)
        self.streams_skipped = 0
        self._writers: _FileWriters | None = None
        self._first_dir: dict[int, int] = {}  # file FileID -> the directory of its first name
        self._dir_parts: dict[int, tuple] = {}  # directory FileID -> its local path parts
        self._links: list[tuple[tuple, str, int]] = []  # (parts, name, FileID) of later names
        self._first_names: dict[int, dict[int, str]] = {}  # directory FileID -> {FileID: first name}, link pass
        self._moved_first: dict[int, tuple[tuple, str]] = {}  # FileID -> (parts, local) where a copy stands in
        # Set by run() for its duration; no entry is made outside it.
        self._make: _EntryMaker = None  # type: ignore[assignment]
        self._early_meta: dict[tuple, PosixInfo | _DirMeta] = {}  # directories whose metadata the writers set
        # A directory's mode and times wait for everything in it (a file or
        # link created in it afterwards would change its mtime).
        self._dir_meta: list[tuple[list[str], PosixInfo | _DirMeta]] = []
        self._umask: int | None = None  # for one run()

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
            self._umask = _current_umask()
            try:
                return self._run(path)
            finally:
                # dropped while paused: the first collection afterwards would scan them
                self._first_dir, self._dir_parts, self._early_meta, self._make = {}, {}, {}, None  # type: ignore[assignment]
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
            for dir_parts, info in self._dir_meta:
                try:
                    self._make.set_meta_fd(chain.open(dir_parts), info)
                except OSError as e:
                    self.report.problem(f"{'/'.join(dir_parts)}: {e.strerror or e}")
            self._dir_meta.clear()
        finally:
            chain.close()
            sources.close()

    def _entry_failed(self, e: OSError, rel: str) -> None:
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
                    self._make.retry(
                        lambda: os.link(first[1], local, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False),
                        dfd,
                        local,
                        rel,
                    )
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
            for p in frame.parts[len(stack[i].parts) :]:
                nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                if fd != stack[i].fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != stack[i].fd:
                os.close(fd)
            raise
        frame.fd = fd

    def _open_dir(self, dfd, dir_id: int, parts: list[str], plain_dir: bool, info) -> _Frame:
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
        # Told apart by a few fields of the record (no FileRecord per entry);
        # a plain file's metadata is read by the writer that creates it.
        names, fids = image.listing(dir_id)
        take_plain = writers is not None
        for name, fid, kind in zip(names, fids, image.record_kinds(fids)):
            if kind != KIND_DIRECTORY:
                if fid in first_dir:
                    self._links.append((key, name, fid))
                    continue
                first_dir[fid] = dir_id
                if kind >= 0 and take_plain:
                    plain.append((name, fid))
                    plain_bytes += kind
                    continue
            later.append((name, fid))
        if plain:
            assert writers is not None  # only writers take plain files
            frame.writer = writers.add(key, plain, plain_bytes, plain_dir)
            self.progress(plain_bytes)
        if later:
            frame.later = later
            frame.fd = dfd() if callable(dfd) else dfd
        elif not callable(dfd):
            frame.fd = dfd
        return frame

    def _later_entry(self, frame: _Frame, name: str, fid: int) -> _Frame | None:
        """One entry of ``frame`` that is not a plain file for the writers;
        returns the frame of a directory to go into."""
        parts = frame.parts
        rel = "/".join(parts + [name])
        local = _safe_local_name(name)
        if local is None:
            self.report.problem(f"{rel}: unsafe name {name!r}, not extracted")
            return None
        try:
            rec = self.image.record(fid)
            if rec.is_dir and not rec.reparse_offset and not rec.stream_table_offset:
                # a plain directory: what posix_info would say, from the record
                perm, uid, gid = self._make.owner_of(fid, rec, 0o755)
                meta = _DirMeta(
                    uid,
                    gid,
                    S.S_IFDIR | perm,
                    filetime_to_ns(rec.last_access_time),
                    filetime_to_ns(rec.last_write_time),
                )
                return self._enter_subdir(frame.fd, local, fid, meta, parts, rel, frame.plain_dir)
            return self._extract_entry(
                frame.fd, local, fid, self.image.stat(fid, links=False), parts, rel, frame.plain_dir
            )
        except (CimError, OSError) as e:
            self._entry_failed(e, rel)
        return None

    def _extract_entry(self, dfd, local, fid, st, parts, rel, plain_dir: bool = False) -> _Frame | None:
        """One entry; a directory is made and its frame returned (the caller
        walks it)."""
        info = posix_info(st)
        if st.stream_count:
            self.streams_skipped += st.stream_count
        if info.kind == DIR:
            return self._enter_subdir(dfd, local, fid, info, parts, rel, plain_dir)
        if info.kind == FILE:
            self._make.write_file(dfd, local, fid, st, info, rel)
        else:
            self._make.make_node(dfd, local, fid, info, rel, self.report.warning)
        return None

    def _enter_subdir(self, dfd, local: str, fid: int, info, parts, rel: str, plain_dir: bool) -> _Frame | None:
        """A directory: made (or one in the way replaced) and started; its
        metadata (``info``: a PosixInfo or _DirMeta) is set by
        :meth:`_dir_done` once its entries are.  A directory met a second
        time (linked under two names, or a loop) is extracted once: the
        second name is reported, not followed."""
        first = self._dir_parts.get(fid)
        if first is not None:
            where = "/".join(first) or "."
            if tuple(parts[: len(first)]) == first:
                self.report.problem(f"{rel}: directory loop in the image (back to {where}), not followed")
            else:
                self.report.problem(
                    f"{rel}: the same directory as {where} (linked under two names); extracted once, there"
                )
            return None
        child = parts + [local]
        final = self._made_final(info) if plain_dir else None
        cfd, made_here = self._make.make_dir(dfd, local, rel, 0o700 if final is None else final)
        if not made_here:
            plain_dir = False  # not made here: a writer looks at it
        try:
            frame = self._open_dir(cfd, fid, child, plain_dir, info)
            frame.times_only = made_here and final is not None
            return frame
        except BaseException:
            if type(cfd) is int:
                os.close(cfd)
            raise

    def _made_final(self, info) -> int | None:
        """The mode to give mkdir for a directory that then has all its
        metadata but its times, or None.  That holds in a plain directory
        (owner: ours; no default ACL or set-group-ID bit to change the new
        one) when its owner is ours or owners are not restored, the umask
        takes nothing from its mode, and the mode lets the extraction (not
        root) read, create in and pass through it: the directory is then as
        it ends up from the start, never looser.  Saves fchown and fchmod."""
        perm = info.mode & 0o7777
        if (
            self._umask is None
            or perm & 0o7000
            or perm & self._umask
            or (self.owner and (info.uid, info.gid) != self._make._ids)
            or (not self._root and perm & 0o700 != 0o700)
        ):
            return None
        return perm

    def _dir_done(self, frame: _Frame) -> None:
        """Everything in the directory is made (or handed to the writers)."""
        info, child = frame.info, frame.parts
        # Early, by a writer, where nothing is made in it later but hard
        # links (its metadata is then set again) and its mode cannot stop
        # the writers going through it or the links being made.
        if self._writers is not None and (self._root or info.mode & 0o300 == 0o300):
            key = tuple(child)
            self._writers.set_dir_meta(key, info, frame.writer, frame.times_only)
            self._early_meta[key] = info
        else:
            self._dir_meta.append((child, info))
