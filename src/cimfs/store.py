"""The content store of an image being written: its region files, each
object stored once, and the copying of file contents into them.

:class:`ObjectStore` appends objects (file contents, metadata blobs, tables)
to the new region set, de-duplicated by SHA-256 against this image and, for
forks, against the parent chain's object ID files (spec §4), and writes the
object ID files at the end.  :class:`DataPump` copies file contents on a
worker thread so reading, hashing and writing overlap the caller's work.
The tree, the records and the commit are :mod:`cimfs.writer`'s.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import stat
import threading
import uuid

from . import reader as _reader
from .workers import Worker, abandon_all, can_fork, fork_context
from .errors import E_FAIL, E_INVALIDARG, CimError, CimFormatError, hresult_from_oserror
from .layout import cim

# [choice] Contents shorter than this go to the small-data region (512-byte
# aligned); longer ones to a data region (4096-byte aligned).  32 KiB keeps the
# alignment padding of a typical source tree near 1 % of its size while large
# files stay page-aligned for mmap and the page cache.
SMALL_DATA_MAX = 32 * 1024
# [choice] A region file is closed and a new one of its type started once it
# passes this size (a single larger object still goes in whole).
REGION_SOFT_CAP = 4 << 30
# [choice] Consistent images (CimCreateImage2's CONSISTENT_CIM): the contents
# of local files added by path go to a fixed number of lanes chosen by their
# size alone (small or large, and one bit of a hash of the size), each lane
# its own sequence of regions, filled in the order the files were added.  A
# data process takes whole lanes (lane % workers), so where a content lands
# depends on the input only, never on how many processes copy it or which
# finishes first; equal contents have equal sizes, so dedup stays exact.
CONSISTENT_LANES = 4


def lane_of(size: int) -> int:
    """The consistent-mode lane of a local file's contents of ``size`` bytes."""
    return (2 if size > SMALL_DATA_MAX else 0) | ((size * 0x9E3779B97F4A7C15) >> 40) & 1


# Appends to metadata/small-data regions are buffered up to this many bytes.
_FLUSH_BYTES = 4 << 20
_PADDING = bytes(max(cim.REGION_ALIGNMENT.values()))
_WRITEBACK_STEP = 8 << 20


