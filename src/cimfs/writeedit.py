"""Editing the tree of an image being written: :class:`TreeEditing`, the
Win32-shaped operations of :class:`~cimfs.writer.ImageWriter` (files and
directories created or replaced, alternate streams, hard links, deletions)
and the marks of a layer converted on its own (tombstones, merge links,
opaque and parent-only directories).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    E_ACCESSDENIED,
    E_INVALIDARG,
    ERROR_ALREADY_EXISTS,
    ERROR_DIR_NOT_EMPTY,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    CimError,
)
from .layout import cim, ntfs
from .metadata import FileMetadata
from .names import join_path, split_path
from .writestream import StreamWriter
from .writetree import WriterTree, _Node, _unpacked


class TreeEditing(WriterTree):
    """The editing operations of :class:`cimfs.writer.ImageWriter` (a base class of it)."""

    if TYPE_CHECKING:  # what ImageWriter and FileAdding provide (for the type checker only)
        _open_stream: StreamWriter | None
        _merge_dir_flags: dict

        def _check_open(self, mutating: bool = True, committing: bool = False) -> None: ...
        def _drain(self) -> None: ...
        def exists(self, path: str) -> bool: ...
        def is_dir(self, path: str) -> bool: ...
        def mkdir(
            self, path: str, metadata: FileMetadata | None = None, *, exist_ok: bool = False, parents: bool = False
        ) -> None: ...

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

    def _create(
        self, path: str, meta: FileMetadata, placeholder: bool = False, found: tuple | None = None
    ) -> tuple[_Node, int]:
        """The node ``create_file`` makes or updates, and its stream's size (0
        for a directory).  ``placeholder``: see :meth:`_create_copied`;
        ``found``: what ``_find(path)`` just returned, when the caller has it."""
        self._check_open()
        is_dir = meta.is_dir
        size = 0 if is_dir else meta.file_size
        if not isinstance(size, int) or not 0 <= size <= cim.MAX_STREAM_LENGTH:
            raise CimError(E_INVALIDARG, f"file size {size} is out of range (0 to 2^48-1)", path)
        parent, key, existing, _, parts = found or self._find(path)
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

    def _update_dir(self, node: _Node, record: cim.FileRecord | bytes) -> None:
        self._children(node)
        # Metadata is replaced; children and alternate streams stay.
        old = _unpacked(node.record)
        node.record = _unpacked(record)._replace(
            stream=old.stream, parent_file_id=old.parent_file_id, stream_table_offset=old.stream_table_offset
        )
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
            raise CimError(
                E_INVALIDARG, "a directory with a reparse point of its own cannot carry a merge marker", path
            )
        # The flags it has so far, unless new metadata replaced the marker since.
        flags = self._merge_dir_flags.get(node, 0) if record.reparse_offset else 0
        flags = self._merge_dir_flags[node] = flags | flag
        marker = cim.pack_blob(ntfs.pack_merge_dir_reparse(flags))
        node.record = record._replace(
            reparse_offset=self._store.put_blob(marker), reparse_tag=ntfs.IO_REPARSE_TAG_CIMFS_MERGE
        )
        node.dirty = True
