"""The tree of an image being written: :class:`_Node` (a file or directory,
its record kept packed once final) and :class:`WriterTree`, the
:class:`~cimfs.writer.ImageWriter` methods that reach nodes: a parent's nodes
loaded lazily, paths walked from the root or found through the cache of
directories looked up by path, and a record made from :class:`FileMetadata`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .commit import EMPTY_DIR_STREAM as _DIR_STREAM
from .errors import E_INVALIDARG, ERROR_PATH_NOT_FOUND, CimError
from .layout import cim, ntfs
from .metadata import FileMetadata
from .names import PATH_CHECK_FROM as _PATH_CHECK_FROM
from .names import check_name, check_path_length, join_path, split_path

if TYPE_CHECKING:
    from . import reader as _reader
    from .names import NameFolder
    from .store import ObjectStore


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

    __slots__ = (
        "file_id",
        "record",
        "from_base",
        "children",
        "streams",
        "dirty",
        "nlink",
        "open_stream",
        "is_dir",
        "seen",
    )

    def __init__(
        self, record: cim.FileRecord | bytes, file_id: int = 0, from_base: bool = False, is_dir: bool | None = None
    ):
        self.record = record
        self.file_id = file_id
        self.from_base = from_base
        if is_dir is None:
            is_dir = record.is_dir  # type: ignore[union-attr]  # callers that give no is_dir give a FileRecord
        self.children: dict[str, tuple[str, _Node]] | None = {} if (is_dir and not from_base) else None
        # None: no alternate streams yet (new node) or the parent's stream table, not loaded
        self.streams: dict[str, tuple[str, cim.Stream]] | None = None
        self.dirty = not from_base
        self.nlink = 0
        self.open_stream = False
        self.is_dir = is_dir  # fixed for a node's life: replacing a file by a directory makes a new node
        self.seen = False  # visited by the commit's walk (hard links reach a node more than once)


_DIR_CACHE_MAX = 1 << 16


class WriterTree:
    """The tree access of :class:`cimfs.writer.ImageWriter` (a base class of it:
    these methods use the state its ``__init__`` sets up)."""

    if TYPE_CHECKING:  # what ImageWriter sets up (for the type checker only)
        _base: _reader.Image | None  # a fork's or an extension's parent; None for a new image
        _store: ObjectStore  # from __init__ on (close() copes with a failed __init__ that made none)
        _root: _Node
        _folder: NameFolder
        _base_nodes: dict[int, _Node]
        _dir_cache: dict[str, _Node]
        _clamp_time: int | None

    # ------------------------------------------------------------ tree access
    def _base_node(self, file_id: int) -> _Node:
        node = self._base_nodes.get(file_id)
        if node is None:
            assert self._base is not None  # a parent's FileIDs come only from a parent
            node = self._base_nodes[file_id] = _Node(self._base.record(file_id), file_id, from_base=True)
        return node

    def _children(self, node: _Node) -> dict[str, tuple[str, _Node]]:
        if node.children is None:
            assert self._base is not None  # only a parent's directories are loaded lazily
            children = {}
            key = self._folder.key
            base_nodes = self._base_nodes
            entries = self._base.scandir(node.file_id)
            # the directory's records decoded in one call (Image.records), not one record() each
            records = self._base.records([e.file_id for e in entries])
            for entry, record in zip(entries, records):
                child = base_nodes.get(entry.file_id)
                if child is None:
                    child = base_nodes[entry.file_id] = _Node(record, entry.file_id, from_base=True)
                children[key(entry.name)] = (entry.name, child)
            node.children = children
        return node.children

    def _streams(self, node: _Node) -> dict[str, tuple[str, cim.Stream]]:
        if node.streams is None:
            if node.from_base:
                assert self._base is not None
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
    def _record_for(
        self, meta: FileMetadata, path: str, stream: cim.Stream | None = None, placeholder: bool = False
    ) -> cim.FileRecord | bytes:
        """The record of ``meta``; ``placeholder``: a new file whose contents
        are copied later (see :meth:`_create_copied`) or that has none, packed at once."""
        sd, ea, rp = meta.security_descriptor or b"", meta.ea_buffer or b"", meta.reparse_data or b""
        tag = 0
        if sd or rp or ea:  # all checked before any is stored
            if len(sd) > 0xFFFF or len(ea) > 0xFFFF or len(rp) > 0xFFFF:
                raise CimError(
                    E_INVALIDARG,
                    "security descriptor, EA buffer and reparse data are each limited to 65535 bytes",
                    path,
                )
            if rp:
                if len(rp) < 8:
                    raise CimError(
                        E_INVALIDARG, f"reparse data of {len(rp)} bytes is shorter than its 8-byte header", path
                    )
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
            return cim.pack_new_file_record(
                flags,
                len(ea),
                tag,
                ct,
                wt,
                cht,
                at,
                0,
                cim.placeholder_stream_word(size) if size else 0,  # 0: the empty stream
                sd_offset,
                ea_offset,
                rp_offset,
            )
        if stream is None:
            stream = _DIR_STREAM if meta.is_dir else cim.EMPTY_STREAM
        return cim.FileRecord(flags, len(ea), tag, ct, wt, cht, at, stream, sd_offset, ea_offset, rp_offset)