def _writeback_starter():
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)``: start writing a
    range back without waiting (Linux; None elsewhere).  Advisory only: the
    fsync at the end is what makes the data durable."""
    try:
        import ctypes  # start-up time: bound at the first use

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return lambda fd, off, n: fn(fd, off, n, 2)


_START_WRITEBACK = _writeback_starter()
_IOV_MAX = 1024  # pwritev takes at most this many buffers (Linux UIO_MAXIOV)
ZERO_CHUNK = bytes(1 << 20)
HOLE_MIN = 64 * 1024  # all-zero writes at least this long become holes in the region file
# [choice] After this many look-ups in one parent object ID file, load it into
# a dict instead of binary-searching the file every time.
_INDEX_LOAD_AFTER = 256


def object_key(length: int, digest: bytes) -> bytes:
    """In-memory key that sorts like object ID entries: by (length, digest)."""
    return length.to_bytes(8, "big") + digest


def digest_of(data) -> bytes:
    """[choice] object digest: the first 24 bytes of SHA-256 (spec §4)."""
    return hashlib.sha256(data).digest()[: cim.DIGEST_SIZE]


def all_zero(data) -> bool:
    view = memoryview(data).cast("B")
    step = len(ZERO_CHUNK)
    return all(view[i: i + step] == ZERO_CHUNK[: len(view[i: i + step])] for i in range(0, len(view), step))


def write_file(path: str, data: bytes, sync: bool, exclusive: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


# ====================================================================== regions
class RegionWriter:
    """One region file being appended to."""

    def __init__(self, directory: str, set_id: uuid.UUID, index: int, combined_index: int, region_type: int,
                 early_writeback: bool = False, cap: int = REGION_SOFT_CAP):
        self.name = cim.RegionSet(set_id, 0).file_name("region", index)
        self.path = os.path.join(directory, self.name)
        self.index = index
        self.combined_index = combined_index
        self.region_type = region_type
        self.alignment = cim.REGION_ALIGNMENT[region_type]
        self.cap = cap  # a lane's region (consistent mode) is closed by the owner's count, not here
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        header = cim.pack_region_header(index, region_type)
        os.pwrite(self.fd, header, 0)
        self.flushed = self.end = len(header)
        # Appended objects wait here and go out in one pwritev: no copy into a buffer.
        self.pending: list[bytes] = []
        # With a final fsync coming, start writing back as we go, so the disk
        # works while the CPU does and the fsync only waits for the tail.
        self._writeback = _START_WRITEBACK if early_writeback else None
        self._written_back = 0

    def full(self, size: int) -> bool:
        return self.end > cim.REGION_HEADER.size and self.end + size > self.cap

    def append(self, data) -> int:
        a = self.alignment  # a power of two
        start = (self.end + a - 1) & -a
        pending = self.pending
        if start != self.end:
            pending.append(_PADDING[: start - self.end])
        pending.append(data if type(data) is bytes else bytes(data))  # a caller's buffer may change
        self.end = start + len(data)
        if self.end - self.flushed >= _FLUSH_BYTES or len(pending) >= _IOV_MAX:
            self.flush()
        return start

    def flush(self) -> None:
        pending = self.pending
        if not pending:
            return
        pos = self.flushed
        for i in range(0, len(pending), _IOV_MAX):
            part = pending[i: i + _IOV_MAX]
            size = sum(map(len, part))
            n = os.pwritev(self.fd, part, pos)
            if n < size:  # a short write (a signal, a nearly full disk): write the rest plainly
                self.write_at(memoryview(b"".join(part))[n:], pos + n)
            pos += size
        assert pos == self.end
        self.flushed = pos
        pending.clear()
        if self._writeback is not None and pos - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(pos)

    def _start_writeback(self, upto: int) -> None:
        self._writeback(self.fd, self._written_back, upto - self._written_back)
        self._written_back = upto

    def reserve(self, size: int) -> int:
        """Room for an object written piecewise with :meth:`write_at`."""
        self.flush()
        start = cim.align(self.end, self.alignment)
        self.flushed = self.end = start + size
        return start

    def write_at(self, data, pos: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        if self._writeback is not None and pos - self._written_back >= _WRITEBACK_STEP:
            self._start_writeback(pos)

    def release_tail(self, start: int, previous_end: int) -> None:
        """Give back a reserved object (its content was a duplicate)."""
        self.flushed = self.end = previous_end
        self._written_back = min(self._written_back, previous_end)
        os.ftruncate(self.fd, previous_end)

    def finish(self, sync: bool) -> None:
        self.flush()
        os.ftruncate(self.fd, self.end)
        if sync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ParentObjectIndex:
    """Dedup look-ups in the object ID files of the parent chain (spec §4)."""

    def __init__(self, base: _reader.Image):
        self.base = base
        self.files: list[tuple[int, str]] = []  # (combined region index, objectid path)
        for combined, (name, _) in enumerate(base.region_names):
            oid = _reader.find_region_file(base.directory, "objectid" + name[len("region"):])
            if oid:
                self.files.append((combined, oid))
        self._maps: dict[int, tuple] = {}
        self._lookups = 0
        self._dict: dict[bytes, int] | None = None

    def _entries(self, combined: int, path: str):
        m = self._maps.get(combined)
        if m is None:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                table, count = cim.unpack_objectid_header(data, path)
            except (OSError, CimFormatError):
                data, table, count = b"", 0, 0  # an unreadable index only costs dedup
            m = self._maps[combined] = (data, table, count)
        return m

    def _load_all(self) -> dict[bytes, int]:
        d: dict[bytes, int] = {}
        for combined, path in self.files:
            data, table, count = self._entries(combined, path)
            for length, dg, off in cim.OBJECTID_ENTRY.iter_unpack(memoryview(data)[table: table + count * cim.OBJECTID_ENTRY.size]):
                d.setdefault(object_key(length, dg), cim.region_offset(combined, off))
        return d

    def find(self, length: int, dg: bytes, verify) -> int:
        """RegionOffset of an identical object in the parent chain, or 0."""
        self._lookups += 1
        if self._dict is None and self._lookups > _INDEX_LOAD_AFTER:
            self._dict = self._load_all()
        if self._dict is not None:
            ro = self._dict.get(object_key(length, dg), 0)
            return ro if ro and verify(ro, length, dg) else 0
        want = (length, dg)
        size = cim.OBJECTID_ENTRY.size
        for combined, path in self.files:
            data, table, count = self._entries(combined, path)
            lo, hi = 0, count
            while lo < hi:
                mid = (lo + hi) // 2
                n, d, off = cim.OBJECTID_ENTRY.unpack_from(data, table + mid * size)
                if (n, d) < want:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < count:
                n, d, off = cim.OBJECTID_ENTRY.unpack_from(data, table + lo * size)
                if (n, d) == want:
                    ro = cim.region_offset(combined, off)
                    if verify(ro, length, dg):
                        return ro
        return 0


class ObjectStore:
    """Appends objects to the image's own region set, storing each content once."""

    def __init__(self, directory: str, base: _reader.Image | None, sync: bool, consistent: bool = False):
        self.directory = directory
        # A consistent image writes under this random id and renames its
        # files to an id derived from their contents at finish().
        self.set_id = self._written_id = uuid.uuid4()
        self.consistent = consistent
        self._owner = True  # False in a twin: the owner names the region set
        self._lanes: list | None = None  # consistent mode: per lane [region index, bytes routed to it]
        self._by_index: dict[int, RegionWriter] = {}  # lane regions this store writes, by index
        self._final_names: list[str] = []  # files finish() created under the content-derived id
        self.base = base
        self.first_combined = len(base.region_names) if base else 0
        self.regions: list[RegionWriter] = []
        self.current: dict[int, RegionWriter] = {}
        self.known: dict[bytes, int] = {}  # object_key -> RegionOffset, own objects
        self.blobs: dict[bytes, int] = {}  # metadata blob bytes -> RegionOffset
        self.parent_index = ParentObjectIndex(base) if base else None
        self.sync = sync
        self.lock = threading.RLock()  # the data pump and the owner share regions and the index
        self.bytes_logical = 0  # bytes callers asked to store
        self.bytes_stored = 0  # bytes actually written
        # Region numbers, shared with a DataProcess once one runs (both add regions to the set).
        self._next_region: list[int] | None = [0]
        self._shared_next = None

    def share_region_numbers(self, ctx) -> None:
        """From now on region numbers come from a counter in shared memory."""
        self._shared_next = ctx.Value("i", self._next_region[0])
        self._next_region = None

    def _new_region_index(self) -> int:
        if self._shared_next is None:
            index = self._next_region[0]
            self._next_region[0] += 1
            return index
        with self._shared_next.get_lock():
            index = self._shared_next.value
            self._shared_next.value += 1
            return index

    def region_count(self) -> int:
        """Regions in the set, this store's and a data process's."""
        return self._next_region[0] if self._shared_next is None else self._shared_next.value

    def twin(self) -> "ObjectStore":
        """This store as a forked data process starts it: the same region set,
        dedup index and parent chain, none of the owner's open regions.  In
        consistent mode its dedup index starts empty (lanes dedup among
        themselves and against the parent chain only, however many
        processes share them)."""
        t = object.__new__(ObjectStore)
        t.__dict__.update(self.__dict__)
        t.regions, t.current, t.blobs = [], {}, {}
        t.lock = threading.RLock()
        t.bytes_logical = t.bytes_stored = 0
        t._owner = False
        if self.consistent:
            t.known, t._by_index = {}, {}
        return t

    def lane_region(self, size: int) -> int:
        """Consistent mode, on the owner: the region index the contents of a
        local file of ``size`` bytes go to (see CONSISTENT_LANES).  A lane
        moves to a new region once the bytes routed to it would pass the
        soft cap, counted before dedup so that the owner can decide it."""
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = [[-1, 0] for _ in range(CONSISTENT_LANES)]
        lane = lanes[lane_of(size)]
        if lane[0] < 0 or (lane[1] and lane[1] + size > REGION_SOFT_CAP):
            index = self._new_region_index()
            if self.first_combined + index >= cim.MAX_REGIONS:
                raise CimError(E_INVALIDARG, f"image would need more than {cim.MAX_REGIONS} region files", self.directory)
            lane[0], lane[1] = index, 0
        lane[1] += size
        return lane[0]

    def use_region(self, index: int, region_type: int) -> None:
        """Consistent mode: append objects of ``region_type`` to the lane
        region ``index`` (created at its first use) from now on."""
        r = self._by_index.get(index)
        if r is None:
            r = self._by_index[index] = RegionWriter(self.directory, self.set_id, index, self.first_combined + index,
                                                     region_type, early_writeback=self.sync, cap=1 << 62)
            self.regions.append(r)
        self.current[region_type] = r

    def region(self, region_type: int, size: int) -> RegionWriter:
        r = self.current.get(region_type)
        if r is None or r.full(size):
            if r is not None:
                r.flush()
            index = self._new_region_index()
            if self.first_combined + index >= cim.MAX_REGIONS:
                raise CimError(E_INVALIDARG, f"image would need more than {cim.MAX_REGIONS} region files", self.directory)
            r = RegionWriter(self.directory, self.set_id, index, self.first_combined + index, region_type,
                             early_writeback=self.sync)
            self.regions.append(r)
            self.current[region_type] = r
        return r

    def _verify_parent(self, ro: int, length: int, dg: bytes) -> bool:
        try:
            return digest_of(self.base._view(ro, length, "parent object")) == dg
        except CimError:
            return False

    def lookup(self, length: int, dg: bytes) -> int:
        key = object_key(length, dg)
        ro = self.known.get(key, 0)
        if not ro and self.parent_index is not None:
            ro = self.parent_index.find(length, dg, self._verify_parent)
            if ro:
                self.known[key] = ro
        return ro

    def put_blob(self, data: bytes) -> int:
        """A metadata blob (SD, EA, reparse buffer): most files share a few, so
        they are looked up by their bytes before anything is hashed."""
        ro = self.blobs.get(data)
        if ro is None:
            ro = self.blobs[data] = self.put(cim.REGION_METADATA, data)
        else:
            self.bytes_logical += len(data)
        return ro

    def put(self, region_type: int, data, dg: bytes | None = None) -> int:
        """Store ``data`` once; returns its RegionOffset."""
        if dg is None:
            dg = digest_of(data)  # outside the lock: the data pump stores concurrently
        with self.lock:
            return self._put(region_type, data, dg)

    def _put(self, region_type: int, data, dg: bytes | None) -> int:
        # Once per small file of an import: lookup(), object_key() and
        # region() inlined for the common case.
        length = len(data)
        self.bytes_logical += length
        if dg is None:
            dg = digest_of(data)
        key = length.to_bytes(8, "big") + dg  # object_key(length, dg)
        ro = self.known.get(key)
        if ro is None and self.parent_index is not None:
            ro = self.lookup(length, dg)
        if ro:
            return ro
        r = self.current.get(region_type)
        if r is None or r.full(length):
            r = self.region(region_type, length)
        ro = cim.region_offset(r.combined_index, r.append(data))
        self.known[key] = ro
        self.bytes_stored += length
        return ro

    def put_unique(self, data) -> int:
        """A metadata object no other can share (tables): not indexed."""
        with self.lock:
            return self._put_unique(data)

    def _put_unique(self, data) -> int:
        r = self.region(cim.REGION_METADATA, len(data))
        self.bytes_stored += len(data)
        return cim.region_offset(r.combined_index, r.append(data))

    def own_region_offsets(self):
        """(region, iterator of (length, digest, byte offset)) for each own
        region, for the object ID files.  Object keys sort like object ID
        entries, so one sorted list of references serves every region."""
        keys = sorted(self.known)
        known = self.known
        split = cim.split_region_offset

        def entries(index: int):
            for key in keys:
                idx, off = split(known[key])
                if idx == index:
                    yield int.from_bytes(key[:8], "big"), key[8:], off

        for r in self.regions:
            yield r, entries(r.combined_index)

    def finish(self) -> cim.RegionSet:
        """Write out the regions and their object ID files.  A consistent
        owner then renames the whole set (a data process's regions too) to
        an id derived from their contents (see content_set_id)."""
        for r in self.regions:
            r.finish(self.sync)
        for r, entries in self.own_region_offsets():
            path = os.path.join(self.directory, cim.RegionSet(self.set_id, 0).file_name("objectid", r.index))
            write_file(path, cim.pack_objectid_file(r.index, r.region_type, entries), self.sync, exclusive=True)
        if self.consistent and self._owner:
            self._rename_set(content_set_id(self.directory, self.set_id, self.region_count()))
        return cim.RegionSet(self.set_id, self.region_count())

    def _rename_set(self, new_id: uuid.UUID) -> None:
        old, new = cim.RegionSet(self.set_id, 0), cim.RegionSet(new_id, 0)
        for index in range(self.region_count()):
            for kind in ("region", "objectid"):
                src = os.path.join(self.directory, old.file_name(kind, index))
                dst = os.path.join(self.directory, new.file_name(kind, index))
                try:
                    os.link(src, dst)
                except FileExistsError:
                    # [choice] Another image of the same contents already has
                    # this set: its files are these bytes (the name is their
                    # digest), so both images share them, as forks do.
                    pass
                except OSError:  # a filesystem without hard links
                    if os.path.exists(dst):
                        raise
                    os.rename(src, dst)
                    self._final_names.append(dst)
                    continue
                else:
                    self._final_names.append(dst)
                os.unlink(src)
        self.set_id = new_id

    def abandon(self) -> None:
        for path in self._final_names:  # only what this writer created: never a set another image shares
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._final_names.clear()
        for r in self.regions:
            r.abandon()
        # The names written under, not a content-derived id another image may share.
        names = cim.RegionSet(self._written_id, 0)
        for index in range(self.region_count()):  # a data process's regions too
            for kind in ("region", "objectid"):
                try:
                    os.unlink(os.path.join(self.directory, names.file_name(kind, index)))
                except FileNotFoundError:
                    pass
        self.regions.clear()
        self.current.clear()


