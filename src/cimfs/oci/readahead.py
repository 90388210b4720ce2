"""Layers read ahead of their import in a forked process (``import-image
--jobs 2``): the part of a layer's import that does not need its parent.

A layer's import is two kinds of work.  Reading the blob, checking its
digest, decompressing it, checking the diff ID and parsing the tar (headers,
PAX records, file data) depend on the layer's own bytes only; applying the
members to a fork of the parent image (whiteouts, the tree, file contents
stored against the parent chain's dedup index), the hive work and the commit
need the parent committed.  :class:`LayerFeed` runs the first kind for every
new layer of an import, in order, in one :class:`~cimfs.workers.Worker`
process (decompression and digests on a thread there, the tar on its main
thread), and hands each layer's members and data to the importer in the
owner as :class:`PipedLayer` sources; the owner applies layer N while the
worker reads on into N+1.  Nothing the worker does touches the store: it
only reads blobs, so a failed or killed import leaves what the journal
covers, as with ``--jobs 1``.  The owner applies the same members with the
same data chunks in the same order, so the images are byte for byte those
of ``--jobs 1``; every error the worker meets is handed over at the member
where ``--jobs 1`` would meet it, with the same text.

Memory is bounded: the owner holds at most ``AHEAD_BYTES`` of received
batches (a thread receives them, so the worker also runs ahead while the
owner commits), plus the pipe and one batch on each side.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import tarfile
import threading

from ..errors import E_FAIL, E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from ..winlayer.pax import CHUNK
from ..winlayer.tarsource import _is_read_error, _read_error_text, _TarSource
from ..workers import Worker, abandon_all, can_fork, fork_context
from . import blobs

AHEAD_BYTES = 64 << 20  # received and not yet applied, at most (plus one batch)
SWITCH_INTERVAL = 0.0005  # seconds, in the reader process
PREFETCH_CHUNK = 4 << 20  # what the decompression thread hands over at a time (one zlib output)
_BATCH_ITEMS = 512
_BATCH_BYTES = 1 << 20

# Items of a layer, in order: ("s", position) it starts; ("h", name, type,
# size, linkname, mtime, pax_headers) a member; ("d", bytes) a piece of the
# last member's data (CHUNK at most, as --jobs 1 reads it); ("t",) the tar's
# end; ("z", uncompressed bytes) blob and diff ID checked; ("x", hresult,
# message, filename) the error that ends the layer and the feed.


def available() -> bool:
    return can_fork()


class _Batcher:
    """The worker's side: items go out in pickled batches."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.items: list = []
        self.bytes = 0
        self.read = 0  # compressed bytes read since the last batch (the owner's progress bar)

    def count(self, n: int) -> None:
        self.read += n

    def add(self, item, size: int = 0) -> None:
        self.items.append(item)
        self.bytes += size
        if len(self.items) >= _BATCH_ITEMS or self.bytes >= _BATCH_BYTES:
            self.flush()

    def error(self, e: CimError) -> None:
        self.add(("x", e.hresult, e.strerror, e.filename))
        self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        data = pickle.dumps((self.read, self.items), protocol=pickle.HIGHEST_PROTOCOL)
        self.items, self.bytes, self.read = [], 0, 0
        try:
            self.conn.send_bytes(data)
        except OSError:  # the owner went away: it removes what it wrote
            os._exit(1)


def _reader_main(layers, feed, batches) -> None:
    # The decompression thread needs the GIL for a moment per chunk while the
    # tar thread holds it nearly all the time: waiting out the default 5 ms
    # switch interval each time would starve it.
    sys.setswitchinterval(SWITCH_INTERVAL)
    out = _Batcher(feed)
    for position, layer in enumerate(layers):
        if not _read_layer(out, position, *layer):
            break
    out.flush()
    feed.close()


def _read_layer(
    out: _Batcher, position: int, opener, compression, digest, size, diff_id, label: str, source: str
) -> bool:
    out.add(("s", position))
    try:
        raw = opener()
    except OSError as e:
        out.error(CimError(ERROR_FILE_NOT_FOUND, f"cannot open {label}: {e.strerror or e}", source))
        return False
    reader = None
    try:
        if compression == "detect":
            raw, compression = blobs.sniff_compression(raw, close_source=True)
        stream = blobs.LayerStream(raw, compression, digest, size, diff_id, label, out.count)
        # decompression and digests on a second thread (they release the GIL)
        reader = blobs.Prefetch(stream, depth=4, chunk=PREFETCH_CHUNK)
        src = _TarSource(reader, label)
        assert src.tf is not None  # _TarSource opens it or raises
        try:
            for m in src.members():
                out.add(("h", m.name, m.type, m.size, m.linkname, m.mtime, m.pax_headers))
                if not (m.isfile() and m.size):
                    continue
                # the member's data, read as _LayerImporter._copy reads it
                f = src.tf.extractfile(m)
                assert f is not None  # a regular member's data
                remaining = m.size
                try:
                    while remaining:
                        chunk = f.read(min(CHUNK, remaining))
                        if not chunk:
                            out.error(
                                CimError(E_INVALIDARG, f"truncated tar: data ends {remaining} bytes early", m.name)
                            )
                            return False
                        out.add(("d", chunk), len(chunk))
                        remaining -= len(chunk)
                except CimError as e:
                    out.error(e)
                    return False
                except Exception as e:
                    if not _is_read_error(e):
                        raise
                    out.error(CimError(E_INVALIDARG, _read_error_text(e, "data", m), m.name))
                    return False
        finally:
            src.close()
        out.add(("t",))
        reader.finish()
        out.add(("z", stream.uncompressed_bytes))
        out.flush()  # the owner can finish this layer while the next one is read
        return True
    except CimError as e:
        out.error(e)
        return False
    except Exception as e:  # noqa: BLE001 - reported by the owner, naming the layer
        out.error(CimError(E_FAIL, f"reading the layer failed: {type(e).__name__}: {e}", label))
        return False
    finally:
        if reader is not None:
            reader.close()
        try:
            raw.close()
        except Exception:  # noqa: BLE001
            pass


