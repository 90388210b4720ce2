"""Writing CIM images: the one core behind :func:`cimfs.create` and the Win32 facade.

This module owns editing an image's tree.  An :class:`ImageWriter` holds the
containing directory locked, keeps the directory tree in memory (files,
directories, hard links, alternate streams, deletions, tombstones and merge
links), and streams file contents straight into a new region set as they
arrive (de-duplicated by SHA-256 against this image and, for forks, against
the parent chain's object ID files).  Its commit hands the finished tree to
:class:`cimfs.commit.ImageCommit`, which serialises and publishes it.

A fork or an extension loads its parent lazily: only the directories a change
touches are read, and only the file tables holding a changed record are
written again, so committing a fork costs what changed, not the parent's size.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import stat
from typing import BinaryIO, Callable

from . import reader as _reader
from .errors import (
    E_ACCESSDENIED,
    E_FAIL,
    E_HANDLE,
    E_INVALIDARG,
    ERROR_ALREADY_EXISTS,
    ERROR_DIR_NOT_EMPTY,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    CimError,
    hresult_from_oserror,
)
from .bulk import paused_gc
from .commit import COMMIT_TEMP_NAME, EMPTY_DIR_STREAM as _DIR_STREAM, ImageCommit
from .layout import cim, ntfs
from .metadata import FileAttributes, FileMetadata
from .names import (
    MAX_NAME_UNITS,
    PATH_CHECK_FROM as _PATH_CHECK_FROM,
    NameFolder,
    check_name,
    check_path_length,
    join_path,
    name_is_valid,
    split_path,
)
from .store import (
    HOLE_MIN,
    SMALL_DATA_MAX,
    ZERO_CHUNK,
    DataPump,
    DataProcess,
    LocalCopier,
    ObjectStore,
    RegionWriter,
    all_zero,
    open_source,
    read_exactly,
    object_key,
)

# ====================================================================== locking
class DirectoryLock:
    """One image handle per containing directory, across threads and processes.

    ``flock`` locks belong to an open file description, so a second open of the
    same directory conflicts even inside one process.
    """

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise CimError(ERROR_SHARING_VIOLATION, "another image handle holds this directory", path) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = -1

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ====================================================================== tree
def _unpacked(record) -> cim.FileRecord:
    return cim.unpack_file_record(record) if isinstance(record, bytes) else record


def _with_stream(record, stream: cim.Stream) -> bytes:
    """A file's record once its default stream is final, kept packed: 129
    bytes instead of a tuple of a dozen ints (about 400), which is what a
    million-entry image is made of."""
    return cim.pack_file_record(_unpacked(record)._replace(stream=stream))


class _Node:
    """A file or directory of the image being written.

    ``record`` holds everything but, for directories, the link table (built at
    commit).  Nodes loaded from a parent image keep their FileID and are
    ``dirty`` only once changed.
    """

    __slots__ = ("file_id", "record", "from_base", "children", "streams", "dirty", "nlink", "open_stream", "is_dir", "seen")

    def __init__(self, record: "cim.FileRecord | bytes", file_id: int = 0, from_base: bool = False,
                 is_dir: bool | None = None):
        self.record = record
        self.file_id = file_id
        self.from_base = from_base
        if is_dir is None:
            is_dir = record.is_dir
        self.children: dict[str, tuple[str, _Node]] | None = {} if (is_dir and not from_base) else None
        # None: no alternate streams yet (new node) or the parent's stream table, not loaded
        self.streams: dict[str, tuple[str, cim.Stream]] | None = None
        self.dirty = not from_base
        self.nlink = 0
        self.open_stream = False
        self.is_dir = is_dir  # fixed for a node's life: replacing a file by a directory makes a new node
        self.seen = False  # visited by the commit's walk (hard links reach a node more than once)


_DIR_CACHE_MAX = 1 << 16


class StreamWriter:
    """The open stream of a file or alternate stream: its size is fixed at creation,
    bytes arrive in order, and unwritten ranges read as zeros."""

    def __init__(self, image: "ImageWriter", node: _Node, stream_name: str | None, size: int, path: str):
        self._image = image
        self._node = node
        self._stream_name = stream_name
        self.size = size
        self.path = path
        self.written = 0
        self.closed = False
        self._small = size <= SMALL_DATA_MAX
        self._buf = bytearray() if self._small else None
        self._region: RegionWriter | None = None
        self._start = 0
        self._previous_end = 0
        self._hash = None

    def write(self, data) -> int:
        if self.closed:
            raise CimError(E_HANDLE, "stream is closed", self.path)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self.written + n > self.size:
            raise CimError(E_INVALIDARG, f"write of {n} bytes at {self.written} goes past the stream's size {self.size}", self.path)
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
                    raise CimError(hresult_from_oserror(e), f"writing the region file failed: {e.strerror}", self.path) from None
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
        remaining = size - self.written
        while remaining:
            chunk = min(remaining, len(ZERO_CHUNK))
            h.update(memoryview(ZERO_CHUNK)[:chunk])
            remaining -= chunk
        dg = h.digest()[: cim.DIGEST_SIZE]
        store.bytes_logical += size
        ro = store.lookup(size, dg)
        if ro:
            self._region.release_tail(self._start, self._previous_end)
        else:
            ro = cim.region_offset(self._region.combined_index, self._start)
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

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ====================================================================== the writer
class ImageWriter:
    """A new image, a fork of ``base`` or an extension of it (``base == name``)."""

    def __init__(self, containing_dir: str | os.PathLike, name: str | None, base: str | None = None, *, sync: bool = True,
                 data_process: bool | int = True, consistent: bool = False, clamp_time: int | None = None):
        directory = os.fspath(containing_dir)
        if not name and not base:
            raise CimError(E_INVALIDARG, "neither an existing nor a new image name was given", directory)
        try:
            st = os.stat(directory)
        except PermissionError:
            raise CimError(E_ACCESSDENIED, "no access to the containing directory", directory) from None
        except OSError:
            raise CimError(ERROR_PATH_NOT_FOUND, "containing directory does not exist", directory) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CimError(ERROR_PATH_NOT_FOUND, "containing path is not a directory", directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise CimError(E_ACCESSDENIED, "no write access to the containing directory", directory)
        name = name or base
        for n in filter(None, (name, base)):
            if os.sep in n or (os.altsep and os.altsep in n) or n in (".", ".."):
                raise CimError(ERROR_INVALID_NAME, "an image name is a file name, not a path", n)
        if name != base and (cim.REGION_FILE_NAME.match(name) or COMMIT_TEMP_NAME.match(name)):
            # gc/rm recognise images by their header whatever their name; a
            # commit's leftover temporary file they remove, and a region
            # file's name on an image would only mislead.
            raise CimError(ERROR_INVALID_NAME, "the name of a region file or of a commit's temporary "
                                               "file cannot name an image", name)
        self.directory = os.path.abspath(directory)
        self.name = name
        self.path = os.path.join(self.directory, name)
        self.extending = bool(base) and base == name
        self._sync = sync
        # data_process: True, as many data processes as the machine has cores; an int, that many (0: none).
        self.consistent = bool(consistent)
        if clamp_time is not None and not (isinstance(clamp_time, int) and 0 <= clamp_time < 1 << 63):
            raise CimError(E_INVALIDARG, f"clamp time {clamp_time!r} is not a FILETIME", directory)
        self._clamp_time = clamp_time
        self._lock = DirectoryLock(self.directory)
        self._base: _reader.Image | None = None
        self._store: ObjectStore | None = None
        self._committed = False
        self._commit_error: str | None = None
        self._closed = False
        self._open_stream: StreamWriter | None = None
        self._pump: DataPump | None = None
        self._process: DataProcess | None = None
        self._copied: list = []  # per data process: (nodes, RegionOffsets of their contents) (see _commit)
        self._use_process = data_process
        # A merged image's sources, top first, and what builds its tree at commit
        # (both set by cimfs.merged.add_source: merging is a client of the writer).
        self._merge_sources: list[str] = []
        self._build_merged: Callable[[], tuple[list, int]] | None = None
        self._merge_dir_flags: dict = {}  # directory node -> its merge marker's flags (make_opaque ...)
        try:
            if base:
                base_path = os.path.join(self.directory, base)
                if not os.path.exists(base_path):
                    raise CimError(ERROR_FILE_NOT_FOUND, "existing image not found", base_path)
                if not self.extending and os.path.lexists(self.path):
                    raise CimError(ERROR_FILE_EXISTS, "the new image already exists", self.path)
                self._base = _reader.Image(base_path)
            elif os.path.lexists(self.path):
                # [choice] CimCreateImage with only a new name that exists: refuse
                # rather than silently replace an image others may fork from.
                raise CimError(ERROR_FILE_EXISTS, "an image of that name already exists", self.path)
            self._store = ObjectStore(self.directory, self._base, sync, consistent=self.consistent)
            self._base_nodes: dict[int, _Node] = {}
            # Directories looked up by path ("a\\b" -> node), so importers adding
            # to one directory after another do not walk from the root each time.
            # Only _unlink removes nodes from the tree, and it empties this.
            self._dir_cache: dict[str, _Node] = {}
            if self._base is not None:
                self._folder = self._base._folder
                self._root = self._base_node(self._base.root_id)
            else:
                self._folder = NameFolder.for_table(cim.load_upcase_table())
                self._root = _Node(cim.FileRecord(stream=_DIR_STREAM))
                self._root.nlink = 1
        except PermissionError as e:
            self._release()
            raise CimError(E_ACCESSDENIED, e.strerror or "permission denied", e.filename or self.directory) from None
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------ state
    def _check_open(self, mutating: bool = True, committing: bool = False) -> None:
        if self._closed:
            raise CimError(E_HANDLE, "image handle is closed", self.path)
        if mutating and self._merge_sources and not committing:
            raise CimError(E_INVALIDARG, "a merged image has no changes of its own, only its sources", self.path)
        if mutating and self._committed:
            raise CimError(E_INVALIDARG, "image is already committed; no further change is allowed", self.path)
        if mutating and self._commit_error is not None:
            # The data processes are gone and the store may be half finished:
            # another commit would publish records whose contents were never written.
            raise CimError(E_FAIL, f"an earlier commit failed ({self._commit_error}); close the image and start again",
                           self.path)
        if mutating and self._open_stream is not None:
            raise CimError(ERROR_SHARING_VIOLATION, f"a stream is still open on {self._open_stream.path!r}", self.path)

    @property
    def committed(self) -> bool:
        return self._committed

    # ------------------------------------------------------------ tree access
    def _base_node(self, file_id: int) -> _Node:
        node = self._base_nodes.get(file_id)
        if node is None:
            node = self._base_nodes[file_id] = _Node(self._base.record(file_id), file_id, from_base=True)
        return node

    def _children(self, node: _Node) -> dict:
        if node.children is None:
            children = {}
            key = self._folder.key
            for entry in self._base.scandir(node.file_id):
                children[key(entry.name)] = (entry.name, self._base_node(entry.file_id))
            node.children = children
        return node.children

    def _streams(self, node: _Node) -> dict:
        if node.streams is None:
            if node.from_base:
                names, streams = self._base._stream_table(node.file_id)
                key = self._folder.key
                node.streams = {key(n): (n, s) for n, s in zip(names, streams)}
            else:
                node.streams = {}
        return node.streams

    def _walk_to_parent(self, parts: list[str], path: str) -> _Node:
        node = self._root
        for i, part in enumerate(parts[:-1]):
            entry = self._children(node).get(self._folder.key(part))
            if entry is None or not entry[1].is_dir:
                what = "does not exist" if entry is None else "is not a directory"
                raise CimError(ERROR_PATH_NOT_FOUND, f"parent {join_path(parts[: i + 1])!r} {what}", path)
            node = entry[1]
        return node

    def _find(self, path: str, allow_stream: bool = False):
        """(parent node, key, (name, node) or None, stream name, parts)."""
        # A known parent directory: only the last component is checked and looked up.
        if isinstance(path, str):
            head, _, tail = path.replace("/", "\\").rpartition("\\")
            parent = self._dir_cache.get(head)
            if parent is not None and tail and ":" not in tail:
                check_name(tail, path)
                if len(path) > _PATH_CHECK_FROM:
                    check_path_length(path)
                key = self._folder.key(tail)
                children = parent.children if parent.children is not None else self._children(parent)
                return parent, key, children.get(key), None, [tail]
        parts, stream = split_path(path, allow_stream)
        if not parts:
            return None, "", ("", self._root), stream, parts
        parent = self._walk_to_parent(parts, path)
        if stream is None:
            self._cache_dir(path.replace("/", "\\").rpartition("\\")[0], parent)
        key = self._folder.key(parts[-1])
        return parent, key, self._children(parent).get(key), stream, parts

    def _cache_dir(self, path: str, node: _Node) -> None:
        """Remember a directory by a spelling of its path that resolved to it."""
        cache = self._dir_cache
        if len(cache) >= _DIR_CACHE_MAX:  # many spellings of paths: start over
            cache.clear()
        cache[path] = node

    def _path_of(self, target: _Node) -> str | None:
        """The image path of a node (for an error message: a walk of the loaded
        tree), or None once it is no longer linked."""
        queue = [(self._root, "")]
        for node, path in queue:  # grows while iterating
            for name, child in (node.children or {}).values():
                child_path = f"{path}\\{name}" if path else name
                if child is target:
                    return child_path
                if child.is_dir:
                    queue.append((child, child_path))
        return None

    def _touch(self, node: _Node) -> None:
        node.dirty = True

    # ------------------------------------------------------------ metadata
    def _record_for(self, meta: FileMetadata, path: str, stream: cim.Stream | None = None,
                    placeholder: bool = False) -> "cim.FileRecord | bytes":
        """The record of ``meta``; ``placeholder``: a new file whose contents
        are copied later (see :meth:`_create_copied`) or that has none, packed at once."""
        sd, ea, rp = meta.security_descriptor or b"", meta.ea_buffer or b"", meta.reparse_data or b""
        tag = 0
        if sd or rp or ea:  # all checked before any is stored
            if len(sd) > 0xFFFF or len(ea) > 0xFFFF or len(rp) > 0xFFFF:
                raise CimError(E_INVALIDARG, "security descriptor, EA buffer and reparse data are each limited to 65535 bytes", path)
            if rp:
                if len(rp) < 8:
                    raise CimError(E_INVALIDARG, f"reparse data of {len(rp)} bytes is shorter than its 8-byte header", path)
                tag = ntfs.reparse_tag(rp)
        ct, wt, cht, at = meta.creation_time, meta.last_write_time, meta.change_time, meta.last_access_time
        try:
            bad = (ct | wt | cht | at) >> 63  # nonzero if any is negative or too large
        except TypeError:
            bad = True
        if bad:
            for t in (ct, wt, cht, at):
                # FILETIME is signed (LARGE_INTEGER): 2^63 and above read back negative.
                if not (isinstance(t, int) and 0 <= t < 1 << 63):
                    raise CimError(E_INVALIDARG, f"time {t!r} is not a FILETIME (0 to 2^63-1)", path)
        clamp = self._clamp_time
        if clamp is not None:  # SOURCE_DATE_EPOCH: nothing newer than the build's date
            ct, wt, cht, at = min(ct, clamp), min(wt, clamp), min(cht, clamp), min(at, clamp)
        store = self._store
        sd_offset = store.put_blob(cim.pack_blob(sd)) if sd else 0
        ea_offset = store.put_blob(ea if type(ea) is bytes else bytes(ea)) if ea else 0
        rp_offset = store.put_blob(cim.pack_blob(rp)) if rp else 0
        attributes = meta.attributes
        flags = cim.attributes_to_flags(attributes) if attributes else 0
        if placeholder:
            size = meta.file_size
            return cim.pack_new_file_record(flags, len(ea), tag, ct, wt, cht, at,
                                            0, cim.placeholder_stream_word(size) if size else 0,  # 0: the empty stream
                                            sd_offset, ea_offset, rp_offset)
        if stream is None:
            stream = _DIR_STREAM if meta.is_dir else cim.EMPTY_STREAM
        return cim.FileRecord(flags, len(ea), tag, ct, wt, cht, at, stream, sd_offset, ea_offset, rp_offset)

    # ------------------------------------------------------------ Win32-shaped operations
    def create_file(self, path: str, metadata: FileMetadata | None = None) -> StreamWriter:
        """Add (or overwrite) a file or directory; returns its stream, to be written and closed."""
        meta = metadata or FileMetadata()
        node, size = self._create(path, meta)
        writer = StreamWriter(self, node, None, size, path)
        if size:
            node.open_stream = True
            self._open_stream = writer
        return writer

    def _create(self, path: str, meta: FileMetadata, placeholder: bool = False) -> tuple[_Node, int]:
        """The node ``create_file`` makes or updates, and its stream's size (0
        for a directory).  ``placeholder``: see :meth:`_create_copied`."""
        self._check_open()
        is_dir = meta.is_dir
        size = 0 if is_dir else meta.file_size
        if not isinstance(size, int) or not 0 <= size <= cim.MAX_STREAM_LENGTH:
            raise CimError(E_INVALIDARG, f"file size {size} is out of range (0 to 2^48-1)", path)
        parent, key, existing, _, parts = self._find(path)
        if parent is None:
            if not is_dir:
                raise CimError(E_INVALIDARG, "the root can only be a directory", path)
            node = self._root
            self._update_dir(node, self._record_for(meta, path))
            return node, 0
        record = self._record_for(meta, path, None, placeholder and not is_dir)
        if existing is not None:
            old = existing[1]
            if old.is_dir and is_dir:
                self._update_dir(old, record)
                self._touch(parent)
                children = self._children(parent)
                children[key] = (parts[-1], old)  # the name's case follows the caller
                return old, 0
            if old.is_dir and self._children(old):
                raise CimError(ERROR_DIR_NOT_EMPTY, "a non-empty directory cannot be replaced by a file", path)
            self._unlink(parent, key)
        node = _Node(record, is_dir=is_dir)
        self._link(parent, key, parts[-1], node)
        if is_dir:
            # Importers add to it next.  Its path as spelled resolved to it ("parts"
            # is only the last name when the parent came from this cache).
            self._cache_dir(path.replace("/", "\\"), node)
        return node, size

    def _update_dir(self, node: _Node, record: cim.FileRecord) -> None:
        self._children(node)
        # Metadata is replaced; children and alternate streams stay.
        old = _unpacked(node.record)
        node.record = record._replace(stream=old.stream, parent_file_id=old.parent_file_id,
                                      stream_table_offset=old.stream_table_offset)
        node.dirty = True

    def create_stream(self, path: str, size: int) -> StreamWriter:
        """``CimCreateAlternateStream``: ``path`` is ``file:stream``."""
        self._check_open()
        if not isinstance(size, int) or not 0 <= size <= cim.MAX_STREAM_LENGTH:
            raise CimError(E_INVALIDARG, f"stream size {size} is out of range", path)
        parent, key, existing, stream, parts = self._find(path, allow_stream=True)
        if stream is None:
            raise CimError(ERROR_INVALID_NAME, "an alternate stream path has the form 'file:stream'", path)
        if existing is None:
            raise CimError(ERROR_FILE_NOT_FOUND, "no such file to add a stream to", path)
        node = existing[1]
        streams = self._streams(node)
        streams[self._folder.key(stream)] = (stream, cim.EMPTY_STREAM)
        node.dirty = True
        writer = StreamWriter(self, node, stream, size, path)
        if size:
            self._open_stream = writer
        return writer

    def link(self, new_path: str, existing_path: str) -> None:
        """``CimCreateHardLink``: another name for an existing file."""
        self._check_open()
        _, _, target, _, _ = self._find(existing_path)
        if target is None:
            raise CimError(ERROR_FILE_NOT_FOUND, "the existing file does not exist", existing_path)
        if target[1].is_dir:
            raise CimError(E_ACCESSDENIED, "a directory cannot be hard-linked", existing_path)
        parent, key, existing, _, parts = self._find(new_path)
        if parent is None:
            raise CimError(ERROR_ALREADY_EXISTS, "the root already exists", new_path)
        if existing is not None:
            if existing[1] is target[1]:
                return
            raise CimError(ERROR_ALREADY_EXISTS, "the new link's name already exists", new_path)
        self._link(parent, key, parts[-1], target[1])

    def delete(self, path: str) -> None:
        """``CimDeletePath``: a file, one hard link, a directory with its contents, or ``file:stream``."""
        self._check_open()
        parent, key, existing, stream, parts = self._find(path, allow_stream=True)
        if existing is None:
            raise CimError(ERROR_FILE_NOT_FOUND, "no such file or directory", path)
        if stream is not None:
            node = existing[1]
            streams = self._streams(node)
            if streams.pop(self._folder.key(stream), None) is None:
                raise CimError(ERROR_FILE_NOT_FOUND, f"no alternate stream {stream!r}", path)
            node.dirty = True
            return
        if parent is None:
            raise CimError(E_INVALIDARG, "the root cannot be deleted", path)
        self._unlink(parent, key)

    def _link(self, parent: _Node, key: str, name: str, node: _Node) -> None:
        self._children(parent)[key] = (name, node)
        node.nlink += 1
        parent.dirty = True

    def _unlink(self, parent: _Node, key: str) -> None:
        self._dir_cache.clear()  # a cached directory may be the one going away, or below it
        name, node = self._children(parent).pop(key)
        node.nlink -= 1
        parent.dirty = True

    # ------------------------------------------------------------ layers converted on their own
    def tombstone(self, path: str) -> None:
        """``CimTombstoneFile``: ``path`` is deleted from the layers below when
        images are merged.  [choice] Stored as a zero-length file with the WCI
        tombstone reparse point (as container layers mark deletions on NTFS);
        what this image had at ``path`` goes.  Missing parent directories are
        made parent-only (:meth:`make_parent_only`), so they change nothing below."""
        self._check_open()
        parts, _ = split_path(path)
        if not parts:
            raise CimError(E_INVALIDARG, "the root cannot be tombstoned", path)
        self._parent_only_parents(parts, path)
        if self.exists(path):
            self.delete(path)
        self._create(path, FileMetadata(reparse_data=ntfs.pack_tombstone_reparse()))

    def _parent_only_parents(self, parts: list[str], path: str) -> None:
        for i in range(1, len(parts)):
            sub = join_path(parts[:i])
            if self.is_dir(sub):
                continue
            if self.exists(sub):
                raise CimError(ERROR_PATH_NOT_FOUND, f"parent {sub!r} is not a directory", path)
            self.mkdir(sub)
            self.make_parent_only(sub)

    def merge_link(self, new_path: str, existing_path: str) -> None:
        """``CimCreateMergeLink``: ``new_path`` becomes a hard link to what
        ``existing_path`` is in the layers below once images are merged.
        [choice] Stored as a zero-length file with a cimfs merge marker
        reparse point (``layout.ntfs.IO_REPARSE_TAG_CIMFS_MERGE``) holding the
        target path; missing parent directories are made parent-only."""
        self._check_open()
        target, stream = split_path(existing_path)
        if not target:
            raise CimError(E_ACCESSDENIED, "the root cannot be hard-linked", existing_path)
        parts, _ = split_path(new_path)
        if not parts:
            raise CimError(ERROR_ALREADY_EXISTS, "the root already exists", new_path)
        self._parent_only_parents(parts, new_path)
        if self.exists(new_path):
            raise CimError(ERROR_ALREADY_EXISTS, "the new link's name already exists", new_path)
        self._create(new_path, FileMetadata(reparse_data=ntfs.pack_merge_link_reparse(join_path(target))))

    def make_opaque(self, path: str) -> None:
        """Mark directory ``path`` opaque: when images are merged it replaces the
        directory of the layers below instead of merging with it (an overlay
        ``.wh..wh..opq``).  [choice] The directory carries a cimfs merge marker
        reparse point, so it cannot have a reparse point of its own."""
        self._mark_dir(path, ntfs.MERGE_DIR_OPAQUE)

    def make_parent_only(self, path: str) -> None:
        """Mark directory ``path`` as only a parent of this image's entries:
        when images are merged, the metadata of a directory of the layers below
        at that path stays (a layer tar that lists ``a/b`` but not ``a/``)."""
        self._mark_dir(path, ntfs.MERGE_DIR_PARENT_ONLY)

    def _mark_dir(self, path: str, flag: int) -> None:
        self._check_open()
        _, _, existing, _, _ = self._find(path)
        if existing is None or not existing[1].is_dir:
            raise CimError(ERROR_PATH_NOT_FOUND, "no such directory", path)
        node = existing[1]
        self._children(node)
        record = _unpacked(node.record)
        if record.reparse_offset and record.reparse_tag != ntfs.IO_REPARSE_TAG_CIMFS_MERGE:
            raise CimError(E_INVALIDARG, "a directory with a reparse point of its own cannot carry a merge marker", path)
        # The flags it has so far, unless new metadata replaced the marker since.
        flags = self._merge_dir_flags.get(node, 0) if record.reparse_offset else 0
        flags = self._merge_dir_flags[node] = flags | flag
        marker = cim.pack_blob(ntfs.pack_merge_dir_reparse(flags))
        node.record = record._replace(reparse_offset=self._store.put_blob(marker),
                                      reparse_tag=ntfs.IO_REPARSE_TAG_CIMFS_MERGE)
        node.dirty = True

    # ------------------------------------------------------------ Pythonic conveniences
    def exists(self, path: str) -> bool:
        try:
            parent, key, existing, stream, _ = self._find(path, allow_stream=True)
        except CimError as e:
            if e.hresult in (ERROR_PATH_NOT_FOUND, ERROR_FILE_NOT_FOUND):
                return False
            raise
        if existing is None:
            return False
        return stream is None or self._folder.key(stream) in self._streams(existing[1])

    def is_dir(self, path: str) -> bool:
        try:
            _, _, existing, _, _ = self._find(path)
        except CimError:
            return False
        return existing is not None and existing[1].is_dir

    def mkdir(self, path: str, metadata: FileMetadata | None = None, *, exist_ok: bool = False, parents: bool = False) -> None:
        meta = metadata or FileMetadata()
        if not meta.is_dir:
            meta = dataclasses.replace(meta, attributes=meta.attributes | FileAttributes.DIRECTORY)
        if parents:
            parts, _ = split_path(path)
            for i in range(1, len(parts)):
                if not self.is_dir(join_path(parts[:i])):
                    self.mkdir(join_path(parts[:i]), FileMetadata(attributes=FileAttributes.DIRECTORY))
        _, _, existing, _, _ = self._find(path)  # one look-up: importers make thousands of directories
        if existing is not None:
            if exist_ok and existing[1].is_dir and metadata is None:
                return
            if not exist_ok:
                raise CimError(ERROR_ALREADY_EXISTS, "already exists", path)
        self._create(path, meta)  # create_file() and close() without a StreamWriter: a directory has no contents

    def add_file(self, path: str, data: "bytes | BinaryIO | os.PathLike" = b"", metadata: FileMetadata | None = None) -> None:
        """Add a file from bytes, a binary file object (read to its end) or a
        local file given by path (``os.PathLike``; not a symlink).

        Regular files are copied by the writer's data process (or data
        thread): a read error or a vanished source is reported by a later
        call or by :meth:`commit`, naming ``path``.  ``metadata.file_size``, when set, is how many
        bytes to take (a source that turns out shorter is an error)."""
        meta = metadata or FileMetadata()
        if meta.is_dir:
            raise CimError(E_INVALIDARG, "use mkdir() for directories", path)
        if isinstance(data, os.PathLike):
            self._add_local_file(path, os.fspath(data), meta)
            return
        if isinstance(data, (bytes, bytearray, memoryview)):
            if not meta.file_size and not len(data):
                self._create(path, meta, placeholder=True)  # an empty file: its record is final, packed at once
                return
            if not meta.file_size:
                meta = dataclasses.replace(meta, file_size=len(data))
            with self.create_file(path, meta) as s:
                s.write(data)
            return
        if not meta.file_size:
            size = _size_of(data)
            if size is None:
                data = data.read()
                self.add_file(path, data, dataclasses.replace(meta, file_size=len(data)))
                return
            meta = dataclasses.replace(meta, file_size=size)
        # Not in a consistent image: the data thread would number its regions
        # in whatever order it and this thread get to them.
        fd = _regular_file_fd(data) if meta.file_size > SMALL_DATA_MAX and not self.consistent else None
        if fd is not None:
            self._add_file_async(path, meta, data, fd)
            return
        with self.create_file(path, meta) as s:
            _copy_into(data, s)

    def add_local_files(self, directory: str, files: list) -> None:
        """Add regular local files to the existing ``directory``: each of
        ``files`` is ``(name, source path, metadata)``, ``metadata.file_size``
        the bytes to take.  The same as ``add_file(directory\\name,
        pathlib.Path(source), metadata)`` for each, errors included, but the
        directory is looked up once and new names take a short path: an
        importer makes one call per source directory."""
        if not files:
            return
        prefix = directory.replace("/", "\\") + "\\" if directory else ""
        # Names are checked below (at most MAX_NAME_UNITS each): a directory
        # this deep sends every file through the checked path, which measures it.
        long_prefix = len(prefix) + MAX_NAME_UNITS > _PATH_CHECK_FROM
        process = self._process or self._start_copier()
        if process is None or process.done or self._closed or self._committed or self._open_stream is not None:
            for name, src, meta in files:
                self._add_local_file(prefix + name, os.fsdecode(src), meta)
            return
        if process.failed():
            self._finish_copies()  # raises the copy's error now, not at commit
        dir_key = directory.replace("/", "\\")
        parent = self._dir_cache.get(dir_key)
        if parent is None:
            _, _, found, _, _ = self._find(directory)
            if found is None or not found[1].is_dir:
                raise CimError(ERROR_PATH_NOT_FOUND, "no such directory", directory)
            parent = found[1]
            self._cache_dir(dir_key, parent)
        children = self._children(parent)
        parent.dirty = True  # before the first link: a failure midway must not leave linked nodes unwritten
        key_of = self._folder.key
        record_for = self._record_for
        submit = process.submit
        cwd = None
        for name, src, meta in files:
            size = meta.file_size
            if type(src) is not str:
                src = os.fsdecode(src)
            key = key_of(name) if type(name) is str else None
            if (key is None or key in children or long_prefix or not name_is_valid(name) or type(size) is not int
                    or not 0 < size <= cim.MAX_STREAM_LENGTH or meta.attributes & 0x10):
                self._add_local_file(prefix + name, src, meta)  # replacing, an error, an empty file: the checked path
                continue
            node = _Node(record_for(meta, prefix + name, None, True), is_dir=False)
            children[key] = (name, node)
            node.nlink = 1
            if src[:1] != "/":  # the process opens it later: the caller may chdir meanwhile
                cwd = cwd or os.getcwd()
                src = os.path.join(cwd, src)
            submit(node, src, size)

    def _start_copier(self):
        """The data processes for local files, forked at the first one (None:
        this process copies them).  A consistent image always has a copier:
        its lanes decide where contents go (in-process when nothing can be
        forked), whatever copies them."""
        n = self._use_process
        if n and DataProcess.available():
            self._process = DataProcess(self._store, None if n is True else int(n))
        elif self.consistent:
            self._process = LocalCopier(self._store)
        return self._process

    def _add_file_async(self, path: str, meta: FileMetadata, src, fd: int) -> None:
        """The contents of a regular file go through the data pump; the node
        gets its stream when the copy is done (at the latest before commit)."""
        pos = src.tell()
        self._submit(path, meta, os.dup(fd), pos)
        src.seek(pos + meta.file_size)

    def _add_local_file(self, path: str, src, meta: FileMetadata) -> None:
        if isinstance(src, bytes):
            src = os.fsdecode(src)
        if not meta.file_size:
            try:
                st = os.lstat(src)
            except OSError as e:
                raise CimError(hresult_from_oserror(e), f"cannot stat the source {src!r}: {e.strerror}", path) from None
            if not stat.S_ISREG(st.st_mode):
                raise CimError(E_INVALIDARG, f"source {src!r} is not a regular file", path)
            if not st.st_size:
                self.create_file(path, meta).close()
                return
            meta = dataclasses.replace(meta, file_size=st.st_size)
        if self._process is None:
            self._start_copier()
        if self._process is not None and not self._process.done:
            if self._process.failed():
                self._finish_copies()  # raises the copy's error now, not at commit
            node, size = self._create_copied(path, meta)
            if src[:1] != "/":  # the process opens it later: the caller may chdir meanwhile (POSIX: fork)
                src = os.path.join(os.getcwd(), src)
            self._process.submit(node, src, size)
        elif meta.file_size <= SMALL_DATA_MAX:
            # No data process: a thread would only contend for the GIL over a small file.
            fd = open_source(src, path)
            try:
                data = read_exactly(fd, 0, meta.file_size, path)
            finally:
                os.close(fd)
            self.add_file(path, data, meta)
        else:
            self._submit(path, meta, src, 0)

    def _create_copied(self, path: str, meta: FileMetadata) -> tuple[_Node, int]:
        """A new file whose contents a data thread or process copies later:
        until then its stream is a placeholder of the right size (reads as
        zeros), and its record is kept packed."""
        return self._create(path, meta, placeholder=True)

    def _submit(self, path: str, meta: FileMetadata, source: int | str, pos: int) -> None:
        """A file whose contents the data pump copies from ``source``; until it
        has, its stream reads as zeros (the pump is drained before commit)."""
        if self.consistent:
            # No data thread: it would number its regions in whatever order
            # it and this thread get to them.
            self._copy_now(path, meta, source, pos)
            return
        try:
            self._check_pump()
            node, size = self._create_copied(path, meta)
        except BaseException:
            if isinstance(source, int):
                os.close(source)
            raise
        if self._pump is None:
            self._pump = DataPump(self._store)
        self._pump.submit(node, source, pos, size, path)

    def _copy_now(self, path: str, meta: FileMetadata, source: int | str, pos: int) -> None:
        fd = source
        try:
            if not isinstance(fd, int):
                fd = open_source(source, path)
            with self.create_file(path, meta) as s:
                done = 0
                while done < s.size:
                    chunk = read_exactly(fd, pos + done, min(s.size - done, 1 << 20), path)
                    s.write(chunk)
                    done += len(chunk)
        finally:
            if isinstance(fd, int):
                os.close(fd)

    def _check_pump(self) -> None:
        if self._pump is not None and self._pump.error is not None:
            self._drain()

    def _drain(self) -> None:
        if self._pump is not None:
            self._pump.drain()

    def _finish_copies(self) -> None:
        """Every file's contents in place: the data thread drained, the data process finished."""
        self._drain()
        if self._process is not None and not self._process.done:
            # Records get these offsets as the commit writes its file tables
            # (the serial tail of a commit: no per-file record copy here).
            self._copied = self._process.finish(self._path_of)

    def add_stream(self, path: str, data: bytes | BinaryIO) -> None:
        """Add an alternate stream ``file:stream`` from bytes or a file object."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = data.read()
        with self.create_stream(path, len(data)) as s:
            s.write(data)

    # ------------------------------------------------------------ commit
    def commit(self) -> str:
        """Write the image (crash-safely) and return the ``.cim`` path."""
        self._check_open(committing=True)
        try:
            try:
                self._drain()  # the data thread sets records; the commit patches them next
                with paused_gc():
                    self._commit(self._build_merged() if self._build_merged is not None else None)
            except PermissionError as e:
                raise CimError(E_ACCESSDENIED, e.strerror or "permission denied", e.filename or self.path) from None
            except OSError as e:
                if isinstance(e, CimError):
                    raise
                raise CimError(hresult_from_oserror(e), f"commit failed: {e.strerror or e}", e.filename or self.path) from None
        except BaseException as e:
            self._commit_error = str(e) or type(e).__name__
            raise
        self._committed = True
        return self.path

    def _commit(self, merged: tuple[list, int] | None = None) -> None:
        """``merged``: (the sources' region sets, the upcase table's offset) of a merged image."""
        if self._process is not None:
            # The last files' batches go out before the tables are packed: a
            # data process that had caught up would wait for them meanwhile.
            self._process.end_input()
        ImageCommit(self.directory, self.name, root=self._root, base=self._base, store=self._store,
                    extending=self.extending, sync=self._sync).run(self._copies_done, merged)

    def _copies_done(self) -> list:
        """Wait for the contents still being copied; per data process, (nodes, RegionOffsets)."""
        self._finish_copies()
        copied, self._copied = self._copied, []
        return copied

    # ------------------------------------------------------------ close
    def _release(self) -> None:
        # The loaded tree goes now, not with the handle: a caller may keep the
        # handle (stats()), and while the cyclic GC is paused (paused_gc) the
        # nodes are freed by reference counting instead of all being scanned
        # by the first collection after it (~60 ms for 60 000 files).
        self._root = None
        self._dir_cache = {}
        self._base_nodes = {}
        self._copied = []
        if self._base is not None:
            self._base.close()
            self._base = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def close(self) -> None:
        """Free the handle; uncommitted changes (and their region files) are discarded."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._pump is not None:
                self._pump.stop()
                self._pump = None
            if self._process is not None and not self._process.done:
                self._process.abandon()  # before its region files are removed
            if not self._committed and self._store is not None:
                self._store.abandon()
        finally:
            self._release()

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with paused_gc():  # commit and free the tree in one pause (see _release)
            try:
                if exc_type is None and not self._committed and not self._closed:
                    if self._open_stream is not None:
                        self._open_stream.close()
                    self.commit()
            finally:
                self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    # ------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Bytes callers stored, bytes written after dedup, region files.
        Before commit this waits for the contents still being copied."""
        if not self._committed and not self._closed:
            self._finish_copies()
        s = self._store
        return {"bytes_logical": s.bytes_logical, "bytes_stored": s.bytes_stored, "region_files": s.region_count()}


def _regular_file_fd(f) -> int | None:
    try:
        fd = f.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _size_of(f) -> int | None:
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size - f.tell()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        pos = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return end - pos
    except (AttributeError, OSError, ValueError):
        return None


def _copy_into(src, stream: StreamWriter) -> None:
    remaining = stream.size
    buf = bytearray(min(remaining, 1 << 20) or 1)
    view = memoryview(buf)
    readinto = getattr(src, "readinto", None)
    while remaining:
        want = min(remaining, len(buf))
        if readinto is not None:
            n = readinto(view[:want])
            chunk = view[:n] if n else b""
        else:
            chunk = src.read(want)
            n = len(chunk)
        if not n:
            raise CimError(E_INVALIDARG, f"source ended {remaining} bytes before the declared size", stream.path)
        stream.write(chunk)
        remaining -= n


def create(containing_dir: str | os.PathLike, name: str, base: str | os.PathLike | None = None, *, sync: bool = True,
           data_process: bool | int = True, consistent: bool = False, clamp_time: int | None = None) -> ImageWriter:
    """A writer for the image ``name`` in ``containing_dir``; with ``base`` a fork
    of that image (or its extension when ``base == name``).  As a context
    manager it commits on a clean exit and discards everything on an exception.

    ``base`` is a name in ``containing_dir`` (a path to it is accepted): a fork
    shares its parent's region files, so both live in one directory.

    Local files added by path are copied by a forked data process (when the
    caller runs no other thread); ``data_process=False`` copies them in this
    process instead, an int sets how many processes.

    ``consistent=True`` (``CONSISTENT_CIM``): the same calls give the same
    files, byte for byte and by name, however the contents are copied.
    ``clamp_time`` (FILETIME) caps every time stored (``SOURCE_DATE_EPOCH``).
    """
    if base is not None:
        base = os.fspath(base)
        if os.path.dirname(base):
            if os.path.abspath(os.path.dirname(base)) != os.path.abspath(os.fspath(containing_dir)):
                raise CimError(E_INVALIDARG, "a fork's parent must be in the same directory as the fork", base)
            base = os.path.basename(base)
    return ImageWriter(containing_dir, name, base, sync=sync, data_process=data_process, consistent=consistent,
                       clamp_time=clamp_time)
