"""Reading CIM images: :func:`open` returns an :class:`Image`.

The reader trusts nothing in the image: every RegionOffset, length and count is
checked against the files before it is used, so a corrupt or hostile image
gives a :class:`CimFormatError` and never another exception, a hang or an
allocation larger than the image's files.

This module owns the image's metadata: opening it, records, directories,
paths, the walk, stat and stream tables.  Region files are opened and read by
:mod:`cimfs.regionfile`; stream bytes are read by :mod:`cimfs.streams` and the
walks over the tree are :mod:`cimfs.treewalk` and the structural check and
summary :mod:`cimfs.imagecheck`, each mixed into :class:`Image`.
"""

from __future__ import annotations

import bisect
import builtins
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, overload

from . import remote
from .errors import (
    E_INVALIDARG,
    ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND,
    CimError,
    CimFormatError,
)
from .imagecheck import ImageChecks
from .layout import cim
from .names import NameFolder, join_path, split_path

# The region-file layer and the stream readers live in their own modules; their names stay importable from here.
from .regionfile import _open_regular, _physical_memory, _Region, find_region_file, read_regular  # noqa: F401
from .streams import _HAVE_COPY_FILE_RANGE, COPY_CHUNK, MAX_READ_SIZE, CimFile, StreamReading  # noqa: F401
from .treewalk import TreeWalking

# Reading a .cim never needs more than its header and 65535 parent sets.
_MAX_FILESYSTEM_FILE = cim.FILESYSTEM_HEADER.size + 65535 * cim.REGION_SET.size
_DIR_CACHE_SIZE = 4096
#: File table directories up to this many entries (4 M FileIDs) are unpacked
#: at open; longer ones (which only a sparse region file makes cheap to
#: claim) entry by entry as they are used.
_EAGER_FILE_TABLES = 4096
#: Link-table bytes the decoded-directory cache may stand for.
_DIR_CACHE_BYTES = 16 << 20
_RECORD_CACHE_SIZE = 65536


class DirEntry(NamedTuple):
    name: str
    file_id: int


class Stat(NamedTuple):
    file_id: int
    attributes: int
    size: int
    creation_time: int
    last_write_time: int
    change_time: int
    last_access_time: int
    security_descriptor: bytes
    ea_buffer: bytes
    reparse_tag: int
    reparse_data: bytes
    nlink: int
    is_dir: bool
    is_sparse: bool
    stream_count: int
    parent_file_id: int


class _Directory(NamedTuple):
    names: list[str]
    file_ids: list[int]
    keys: list  # folded names, computed lazily (None until needed)
    size: int = 0  # bytes of its link table (what the cache is budgeted by)


class _TableList(list):
    def total_records(self) -> int:
        return sum(t.count for t in self)


class _FileTables(Sequence[cim.FileTableEntry]):
    """The file table directory as a sequence, each entry unpacked (and
    checked) when asked for: a count that passes the size check only because
    the region file is sparse costs no memory up front."""

    __slots__ = ("_raw", "_count", "_fail", "_cache")

    def __init__(self, raw: memoryview, count: int, fail: Callable[[str], CimFormatError]):
        self._raw, self._count, self._fail = raw, count, fail
        self._cache: dict[int, cim.FileTableEntry] = {}

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> cim.FileTableEntry: ...

    @overload
    def __getitem__(self, i: slice) -> list[cim.FileTableEntry]: ...

    def __getitem__(self, i: int | slice) -> cim.FileTableEntry | list[cim.FileTableEntry]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._count))]
        t = self._cache.get(i)
        if t is not None:
            return t
        if not 0 <= i < self._count:
            if -self._count <= i < 0:
                return self[i + self._count]
            raise IndexError(i)
        t = cim.unpack_file_table_entry(self._raw, i)
        if t.count > cim.FILE_TABLE_CAPACITY:
            raise self._fail(f"file table {i} claims {t.count} records (at most {cim.FILE_TABLE_CAPACITY})")
        if t.count and t.entry_size == 0:
            raise self._fail(f"file table {i} has entry size 0")
        if len(self._cache) < 4096:
            self._cache[i] = t
        return t

    def __iter__(self) -> Iterator[cim.FileTableEntry]:
        for i in range(self._count):
            yield self[i]

    def total_records(self) -> int:
        """The records all tables claim (each count capped at a table's capacity)."""
        return cim.file_table_record_total(self._raw, self._count)