class LayerFeed:
    """The owner's side: starts the worker on ``layers`` (tuples of opener,
    compression, digest, size, diff ID, label, source name), in import
    order; :meth:`layer` gives the next one as an importer source."""

    def __init__(self, layers: list[tuple]):
        self.labels = [layer[5] for layer in layers]
        self.position = 0
        self.worker = Worker(fork_context(), _reader_main, (list(layers),), name="cimfs-layer-reader", feed=True)
        self._queue: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._receive, name="cimfs-layer-feed", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        conn = self.worker.feed
        assert conn is not None  # the worker was started with feed=True
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                data = None
            with self._cond:
                while data is not None and self._bytes >= AHEAD_BYTES and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._queue.append(data)
                if data is not None:
                    self._bytes += len(data)
                self._cond.notify_all()
            if data is None:
                return

    def next_batch(self, label: str) -> tuple[int, list]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            data = self._queue[0]
            if data is None:  # left queued: every later call says the same
                self.worker.proc.join(1)
                raise CimError(
                    E_FAIL,
                    f"the layer reader process ended unexpectedly (exit code {self.worker.proc.exitcode})",
                    label,
                )
            self._queue.popleft()
            self._bytes -= len(data)
            self._cond.notify_all()
        return pickle.loads(data)

    def layer(self, progress=None) -> PipedLayer:
        """The next layer of the feed (they come in the order given)."""
        position = self.position
        self.position += 1
        return PipedLayer(self, position, self.labels[position], progress)

    def close(self) -> None:
        """Ends the worker (killed if it still runs: an import that failed)
        and the receiving thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self.worker.proc.is_alive():
            self.worker.proc.kill()
        self.worker.proc.join()
        self._thread.join()
        abandon_all([self.worker])


class PipedLayer:
    """One layer of a :class:`LayerFeed` as the importer's tar source
    (``members``, ``extractfile``, ``label``) and as the checked stream the
    store finishes (``finish``, ``uncompressed_bytes``)."""

    is_layer_source = True

    def __init__(self, feed: LayerFeed, position: int, label: str, progress=None):
        self.feed = feed
        self.position = position
        self.label = label
        self.progress = progress
        self.items: collections.deque = collections.deque()
        self.uncompressed_bytes = 0
        self.started = self.tar_ended = self.finished = False

    def _next(self):
        while not self.items:
            read, items = self.feed.next_batch(self.label)
            if read and self.progress is not None:
                self.progress(read)
            self.items.extend(items)
        item = self.items.popleft()
        if item[0] == "x":
            self.items.appendleft(item)  # the layer ends here: every later call raises it again
            raise CimError(item[1], item[2], item[3])
        if not self.started:
            if item[0] != "s" or item[1] != self.position:
                raise CimError(
                    E_FAIL, f"the layer reader sent {item[0]!r} where layer {self.position} starts", self.label
                )
            self.started = True
            return self._next()
        return item

    def members(self):
        while not self.tar_ended:
            item = self._next()
            kind = item[0]
            if kind == "h":
                m = tarfile.TarInfo(item[1])
                m.type, m.size, m.linkname, m.mtime, m.pax_headers = item[2:7]
                yield m
            elif kind == "t":
                self.tar_ended = True
            elif kind != "d":  # "d": data of a member the importer did not read (as tarfile skips it)
                raise CimError(E_FAIL, f"the layer reader sent {kind!r} inside the tar", self.label)

    def extractfile(self, m) -> _PipedData:
        return _PipedData(self)

    def finish(self) -> None:
        """The rest of the layer read and both digests checked (raises on a mismatch)."""
        if self.finished:
            return
        for _ in self.members():
            pass
        item = self._next()
        if item[0] != "z":
            raise CimError(E_FAIL, f"the layer reader sent {item[0]!r} at the end of the layer", self.label)
        self.uncompressed_bytes = item[1]
        self.finished = True

    def close(self) -> None:
        pass


class _PipedData:
    """A member's data as the worker sent it: one piece per read."""

    def __init__(self, layer: PipedLayer):
        self.layer = layer
        self.buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if not self.buf:
            item = self.layer._next()
            if item[0] != "d":
                self.layer.items.appendleft(item)
                return b""
            if n is None or n < 0 or n >= len(item[1]):
                return item[1]
            self.buf = memoryview(item[1])
        n = len(self.buf) if n is None or n < 0 else n
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out
