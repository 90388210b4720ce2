"""Walking an image's tree: :meth:`~TreeWalking.walk`, the FileIDs reachable
from the root, the merge markers and tombstones found on the way, link counts
-- each directory entered once, with work bounded by the image's size, and
damage reported and skipped (:class:`_Visits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .errors import CimError, CimFormatError
from .layout import cim, ntfs
from .names import join_path, split_path

if TYPE_CHECKING:
    from .reader import _Directory
    from .regionfile import _Region


class _Visits:
    """What a walk of the tree has entered, so that every walker visits each
    directory once and does work bounded by the image's size: a directory
    FileID met under a second name, two directories sharing one link table,
    or link tables adding up to more bytes than the region files have (they
    overlap) are damage, reported by the walker and not entered."""

    __slots__ = ("dirs", "tables", "budget", "image", "counted")

    def _count_regions(self, open_all: bool) -> None:
        for i, size in self.image._region_sizes(open_all):
            if i not in self.counted:
                self.counted.add(i)
                self.budget += size

    def __init__(self, image: TreeWalking):
        self.dirs: set[int] = set()
        self.tables: set[int] = set()
        # The region files already open (link tables sit in metadata regions);
        # all of them are counted only if that runs out, so a walk does not
        # open every data region (a request each, for a remote image).
        self.image = image
        self.counted: set[int] = set()
        self.budget = 0
        self._count_regions(open_all=False)

    def admit(self, fid: int, rec: cim.FileRecord | None = None) -> str | None:
        """None if the directory ``fid`` may be entered (it is then counted
        as entered), else why not."""
        if rec is None:
            rec = self.image.record(fid)
        if fid in self.dirs:
            return f"directory FileID {fid} has a second name (a cycle or a linked directory)"
        s = rec.stream
        if s.length:
            if s.offset in self.tables:
                return f"directory FileID {fid} shares its link table with another directory"
            self.budget -= s.length
            if self.budget < 0:
                self._count_regions(open_all=True)
            if self.budget < 0:
                return f"directory FileID {fid}: link tables add up to more bytes than the region files hold (they overlap)"
            self.tables.add(s.offset)
        self.dirs.add(fid)
        return None


class TreeWalking:
    """The tree-walking methods of :class:`cimfs.reader.Image` (mixed into it:
    they use its records, directories and region files)."""

    if TYPE_CHECKING:  # what Image provides (for the type checker only)
        path: str
        root_id: int
        _regions: list[_Region | None]
        _nlinks: dict[int, int] | None

        def _fail(self, reason: str) -> CimFormatError: ...
        def _region(self, index: int) -> _Region: ...
        def _blob(self, ro: int, what: str) -> bytes: ...
        def _directory(self, file_id: int) -> _Directory: ...
        def record(self, file_id: int) -> cim.FileRecord: ...
        def lookup(self, path: str | int) -> int: ...

    def _region_sizes(self, open_all: bool) -> list[tuple[int, int]]:
        """(index, size) of the region files already open, or of all that open."""
        out = []
        for i in range(len(self._regions)):
            region = self._regions[i]
            if region is None and open_all:
                try:
                    region = self._region(i)
                except CimError:
                    continue
            if region is not None:
                out.append((i, region.size))
        return out

    def directory_guard(self) -> _Visits:
        """For a walker outside this class: ``guard.admit(fid)`` is None when
        directory ``fid`` may be entered, else the damage that forbids it
        (a second name, a link table shared or overlapping)."""
        return _Visits(self)

    def walk(
        self, path: str = "", onerror: Callable[[CimFormatError], object] | None = None
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """Top-down like ``os.walk``; ``dirpath`` uses ``\\`` and the root is ``""``.

        Directories may be pruned by editing ``dirnames`` in place.  Damage
        met on the way (a directory that cannot be read, an entry whose
        record is bad, a directory under a second name) is passed to
        ``onerror`` as a :class:`CimFormatError` (ignored without one) and
        that part is skipped: the rest of the tree is still walked.  Each
        directory is entered once, however many names lead to it.
        """
        top_id = self.lookup(path)
        top = join_path(split_path(path, strict=False)[0])
        visits = _Visits(self)
        reason = visits.admit(top_id, self.record(top_id))
        if reason is not None:
            raise self._fail(reason)
        stack = [(top, top_id)]
        while stack:
            dirpath, fid = stack.pop()
            try:
                names, ids = self._directory(fid)[:2]
            except CimFormatError as e:
                if onerror is not None:
                    onerror(e)
                continue
            dirs, files, dir_ids = [], [], {}
            for name, child in zip(names, ids):
                try:
                    is_dir = self.record(child).is_dir
                except CimFormatError as e:
                    if onerror is not None:
                        onerror(CimFormatError(e.strerror, f"{dirpath}\\{name}" if dirpath else name))
                    continue
                if is_dir:
                    dirs.append(name)
                    dir_ids[name] = child
                else:
                    files.append(name)
            yield dirpath, dirs, files
            subs = []
            for name in dirs:  # in order: the first name of a directory is the one entered
                dir_id = dir_ids.get(name)
                if dir_id is None:
                    continue
                sub = f"{dirpath}\\{name}" if dirpath else name
                reason = visits.admit(dir_id, self.record(dir_id))
                if reason is not None:
                    if onerror is not None:
                        onerror(CimFormatError(reason, sub))
                    continue
                subs.append((sub, dir_id))
            stack.extend(reversed(subs))

    def iter_file_ids(self) -> Iterator[tuple[str, int]]:
        """Every (path, FileID) reachable from the root, the root first as
        ``""`` (damaged parts skipped, each directory entered once)."""
        yield "", self.root_id
        for path, fid, _rec, _reason in self._tree():
            if fid is not None:
                yield path, fid

    def _tree(self) -> Iterator[tuple[str, int | None, cim.FileRecord | None, str | None]]:
        """(path, FileID, record, damage) for every entry below the root,
        parents before children, without recursion and without a path lookup
        per entry.  ``record`` is None and ``damage`` says why when the entry
        cannot be read or a directory is not entered; a directory that cannot
        be listed is reported as (its path, None, None, reason)."""
        visits = _Visits(self)
        visits.admit(self.root_id, self.record(self.root_id))
        stack = [("", self.root_id)]
        while stack:
            dirpath, fid = stack.pop()
            try:
                d = self._directory(fid)
            except CimFormatError as e:
                yield dirpath, None, None, e.strerror
                continue
            sub = []
            for name, child in zip(d.names, d.file_ids):
                path = f"{dirpath}\\{name}" if dirpath else name
                try:
                    rec = self.record(child)
                except CimFormatError as e:
                    yield path, child, None, e.strerror
                    continue
                reason = visits.admit(child, rec) if rec.is_dir else None
                yield path, child, rec, reason
                if rec.is_dir and reason is None:
                    sub.append((path, child))
            stack.extend(reversed(sub))

    def tombstones(self) -> list[str]:
        """Paths this image marks deleted from the layers below (``CimTombstoneFile``)."""
        tag = ntfs.IO_REPARSE_TAG_WCI_TOMBSTONE
        out = []
        for p, fid in self.iter_file_ids():
            rec = self.record(fid)
            if rec.reparse_tag == tag and not rec.is_dir:  # a merge treats only files as tombstones
                out.append(p)
        return out

    def merge_links(self) -> list[tuple[str, str]]:
        """(path, target in the layers below) of each ``CimCreateMergeLink`` of this image."""
        return [(p, m[1]) for p, m in self._merge_markers() if m[0] == ntfs.MERGE_KIND_LINK and isinstance(m[1], str)]

    def opaque_dirs(self) -> list[str]:
        """Directories that replace, instead of merging with, the layers' below."""
        return [
            p
            for p, m in self._merge_markers()
            if m[0] == ntfs.MERGE_KIND_DIR and isinstance(m[1], int) and m[1] & ntfs.MERGE_DIR_OPAQUE
        ]

    def _merge_markers(self) -> Iterator[tuple[str, tuple[int, str | int]]]:
        tag = ntfs.IO_REPARSE_TAG_CIMFS_MERGE
        for p, fid in self.iter_file_ids():
            rec = self.record(fid)
            if rec.reparse_tag == tag and rec.reparse_offset:
                try:
                    m = ntfs.parse_merge_reparse(self._blob(rec.reparse_offset, f"reparse buffer of {p!r}"))
                except CimFormatError as e:
                    raise CimFormatError(f"{p}: {e.strerror}", self.path) from None
                if m is not None:
                    yield p, m

    def _link_counts(self) -> dict[int, int]:
        # Damage is skipped, not raised: one bad directory must not make the
        # stat of every file fail.  Names in a skipped part are not counted.
        if self._nlinks is None:
            counts: dict[int, int] = {}
            for _path, fid, rec, _reason in self._tree():
                if fid is not None and rec is not None and not rec.is_dir:  # a record comes with its FileID
                    counts[fid] = counts.get(fid, 0) + 1
            self._nlinks = counts
        return self._nlinks
