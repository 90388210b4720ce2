"""An open stream of an image being written: :class:`StreamWriter` takes a
file's (or alternate stream's) bytes in order, small contents buffered for
the small-data region, large ones written straight into a reserved room of a
data region (all-zero runs left as holes), hashed, and given back when the
content turns out to be a duplicate.
"""

from __future__ import annotations

import hashlib
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import E_HANDLE, E_INVALIDARG, CimError, hresult_from_oserror
from .layout import cim
from .store import HOLE_MIN, SMALL_DATA_MAX, ZERO_CHUNK, all_zero, object_key
from .writetree import _with_stream

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .store import RegionWriter
    from .writeedit import TreeEditing
    from .writetree import _Node


class StreamWriter:
    """The open stream of a file or alternate stream: its size is fixed at creation,
    bytes arrive in order, and unwritten ranges read as zeros."""

    # Set for a phase of the stream's life, not in __init__:
    _buf: bytearray  # a small stream's bytes (size <= SMALL_DATA_MAX), from creation
    _hash: hashlib._Hash  # a large stream's digest so far, from its first write (with _region)

    def __init__(self, image: TreeEditing, node: _Node, stream_name: str | None, size: int, path: str) -> None:
        self._image = image
        self._node = node
        self._stream_name = stream_name
        self.size = size
        self.path = path
        self.written = 0
        self.closed = False
        self._small = size <= SMALL_DATA_MAX
        if self._small:
            self._buf = bytearray()
        self._region: RegionWriter | None = None
        self._start = 0
        self._previous_end = 0

    def write(self, data: ReadableBuffer) -> int:
        if self.closed:
            raise CimError(E_HANDLE, "stream is closed", self.path)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes  # type: ignore[arg-type]  # the buffers written (bytes, bytearray) have len()
        if self.written + n > self.size:
            raise CimError(
                E_INVALIDARG, f"write of {n} bytes at {self.written} goes past the stream's size {self.size}", self.path
            )
        if not n:
            return 0
        if self._small:
            self._buf += data
        else:
            if self._region is None:
                self._image._drain()
                store = self._image._store
                self._region = store.region(cim.REGION_DATA, self.size)
                self._previous_end = self._region.end
                self._start = self._region.reserve(self.size)
                self._hash = hashlib.sha256()
            self._hash.update(data)
            if not (n >= HOLE_MIN and all_zero(data)):
                try:
                    self._region.write_at(data, self._start + self.written)
                except OSError as e:
                    raise CimError(
                        hresult_from_oserror(e), f"writing the region file failed: {e.strerror}", self.path
                    ) from None
        self.written += n
        return n

    def _finish(self) -> cim.Stream:
        store = self._image._store
        size = self.size
        if size == 0:
            return cim.EMPTY_STREAM
        if self.written == 0:
            return cim.Stream(0, size, cim.STREAM_TYPE_DATA, sparse=True)
        if self._small:
            if len(self._buf) < size:
                self._buf += bytes(size - len(self._buf))
            ro = store.put(cim.REGION_SMALL_DATA, bytes(self._buf))
            return cim.Stream(ro, size)
        h = self._hash
        region = self._region
        assert region is not None  # reserved by the first write of a large stream, and written > 0 here
        remaining = size - self.written
        while remaining:
            chunk = min(remaining, len(ZERO_CHUNK))
            h.update(memoryview(ZERO_CHUNK)[:chunk])
            remaining -= chunk
        dg = h.digest()[: cim.DIGEST_SIZE]
        store.bytes_logical += size
        ro = store.lookup(size, dg)
        if ro:
            region.release_tail(self._start, self._previous_end)
        else:
            ro = cim.region_offset(region.combined_index, self._start)
            store.known[object_key(size, dg)] = ro
            store.bytes_stored += size
        return cim.Stream(ro, size)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            stream = self._finish()
        finally:
            self._node.open_stream = False
            self._image._open_stream = None
        node = self._node
        if self._stream_name is None:
            # A directory's default stream is its link table, built at commit.
            if not node.is_dir:
                node.record = _with_stream(node.record, stream)
        else:
            self._image._streams(node)[self._image._folder.key(self._stream_name)] = (self._stream_name, stream)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
