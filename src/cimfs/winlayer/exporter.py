"""Exporting images as Windows layer tars: :func:`export_layer` writes a whole
image (:class:`_Exporter`, which also turns an independent layer's merge
markers back into whiteouts and hard links) or its differences from a parent
image (:class:`_DiffExporter`), atomically to a path or as a stream.
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Literal

import cimfs

from ..atomic import replacing
from ..errors import E_INVALIDARG, ERROR_INVALID_NAME, CimError, hresult_from_oserror
from ..metadata import FileAttributes
from . import hives
from .pax import (
    CHUNK,
    FILETIME_UNIX_EPOCH,
    IO_REPARSE_TAG_MOUNT_POINT,
    IO_REPARSE_TAG_SYMLINK,
    PAX_CREATIONTIME,
    PAX_EA_PREFIX,
    PAX_FILEATTR,
    PAX_MOUNTPOINT,
    PAX_RAWREPARSE,
    PAX_RAWSD,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    _ntfs,
    _progress_adapter,
    filetime_to_pax_time,
)
from .tarsource import _is_stream


# ------------------------------------------------------------------ export
class _CountingReader(io.RawIOBase):
    def __init__(self, f, report, label):
        self.f, self.report, self.label = f, report, label

    def readable(self):
        return True

    def read(self, n=-1):
        b = self.f.read(n)
        if b:
            self.report(len(b), self.label)
        return b

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


_COMPRESSION = {".gz": "gz", ".tgz": "gz", ".bz2": "bz2", ".tbz2": "bz2", ".xz": "xz", ".txz": "xz"}


def export_layer(
    image,
    out,
    progress=None,
    *,
    compression: str | None = None,
    parent=None,
    exclude: Iterable[str] = (),
    independent: bool = False,
) -> None:
    """Write ``image`` (an open :class:`cimfs.Image` or a ``.cim`` path) as a
    Windows layer tar (PAX) to ``out`` (a path, written atomically, or a
    binary file object, written as a stream).

    With ``parent`` (an image or path, normally the image ``image`` was forked
    from) only the differences are written: what is new or changed, and a
    ``.wh.<name>`` whiteout for each name the parent has and ``image`` has not,
    so that applying the tar on ``parent`` gives ``image``.  ``exclude`` names
    image paths (``\\``-separated, compared case-insensitively) left out
    with everything under them.

    ``compression`` is ``None``/``""`` (plain), ``"gz"``, ``"bz2"`` or ``"xz"``;
    for a path it defaults from the suffix (``.gz``, ``.bz2``, ``.xz``).

    ``independent``: ``image`` is a layer converted on its own
    (``import_layer(..., independent=True)``): its tombstones go out as
    whiteouts, merge links as hard link entries, opaque directories with
    ``.wh..wh..opq``, parent-only directories not at all.  (Otherwise such
    entries are written as the reparse points they are stored as.)

    A non-base layer (``parent`` given, or ``independent``) is written without
    the ``Hives\\<X>_BASE`` its import generated from its ``Hives\\<X>_DELTA``
    (:mod:`.hives`): the tar holds the layer's own files, and importing it on
    the same parent makes the same base hive again.  When that base hive
    differs from the parent's, the delta is written even if the parent has
    the same bytes.  A whole-image export keeps every file.
    """
    if independent and (parent is not None or exclude):
        raise CimError(E_INVALIDARG, "an independent layer is exported whole (no parent, nothing excluded)")
    report = _progress_adapter(progress)
    own_image = not isinstance(image, cimfs.Image)
    img = cimfs.open(image) if own_image else image
    own_parent = parent is not None and not isinstance(parent, cimfs.Image)
    try:
        lower = cimfs.open(parent) if own_parent else parent
    except BaseException:
        if own_image:
            img.close()
        raise
    exclude = frozenset(img.fold(e.replace("/", "\\").strip("\\")) for e in exclude)
    try:
        derived = hives.derived_bases(img) if lower is not None or independent else {}
    except BaseException:
        if own_image:
            img.close()
        if own_parent:
            lower.close()
        raise
    if lower is not None or exclude:

        def make(tf, rep):
            return _DiffExporter(img, tf, rep, lower, exclude, derived)
    else:

        def make(tf, rep):
            return _Exporter(img, tf, rep, independent, derived)

    try:
        if isinstance(out, (str, bytes, os.PathLike)):
            path = os.fsdecode(out)
            if compression is None:
                compression = _COMPRESSION.get(os.path.splitext(path)[1].lower(), "")
            try:
                with replacing(path) as tmp, open(tmp, "xb") as f:
                    _export(make, f, report, compression, path)
                    f.flush()
                    os.fsync(f.fileno())
            except CimError:
                raise
            except OSError as e:
                raise CimError(hresult_from_oserror(e), f"cannot write the tar: {e.strerror or e}", path) from None
        else:
            try:
                _export(make, out, report, compression or "", getattr(out, "name", "<stream>"))
            except OSError as e:
                if isinstance(e, CimError):
                    raise
                raise CimError(hresult_from_oserror(e), f"cannot write the tar: {e.strerror or e}", None) from None
    finally:
        if own_image:
            img.close()
        if own_parent:
            lower.close()


_STREAM_MODES: dict[str, Literal["w|", "w|gz", "w|bz2", "w|xz"]] = {
    "": "w|",
    "gz": "w|gz",
    "bz2": "w|bz2",
    "xz": "w|xz",
}


def _export(make_exporter, f, report, compression: str, label) -> None:
    mode = _STREAM_MODES.get(compression)
    if mode is None:
        raise CimError(E_INVALIDARG, f"unknown compression {compression!r} (gz, bz2 or xz)")
    tf = tarfile.open(fileobj=f, mode=mode, format=tarfile.PAX_FORMAT, encoding="utf-8")
    # Only a complete export gets its end-of-archive blocks: a reader of a
    # failed export (a pipe, say) sees a truncated tar, not a shorter valid one.
    try:
        make_exporter(tf, report).run()
    except BaseException:
        # Abandon the tar without its end blocks (and without tarfile's
        # flush-on-garbage-collection writing into a closed file later).
        tf.closed = True  # type: ignore[attr-defined]  # set by TarFile.__init__; typeshed leaves it out
        if _is_stream(tf):
            tf.fileobj.closed = True  # type: ignore[attr-defined]  # a tarfile._Stream, whose .closed typeshed does not know
        raise
    tf.close()


class _Exporter:
    def __init__(self, img, tf: tarfile.TarFile, report, independent: bool = False, derived=None):
        self.img, self.tf, self.report = img, tf, report
        self.independent = independent
        self.first_name: dict[int, str] = {}
        # folded paths of generated base hives (left out) -> their delta's parts
        self.derived: dict[str, list[str]] = derived or {}

    def run(self) -> None:
        """Pre-order: each directory right before its children, children in image order."""
        img = self.img
        seen_dirs = {img.root_id}
        stack: list[tuple[list[str], Iterator[cimfs.DirEntry]]] = [([], iter(img.scandir(img.root_id)))]
        while stack:
            parts, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            cparts = parts + [entry.name]
            if self.derived and img.fold("\\".join(cparts)) in self.derived:
                continue
            st = img.stat(entry.file_id)
            self._write("entry", cparts, st)
            if st.is_dir:
                if entry.file_id in seen_dirs:
                    raise CimError(E_INVALIDARG, "directory appears twice in the tree", "\\".join(cparts))
                seen_dirs.add(entry.file_id)
                stack.append((cparts, iter(img.scandir(entry.file_id))))

    def _tarname(self, parts) -> str:
        name = "/".join(parts)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise CimError(
                ERROR_INVALID_NAME,
                "name is not valid Unicode (an unpaired surrogate); a tar cannot hold it",
                "\\".join(parts),
            ) from None
        return name

    def _pax(self, st) -> dict[str, str]:
        h = {
            PAX_FILEATTR: str(st.attributes),
            PAX_CREATIONTIME: filetime_to_pax_time(st.creation_time),
            "mtime": filetime_to_pax_time(st.last_write_time),
            "ctime": filetime_to_pax_time(st.change_time),
            "atime": filetime_to_pax_time(st.last_access_time),
        }
        if st.security_descriptor:
            h[PAX_RAWSD] = base64.b64encode(st.security_descriptor).decode("ascii")
        if st.ea_buffer:
            ntfs = _ntfs()
            for ea in ntfs.unpack_eas(st.ea_buffer):
                n = ea.name.decode("ascii") if isinstance(ea.name, (bytes, bytearray)) else str(ea.name)
                if "=" in n or "\n" in n:
                    raise CimError(E_INVALIDARG, f"extended attribute name {n!r} cannot be a PAX keyword")
                h[PAX_EA_PREFIX + n] = base64.b64encode(bytes(ea.value)).decode("ascii")
        return h

    def _tarinfo(self, name: str, st, h: dict[str, str]) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mtime = (st.last_write_time - FILETIME_UNIX_EPOCH) // 10_000_000
        ti.mode = 0o755 if st.is_dir else 0o644
        ti.pax_headers = h
        return ti

    def _symlink_target(self, st) -> tuple[str | None, bool]:
        """(link name, is mount point) when a symlink entry can carry this reparse point."""
        if st.reparse_tag not in (IO_REPARSE_TAG_SYMLINK, IO_REPARSE_TAG_MOUNT_POINT):
            return None, False
        try:
            rp = _ntfs().parse_reparse(st.reparse_data)
        except (CimError, ValueError, TypeError, IndexError):
            return None, False
        target = rp.target or rp.print_name or rp.substitute_name
        if not target or "\0" in target:
            return None, False
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            return None, False
        return target, st.reparse_tag == IO_REPARSE_TAG_MOUNT_POINT

    def _merge_marker(self, parts, st):
        """How an independent layer's entry goes back into a tar: ("whiteout",),
        ("link", target), ("dir", flags) or None for an ordinary entry."""
        ntfs = _ntfs()
        if st.reparse_tag == ntfs.IO_REPARSE_TAG_WCI_TOMBSTONE and not st.is_dir:
            return ("whiteout",)
        if st.reparse_tag != ntfs.IO_REPARSE_TAG_CIMFS_MERGE:
            return None
        try:
            marker = ntfs.parse_merge_reparse(st.reparse_data)
        except CimError as e:
            raise CimError(e.hresult, e.strerror, "\\".join(parts)) from None
        return marker and (("link", marker[1]) if marker[0] == ntfs.MERGE_KIND_LINK else ("dir", marker[1]))

    def _marked_entry(self, parts, st, marker) -> bool:
        """Write what a merge marker stands for; False: the entry itself follows."""
        if marker[0] == "whiteout":
            ti = tarfile.TarInfo(self._tarname(parts[:-1] + [WHITEOUT_PREFIX + parts[-1]]))
            ti.type, ti.mode = tarfile.REGTYPE, 0o644
        elif marker[0] == "link":
            ti = tarfile.TarInfo(self._tarname(parts))
            ti.type = tarfile.LNKTYPE
            ti.linkname = self._tarname(marker[1].split("\\"))
        else:
            return False
        self.tf.addfile(ti)
        self.report(0, ti.name)
        return True

    def entry(self, parts, st) -> None:
        marker = self._merge_marker(parts, st) if self.independent else None
        if marker is not None:
            if self._marked_entry(parts, st, marker):
                return
            # A directory of an independent layer: its own metadata, then what the marker says.
            flags = marker[1]
            st = st._replace(reparse_data=b"", reparse_tag=0, attributes=st.attributes & ~FileAttributes.REPARSE_POINT)
            if not flags & _ntfs().MERGE_DIR_PARENT_ONLY:
                self._entry(parts, st)
            if flags & _ntfs().MERGE_DIR_OPAQUE:
                ti = tarfile.TarInfo(self._tarname(parts + [WHITEOUT_OPAQUE]))
                ti.type, ti.mode = tarfile.REGTYPE, 0o644
                self.tf.addfile(ti)
                self.report(0, ti.name)
            return
        self._entry(parts, st)

    def _entry(self, parts, st) -> None:
        name = self._tarname(parts)
        label = name
        fid = st.file_id
        if not st.is_dir and st.nlink > 1:
            first = self.first_name.get(fid)
            if first is not None:
                ti = tarfile.TarInfo(name)
                ti.type = tarfile.LNKTYPE
                ti.linkname = first
                ti.mtime = max(0, (st.last_write_time - FILETIME_UNIX_EPOCH) // 10_000_000)
                self.tf.addfile(ti)
                self.report(0, label)
                return
            self.first_name[fid] = name
        h = self._pax(st)
        ti = self._tarinfo(name, st, h)
        data_size = 0 if st.is_dir else st.size
        if st.reparse_data:
            target, mount = self._symlink_target(st) if not data_size else (None, False)
            if target is not None:
                ti.type = tarfile.SYMTYPE
                ti.linkname = target
                if mount:
                    h[PAX_MOUNTPOINT] = ""
                ntfs = _ntfs()
                try:
                    rebuilt = ntfs.pack_mount_point_reparse(target) if mount else ntfs.pack_symlink_reparse(target)
                except (CimError, ValueError, TypeError):
                    rebuilt = None
                if rebuilt != st.reparse_data:
                    h[PAX_RAWREPARSE] = base64.b64encode(st.reparse_data).decode("ascii")
            else:
                h[PAX_RAWREPARSE] = base64.b64encode(st.reparse_data).decode("ascii")
        if ti.type != tarfile.SYMTYPE:
            if st.is_dir:
                ti.type = tarfile.DIRTYPE
            else:
                ti.type = tarfile.REGTYPE
                ti.size = data_size
        if ti.type == tarfile.REGTYPE and data_size:
            with self.img.open(fid) as f:
                self.tf.addfile(ti, _CountingReader(f, self.report, label))
        else:
            self.tf.addfile(ti)
            self.report(0, label)
        # Alternate data streams follow their file.
        if st.stream_count:
            for sname in self.img.streams(fid):
                size = self.img.stream_size(fid, sname)
                sti = tarfile.TarInfo(f"{name}:{sname}:$DATA")
                sti.type = tarfile.REGTYPE
                sti.size = size
                sti.mtime = ti.mtime
                sti.mode = 0o644
                sti.pax_headers = {k: h[k] for k in ("mtime", "ctime", "atime")}
                slabel = sti.name
                if size:
                    with self.img.open(fid, stream=sname) as f:
                        self.tf.addfile(sti, _CountingReader(f, self.report, slabel))
                else:
                    self.tf.addfile(sti)

    def _whiteout(self, parts) -> None:
        ti = tarfile.TarInfo(self._tarname(parts[:-1] + [WHITEOUT_PREFIX + parts[-1]]))
        ti.type = tarfile.REGTYPE
        ti.mode = 0o644
        self.tf.addfile(ti)
        self.report(0, ti.name)

    def _write(self, kind, parts, st) -> None:
        """One tar entry (or a whiteout); a failure names the entry's path."""
        try:
            if kind == "whiteout":
                self._whiteout(parts)
            else:
                self.entry(parts, st)
        except CimError as e:
            if e.filename is None:
                raise CimError(e.hresult, e.strerror, "\\".join(parts)) from None
            raise
        except (UnicodeError, ValueError, tarfile.TarError) as e:
            raise CimError(E_INVALIDARG, f"cannot write a tar entry for it: {e}", "\\".join(parts)) from None


