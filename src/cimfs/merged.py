"""Merged images (``CimAddFsToMergedImage``): one format-2 ``.cim`` over several.

A merged image lists the region sets of all its sources (one directory, so
every region file is found by name) and holds only metadata of its own: new
file tables, link tables and stream tables whose RegionOffsets are renumbered
into the merged image's combined region list.  No file contents are copied.

The layers are applied base first, like importing them as a fork chain:
a directory merges with the one below it (its metadata from the upper layer),
anything else replaces what was below, a tombstone removes the name (and
everything below it), an opaque directory replaces the lower directory
instead of merging, and a merge link becomes a hard link to what its target
path is once the layers below are merged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import reader as _reader
from .errors import E_INVALIDARG, E_NOTIMPL, ERROR_FILE_NOT_FOUND, CimError, CimFormatError
from .layout import cim, ntfs
from .names import split_path
from .writer import ImageWriter, _Node

_DIR_STREAM = cim.Stream(0, 0, cim.STREAM_TYPE_LINK_TABLE)

# CimAddFsToMergedImage2 flags (hcsshim pkg/cimfs)
MERGE_FLAG_SINGLE_FILE = 0x1
MERGE_FLAG_BLOCK_DEVICE = 0x2
MERGE_FLAG_VERIFIED = 0x4


def check_merge_flags(flags: int, path: str) -> None:
    """Single-file, block and verified merges have no public layout: refused."""
    if not isinstance(flags, int) or flags < 0:
        raise CimError(E_INVALIDARG, f"merge flags {flags!r} are not a flag set", path)
    unknown = flags & ~(MERGE_FLAG_SINGLE_FILE | MERGE_FLAG_BLOCK_DEVICE | MERGE_FLAG_VERIFIED)
    if unknown:
        raise CimError(E_INVALIDARG, f"unknown merge flags {unknown:#x}", path)
    if flags:
        raise CimError(
            E_NOTIMPL,
            f"merge flags {flags:#x} (single-file, block device or verified CIMs): their "
            "on-disk layout is not public, so cimfs writes only format-2 merged images",
            path,
        )


def merged_region_sets(images: list) -> tuple[list[cim.RegionSet], list[list[int]]]:
    """The merged image's parent region sets (``images`` top first) and, per
    image, its combined region indexes in the merged list.  Sets shared by
    several sources (a fork chain) are listed once; the base's sets come first,
    so the base's own offsets keep their values."""
    sets: list[cim.RegionSet] = []
    first: dict = {}  # set id -> (first combined index, count)
    total = 0
    for img in reversed(images):
        for rs in img.region_sets:
            known = first.get(rs.id)
            if known is None:
                first[rs.id] = (total, rs.count)
                sets.append(rs)
                total += rs.count
            elif known[1] != rs.count:
                raise CimFormatError(
                    f"region set {rs.id} is listed with {rs.count} and {known[1]} region files", img.path
                )
    if total + 1 > cim.MAX_REGIONS:
        raise CimError(
            E_INVALIDARG,
            f"the sources list {total} region files; a merged image holds at most {cim.MAX_REGIONS - 1} of theirs",
            images[0].path,
        )
    mappings = []
    for img in images:
        mapping: list[int] = []
        for rs in img.region_sets:
            start = first[rs.id][0]
            mapping.extend(range(start, start + rs.count))
        mappings.append(mapping)
    return sets, mappings


def _descends(img: _reader.Image, lower: _reader.Image) -> bool:
    """Whether ``img`` already holds ``lower``'s whole tree: it is a fork of it
    (or of a fork of it), or a merged image over it.  Either lists every
    region set of ``lower`` among its parent sets."""
    return set(lower.region_sets) <= set(img.region_sets[:-1])