class Image(StreamReading, TreeWalking, ImageChecks):
    """A CIM image opened for reading.  Use as a context manager.

    ``storage`` (a :class:`cimfs.remote.RemoteStorage`) reads the image and its
    region files through fsspec; without it they are local files.

    [choice] The named ``.cim`` may be a symbolic link (the caller named it):
    it is resolved once, opened with ``O_NOFOLLOW`` at its real path, and its
    region files are looked up in that real directory and opened with
    ``O_NOFOLLOW``: a region file that is a link is refused (no one named it,
    and whoever can write the directory could point it at a file only the
    caller may read).  ``private_links`` is for cimfs's own merged view only:
    links in the image's directory are followed one level when that
    directory is the caller's alone (docs/MOUNT.md, "Trust").
    """

    def __init__(
        self,
        cim_path: str | os.PathLike,
        *,
        storage: remote.RemoteStorage | None = None,
        private_links: bool = False,
    ):
        self.storage = storage
        self._private_links = private_links
        # A remote region has no descriptor: copy_stream takes the read/write path.
        self._copy_file_range = _HAVE_COPY_FILE_RANGE and storage is None
        if storage is not None:
            self.path = storage.url
            self.directory = None
            self.name = storage.name
            raw = storage.read_cim(_MAX_FILESYSTEM_FILE)
        else:
            self.path = os.fspath(cim_path)
            real = os.path.realpath(self.path)
            self.directory = os.path.dirname(real)
            self.name = os.path.basename(real)
            try:
                fd = _open_regular(real, "image", is_image=True)
            except CimError as e:
                # Named as the caller named it; a link only here was swapped in after the resolution above.
                raise CimError(e.hresult, e.strerror, self.path) from None
            try:
                with builtins.open(fd, "rb") as f:
                    raw = f.read(_MAX_FILESYSTEM_FILE)
            except OSError as e:
                raise CimError(ERROR_FILE_NOT_FOUND, e.strerror or str(e), self.path) from None
        try:
            self.header = cim.unpack_filesystem_header(raw)
        except CimFormatError as e:
            raise CimFormatError(e.strerror, self.path) from None
        self.version = self.header.version
        self.region_sets = list(self.header.parent_sets) + [self.header.region_set]
        self.region_names: list[tuple[str, int]] = []  # (file name, index in set)
        for rs in self.region_sets:
            for i in range(rs.count):
                self.region_names.append((rs.file_name("region", i), i))
                if len(self.region_names) > cim.MAX_REGIONS:
                    raise CimFormatError(f"image lists more than {cim.MAX_REGIONS} region files", self.path)
        if not self.region_names:
            raise CimFormatError("image lists no region files", self.path)
        self._regions: list[_Region | None] = [None] * len(self.region_names)
        self._lock = threading.Lock()
        self._closed = False
        self._dirs: OrderedDict[int, _Directory] = OrderedDict()
        self._dir_bytes = 0
        self._records: OrderedDict[int, cim.FileRecord] = OrderedDict()
        self._table_views: dict[int, memoryview] = {}
        self._nlinks: dict[int, int] | None = None
        try:
            self._load_filesystem()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing
    def _fail(self, reason: str) -> CimFormatError:
        return CimFormatError(reason, self.path)

    def _region(self, index: int) -> _Region:
        if index >= len(self._regions):
            raise self._fail(f"region index {index} out of range (image has {len(self._regions)} region files)")
        region = self._regions[index]
        if region is None:
            with self._lock:
                region = self._regions[index]
                if region is None:
                    if self._closed:
                        raise CimError(E_INVALIDARG, "image is closed", self.path)
                    name, _ = self.region_names[index]
                    if self.storage is not None:
                        region = self._regions[index] = self.storage.open_region(name, f"region file {name}")
                        return region
                    assert self.directory is not None  # a local image's
                    path = find_region_file(self.directory, name)
                    if path is None:
                        raise self._fail(f"region file {name} is missing")
                    region = self._regions[index] = _Region(path, f"region file {name}", self._private_links)
        return region

    def _locate(self, ro: int, length: int, what: str) -> tuple[_Region, int]:
        """The region file and byte offset of the object at RegionOffset
        ``ro``, checked to lie wholly inside that file."""
        index, off = cim.split_region_offset(ro)
        region = self._region(index)
        if ro == 0 or off < cim.REGION_HEADER.size or length < 0 or off + length > region.size:
            raise self._fail(
                f"{what} at region {index} offset {off} length {length} lies outside the region file ({region.size} bytes)"
            )
        return region, off

    def _view(self, ro: int, length: int, what: str) -> memoryview:
        """Bytes [offset, offset+length) of the object at RegionOffset ``ro``, checked."""
        region, off = self._locate(ro, length, what)
        if region.map is None:  # a remote region: fetched through its block cache
            return memoryview(region.pread(off, length))
        return memoryview(region.map)[off : off + length]

    def _data(self, ro: int, length: int, what: str) -> bytes:
        """File contents: checked like :meth:`_view`, then read with pread."""
        region, off = self._locate(ro, length, what)
        try:
            return region.pread(off, length)
        except OSError as e:
            if type(e) is CimError:  # a remote storage's failure (changed, timed out...): not damage, names its URL
                raise
            raise self._fail(f"{what}: cannot read {region.path}: {e.strerror}") from None

    def _bytes(self, ro: int, length: int, what: str) -> bytes:
        return bytes(self._view(ro, length, what))

    def _blob(self, ro: int, what: str) -> bytes:
        """A u16-length-prefixed object (security descriptor, reparse buffer)."""
        if not ro:
            return b""
        (n,) = cim.U16.unpack(self._view(ro, 2, what))
        return self._bytes(ro + 2, n, what)

    def _load_filesystem(self) -> None:
        fs = cim.unpack_filesystem_object(
            self._view(self.header.filesystem_offset, cim.FILESYSTEM_OBJECT.size, "filesystem object")
        )
        self.filesystem = fs
        self.upcase_table = self._bytes(fs.upcase_offset, cim.UPCASE_TABLE_SIZE, "upcase table")
        self._folder = NameFolder.for_table(self.upcase_table)
        ndir = fs.file_table_count
        if ndir > cim.MAX_FILE_TABLES:
            raise self._fail(f"image claims {ndir} file tables (FileIDs are 32-bit: at most {cim.MAX_FILE_TABLES})")
        raw = self._view(fs.file_table_directory_offset, ndir * cim.FILE_TABLE_DIR_ENTRY.size, "file table directory")
        if ndir <= _EAGER_FILE_TABLES:
            # The common case, unpacked once: record() indexes a list.
            self.file_tables = _TableList(_FileTables(raw, ndir, self._fail))
        else:
            self.file_tables = _FileTables(raw, ndir, self._fail)
        self._table_views = {}
        self.root_id = fs.root_file_id
        if not self.record(self.root_id).is_dir:
            raise self._fail(f"root FileID {self.root_id} is not a directory")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            regions, self._regions = self._regions, [None] * len(self._regions)
            views, self._table_views = self._table_views, {}
        for v in views.values():
            if v is not None:
                try:
                    v.release()
                except BufferError:
                    pass
        for r in regions:
            if r is not None and r.fd is None:
                r.close()
            elif r is not None:
                os.close(r.fd)
                try:
                    r.map.close()
                except BufferError:
                    # A caller still holds a view (an open CimFile's buffer);
                    # the mapping goes away with the last reference.
                    pass
        self._dirs.clear()
        self._dir_bytes = 0
        self._records.clear()
        if self.storage is not None:
            self.storage.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cimfs.Image {self.path!r} v{self.version[0]}.{self.version[1]}>"

    # ------------------------------------------------------------ records
    @property
    def file_count(self) -> int:
        """Number of FileIDs the file tables hold (including unreferenced ones)."""
        return self.file_tables.total_records()

    def max_file_id(self) -> int:
        if not self.file_tables:
            return 0
        return (len(self.file_tables) - 1) * cim.FILE_TABLE_CAPACITY + self.file_tables[-1].count

    def record(self, file_id: int) -> cim.FileRecord:
        rec = self._records.get(file_id)
        if rec is not None:
            return rec
        if not isinstance(file_id, int) or file_id < 1:
            raise self._fail(f"invalid FileID {file_id}")
        table_index, slot = divmod(file_id - 1, cim.FILE_TABLE_CAPACITY)
        if table_index >= len(self.file_tables):
            raise self._fail(f"FileID {file_id} beyond the file tables")
        t = self.file_tables[table_index]
        if slot >= t.count:
            raise self._fail(f"FileID {file_id} beyond the {t.count} records of file table {table_index}")
        pos = slot * t.entry_size
        if self.storage is not None:  # no mapping: fetch this record alone (through the block cache)
            n = min(t.entry_size, cim.FILE_RECORD_SIZE)
            raw = self._bytes(t.offset + pos, n, f"file record {file_id}")
            rec = cim.unpack_file_record(raw.ljust(cim.FILE_RECORD_SIZE, b"\0"))
            self._records[file_id] = rec
            if len(self._records) > _RECORD_CACHE_SIZE:
                self._records.popitem(last=False)
            return rec
        view = self._table_views.get(table_index) or self._table_view(table_index)
        if t.entry_size >= cim.FILE_RECORD_SIZE and pos + cim.FILE_RECORD_SIZE <= len(view):
            rec = cim.unpack_file_record(view, pos)
        else:
            n = min(t.entry_size, cim.FILE_RECORD_SIZE)
            if pos + n > len(view):
                raise self._fail(f"file record {file_id} lies outside the region file")
            rec = cim.unpack_file_record(bytes(view[pos : pos + n]).ljust(cim.FILE_RECORD_SIZE, b"\0"))
        self._records[file_id] = rec
        if len(self._records) > _RECORD_CACHE_SIZE:
            self._records.popitem(last=False)
        return rec

    def records(self, file_ids: Iterable[int]) -> list[cim.FileRecord]:
        """``[record(i) for i in file_ids]`` for a directory's worth of
        entries at once: records not cached already are unpacked in one loop
        and not kept (a walk reads each once)."""
        cache, tables, views = self._records, self.file_tables, self._table_views
        cap, size, unpack = cim.FILE_TABLE_CAPACITY, cim.FILE_RECORD_SIZE, cim.unpack_file_record
        out = []
        for fid in file_ids:
            rec = cache.get(fid)
            if rec is None:
                # record()'s common case inline: a table already mapped, a whole record in it
                view = None
                if type(fid) is int:
                    ti, slot = divmod(fid - 1, cap)
                    view = views.get(ti)
                if (
                    view is not None
                    and fid > 0
                    and (t := tables[ti]) is not None
                    and slot < t.count
                    and t.entry_size >= size
                    and slot * t.entry_size + size <= len(view)
                ):
                    rec = unpack(view, slot * t.entry_size)
                else:
                    rec = self.record(fid)  # the careful path: maps the table, says what is wrong
            out.append(rec)
        return out

    def record_kinds(self, file_ids: Iterable[int]) -> list[int]:
        """:func:`cimfs.layout.cim.record_kinds` of each FileID: a plain
        file's stream length, ``cim.KIND_DIRECTORY`` or ``cim.KIND_OTHER``.
        What a walk needs to tell entries apart, read from the mapped table
        without a FileRecord per entry; every check :meth:`records` makes is
        made (anything unusual takes :meth:`record`'s careful path)."""
        fids = list(file_ids)
        tables, views = self.file_tables, self._table_views
        cap, size = cim.FILE_TABLE_CAPACITY, cim.FILE_RECORD_SIZE
        if fids and set(map(type, fids)) == {int}:
            # A directory's entries usually lie in one table already mapped:
            # its first and last FileID bound them all.
            lo, hi = min(fids), max(fids)
            ti = (lo - 1) // cap
            view = views.get(ti) if lo > 0 and (hi - 1) // cap == ti else None
            if view is not None:
                t = tables[ti]
                last = hi - 1 - ti * cap
                if last < t.count and t.entry_size >= size and last * t.entry_size + size <= len(view):
                    return cim.record_kinds(view, [fid - 1 - ti * cap for fid in fids], t.entry_size)
        kinds, slow = cim.record_kinds, cim.file_record_kind
        out = []
        for fid in fids:
            view = None
            if type(fid) is int:
                ti, slot = divmod(fid - 1, cap)
                view = views.get(ti)
            if (
                view is not None
                and fid > 0
                and slot < (t := tables[ti]).count
                and t.entry_size >= size
                and slot * t.entry_size + size <= len(view)
            ):
                out.append(kinds(view, (slot,), t.entry_size)[0])
            else:
                out.append(slow(self.record(fid)))
        return out

    def listing(self, dir_id: int) -> tuple[list[str], list[int]]:
        """Directory ``dir_id``'s names and their FileIDs (``scandir`` as
        two lists, without a DirEntry per entry)."""
        d = self._directory(dir_id)
        return list(d.names), list(d.file_ids)

    def _table_view(self, index: int) -> memoryview:
        """File table ``index`` as one view of its region file, cut at the
        file's end (a record past it is reported when asked for): a record is
        then unpacked in place instead of being located and copied."""
        t = self.file_tables[index]
        what = f"file table {index}"
        region, off = self._locate(t.offset, 0, what)
        view = memoryview(region.map)[off : min(region.size, off + t.count * t.entry_size)]
        self._table_views[index] = view
        return view

    def raw_record(self, file_id: int) -> bytes:
        """The record's bytes as stored (``min(entry size, 96)``), for copying into a fork."""
        table_index, slot = divmod(file_id - 1, cim.FILE_TABLE_CAPACITY)
        self.record(file_id)  # validates
        t = self.file_tables[table_index]
        n = min(t.entry_size, cim.FILE_RECORD_SIZE)
        return self._bytes(t.offset + slot * t.entry_size, n, f"file record {file_id}").ljust(
            cim.FILE_RECORD_SIZE, b"\0"
        )

    def raw_records(self, table_index: int, count: int) -> bytes:
        """The first ``count`` records of file table ``table_index``, each as
        :meth:`raw_record` gives it, in one piece: a fork copies the records it
        leaves unchanged in a table it changes a table at a time, not a record at a time."""
        t = self.file_tables[table_index]
        size = cim.FILE_RECORD_SIZE
        if self.storage is None and t.entry_size == size and 0 < count <= t.count:
            view = self._table_views.get(table_index) or self._table_view(table_index)
            if count * size <= len(view):
                return bytes(view[: count * size])
        # the careful path, record by record: says which record is wrong
        first = table_index * cim.FILE_TABLE_CAPACITY + 1
        return b"".join([self.raw_record(first + i) for i in range(count)])

    def _directory(self, file_id: int) -> _Directory:
        d = self._dirs.get(file_id)
        if d is not None:
            self._dirs.move_to_end(file_id)
            return d
        rec = self.record(file_id)
        if not rec.is_dir:
            raise CimError(ERROR_PATH_NOT_FOUND, "not a directory", self._describe(file_id))
        s = rec.stream
        if s.length == 0:
            d = _Directory([], [], [])
        else:
            what = f"directory {file_id}"
            try:
                names, ids = cim.unpack_link_table(self._view(s.offset, s.length, what), 4, what)
            except CimFormatError as e:  # the layout knows the table, not the image: name it
                raise e if e.filename else self._fail(e.strerror) from None
            d = _Directory(names, ids, [None], s.length)
        # Bounded by count and by bytes: many FileIDs may claim one large
        # link table, and the cache must not hold a decode of it for each.
        self._dirs[file_id] = d
        self._dir_bytes += d.size
        while len(self._dirs) > 1 and (len(self._dirs) > _DIR_CACHE_SIZE or self._dir_bytes > _DIR_CACHE_BYTES):
            self._dir_bytes -= self._dirs.popitem(last=False)[1].size
        return d

    def _keys(self, d: _Directory) -> list[str]:
        if d.keys and d.keys[0] is None:
            d.keys[:] = [self._folder.key(n) for n in d.names]
        return d.keys

    def _describe(self, file_id: int) -> str:
        return f"{self.path}#FileID {file_id}"

    # ------------------------------------------------------------ paths
    def fold(self, name: str) -> str:
        """The key this image sorts and compares ``name`` by."""
        return self._folder.key(name)

    def child(self, dir_id: int, name: str) -> int | None:
        """The FileID of ``name`` in directory ``dir_id`` (case-insensitive), or None."""
        return self._child(dir_id, name)

    def _child(self, dir_id: int, name: str) -> int | None:
        d = self._directory(dir_id)
        if not d.names:
            return None
        keys = self._keys(d)
        k = self._folder.key(name)
        i = bisect.bisect_left(keys, k)
        if i < len(keys) and keys[i] == k:
            return d.file_ids[i]
        return None

    def _resolve(self, path: str | int, allow_stream: bool = True) -> tuple[int, str | None]:
        if isinstance(path, int):
            self.record(path)
            return path, None
        parts, stream = split_path(path, allow_stream, strict=False)
        fid = self.root_id
        for i, part in enumerate(parts):
            rec = self.record(fid)
            if not rec.is_dir:
                raise CimError(ERROR_PATH_NOT_FOUND, f"{join_path(parts[:i])!r} is not a directory", path)
            child = self._child(fid, part)
            if child is None:
                code = ERROR_FILE_NOT_FOUND if i == len(parts) - 1 else ERROR_PATH_NOT_FOUND
                raise CimError(code, "no such file or directory in the image", path)
            fid = child
        return fid, stream

    def lookup(self, path: str | int) -> int:
        """The FileID at ``path``."""
        fid, stream = self._resolve(path, allow_stream=False)
        return fid

    def exists(self, path: str | int) -> bool:
        try:
            fid, stream = self._resolve(path)
            if stream is not None:
                return self._find_stream(fid, stream, path) is not None
            return True
        except CimError as e:
            if isinstance(e, CimFormatError):
                raise
            return False

    # ------------------------------------------------------------ directories
    def scandir(self, path: str | int = "") -> list[DirEntry]:
        fid = path if isinstance(path, int) else self.lookup(path)
        d = self._directory(fid)
        new = tuple.__new__  # DirEntry's own __new__ is a Python function
        return [new(DirEntry, e) for e in zip(d.names, d.file_ids)]

    def listdir(self, path: str | int = "") -> list[str]:
        fid = path if isinstance(path, int) else self.lookup(path)
        return list(self._directory(fid).names)

    # ------------------------------------------------------------ metadata
    def nlink(self, path: str | int) -> int:
        """How many names the entry has (``stat(path).nlink`` without the rest
        of the stat): 1 for a directory; a file's count takes one walk of the
        whole tree the first time (the format keeps none)."""
        fid = path if isinstance(path, int) else self.lookup(path)
        return self._nlink(fid, self.record(fid))

    def _nlink(self, fid: int, rec: cim.FileRecord) -> int:
        # The format keeps no link counts: a file's takes one walk of the whole
        # tree (then cached).  A directory has exactly one name (a second one
        # is corrupt, which walk() and check() report), so stat() of a
        # directory, as a fork's planning does along its paths, costs no walk.
        return 1 if rec.is_dir else self._link_counts().get(fid, 1)

    def stat(self, path: str | int = "", *, links: bool = True) -> Stat:
        """``links=False`` leaves ``nlink`` 0 (not counted): the format keeps
        no link counts, and the first count walks the whole tree."""
        if type(path) is int:  # the bulk of callers (walks, extraction, the mount): no path to parse
            fid, stream = path, None
        else:
            fid, stream = self._resolve(path)
        rec = self.record(fid)
        if stream is not None:
            s = self._find_stream(fid, stream, path)
            if s is None:
                raise CimError(ERROR_FILE_NOT_FOUND, "no such alternate stream", str(path))
        # Descriptions for errors are only built for the blobs there are.
        reparse = self._blob(rec.reparse_offset, f"reparse buffer of FileID {fid}") if rec.reparse_offset else b""
        sd = (
            self._blob(rec.security_descriptor_offset, f"security descriptor of FileID {fid}")
            if rec.security_descriptor_offset
            else b""
        )
        ea = (
            self._bytes(rec.ea_offset, rec.ea_length, f"EA buffer of FileID {fid}")
            if rec.ea_offset and rec.ea_length
            else b""
        )
        is_dir = rec.is_dir
        nlink = self._nlink(fid, rec) if links else 0
        stream_count = len(self._stream_table(fid)[0]) if rec.stream_table_offset else 0
        # Positional, in the order of Stat's fields (a walk builds one per entry).
        return Stat(
            fid,
            rec.attributes(),
            0 if is_dir else rec.stream.length,
            rec.creation_time,
            rec.last_write_time,
            rec.change_time,
            rec.last_access_time,
            sd,
            ea,
            rec.reparse_tag if reparse else 0,
            reparse,
            nlink,
            is_dir,
            rec.stream.sparse,
            stream_count,
            rec.parent_file_id,
        )

    def ea_buffer(self, path: str | int) -> bytes:
        """The entry's extended attributes as stored (``stat(path).ea_buffer`` alone)."""
        fid = path if type(path) is int else self.lookup(path)
        rec = self.record(fid)
        if not (rec.ea_offset and rec.ea_length):
            return b""
        return self._bytes(rec.ea_offset, rec.ea_length, f"EA buffer of FileID {fid}")

    def _stream_table(self, file_id: int) -> tuple[list[str], list[cim.Stream]]:
        rec = self.record(file_id)
        if not rec.stream_table_offset:
            return [], []
        what = f"stream table of FileID {file_id}"
        (n,) = cim.U32.unpack(self._view(rec.stream_table_offset, 4, what))
        try:
            names, streams = cim.unpack_link_table(self._view(rec.stream_table_offset + 4, n, what), 16, what)
        except CimFormatError as e:
            raise e if e.filename else self._fail(e.strerror) from None
        return names, streams

    def streams(self, path: str | int) -> list[str]:
        """Names of the alternate data streams of ``path``."""
        fid = path if isinstance(path, int) else self.lookup(path)
        return list(self._stream_table(fid)[0])

    def _find_stream(self, fid: int, name: str, path: str | int) -> cim.Stream | None:
        names, streams = self._stream_table(fid)
        k = self._folder.key(name)
        for n, s in zip(names, streams):
            if self._folder.key(n) == k:
                return s
        return None

    def stream_descriptor(self, path: str | int, stream: str | None = None) -> cim.Stream:
        fid, s = self._resolve(path)
        stream = stream if stream is not None else s
        if stream is None:
            rec = self.record(fid)
            if rec.is_dir:
                raise CimError(E_INVALIDARG, "is a directory", str(path))
            return rec.stream
        desc = self._find_stream(fid, stream, path)
        if desc is None:
            raise CimError(ERROR_FILE_NOT_FOUND, f"no alternate stream {stream!r}", str(path))
        return desc

    def stream_size(self, path: str | int, stream: str | None = None) -> int:
        return self.stream_descriptor(path, stream).length


def open(
    cim_path: str | os.PathLike,
    storage_options: dict | None = None,
    *,  # noqa: A001 - mirrors zipfile/tarfile.open
    cache_dir: str | None = None,
) -> Image:
    """Open the image ``cim_path`` for reading: a ``.cim`` file, or an fsspec
    URL of one (``s3://bucket/dir/layer.cim``, ``https://...``, a ``::``
    chain) whose region files lie beside it.  ``storage_options`` go to the
    URL's filesystem; ``cache_dir`` keeps a remote image's fetched blocks on
    local disk.  Local paths (and plain ``file://`` URLs) are mapped and read
    directly."""
    if remote.is_url(cim_path):
        local = remote.local_path(cim_path)
        if local is None:
            storage = remote.RemoteStorage(cim_path, storage_options, cache_dir=cache_dir)
            try:
                return Image(cim_path, storage=storage)
            except BaseException:
                storage.close()
                raise
        cim_path = local
    return Image(cim_path)
