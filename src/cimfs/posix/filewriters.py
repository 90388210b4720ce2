"""The forked processes that create an extraction's plain files.

Owns :class:`_FileWriters` (starting the writers, handing each a directory's
plain files and directory metadata in batches, collecting their problems)
and :func:`_file_writer_main`, the loop each writer runs: every file is made
by the :class:`~.entries._EntryMaker` the extractor gave it, through
directories opened from DEST with O_NOFOLLOW at every step.
"""

from __future__ import annotations

import os

import cimfs

from .. import workers
from .entries import _dir_is_plain, _DirChain, _DirMeta, _EntryMaker
from .lx import PosixInfo


class _FileWriters:
    """Forked processes that create an extraction's plain files.

    Creating a file is kernel work (inode allocation, the copy, times) that
    one process does one file at a time; two processes do it on two cores.
    The extractor walks the image, makes the directories and the other
    entries, and hands each plain file (no reparse point, no alternate
    streams, not stored sparse, its first name) to a writer, a directory's
    files together; the writer opens the directory from DEST with O_NOFOLLOW
    at every step as the extractor does.  Problems come back at
    :meth:`finish`; a corrupt image ends the writer that meets it.  Forked
    only while the caller runs no other thread.
    """

    _BATCH_FILES = 128
    _FILE_COST = 16 << 10  # a file's creation, as bytes copied in the same time

    @staticmethod
    def available() -> bool:
        return (os.cpu_count() or 1) >= 2 and workers.can_fork()

    def __init__(self, maker: _EntryMaker, dest_fd: int, count: int = 2):
        self._maker, self._dest_fd, self._count = maker, dest_fd, count
        self._workers: list[workers.Worker] = []
        self._queued = [0] * count
        self._batches: list[list] = [[] for _ in range(count)]
        self._batch_files = [0] * count
        self.done = False

    def _start(self) -> None:
        ctx = workers.fork_context()
        for _ in range(self._count):
            # Job pipes of 1 MiB: the walk runs ahead where files dominate,
            # and what it has sent keeps the writers busy where small
            # directories do and the walk is the slower side (with a 64 KiB
            # pipe the walk blocked 0.3-0.4 s in sends, then each writer
            # waited 0.13-0.23 s for work).
            self._workers.append(
                workers.Worker(
                    ctx,
                    _file_writer_main,
                    (self._maker, self._dest_fd),
                    name="cimfs-extract",
                    others=self._workers,
                    pipe_size=1 << 20,
                )
            )

    def add(self, parts: tuple, files: list, size: int, plain_dir: bool) -> int:
        """A directory's plain files, ``[(name in the image, FileID), ...]``,
        to the writer with the least work queued; returns which writer.
        ``plain_dir``: the extractor made the directory where nothing
        changes what a new file gets (see :func:`_dir_is_plain`)."""
        i = min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += size + self._FILE_COST * len(files)
        self._batches[i].append((parts, files, plain_dir))
        self._batch_files[i] += len(files)
        if self._batch_files[i] >= self._BATCH_FILES:
            self._send(i)
        return i

    def set_dir_meta(self, parts: tuple, info: PosixInfo, writer: int | None, times_only: bool = False) -> None:
        """A directory's owner, mode and times (``times_only``: it was made
        with the rest), set by ``writer`` (the one that has its files: after
        them) once the extractor has made everything else in it, instead of
        by the extractor at the end on one core."""
        i = writer if writer is not None else min(range(self._count), key=self._queued.__getitem__)
        self._queued[i] += self._FILE_COST
        if times_only:
            self._batches[i].append((parts, (info.atime_ns, info.mtime_ns)))
        else:
            self._batches[i].append(
                (parts, (info.uid, info.gid, info.mode, info.atime_ns, info.mtime_ns))
            )  # a _DirMeta

    def _send(self, i: int) -> None:
        if self._batches[i]:
            if not self._workers:
                self._start()
            self._workers[i].send(self._batches[i])  # a writer that is gone: finish() says why
            self._batches[i], self._batch_files[i] = [], 0

    def finish(self) -> tuple[list[str], str | None]:
        """Wait for every file; returns (problems, the corrupt image's message or None)."""
        for i in range(self._count):
            self._send(i)
        for w in self._workers:
            w.end()
        problems: list[str] = []
        fatal = None
        for w in self._workers:
            result = w.result()
            if result is None:
                problems.append(f"a file writer process ended unexpectedly (exit code {w.proc.exitcode})")
                continue
            p, f = result
            problems += p
            fatal = fatal or f
        self.done = True  # only now: an interrupted wait leaves abandon() to kill them
        return problems, fatal

    def abandon(self) -> None:
        if self.done:
            return
        self.done = True
        workers.abandon_all(self._workers)


def _file_writer_main(maker: _EntryMaker, dest_fd: int, batches) -> tuple[list[str], str | None]:
    # Files are created with their final mode (one fchmod fewer each); this
    # process creates nothing else.
    os.umask(0)
    maker.progress = lambda n: None  # counted by the extractor as it hands files out
    problems: list[str] = []
    fatal = None
    chain = _DirChain(dest_fd)
    for batch in batches:
        for item in batch:
            if len(item) == 2:  # a directory's own metadata
                parts, meta = item
                try:
                    if len(meta) == 2:  # made with its final owner and mode
                        os.utime(chain.open(parts), ns=meta)
                    else:
                        maker.set_meta_fd(chain.open(parts), _DirMeta(*meta))
                except OSError as e:
                    problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            parts, files, plain_dir = item
            try:
                dfd = chain.open(parts)
                plain_dir = plain_dir or _dir_is_plain(dfd)
            except OSError as e:
                problems.append(f"{'/'.join(parts)}: {e.strerror or e}")
                continue
            try:
                recs = maker.image.records([fid for name, fid in files])
            except cimfs.errors.CimFormatError as e:
                fatal = str(e)
                break
            try:
                maker.write_plain_files(dfd, plain_dir, parts, files, recs, problems)
            except cimfs.errors.CimFormatError as e:
                fatal = str(e)
                break
        if fatal is not None:
            break
    chain.close()
    return problems, fatal
