"""The content store of an image being written: :class:`ObjectStore`.

It appends objects (file contents, metadata blobs, tables) to the image's new
region set, each content once: de-duplicated by SHA-256 against this image
and, for forks, against the parent chain's object ID files (spec §4).  At the
end it writes the object ID files and, for a consistent image, names the
region set after its contents (:func:`content_set_id`).  A forked data
process works on a twin of it (:meth:`ObjectStore.twin`).

The store is made of several modules; ``cimfs.store`` re-exports what the
writer, the commit and the tests use from them:

- :mod:`cimfs.storeregions`: region files being appended to, size limits, lanes;
- :mod:`cimfs.parentindex`: dedup look-ups in the parent chain;
- :mod:`cimfs.storecopy`: copying file contents (sources, the data thread);
- :mod:`cimfs.dataprocess`: the forked data processes.

The tree, the records and the commit are :mod:`cimfs.writer`'s.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid

from . import reader as _reader
from .atomic import fsync_together
from .dataprocess import DATA_PROCESS_NICENESS, DataProcess, LocalCopier  # noqa: F401
from .errors import E_INVALIDARG, CimError
from .layout import cim
from .parentindex import ParentObjectIndex
from .storecopy import (  # noqa: F401
    DataPump,
    copy_content,
    open_source,
    read_exactly,
    read_small_source,
    small_source_mismatch,
)
from .storeregions import (  # noqa: F401
    CONSISTENT_LANES,
    HOLE_MIN,
    REGION_SOFT_CAP,
    SMALL_DATA_MAX,
    ZERO_CHUNK,
    RegionWriter,
    all_zero,
    digest_of,
    lane_of,
    object_key,
    write_file,
    write_new_file,
    writeback_starter,
)


class ObjectStore:
    """Appends objects to the image's own region set, storing each content once."""

    def __init__(self, directory: str, base: _reader.Image | None, sync: bool, consistent: bool = False):
        self.directory = directory
        # A consistent image writes under this random id and renames its
        # files to an id derived from their contents at finish().
        self.set_id = self._written_id = uuid.uuid4()
        self.consistent = consistent
        self._owner = True  # False in a twin: the owner names the region set
        self._lanes: list[list[int]] | None = None  # consistent mode: per lane [region index, bytes routed to it]
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
        assert self._next_region is not None, "region numbers are shared once"
        self._shared_next = ctx.Value("i", self._next_region[0])
        self._next_region = None

    def _new_region_index(self) -> int:
        if self._shared_next is None:
            counter = self._next_region
            assert counter is not None  # only the shared counter replaces it
            index = counter[0]
            counter[0] += 1
            return index
        with self._shared_next.get_lock():
            index = self._shared_next.value
            self._shared_next.value += 1
            return index

    def region_count(self) -> int:
        """Regions in the set, this store's and a data process's."""
        if self._shared_next is None:
            assert self._next_region is not None  # only the shared counter replaces it
            return self._next_region[0]
        return self._shared_next.value

    def twin(self) -> ObjectStore:
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

    def lane_region(self, size: int, lane: int | None = None) -> int:
        """Consistent mode, on the owner: the region index the contents of a
        local file of ``size`` bytes go to (see CONSISTENT_LANES).  A lane
        moves to a new region once the bytes routed to it would pass the
        soft cap, counted before dedup so that the owner can decide it.
        ``lane``: ``lane_of(size)``, when the caller has it already."""
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = [[-1, 0] for _ in range(CONSISTENT_LANES)]
        room = lanes[lane_of(size) if lane is None else lane]  # [region index, bytes routed to it]
        if room[0] < 0 or (room[1] and room[1] + size > REGION_SOFT_CAP):
            index = self._new_region_index()
            if self.first_combined + index >= cim.MAX_REGIONS:
                raise CimError(
                    E_INVALIDARG, f"image would need more than {cim.MAX_REGIONS} region files", self.directory
                )
            room[0], room[1] = index, 0
        room[1] += size
        return room[0]

    def use_region(self, index: int, region_type: int) -> None:
        """Consistent mode: append objects of ``region_type`` to the lane
        region ``index`` (created at its first use) from now on."""
        r = self._by_index.get(index)
        if r is None:
            r = self._by_index[index] = RegionWriter(
                self.directory,
                self.set_id,
                index,
                self.first_combined + index,
                region_type,
                early_writeback=self.sync,
                cap=1 << 62,
            )
            self.regions.append(r)
        self.current[region_type] = r

    def region(self, region_type: int, size: int) -> RegionWriter:
        r = self.current.get(region_type)
        if r is None or r.full(size):
            if r is not None:
                r.flush()
            index = self._new_region_index()
            if self.first_combined + index >= cim.MAX_REGIONS:
                raise CimError(
                    E_INVALIDARG, f"image would need more than {cim.MAX_REGIONS} region files", self.directory
                )
            r = RegionWriter(
                self.directory, self.set_id, index, self.first_combined + index, region_type, early_writeback=self.sync
            )
            self.regions.append(r)
            self.current[region_type] = r
        return r

    def _verify_parent(self, ro: int, length: int, dg: bytes) -> bool:
        assert self.base is not None  # parent objects are looked up only in a fork
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
        """(region, list of (length, digest, byte offset)) for each own
        region, for the object ID files.  Object keys sort like object ID
        entries, so one pass over the sorted keys fills every region's list."""
        known = self.known
        per_region: dict[int, list] = {r.combined_index: [] for r in self.regions}
        split = cim.split_region_offset
        for key in sorted(known):
            index, offset = split(known[key])
            entries = per_region.get(index)
            if entries is not None:  # else a parent's object
                entries.append((int.from_bytes(key[:8], "big"), key[8:], offset))
        for r in self.regions:
            yield r, per_region[r.combined_index]

    def finish(self) -> cim.RegionSet:
        """Write out the regions and their object ID files.  A consistent
        owner then renames the whole set (a data process's regions too) to
        an id derived from their contents (see content_set_id)."""
        fds: list[int] = []  # every file of the set, fsynced together at the end (one journal commit, not one each)
        names = cim.RegionSet(self.set_id, 0)
        try:
            for r in self.regions:
                fds.append(r.finish_open())
            for r, entries in self.own_region_offsets():
                path = os.path.join(self.directory, names.file_name("objectid", r.index))
                data = cim.pack_objectid_file(r.index, r.region_type, entries)
                fds.append(write_new_file(path, data, exclusive=True))
            if self.sync and self._owner:
                # A twin (the data thread or a data process) finishes before
                # the owner does and leaves its files to this one round: the
                # whole set durable in one journal commit, before the .cim.
                own = {r.index for r in self.regions}
                for index in range(self.region_count()):
                    if index not in own:
                        for kind in ("region", "objectid"):
                            path = os.path.join(self.directory, names.file_name(kind, index))
                            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                fsync_together(fds)
        finally:
            for fd in fds:
                os.close(fd)
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
