"""What an image says about itself beyond its tree: :meth:`~ImageChecks.check`
(structural findings reading paths does not surface: region headers, object
ID files, link-table order, unreachable records), the stored sizes of its
files and the :meth:`~ImageChecks.info` summary.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import CimError, CimFormatError
from .layout import cim
from .regionfile import find_region_file, read_regular

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .reader import _Directory, _FileTables, _TableList
    from .regionfile import _Region


class ImageChecks:
    """The checking and summary methods of :class:`cimfs.reader.Image` (mixed
    into it: they use its regions, records and directory walk)."""

    if TYPE_CHECKING:  # what Image provides (for the type checker only)
        path: str
        name: str
        directory: str | None
        storage: Any
        header: cim.FilesystemHeader
        version: tuple[int, int]
        region_names: list[tuple[str, int]]
        file_tables: _TableList | _FileTables
        root_id: int

        @property
        def file_count(self) -> int: ...

        def _region(self, index: int) -> _Region: ...
        def _directory(self, file_id: int) -> _Directory: ...
        def _keys(self, d: _Directory) -> list[str]: ...
        def _tree(self) -> Iterator[tuple[str, int | None, cim.FileRecord | None, str | None]]: ...

    def check(self) -> list[str]:
        """Structural findings that reading paths and files does not surface:
        region headers, object ID files, link-table order, unreachable records.
        (Reading every stream is left to the caller; see ``cimfs fsck``.)"""
        findings: list[str] = []
        for i, (name, index_in_set) in enumerate(self.region_names):
            try:
                region = self._region(i)
            except CimFormatError as e:
                findings.append(e.strerror)
                continue
            if region.index != index_in_set:
                findings.append(f"{name}: header says region index {region.index}, expected {index_in_set}")
            if region.region_type not in cim.REGION_TYPE_NAMES:
                findings.append(f"{name}: unknown region type {region.region_type}")
            oid_name = "objectid" + name[len("region") :]
            oid = self._find_file(oid_name)
            if oid is None:
                findings.append(
                    f"{oid_name}: object ID file missing (forks of this image cannot deduplicate against it)"
                )
                continue
            try:
                data = self._read_file(oid)
                table, count = cim.unpack_objectid_header(data, oid_name)
            except (OSError, CimFormatError) as e:
                findings.append(f"{oid_name}: {e.strerror or e}")
                continue
            previous = None
            for k, (length, digest, off) in enumerate(
                cim.OBJECTID_ENTRY.iter_unpack(data[table : table + count * cim.OBJECTID_ENTRY.size])
            ):
                if previous is not None and (length, digest) < previous:
                    findings.append(f"{oid_name}: entry {k} is out of (length, digest) order")
                    break
                previous = (length, digest)
                if off < cim.REGION_HEADER.size or off + length > region.size:
                    findings.append(f"{oid_name}: entry {k} ({length} bytes at {off}) lies outside {name}")
                    break
        reachable = {self.root_id}
        checked = set()
        for path, fid, rec, reason in self._tree():
            if fid is not None:
                reachable.add(fid)
            if reason is not None:
                findings.append(f"{path or '(root)'}: {reason}")
            if fid is None or rec is None or not rec.is_dir or reason is not None or fid in checked:
                continue
            checked.add(fid)
            try:
                d = self._directory(fid)
            except CimFormatError:
                continue  # _tree reports it when it lists the directory
            keys = self._keys(d)
            for j in range(1, len(keys)):
                if not keys[j - 1] < keys[j]:
                    what = "twice" if keys[j - 1] == keys[j] else "out of order"
                    findings.append(f"{path or '(root)'}: entry {d.names[j]!r} is {what} in the link table")
        try:
            keys = self._keys(self._directory(self.root_id))
            for j in range(1, len(keys)):
                if not keys[j - 1] < keys[j]:
                    findings.append(
                        f"(root): entry {self._directory(self.root_id).names[j]!r} is out of order or twice in the link table"
                    )
        except CimFormatError:
            pass
        unreachable = self.file_count - len(reachable)
        if unreachable > 0 and not self.header.parent_sets:
            # Forks legitimately leave their parent's deleted records behind.
            findings.append(f"{unreachable} file records are not reachable from the root")
        return findings

    def _find_file(self, name: str) -> str | None:
        """A file beside the ``.cim`` (local path or object path), or None."""
        if self.storage is not None:
            return self.storage.find(name)
        assert self.directory is not None  # a local image's
        return find_region_file(self.directory, name)

    def _read_file(self, path: str) -> bytes:
        if self.storage is not None:
            return self.storage.read_object(path)
        return read_regular(path, "object ID file")

    def stored_sizes(self) -> dict[str, tuple[int, int]]:
        """``{file name: (bytes, bytes allocated)}`` of the ``.cim`` and each
        region file that exists (a remote object's allocation is its size)."""
        out: dict[str, tuple[int, int]] = {}
        for name in [self.name] + [n for n, _ in self.region_names]:
            try:
                path = self._find_file(name)
                if path is None:
                    continue
                if self.storage is not None:
                    size = self.storage.size(path)
                    out[name] = (size, size)
                else:
                    st = os.stat(path)
                    out[name] = (st.st_size, st.st_blocks * 512)
            except (CimError, OSError):
                continue
        return out

    # ------------------------------------------------------------ summary
    def info(self) -> dict:
        return {
            "path": self.path,
            "version": f"{self.version[0]}.{self.version[1]}",
            "region_set": {"id": str(self.header.region_set.id), "count": self.header.region_set.count},
            "parent_region_sets": [{"id": str(p.id), "count": p.count} for p in self.header.parent_sets],
            "region_files": [n for n, _ in self.region_names],
            "file_tables": len(self.file_tables),
            "file_records": self.file_count,
            "root_file_id": self.root_id,
        }