class Merger:
    """Builds the tree of a merged image in an :class:`~cimfs.writer.ImageWriter`
    that has no changes of its own; :meth:`run` returns its parent region sets
    and the RegionOffset of the upcase table it shares with the top source."""

    def __init__(self, writer: ImageWriter, sources: list[str]) -> None:
        self.w = writer
        self.sources = sources  # top first
        assert writer._store is not None  # made by ImageWriter.__init__, kept until commit
        self.store = writer._store

    def run(self) -> tuple[list[cim.RegionSet], int]:
        images = []
        try:
            for path in self.sources:
                images.append(_reader.Image(path))
            sets, mappings = merged_region_sets(images)
            self.store.first_combined = sum(rs.count for rs in sets)
            top = images[0]
            self.w._folder = top._folder  # the merged image sorts with the table it shares
            self.key = self.w._folder.key
            upcase = self._remap(top.filesystem.upcase_offset, mappings[0], top, "upcase table")
            applied: list[_reader.Image] = []
            for img, mapping in reversed(list(zip(images, mappings))):
                if applied and all(_descends(img, lower) for lower in applied):
                    # A fork (or a merged image) already holds the whole tree of the
                    # images below it (their deletions are absent names, not
                    # tombstones): it replaces what they gave instead of lying over it.
                    self._reset_root()
                self._apply(img, mapping)
                applied.append(img)
            return sets, upcase
        finally:
            for img in images:
                img.close()

    def _reset_root(self) -> None:
        root = _Node(cim.FileRecord(stream=_DIR_STREAM))
        root.nlink = 1
        self.w._root = root

    # ------------------------------------------------------------ offsets
    def _remap(self, ro: int, mapping: list[int], img: _reader.Image, what: str) -> int:
        if not ro:
            return 0
        index, off = cim.split_region_offset(ro)
        if index >= len(mapping):
            raise CimFormatError(f"{what}: region index {index} out of range ({len(mapping)} region files)", img.path)
        return cim.region_offset(mapping[index], off)

    def _stream(self, s: cim.Stream, mapping: list[int], img: _reader.Image, what: str) -> cim.Stream:
        if s.length == 0:
            return cim.EMPTY_STREAM
        if s.sparse:
            return s._replace(offset=0)
        if s.type == cim.STREAM_TYPE_PE_IMAGE:
            pe = img._pe_image(s)
            raw = img._bytes(s.offset, cim.pe_image_object_size(len(pe.mappings)), what)
            moved = cim.pe_image_with_data_offset(raw, self._remap(pe.data_offset, mapping, img, what))
            return s._replace(offset=self.store.put(cim.REGION_METADATA, moved))
        return s._replace(offset=self._remap(s.offset, mapping, img, what))

    def _record(
        self,
        img: _reader.Image,
        fid: int,
        rec: cim.FileRecord,
        mapping: list[int],
        is_dir: bool,
        drop_reparse: bool = False,
    ) -> cim.FileRecord:
        """``rec`` with its offsets in the merged image's region list, no stream
        table and no parent yet (both set at commit)."""
        what = f"FileID {fid}"
        sd, ea, rp = rec.security_descriptor_offset, rec.ea_offset, rec.reparse_offset
        if drop_reparse:
            rp = 0
        if sd or ea or rp:
            remap = self._remap
            sd, ea, rp = remap(sd, mapping, img, what), remap(ea, mapping, img, what), remap(rp, mapping, img, what)
        stream = _DIR_STREAM if is_dir else self._stream(rec.stream, mapping, img, what)
        return cim.FileRecord(
            rec.flags,
            rec.ea_length,
            0 if drop_reparse else rec.reparse_tag,
            rec.creation_time,
            rec.last_write_time,
            rec.change_time,
            rec.last_access_time,
            stream,
            sd,
            ea,
            rp,
            0,
            0,
        )

    def _file_node(self, img: _reader.Image, fid: int, rec: cim.FileRecord, mapping: list[int]) -> _Node:
        record = self._record(img, fid, rec, mapping, False)
        if not rec.stream_table_offset:
            # packed at once: the commit places it as it is (as an import's new files)
            return _Node(cim.pack_file_record(record), is_dir=False)
        node = _Node(record, is_dir=False)
        names, streams = img._stream_table(fid)
        what = f"alternate stream of FileID {fid}"
        node.streams = {self.key(n): (n, self._stream(s, mapping, img, what)) for n, s in zip(names, streams)}
        return node

    # ------------------------------------------------------------ tree
    def _marker(self, img: _reader.Image, rec: cim.FileRecord, path: str) -> tuple[int, str | int] | None:
        if rec.reparse_tag != ntfs.IO_REPARSE_TAG_CIMFS_MERGE or not rec.reparse_offset:
            return None
        try:
            marker = ntfs.parse_merge_reparse(img._blob(rec.reparse_offset, f"reparse buffer of {path}"))
        except CimFormatError as e:
            raise CimFormatError(f"{path}: {e.strerror}", img.path) from None
        if marker is not None and (marker[0] == ntfs.MERGE_KIND_DIR) != rec.is_dir:
            what = "a directory marker on a file" if not rec.is_dir else "a merge link marker on a directory"
            raise CimFormatError(f"{path}: {what}", img.path)
        return marker

    def _apply(self, img: _reader.Image, mapping: list[int]) -> None:
        root = self.w._root
        root_rec = img.record(img.root_id)
        root.record = self._record(img, img.root_id, root_rec, mapping, True)
        key = self.key
        files: dict[int, _Node] = {}  # FileID in this layer -> node (its hard links share it)
        links = []
        made_for_children = []  # (parent, key, node): parent-only directories nothing below had
        seen = {img.root_id}
        stack = [(img.root_id, root, "")]
        while stack:
            dir_id, dir_node, dir_path = stack.pop()
            children = dir_node.children
            assert children is not None  # only directories are stacked
            for name, fid in img.scandir(dir_id):
                path = f"{dir_path}\\{name}" if dir_path else name
                rec = img.record(fid)
                k = key(name)
                old = children.get(k)
                if rec.reparse_tag == ntfs.IO_REPARSE_TAG_WCI_TOMBSTONE and not rec.is_dir:
                    if old is not None:
                        self._unlink(dir_node, k)
                    continue
                marker = self._marker(img, rec, path)
                if marker is not None and marker[0] == ntfs.MERGE_KIND_LINK:
                    target = marker[1]
                    assert isinstance(target, str)  # a link marker holds its target's path
                    links.append((dir_node, k, name, target, path))
                    continue
                if rec.is_dir:
                    if fid in seen:
                        raise CimFormatError(f"{path}: directory FileID {fid} is reached twice (a cycle)", img.path)
                    seen.add(fid)
                    flags = marker[1] if marker is not None else 0
                    assert isinstance(flags, int)  # _marker lets only a directory marker (its flags) onto a directory
                    record = self._record(img, fid, rec, mapping, True, drop_reparse=marker is not None)
                    lower = old[1] if old is not None and old[1].is_dir else None
                    parent_only = bool(flags & ntfs.MERGE_DIR_PARENT_ONLY)
                    if lower is not None and not flags & ntfs.MERGE_DIR_OPAQUE:
                        node = lower
                        if not parent_only:  # else the lower directory's metadata and name stay
                            node.record = record
                            children[k] = (name, node)  # the name's case follows the upper layer
                    else:
                        if old is not None:
                            self._unlink(dir_node, k)
                        if parent_only and lower is not None and old is not None:  # (lower is old's node)
                            node = _Node(lower.record, is_dir=True)  # opaque, with the lower one's metadata
                            self._link(dir_node, k, old[0], node)
                        else:
                            node = _Node(record, is_dir=True)
                            self._link(dir_node, k, name, node)
                            if parent_only:
                                made_for_children.append((dir_node, k, node))
                    stack.append((fid, node, path))
                    continue
                file_node = files.get(fid)
                if file_node is None:
                    file_node = files[fid] = self._file_node(img, fid, rec, mapping)
                if old is not None:
                    self._unlink(dir_node, k)
                self._link(dir_node, k, name, file_node)
        for dir_node, k, name, target, path in links:
            found = self._lookup(target)
            if found is None or found.is_dir:
                what = "is not in the layers below" if found is None else "is a directory"
                raise CimError(
                    ERROR_FILE_NOT_FOUND if found is None else E_INVALIDARG,
                    f"merge link '{path}': its target '{target}' {what}",
                    img.path,
                )
            if dir_node.children and dir_node.children.get(k) is not None:
                self._unlink(dir_node, k)
            self._link(dir_node, k, name, found)
        # A parent-only directory the layers below did not have exists for its
        # entries; one left with none (it held only tombstones) goes, as a
        # fork chain would never have made it.  Children come after parents.
        for dir_node, k, node in reversed(made_for_children):
            if not node.children and dir_node.children and dir_node.children.get(k, (None, None))[1] is node:
                self._unlink(dir_node, k)

    def _lookup(self, path: str) -> _Node | None:
        parts, _ = split_path(path, strict=False)
        node = self.w._root
        for part in parts:
            if node.children is None:
                return None
            entry = node.children.get(self.key(part))
            if entry is None:
                return None
            node = entry[1]
        return node

    def _link(self, dir_node: _Node, k: str, name: str, node: _Node) -> None:
        assert dir_node.children is not None  # a directory's
        dir_node.children[k] = (name, node)
        node.nlink += 1

    def _unlink(self, dir_node: _Node, k: str) -> None:
        assert dir_node.children is not None  # a directory's
        _, node = dir_node.children.pop(k)
        node.nlink -= 1


