"""Copying file contents into an image on the owner's side: the sources
opened safely (no symlink, only a regular file, never blocking on a FIFO) and
read exactly, :func:`copy_content` (one content hashed, deduplicated and
written, holes kept), and :class:`DataPump`, which runs those copies on a
worker thread of the writer's process.  The forked data processes are
:mod:`cimfs.dataprocess`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from typing import TYPE_CHECKING

from .errors import E_INVALIDARG, CimError, hresult_from_oserror
from .layout import cim
from .storeregions import HOLE_MIN, SMALL_DATA_MAX, all_zero, digest_of, object_key

if TYPE_CHECKING:
    from .store import ObjectStore


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

    def __init__(self, store: ObjectStore):
        import queue  # start-up time: only the data thread uses it

        self.store = store
        self.jobs: queue.Queue = queue.Queue(self._QUEUE_DEPTH)
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


def copy_content(store: ObjectStore, buf: bytearray, fd: int, pos: int, size: int, path: str | None) -> cim.Stream:
    """Store ``size`` bytes at ``pos`` of ``fd`` once; ``buf`` is scratch space."""
    if size <= SMALL_DATA_MAX:
        data = read_exactly(fd, pos, size, path)
        return cim.Stream(store.put(cim.REGION_SMALL_DATA, data, digest_of(data)), size)
    view = memoryview(buf)
    if size <= len(buf):
        # Whole in the buffer: hashed before it is written, so a duplicate
        # is never written (nor its room given back).
        _read_into(fd, view, pos, size, 0, path)
        chunk = view[:size]
        dg = hashlib.sha256(chunk).digest()[: cim.DIGEST_SIZE]
        with store.lock:
            store.bytes_logical += size
            ro = store.lookup(size, dg)
            if not ro:
                region = store.region(cim.REGION_DATA, size)
                start = region.reserve(size)
                if not (size >= HOLE_MIN and all_zero(chunk)):
                    region.write_at(chunk, start)
                ro = cim.region_offset(region.combined_index, start)
                store.known[object_key(size, dg)] = ro
                store.bytes_stored += size
        return cim.Stream(ro, size)
    with store.lock:
        region = store.region(cim.REGION_DATA, size)
        previous_end = region.end
        start = region.reserve(size)
    h = hashlib.sha256()
    done = 0
    while done < size:
        n = _read_into(fd, view, pos + done, min(len(buf), size - done), size - done, path)
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


def _read_into(fd: int, view: memoryview, pos: int, want: int, left: int, path: str | None) -> int:
    """Fill ``view[:want]`` from ``pos`` of ``fd`` (a regular file reads short
    only at its end, which is an error: the source has ``left`` (or ``want``)
    bytes more to give)."""
    got = 0
    while got < want:
        try:
            n = os.preadv(fd, [view[got:want]], pos + got)
        except OSError as e:
            raise CimError(hresult_from_oserror(e), f"cannot read the source: {e.strerror}", path) from None
        if n == 0:
            raise CimError(
                E_INVALIDARG, f"source ended {(left or want) - got} bytes before its size (did it shrink?)", path
            )
        got += n
    return got


_SOURCE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_O_NOATIME = getattr(os, "O_NOATIME", 0)


def open_source(
    src: str, path: str | None, dir_fd: int | None = None, shown: str | None = None, checked: bool = True
) -> int:
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
        raise CimError(
            hresult_from_oserror(e), f"cannot open the source {shown or src!r}: {e.strerror}", path
        ) from None
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
    return small_source_mismatch(fd, data, size, shown, path)


def small_source_mismatch(fd: int, data: bytes, size: int, shown: str, path: str | None) -> bytes:
    """:func:`read_small_source` once its read gave ``data``, not ``size`` bytes."""
    _check_regular(fd, shown, path)
    if len(data) > size:
        return data[:size]  # a regular file that grew: its first size bytes, as with a large one
    return read_exactly(fd, 0, size, path)


def read_exactly(fd: int, pos: int, size: int, path: str | None) -> bytes:
    try:
        data = os.pread(fd, size, pos)
        while len(data) < size:
            more = os.pread(fd, size - len(data), pos + len(data))
            if not more:
                raise CimError(
                    E_INVALIDARG, f"source ended {size - len(data)} bytes before its size (did it shrink?)", path
                )
            data += more
    except OSError as e:
        raise CimError(hresult_from_oserror(e), f"cannot read the source: {e.strerror}", path) from None
    return data
