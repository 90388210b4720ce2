"""Dedup look-ups in the parent chain of a fork: :class:`ParentObjectIndex`
binary-searches the parent images' object ID files (spec §4), and loads them
into one dict once a fork looks up more than a few objects.
"""

from __future__ import annotations

from . import reader as _reader
from .errors import CimFormatError
from .layout import cim
from .storeregions import object_key

# [choice] After this many look-ups in one parent object ID file, load it into
# a dict instead of binary-searching the file every time.
_INDEX_LOAD_AFTER = 256


class ParentObjectIndex:
    """Dedup look-ups in the object ID files of the parent chain (spec §4)."""

    def __init__(self, base: _reader.Image):
        self.base = base
        self.files: list[tuple[int, str]] = []  # (combined region index, objectid path)
        directory = base.directory
        assert directory is not None  # a fork's parent is a local image: it shares the fork's directory
        for combined, (name, _) in enumerate(base.region_names):
            oid = _reader.find_region_file(directory, "objectid" + name[len("region") :])
            if oid:
                self.files.append((combined, oid))
        self._maps: dict[int, tuple] = {}
        self._lookups = 0
        self._dict: dict[bytes, int] | None = None

    def _entries(self, combined: int, path: str):
        m = self._maps.get(combined)
        if m is None:
            try:
                data = _reader.read_regular(path, "object ID file")
                table, count = cim.unpack_objectid_header(data, path)
            except (OSError, CimFormatError):
                data, table, count = b"", 0, 0  # an unreadable index only costs dedup
            m = self._maps[combined] = (data, table, count)
        return m

    def _load_all(self) -> dict[bytes, int]:
        d: dict[bytes, int] = {}
        for combined, path in self.files:
            data, table, count = self._entries(combined, path)
            for length, dg, off in cim.OBJECTID_ENTRY.iter_unpack(
                memoryview(data)[table : table + count * cim.OBJECTID_ENTRY.size]
            ):
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