_UNCHANGED_FIELDS = (
    "attributes",
    "creation_time",
    "last_write_time",
    "change_time",
    "last_access_time",
    "security_descriptor",
    "ea_buffer",
    "reparse_data",
    "is_dir",
    "size",
    "is_sparse",
)


class _DiffExporter(_Exporter):
    """The differences of ``img`` from ``lower`` as a layer tar (whiteouts for
    what is gone), or with ``lower=None`` the whole image; ``exclude`` holds
    folded image paths left out with their subtrees.

    With a parent, two passes: the first decides, for every path, whether it
    is written (and keeps only the changes); the second writes.  A new name of
    a file that keeps an unchanged name (a hard link added on top of a lower
    layer's file) then becomes a link entry to that name, whatever the order
    the names come in.  Without one, entries are written as they are walked.
    """

    def __init__(self, img, tf, report, lower, exclude: frozenset, derived=None):
        super().__init__(img, tf, report, derived=derived)
        self.lower = lower
        self.exclude = exclude

    def run(self) -> None:
        if self.lower is None:  # nothing to compare with: written as it is walked
            self._plan_dir([], self.img.root_id, None, _WriteNow(self))
            return
        plan: list[tuple[str, list[str], object]] = []  # ("entry" | "whiteout", parts, stat): changes only
        self._plan_dir([], self.img.root_id, self.lower.root_id, plan)
        plan += self._deltas_needed(plan)
        for item in plan:
            self._write(*item)

    def _excluded(self, parts) -> bool:
        if not (self.exclude or self.derived):
            return False
        key = self.img.fold("\\".join(parts))
        return key in self.exclude or key in self.derived

    def _deltas_needed(self, plan) -> list:
        """The deltas of generated base hives that differ from the parent's but
        are not in the plan (the same bytes as the parent's delta): without
        them the tar would not make the same base hive again."""
        img, lower = self.img, self.lower
        planned = {img.fold("\\".join(parts)) for kind, parts, _ in plan if kind == "entry"}
        extra = []
        for base_key, delta_parts in self.derived.items():
            if img.fold("\\".join(delta_parts)) in planned:
                continue
            base_path = "\\".join([delta_parts[0], base_key.split("\\")[-1]])
            st = img.stat(base_path)
            try:
                lst = lower.stat(base_path)
            except CimError:
                lst = None
            if lst is None or lst.is_dir or not self._same_file(st.file_id, st, lst.file_id, lst):
                extra.append(("entry", delta_parts, img.stat("\\".join(delta_parts))))
        return extra

    def _plan_dir(self, parts, did, lower_did, plan) -> None:
        """Pre-order, as the full export: each directory's whiteouts, then its
        children in image order, each directory's own children right after it."""
        img, lower = self.img, self.lower
        stack = [self._open_dir(parts, did, lower_did, plan)]
        seen = {did}
        while stack:
            parts, it, lower_entries = stack[-1]
            e = next(it, None)
            if e is None:
                stack.pop()
                continue
            cparts = parts + [e.name]
            if self._excluded(cparts):
                continue
            st = img.stat(e.file_id)
            below = lower_entries.get(img.fold(e.name))
            lst = lower.stat(below.file_id) if below is not None else None
            descend = None  # (lower directory to compare with or None) when st is a directory
            if lst is None or below.name != e.name or lst.is_dir != st.is_dir:
                plan.append(("entry", cparts, st))
                descend = (None,)
            elif st.is_dir:
                if not self._same_meta(st, lst) or not self._same_streams(e.file_id, below.file_id):
                    plan.append(("entry", cparts, st))
                descend = (below.file_id,)
            elif self._same_file(e.file_id, st, below.file_id, lst):
                if st.nlink > 1:
                    self.first_name.setdefault(st.file_id, self._tarname(cparts))
            else:
                plan.append(("entry", cparts, st))
            if st.is_dir and descend is not None:
                if e.file_id in seen:
                    raise CimError(E_INVALIDARG, "directory appears twice in the tree", "\\".join(cparts))
                seen.add(e.file_id)
                stack.append(self._open_dir(cparts, e.file_id, descend[0], plan))

    def _open_dir(self, parts, did, lower_did, plan):
        img, lower = self.img, self.lower
        entries = img.scandir(did)
        lower_entries = {}
        if lower_did is not None:
            lower_entries = {lower.fold(e.name): e for e in lower.scandir(lower_did)}
            present = {img.fold(e.name) for e in entries}
            for key, e in lower_entries.items():
                if key not in present and not self._excluded(parts + [e.name]):
                    plan.append(("whiteout", parts + [e.name], None))
        return parts, iter(entries), lower_entries

    @staticmethod
    def _same_meta(a, b) -> bool:
        return all(getattr(a, f) == getattr(b, f) for f in _UNCHANGED_FIELDS)

    def _same_file(self, fid, st, lower_fid, lst) -> bool:
        img, lower = self.img, self.lower
        if fid == lower_fid and img.raw_record(fid) == lower.raw_record(lower_fid):
            return True  # the fork kept the parent's record: same data, streams and metadata
        if not self._same_meta(st, lst) or not self._same_data(fid, lower_fid, st.size, None):
            return False
        return self._same_streams(fid, lower_fid)

    def _same_streams(self, fid, lower_fid) -> bool:
        img, lower = self.img, self.lower
        names = img.streams(fid)
        if names != lower.streams(lower_fid):
            return False
        for n in names:
            size = img.stream_size(fid, n)
            if size != lower.stream_size(lower_fid, n) or not self._same_data(fid, lower_fid, size, n):
                return False
        return True

    def _same_data(self, fid, lower_fid, size, stream) -> bool:
        img, lower = self.img, self.lower
        try:
            if img.stream_descriptor(fid, stream) == lower.stream_descriptor(lower_fid, stream):
                return True  # the same bytes of a shared region
        except CimError:
            pass
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            if img.read_at(fid, pos, n, stream=stream) != lower.read_at(lower_fid, pos, n, stream=stream):
                return False
            pos += n
        return True


class _WriteNow:
    """A plan that is carried out as it is made."""

    def __init__(self, exporter: _DiffExporter):
        self.exporter = exporter

    def append(self, item) -> None:
        self.exporter._write(*item)