def source_path(directory: str, path: str | os.PathLike[str]) -> str:
    """A merge source as a path in the merged image's directory (a bare name or a path)."""
    p = os.fspath(path)
    full = os.path.abspath(p if os.path.dirname(p) else os.path.join(directory, p))
    if os.path.dirname(full) != os.path.abspath(directory):
        raise CimError(
            E_INVALIDARG,
            "a merge source must be in the merged image's directory (its region files are shared by name)",
            full,
        )
    if not os.path.isfile(full):
        raise CimError(ERROR_FILE_NOT_FOUND, "merge source image not found", full)
    return full


def add_source(writer: ImageWriter, path: str | os.PathLike, flags: int = 0) -> None:
    """``CimAddFsToMergedImage2``: add a source image (in the writer's
    directory) to the merged image ``writer`` makes; sources added first win
    (top layer first).  The writer builds the merged tree at commit."""
    writer._check_open(committing=True)
    check_merge_flags(flags, os.fspath(path))
    if writer._base is not None or writer._root.children or writer._root.streams:
        raise CimError(E_INVALIDARG, "only a new image without changes can be a merged image", writer.path)
    full = source_path(writer.directory, path)
    if full == writer.path or full in writer._merge_sources:
        raise CimError(E_INVALIDARG, "an image is added to a merged image at most once, and not to itself", full)
    writer._merge_sources.append(full)
    writer._build_merged = Merger(writer, writer._merge_sources).run


def merge(
    containing_dir: str | os.PathLike[str],
    name: str,
    sources: Sequence[str | os.PathLike[str]],
    *,
    sync: bool = True,
    consistent: bool = True,
) -> str:
    """Write the merged image ``name`` of ``sources`` (``.cim`` names or paths in
    ``containing_dir``, top layer first); returns its path.  ``consistent``
    (the default): the same sources give the same files (see
    :func:`cimfs.create`)."""
    if not sources:
        raise CimError(E_INVALIDARG, "a merged image needs at least one source", os.fspath(containing_dir))
    w = ImageWriter(containing_dir, name, sync=sync, data_process=False, consistent=consistent)
    try:
        for s in sources:
            add_source(w, s)
        return w.commit()
    finally:
        w.close()
