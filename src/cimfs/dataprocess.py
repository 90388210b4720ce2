"""The forked data processes of an image being written: :class:`DataProcess`
(the owner's side: routing files by size or by lane, batches over a pipe, the
results), ``_data_process_main`` (the worker's side: opening, reading,
hashing and appending each file into its own regions of the image's region
set) and :class:`LocalCopier`, a consistent image's lanes copied in this
process when none can be forked.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
from typing import TYPE_CHECKING

from .errors import E_FAIL, CimError, hresult_from_oserror
from .layout import cim
from .storecopy import (
    _O_NOATIME,
    _SOURCE_FLAGS,
    copy_content,
    open_source,
    read_small_source,
    small_source_mismatch,
)
from .storeregions import CONSISTENT_LANES, SMALL_DATA_MAX, lane_of
from .workers import Worker, abandon_all, can_fork, fork_context

if TYPE_CHECKING:
    from .store import ObjectStore


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
            # Bound once here so that the per-file call does not test the mode.
            self.submit = self._submit_to_lane  # type: ignore[method-assign]  # same signature, per instance
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
        lane = lane_of(size)
        w = self._lane_workers[lane]
        w.regions.append(self.store.lane_region(size, lane))
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
                werror = (
                    E_FAIL,
                    f"the data process ended unexpectedly (exit code {w.proc.exitcode})",
                    self.store.directory,
                )
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
        self._error: tuple[int, str, str, int] | None = None  # (hresult, message, source, index of the job)
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
                self._error = (
                    hresult_from_oserror(e),
                    f"writing the image failed: {e.strerror}",
                    src,
                    len(self._offsets),
                )
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


def _queued_work(w: _Worker) -> int:
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
        super().__init__(
            ctx, _data_process_main, (store, self.failed, self.completed), name="cimfs-data", others=others
        )

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
                self.send(
                    (batch, self.sizes[start:], self.regions[start:])
                )  # a process that is gone: finish() says why
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
    append_offset = offsets.append
    known = store.known
    current = store.current
    small_type = cim.REGION_SMALL_DATA
    region_offset = cim.region_offset
    lanes = store.consistent
    parent_index = store.parent_index
    small_region = None if lanes else -1  # the lane region small contents go to now (consistent mode)
    flags_noatime = _SOURCE_FLAGS | _O_NOATIME
    error: tuple | None = None  # (hresult, message, source[, index of the job]): see DataProcess.finish
    dir_path, dir_fd = None, -1  # files arrive directory by directory: open each by name in it
    for batch in batches:
        srcs, sizes = batch[0], batch[1]
        # Consistent mode: the owner chose each content's region (lane).
        regions = batch[2] if len(batch) > 2 else itertools.repeat(-1)
        for src, size, region in zip(srcs, sizes, regions):
            if error is not None:
                append_offset(0)
                continue
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
                        raise CimError(
                            hresult_from_oserror(e), f"cannot open the source {src!r}: {e.strerror}", path
                        ) from None
                    dir_path = parent
                if size > SMALL_DATA_MAX:
                    if lanes:
                        store.use_region(region, cim.REGION_DATA)
                    fd = open_source(name, path, dir_fd, src)
                    try:
                        ro = copy_content(store, buf, fd, 0, size, path).offset
                    finally:
                        os.close(fd)
                else:
                    # Most files of a tree: one read, hashed and appended, with
                    # open_source, read_small_source and ObjectStore._put inlined.
                    try:
                        fd = os.open(name, flags_noatime, dir_fd=dir_fd)  # leave atimes alone when allowed
                    except OSError:  # not the owner (no O_NOATIME), or an error open_source words
                        fd = open_source(name, path, dir_fd, src, checked=False)
                    try:
                        try:
                            data = os.read(fd, size + 1)
                        except OSError:
                            data = b""
                        if len(data) != size:  # not a regular file as scanned: the checked path
                            data = small_source_mismatch(fd, data, size, src, path)
                    finally:
                        os.close(fd)
                    if region != small_region:
                        store.use_region(region, small_type)  # created at its first use, even by a duplicate
                        small_region = region
                    key = size.to_bytes(8, "big") + sha256(data).digest()[:digest_size]  # object_key
                    store.bytes_logical += size
                    ro = known.get(key, 0)  # a RegionOffset is never 0
                    if not ro and parent_index is not None:
                        ro = store.lookup(size, key[8:])
                    if not ro:
                        r = current.get(small_type)
                        if r is None or r.full(size):
                            r = store.region(small_type, size)
                        ro = known[key] = region_offset(r.combined_index, r.append(data))
                        store.bytes_stored += size
            except CimError as e:
                error = (e.hresult, e.strerror, e.filename, len(offsets))
                ro = 0
            except OSError as e:
                error = (hresult_from_oserror(e), f"writing the image failed: {e.strerror}", None, len(offsets))
                ro = 0
            if error is not None:
                failed.value = 1
            append_offset(ro)
        completed.value += sum(sizes) + len(sizes) * _JOB_COST
    if error is None:
        try:
            store.finish()
        except OSError as e:
            error = (hresult_from_oserror(e), f"finishing the data regions failed: {e.strerror}", store.directory)
    return offsets, error, store.bytes_logical, store.bytes_stored
