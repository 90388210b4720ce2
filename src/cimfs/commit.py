"""Committing an image: the tree an :class:`~cimfs.writer.ImageWriter` edited, serialised and published.

This module owns everything between "the tree is final" and "the ``.cim`` is
in place": handing out FileIDs to new nodes, building link and stream tables,
packing the changed records into file tables (a fork's untouched slots keep
its parent's records), the file-table directory and the filesystem object,
finishing the region set (its consistent-mode name included, via the store),
then writing the ``.cim`` crash-safely (temporary file, fsync, link or rename,
fsync of the directory; spec §16).  It reads the writer's nodes but never edits
the tree's shape, and it packs no bytes itself: ``layout/`` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from .atomic import fsync_dir
from .errors import E_INVALIDARG, ERROR_FILE_EXISTS, CimError
from .layout import cim
from .store import ObjectStore, write_file

#: A directory's stream before its link table exists: an empty directory keeps it.
EMPTY_DIR_STREAM = cim.Stream(0, 0, cim.STREAM_TYPE_LINK_TABLE)

#: Names of the temporary file a commit writes before renaming it into place
#: (``.NAME.<12 hex digits>.tmp``).  One left by a writer killed mid-commit is
#: never an image: ``gc`` removes it.
COMMIT_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$", re.DOTALL)


def with_parent(record, parent_file_id: int):
    """A new node's record (packed or not) with its parent's FileID."""
    if isinstance(record, bytes):
        return cim.record_with(record, parent_file_id=parent_file_id)
    return record._replace(parent_file_id=parent_file_id)


class ImageCommit:
    """One commit of a writer's tree into ``directory/name``.

    ``root`` is the tree's root node (see ``writer._Node``), ``base`` the
    parent image of a fork or extension (or None), ``store`` the object store
    the contents went into.  ``copies_done()`` waits for the contents still
    being copied and returns what they became: per data process, (nodes,
    RegionOffsets of their contents).
    """

    def __init__(self, directory: str, name: str, *, root, base, store: ObjectStore, extending: bool, sync: bool):
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory, name)
        self.root = root
        self.base = base
        self.store = store
        self.extending = extending
        self.sync = sync

    def run(self, copies_done: Callable[[], list], merged: tuple[list, int] | None = None) -> None:
        """``merged``: (the sources' region sets, the upcase table's offset) of a merged image."""
        store = self.store
        base = self.base
        tables = self._file_tables(copies_done)
        if base is not None:
            upcase = base.filesystem.upcase_offset
        elif merged is not None:
            upcase = merged[1]
        else:
            upcase = store.put(cim.REGION_METADATA, cim.load_upcase_table())
        directory = cim.pack_file_table_directory(tables)
        fs = cim.FilesystemObject(
            upcase, store.put_unique(directory) if directory else 0, len(tables), self.root.file_id
        )
        fs_offset = store.put_unique(cim.pack_filesystem_object(fs))
        own = store.finish()
        parents = list(base.header.parent_sets) + [base.header.region_set] if base else []
        if merged is not None:
            parents = merged[0]
        self.publish(cim.pack_filesystem_header(own, fs_offset, parents))

    def _file_tables(self, copies_done: Callable[[], list]) -> list:
        """Every changed record packed into its file table, written to the store;
        returns the image's file table entries (a parent's for tables unchanged)."""
        store = self.store
        base = self.base
        cap = cim.FILE_TABLE_CAPACITY
        size = cim.FILE_RECORD_SIZE
        tables = list(base.file_tables) if base else []
        # File table t: (buffer of its records, which slots were written, slots used).
        pending: dict[int, tuple[bytearray, bytearray, list[int]]] = {}

        def place(node, record: bytes) -> tuple[bytearray, int]:
            """Put a record in its table's buffer; returns the buffer and the record's position."""
            t, slot = divmod(node.file_id - 1, cap)
            entry = pending.get(t)
            if entry is None:
                entry = pending[t] = (bytearray(cap * size), bytearray(cap), [0])
            buf, written, used = entry
            at = slot * size
            buf[at : at + size] = record
            written[slot] = 1
            if slot >= used[0]:
                used[0] = slot + 1
            return buf, at

        def write(node) -> None:
            """A changed node's record with its link and stream tables."""
            changes: dict[str, Any] | None = None
            # children/streams of None: a parent's directory or stream table
            # nobody touched (or a new node without alternate streams).
            if node.is_dir and node.children is not None:
                items = sorted(node.children.items())
                if items:
                    table = cim.pack_directory_table([n for _, (n, _) in items], [c.file_id for _, (_, c) in items])
                    changes = {"stream": cim.Stream(store.put_unique(table), len(table), cim.STREAM_TYPE_LINK_TABLE)}
                else:
                    changes = {"stream": EMPTY_DIR_STREAM}
            if node.streams is not None:
                items = sorted(node.streams.items())
                changes = changes or {}
                if items:
                    table = cim.pack_stream_table([n for _, (n, _) in items], [s for _, (_, s) in items])
                    changes["stream_table_offset"] = store.put_unique(table)
                else:
                    changes["stream_table_offset"] = 0
            record = node.record
            if isinstance(record, bytes):
                if changes:
                    record = cim.record_with(record, **changes)  # only a file's stream table can change here
            else:
                record = cim.pack_file_record(record._replace(**changes) if changes else record)
            place(node, record)
            node.record = None

        # One breadth-first walk hands out FileIDs to new nodes (a directory's
        # children sit together in the file tables) and packs every changed
        # record into its table's buffer, while the data processes may still
        # be copying: after them only their offsets are filled in (the serial
        # tail of a commit).  A directory is packed once its children have
        # IDs (its link table lists them).  A record moves into the buffer and
        # leaves its node: 96 bytes instead of a bytes object of 129 (a failed
        # commit poisons the handle, see ImageWriter.commit()).
        next_id = base.max_file_id() + 1 if base else 1
        root = self.root
        if not root.file_id:
            root.file_id = next_id
            next_id += 1
        queue = [root]
        root.seen = True
        set_parent = cim.set_record_parent
        last_table = -1  # the file table the last plain file went to
        buf, written, used = bytearray(), bytearray(), [0]  # its buffers: placeholders until the first place()
        for node in queue:  # grows while iterating
            children = node.children
            if children is not None:  # else a parent's directory nobody touched: nothing new below it
                parent_id = node.file_id
                for _, child in children.values():
                    if child.seen:
                        continue  # another hard link to it
                    child.seen = True
                    new = not child.file_id
                    if new:
                        child.file_id = next_id
                        next_id += 1
                    if child.is_dir and child.children is not None:
                        if new:
                            child.record = with_parent(child.record, parent_id)
                        queue.append(child)  # packed when its turn comes
                    elif child.dirty:
                        record = child.record
                        if type(record) is bytes and child.streams is None:
                            # The bulk of an import: a new file's record as it is, its parent patched
                            # in place (place() inlined while the table is the one of the last file).
                            t, slot = divmod(child.file_id - 1, cap)
                            if t == last_table:
                                at = slot * size
                                buf[at : at + size] = record
                                written[slot] = 1
                                if slot >= used[0]:
                                    used[0] = slot + 1
                            else:
                                buf, at = place(child, record)
                                last_table = t
                                _, written, used = pending[t]
                            if new:
                                set_parent(buf, at, parent_id)
                            child.record = None
                        else:
                            if new:
                                child.record = with_parent(record, parent_id)
                            write(child)
            if node.dirty:
                write(node)
        if next_id - 1 > 0xFFFFFFFF:
            raise CimError(E_INVALIDARG, "too many files for 32-bit FileIDs", self.path)
        fill = cim.fill_copied_stream
        for nodes, offsets in copies_done():  # every file's stream is final from here on
            for node, offset in zip(nodes, offsets):
                if node.file_id:  # not a file deleted again before the commit
                    t, slot = divmod(node.file_id - 1, cap)
                    fill(pending[t][0], slot * size, offset)
        for t in sorted(pending):
            buf, written, used = pending.pop(t)
            first = t * cap + 1
            base_count = tables[t].count if t < len(tables) and tables[t] is not None else 0
            total = max(base_count, used[0])
            if base_count:
                # the slots nobody changed keep the parent's records: copied in runs, not one at a time
                old = memoryview(base.raw_records(t, base_count))
                i = written.find(0, 0, base_count)
                while i >= 0:
                    j = written.find(1, i, base_count)
                    j = base_count if j < 0 else j
                    buf[i * size : j * size] = old[i * size : j * size]
                    i = written.find(0, j, base_count)
            i = written.find(0, base_count, total)
            if i >= 0:  # a slot past the parent's records that nothing wrote: raw_record says what is wrong
                base.raw_record(first + i)
            while len(tables) <= t:
                tables.append(None)
            tables[t] = cim.FileTableEntry(store.put_unique(bytes(buf[: total * size])), total, size)
        return tables

    def publish(self, data: bytes) -> None:
        """Put the ``.cim`` (``data``) in place: a new image only if its name is
        still free, an extension by replacing the old one."""
        # os.urandom, not secrets: importing secrets loads hmac (~0.6 ms of a fork's start-up) for the same bytes
        tmp = os.path.join(self.directory, f".{self.name}.{os.urandom(6).hex()}.tmp")  # see COMMIT_TEMP_NAME
        write_file(tmp, data, self.sync, exclusive=True)
        try:
            if self.extending:
                os.replace(tmp, self.path)
            else:
                try:
                    os.link(tmp, self.path)  # fails if the name appeared meanwhile
                except FileExistsError:
                    raise CimError(ERROR_FILE_EXISTS, "the new image already exists", self.path) from None
                os.unlink(tmp)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.sync:
            fsync_dir(self.directory)