_CONSISTENT_ID_DOMAIN = b"cimfs consistent region set 1\0"


def content_set_id(directory: str, set_id: uuid.UUID, count: int) -> uuid.UUID:
    """[choice] The region set id of a consistent image: SHA-256 over the
    set's region headers and sizes, every object ID file (the length and
    digest of every content at its offset) and the whole of every metadata
    region (tables, which no object ID file lists); its first 16 bytes as an
    RFC 9562 version-8 UUID.  Data regions are not read again: their object
    ID files already stand for their bytes.  The id names these bytes and
    nothing else: two images whose own regions are byte for byte the same
    share them, whatever their parents (each ``.cim`` lists its own)."""
    h = hashlib.sha256(_CONSISTENT_ID_DOMAIN)
    h.update(count.to_bytes(4, "little"))
    names = cim.RegionSet(set_id, 0)
    for index in range(count):
        path = os.path.join(directory, names.file_name("region", index))
        with open(path, "rb") as f:
            header = f.read(cim.REGION_HEADER.size)
            _, region_type = cim.unpack_region_header(header, path)
            size = os.fstat(f.fileno()).st_size
            h.update(header)
            h.update(size.to_bytes(8, "little"))
            if region_type == cim.REGION_METADATA:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        with open(os.path.join(directory, names.file_name("objectid", index)), "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    raw = bytearray(h.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return uuid.UUID(bytes=bytes(raw))


# ====================================================================== copying file contents
class DataPump:
    """Copies file contents into the image on a worker thread.

    Reading, hashing and writing release the GIL, so on two cores the copy of
    one file overlaps the Python work of adding the next ones.  A job's source
    is a duplicated descriptor (a caller's open file) or the path of a large
    local file when no :class:`DataProcess` runs (small ones are cheaper read
    on the owner's thread than contended for over the GIL).  Jobs are handed
    over in batches: a queue round trip costs as much as a small copy.
    Only the worker appends file contents while it runs; the owner drains it
    before it writes contents itself and before commit.
    """

    _QUEUE_DEPTH = 8  # batches
    _BATCH_JOBS = 256
    _BATCH_BYTES = 8 << 20  # a large file is handed over at once

    def __init__(self, store: "ObjectStore"):
        import queue  # start-up time: only the data thread uses it

        self.store = store
        self.jobs: "queue.Queue" = queue.Queue(self._QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.pending = 0  # batches handed over and not yet done
        self._batch: list = []
        self._batch_bytes = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="cimfs-data", daemon=True)
        self._thread.start()

    def submit(self, node, source: int | str, pos: int, size: int, path: str) -> None:
        """Copy ``size`` bytes at ``pos`` of ``source`` (a descriptor the pump
        closes, or a local path) into ``node``'s default stream."""
        self._batch.append((node, source, pos, size, path))
        self._batch_bytes += size
        if len(self._batch) >= self._BATCH_JOBS or self._batch_bytes >= self._BATCH_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            with self._idle:
                self.pending += 1
            self.jobs.put(self._batch)
            self._batch = []
            self._batch_bytes = 0

    def _run(self) -> None:
        buf = bytearray(1 << 20)
        while True:
            batch = self.jobs.get()
            if batch is None:
                return
            for node, source, pos, size, path in batch:
                try:
                    if self.error is None:
                        fd = source if isinstance(source, int) else open_source(source, path)
                        try:
                            stream = copy_content(self.store, buf, fd, pos, size, path)
                        finally:
                            if not isinstance(source, int):
                                os.close(fd)
                        node.record = cim.record_with(node.record, stream=stream)
                except BaseException as e:  # reported to the owner at its next call
                    if self.error is None:
                        self.error = e
                finally:
                    if isinstance(source, int):
                        os.close(source)
            with self._idle:
                self.pending -= 1
                self._idle.notify_all()

    def drain(self) -> None:
        self._hand_over()
        with self._idle:
            while self.pending:
                self._idle.wait()
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def stop(self) -> None:
        self._batch = []  # not handed over: their nodes are never committed
        self.jobs.put(None)
        self._thread.join()


def copy_content(store: ObjectStore, buf: bytearray, fd: int, pos: int, size: int, path: str) -> cim.Stream:
    """Store ``size`` bytes at ``pos`` of ``fd`` once; ``buf`` is scratch space."""
    if size <= SMALL_DATA_MAX:
        data = read_exactly(fd, pos, size, path)
        return cim.Stream(store.put(cim.REGION_SMALL_DATA, data, digest_of(data)), size)
    with store.lock:
        region = store.region(cim.REGION_DATA, size)
        previous_end = region.end
        start = region.reserve(size)
    h = hashlib.sha256()
    view = memoryview(buf)
    done = 0
    while done < size:
        try:
            n = os.preadv(fd, [view[: min(len(buf), size - done)]], pos + done)
        except OSError as e:
            raise CimError(hresult_from_oserror(e), f"cannot read the source: {e.strerror}", path) from None
        if n == 0:
            raise CimError(E_INVALIDARG, f"source ended {size - done} bytes before its size (did it shrink?)", path)
        chunk = view[:n]
        h.update(chunk)
        if not (n >= HOLE_MIN and all_zero(chunk)):
            region.write_at(chunk, start + done)
        done += n
    dg = h.digest()[: cim.DIGEST_SIZE]
    with store.lock:
        store.bytes_logical += size
        ro = store.lookup(size, dg)
        if ro:
            region.release_tail(start, previous_end)
        else:
            ro = cim.region_offset(region.combined_index, start)
            store.known[object_key(size, dg)] = ro
            store.bytes_stored += size
    return cim.Stream(ro, size)


_SOURCE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_O_NOATIME = getattr(os, "O_NOATIME", 0)


def open_source(src: str, path: str, dir_fd: int | None = None, shown: str | None = None,
                checked: bool = True) -> int:
    """Open a local file to copy (``src`` relative to ``dir_fd`` if given).
    Not through a symlink and only a regular file: the tree may change
    between the scan and the copy, and a FIFO put in a file's place must not
    hang the writer (it is opened non-blocking).  ``checked=False`` leaves
    the regular-file check to the caller (:func:`read_small_source`)."""
    try:
        try:
            fd = os.open(src, _SOURCE_FLAGS | _O_NOATIME, dir_fd=dir_fd)  # leave atimes alone when allowed
        except PermissionError:
            fd = os.open(src, _SOURCE_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise CimError(hresult_from_oserror(e), f"cannot open the source {shown or src!r}: {e.strerror}", path) from None
    if checked:
        try:
            _check_regular(fd, shown or src, path)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _check_regular(fd: int, shown: str, path: str | None) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise CimError(E_INVALIDARG, f"source {shown!r} is no longer a regular file", path)


def read_small_source(fd: int, size: int, shown: str, path: str | None) -> bytes:
    """The ``size`` bytes of a source opened with ``open_source(checked=False)``.
    One read of ``size + 1`` bytes: exactly ``size`` is a regular file as
    scanned, so the fstat is only paid when something looks wrong (a FIFO
    reads short, a device too long, a directory fails)."""
    try:
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
    except OSError:
        data = b""
    _check_regular(fd, shown, path)
    if len(data) > size:
        return data[:size]  # a regular file that grew: its first size bytes, as with a large one
    return read_exactly(fd, 0, size, path)


def read_exactly(fd: int, pos: int, size: int, path: str) -> bytes:
    try:
        data = os.pread(fd, size, pos)
        while len(data) < size:
            more = os.pread(fd, size - len(data), pos + len(data))
            if not more:
                raise CimError(E_INVALIDARG, f"source ended {size - len(data)} bytes before its size (did it shrink?)", path)
            data += more
    except OSError as e:
        raise CimError(hresult_from_oserror(e), f"cannot read the source: {e.strerror}", path) from None
    return data


class DataProcess:
    """Copies local files into the image from forked processes.

    Two threads of one interpreter share one GIL: for a tree of small files
    the Python around each open, read and hash is as much work as the owner's
    for the entry itself, so a data *thread* only trades places with it.  A
    forked process has its own interpreter: it owns data and small-data
    regions of the same region set (numbered from a shared counter), its own
    dedup index (a copy of the owner's at the fork, plus the parent chain's),
    writes their object ID files, and at :meth:`finish` sends back where each
    file's contents went.  With two or more cores there are two such workers
    and a file goes to the one its *size* is routed to: the first file of a
    size goes to the worker with the least work outstanding (routed to it
    minus what it reports done), later ones of that size follow it.
    Identical contents have equal sizes, so they always meet the same index
    and are stored once, and both workers end together.  Jobs go over a pipe
    in batches; nothing comes back before the end but a shared counter of
    work done, so neither side can block the other.  The workers are forked only while the
    owner runs no other thread (a fork copies a thread's held locks without
    the thread).  For a consistent image, a file goes by its size's lane
    instead and the owner names the region with the job (CONSISTENT_LANES):
    no shared counter, no balancing by progress.
    """

    _BATCH_JOBS = 512
    _BATCH_BYTES = 16 << 20

    @staticmethod
    def available() -> bool:
        return can_fork()

    def __init__(self, store: ObjectStore, workers: int | None = None):
        ctx = fork_context()
        self.store = store
        if not store.consistent:  # a consistent store's owner numbers every region (lane_region)
            store.share_region_numbers(ctx)
        if workers is None:
            workers = 2 if (os.cpu_count() or 1) >= 2 else 1
        self._workers: list[_Worker] = []
        for _ in range(workers):
            self._workers.append(_Worker(ctx, store, self._workers))
        self._route: dict[int, _Worker] = {}  # file size -> the worker all files of that size go to
        if store.consistent:
            self._lane_workers = [self._workers[lane % workers] for lane in range(CONSISTENT_LANES)]
            self.submit = self._submit_to_lane
        self.done = self._input_ended = False
        self._handed_over = self._checked = 0
        self._failed = False

    def failed(self) -> bool:
        """A worker has met an error (finish() raises it): stop early.  Read
        from shared memory only when a batch was handed over since the last
        call (once per file would cost as much as the rest of submit)."""
        if self._handed_over != self._checked:
            self._checked = self._handed_over
            self._failed = any(w.failed.value for w in self._workers)
        return self._failed

    def submit(self, node, src: str, size: int) -> None:
        """Copy the local file ``src`` (``size`` bytes) into ``node``'s default stream."""
        w = self._route.get(size)
        if w is None:
            w = self._route[size] = min(self._workers, key=_queued_work)
        if w.queue(node, src, size):
            self._handed_over += 1

    def _submit_to_lane(self, node, src: str, size: int) -> None:
        """:meth:`submit` of a consistent image: the file's lane (by size)
        decides the worker and the owner the region (see CONSISTENT_LANES)."""
        region = self.store.lane_region(size)
        w = self._lane_workers[lane_of(size)]
        w.regions.append(region)
        if w.queue(node, src, size):
            self._handed_over += 1

    def end_input(self) -> None:
        """No more files: the last partial batches go out now and the workers
        may finish their regions while the owner does other work."""
        if self._input_ended:
            return
        self._input_ended = True
        for w in self._workers:
            w.hand_over()
            w.end()

    def finish(self, path_of) -> list:
        """Wait for every copy; returns, per worker, (its nodes, the
        RegionOffsets of their contents in the same order) (a node's record
        still holds its placeholder stream: see
        :func:`cim.fill_copied_stream`).  Raises the first copy error, naming
        ``path_of(node)``.  The workers' regions are then complete on disk
        (flushed, synced when the store syncs, object ID files written)."""
        copied: list = []
        self.end_input()
        self.done = True
        error = None
        for w in self._workers:
            result = w.result()
            if result is None:
                werror = (E_FAIL, f"the data process ended unexpectedly (exit code {w.proc.exitcode})",
                          self.store.directory)
                offsets, logical, stored = [], 0, 0
            else:
                offsets, werror, logical, stored = result
                if werror is not None and len(werror) == 4:  # (hresult, message, source, index of the job)
                    werror = (werror[0], werror[1], path_of(w.nodes[werror[3]]) or werror[2])
            error = error or werror
            if werror is None:
                copied.append((w.nodes, offsets))
            w.nodes, w.sizes, w.regions = [], array.array("Q"), array.array("H")
            self.store.bytes_logical += logical
            self.store.bytes_stored += stored
        if error is not None:
            raise CimError(*error)
        return copied

    def abandon(self) -> None:
        abandon_all(self._workers)
        self.done = True


class LocalCopier:
    """A consistent image's data processes, in this process: used when no
    process can be forked (or none is wanted).  Local files' contents go to
    the same lanes and regions in the same order (each copied as it is
    submitted), so the image is the same byte for byte.  The interface is
    :class:`DataProcess`'s: a copy error is reported by :meth:`finish`,
    naming the image path."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self._lanes = store.twin()
        self._buf = bytearray(1 << 20)
        self._nodes: list = []
        self._offsets = array.array("Q")
        self._error = None
        self.done = False

    def failed(self) -> bool:
        return self._error is not None

    def submit(self, node, src: str, size: int) -> None:
        region = self.store.lane_region(size)
        ro = 0
        if self._error is None:
            small = size <= SMALL_DATA_MAX
            lanes = self._lanes
            try:
                lanes.use_region(region, cim.REGION_SMALL_DATA if small else cim.REGION_DATA)
                fd = open_source(src, None, checked=not small)
                try:
                    if small:
                        data = read_small_source(fd, size, src, None)
                        ro = lanes._put(cim.REGION_SMALL_DATA, data, None)
                    else:
                        ro = copy_content(lanes, self._buf, fd, 0, size, None).offset
                finally:
                    os.close(fd)
            except CimError as e:
                self._error = (e.hresult, e.strerror, e.filename or src, len(self._offsets))
            except OSError as e:
                self._error = (hresult_from_oserror(e), f"writing the image failed: {e.strerror}", src, len(self._offsets))
        self._nodes.append(node)
        self._offsets.append(ro)

    def end_input(self) -> None:
        pass

    def finish(self, path_of) -> list:
        self.done = True
        lanes = self._lanes
        self.store.bytes_logical += lanes.bytes_logical
        self.store.bytes_stored += lanes.bytes_stored
        if self._error is not None:
            hresult, message, src, index = self._error
            for r in lanes.regions:  # the owner's abandon() removes them with the rest of the set
                r.abandon()
            raise CimError(hresult, message, path_of(self._nodes[index]) or src)
        lanes.finish()
        copied = [(self._nodes, self._offsets)]
        self._nodes, self._offsets = [], array.array("Q")
        return copied

    def abandon(self) -> None:
        self.done = True
        for r in self._lanes.regions:
            r.abandon()


# [choice] The data processes run this much nicer than the caller.  The
# caller's scan is the critical path: with three busy processes on two cores
# an equal share would slow it by a third, while the data processes catch up
# on both cores once it is done (stdlib create on 2 cores: 1.83 -> 1.65 s
# wall; 5 and 10 measure the same, 19 starves them).  With autogroup
# scheduling, niceness only weighs against processes of the same session.
DATA_PROCESS_NICENESS = 5

# A file's cost to a data process beyond its bytes (open, read, hash, close
# and the Python around them: ~10 us), as bytes copied in the same time.
_JOB_COST = 8 << 10


def _queued_work(w: "_Worker") -> int:
    # What it still has to do, from its own account of what it has done: a
    # worker that got less CPU so far gets less of what comes next.
    return w.work - w.completed.value


class _Worker(Worker):
    """One data process and the owner's side of it."""

    def __init__(self, ctx, store: ObjectStore, others: list):
        self.failed = ctx.Value("b", 0, lock=False)  # set by the process at its first error
        self.completed = ctx.Value("q", 0, lock=False)  # work done, in the units of `work`; the process adds to it
        self.nodes: list = []
        self.sizes = array.array("Q")  # 8 bytes per file, not an int object
        self.regions = array.array("H")  # consistent mode: the region index of each file's contents
        self.batch: list[str] = []  # source paths; their sizes are the tail of `sizes`
        self.batch_bytes = 0
        self.work = 0  # bytes (and _JOB_COST per file) routed here so far
        super().__init__(ctx, _data_process_main, (store, self.failed, self.completed), name="cimfs-data",
                         others=others)

    def queue(self, node, src: str, size: int) -> bool:
        """One file for this process; True if that filled the batch, which then went out."""
        self.work += size + _JOB_COST
        self.nodes.append(node)
        self.sizes.append(size)
        # A job is its source path and size, nothing else: an error comes back
        # with the job's index and the owner names the image path from its node.
        self.batch.append(src)
        self.batch_bytes += size
        if len(self.batch) >= DataProcess._BATCH_JOBS or self.batch_bytes >= DataProcess._BATCH_BYTES:
            self.hand_over()
            return True
        return False

    def hand_over(self) -> None:
        batch = self.batch
        if batch:
            start = len(self.sizes) - len(batch)
            if self.regions:
                self.send((batch, self.sizes[start:], self.regions[start:]))  # a process that is gone: finish() says why
            else:
                self.send((batch, self.sizes[start:]))
            self.batch = []
            self.batch_bytes = 0


def _data_process_main(owner: ObjectStore, failed, completed, batches) -> tuple:
    try:
        os.nice(DATA_PROCESS_NICENESS)
    except OSError:
        pass
    store = owner.twin()  # this process has no other thread: its store's lock is not needed
    sha256, digest_size = hashlib.sha256, cim.DIGEST_SIZE
    buf = bytearray(1 << 20)
    offsets = array.array("Q")
    error = None
    dir_path, dir_fd = None, -1  # files arrive directory by directory: open each by name in it
    for batch in batches:
        srcs, sizes = batch[0], batch[1]
        # Consistent mode: the owner chose each content's region (lane).
        regions = batch[2] if len(batch) > 2 else itertools.repeat(-1)
        for src, size, region in zip(srcs, sizes, regions):
            ro = 0
            if error is None:
                path = None  # errors name the image path from the job's index (DataProcess.finish)
                try:
                    parent, _, name = src.rpartition("/")
                    parent = parent or ("/" if src.startswith("/") else ".")
                    if parent != dir_path:
                        if dir_fd >= 0:
                            os.close(dir_fd)
                            dir_fd = -1
                        try:
                            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                        except OSError as e:
                            raise CimError(hresult_from_oserror(e), f"cannot open the source {src!r}: {e.strerror}", path) from None
                        dir_path = parent
                    small = size <= SMALL_DATA_MAX
                    if region >= 0:
                        store.use_region(region, cim.REGION_SMALL_DATA if small else cim.REGION_DATA)
                    fd = open_source(name, path, dir_fd, src, checked=not small)
                    try:
                        if small:
                            # Most files of a tree: one read, hashed and appended
                            # without the layers copy_content goes through.
                            data = read_small_source(fd, size, src, path)
                            ro = store._put(cim.REGION_SMALL_DATA, data, sha256(data).digest()[:digest_size])
                        else:
                            ro = copy_content(store, buf, fd, 0, size, path).offset
                    finally:
                        os.close(fd)
                except CimError as e:
                    error = (e.hresult, e.strerror, e.filename, len(offsets))
                except OSError as e:
                    error = (hresult_from_oserror(e), f"writing the image failed: {e.strerror}", None, len(offsets))
                if error is not None:
                    failed.value = 1
            offsets.append(ro)
        completed.value += sum(sizes) + len(sizes) * _JOB_COST
    if error is None:
        try:
            store.finish()
        except OSError as e:
            error = (hresult_from_oserror(e), f"finishing the data regions failed: {e.strerror}", store.directory)
    return offsets, error, store.bytes_logical, store.bytes_stored
