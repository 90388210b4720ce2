"""Importing Windows layer tars as images: :class:`_LayerImporter` applies one
layer's members (files, directories, symlinks, hard links, alternate streams,
whiteouts) to an image writer, on top of a parent image or on its own
(``independent``); :func:`import_layer` and :func:`import_layers` wrap it in
:func:`cimfs.create` so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import tarfile

import cimfs

from ..errors import (
    E_INVALIDARG,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    CimError,
)
from ..metadata import FileAttributes, FileMetadata
from . import hives
from .pax import (
    CHUNK,
    PAX_FILEATTR,
    PAX_MOUNTPOINT,
    PAX_RAWREPARSE,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    _ntfs,
    _progress_adapter,
)
from .tarsource import (
    _b64,
    _check_parts,
    _is_read_error,
    _metadata,
    _normalize_headers,
    _read_error_text,
    _shown,
    _tar_parts,
    _TarSource,
)


# ------------------------------------------------------------------ import
class _LayerImporter:
    def __init__(
        self, writer, source: _TarSource, parent_image, progress, independent: bool = False, keep_deltas: bool = False
    ):
        self.w = writer
        self.src = source
        self.lower = parent_image  # reader of the parent image, or None
        # A layer converted on its own (merged later): whiteouts become tombstones,
        # hard links to lower files merge links, and directories record whether
        # they replace (opaque) or only make way for (parent only) the lower ones.
        self.independent = independent
        self.tombstoned: set[str] = set()  # folded paths this layer tombstoned
        self.opaque: set[str] = set()  # folded paths of this layer's opaque directories
        self.progress = progress
        self.fold = parent_image.fold if parent_image is not None else getattr(cimfs, "fold_name", str.upper)
        self.added: dict[str, bool] = {}  # folded image path -> is a directory (entries of this layer)
        self.known_dirs: set[str] = set()
        self.last_file: str | None = None  # image path of the last file/dir entry (ADS owner)
        # A non-base layer: the bytes of its Hives\<X>_DELTA files, by base hive name, for the hive merge.
        self.keep_deltas = keep_deltas
        self.deltas: dict[str, hives.DeltaSpool] = {}

    # -- helpers
    def _key(self, parts) -> str:
        return self.fold("\\".join(parts))

    def _exists(self, path: str) -> bool:
        return self.w.exists(path)

    def _is_dir(self, path: str) -> bool:
        return self.w.is_dir(path)

    def _ensure_parents(self, parts: list[str], member: str) -> None:
        for i in range(1, len(parts)):
            sub = "\\".join(parts[:i])
            key = self.fold(sub)
            if key in self.known_dirs:
                continue
            if not self._exists(sub):
                # [choice] a missing parent directory is created with default metadata.
                self.w.mkdir(sub, FileMetadata(attributes=FileAttributes.DIRECTORY))
                if self.independent:
                    self.w.make_parent_only(sub)
            elif not self._is_dir(sub):
                raise CimError(ERROR_PATH_NOT_FOUND, f"parent {sub!r} is not a directory", member)
            self.known_dirs.add(key)

    def _remove_existing(self, path: str) -> None:
        if self._exists(path):
            self.w.delete(path)
            self.known_dirs.clear()

    def _copy(self, m: tarfile.TarInfo, stream, size: int, member: str, tee=None) -> None:
        f = self.src.extractfile(m)
        if f is None:
            raise CimError(E_INVALIDARG, "entry has no data", member)
        remaining = size
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise CimError(E_INVALIDARG, f"truncated tar: data ends {remaining} bytes early", member)
            stream.write(chunk)
            if tee is not None:
                tee.write(chunk)
            remaining -= len(chunk)
            self.progress(len(chunk), member)

    # -- the layer
    def run(self) -> None:
        for m in self.src.members():
            member = m.name
            try:
                self.entry(m)
                if not (m.isfile() and m.size):
                    self.progress(0, member)
            except CimError as e:
                if e.filename == member:
                    raise
                where = f" [image path {e.filename}]" if e.filename else ""
                raise CimError(e.hresult, f"{e.strerror}{where}", member) from None
            except Exception as e:  # noqa: BLE001 - reading the member's data
                if not _is_read_error(e):
                    raise
                raise CimError(E_INVALIDARG, _read_error_text(e, "data", m), member) from None

    def entry(self, m: tarfile.TarInfo) -> None:
        member = m.name
        m.pax_headers = _normalize_headers(m.pax_headers, member)
        parts = _tar_parts(m.name, "member name", member)
        if not parts:
            return  # "./": the root; the format gives it no metadata
        base = parts[-1]
        # whiteouts
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(parts, member)
            return
        # alternate data streams: <file>:<stream>:$DATA
        if ":" in base:
            self.stream(m, parts, member)
            return
        _check_parts(parts, member)
        path = "\\".join(parts)
        self._ensure_parents(parts, member)
        key = self._key(parts)
        kind = hives.delta_kind(parts) if self.keep_deltas else None
        if kind is not None:
            self._drop_delta(kind[0])  # replaced by this entry
        if m.isdir():
            meta = _metadata(m, member, is_dir=True)
            raw = self._raw_reparse(m, member)
            if raw:
                meta.reparse_data = raw
            if not self._is_dir(path):
                self._remove_existing(path)
            self.w.create_file(path, meta).close()
            if self.independent and (key in self.tombstoned or key in self.opaque):
                # a whiteout of the name, then the directory: nothing of the layers below stays in it
                self.opaque.add(key)
                self.w.make_opaque(path)
            self.added[key] = True
            self.known_dirs.add(key)
            self.last_file = path
        elif m.issym():
            self.symlink(m, parts, path, member)
            self.added[key] = self._is_dir(path)
            self.last_file = path
        elif m.islnk():
            self.hardlink(m, parts, path, member)
            self.added[key] = False
            self.last_file = None
        elif m.isfile():
            meta = _metadata(m, member, is_dir=False)
            raw = self._raw_reparse(m, member)
            if raw:
                meta.reparse_data = raw
            meta.file_size = m.size
            self._remove_existing(path)
            spool = None
            if kind is not None:
                spool = self.deltas[kind[0]] = hives.DeltaSpool(path)
            with self.w.create_file(path, meta) as s:
                self._copy(m, s, m.size, member, spool)
            self.added[key] = False
            self.last_file = path
        else:
            what = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}.get(
                m.type, f"type {m.type!r}"
            )
            raise CimError(E_INVALIDARG, f"a {what} entry has no meaning in a Windows layer", member)

    def _drop_delta(self, base: str) -> None:
        spool = self.deltas.pop(base, None)
        if spool is not None:
            spool.close()

    def layer_deltas(self) -> dict[str, hives.DeltaSpool]:
        """The layer's hive deltas still in the image after its last member
        (a later whiteout may have deleted one)."""
        for base, spool in list(self.deltas.items()):
            if not self._exists(spool.path) or self._is_dir(spool.path):
                self._drop_delta(base)
        return self.deltas

    def close(self) -> None:
        for base in list(self.deltas):
            self._drop_delta(base)

    def _raw_reparse(self, m, member) -> bytes:
        v = m.pax_headers.get(PAX_RAWREPARSE)
        if v is None:
            return b""
        raw = _b64(v, PAX_RAWREPARSE, member)
        if len(raw) < 8:
            raise CimError(E_INVALIDARG, f"PAX record {PAX_RAWREPARSE} is shorter than a reparse header", member)
        return raw

    def symlink(self, m, parts, path, member) -> None:
        h = m.pax_headers
        mount = PAX_MOUNTPOINT in h
        target = m.linkname
        if not target:
            raise CimError(E_INVALIDARG, "symlink entry has an empty target", member)
        if any("\ud800" <= c <= "\udfff" for c in target):
            raise CimError(E_INVALIDARG, "symlink target is not valid UTF-8", member)
        if "\0" in target:
            # A PAX linkpath may carry one; no Windows path does.
            raise CimError(E_INVALIDARG, "symlink target contains a NUL character", member)
        attrs_dir = False
        if PAX_FILEATTR in h:
            try:
                attrs_dir = bool(int(h[PAX_FILEATTR].strip(), 10) & FileAttributes.DIRECTORY)
            except ValueError:
                pass  # _metadata reports it
        is_dir = attrs_dir or mount
        meta = _metadata(m, member, is_dir=is_dir)
        raw = self._raw_reparse(m, member)
        if raw:
            meta.reparse_data = raw
        else:
            ntfs = _ntfs()
            try:
                meta.reparse_data = (
                    ntfs.pack_mount_point_reparse(target) if mount else ntfs.pack_symlink_reparse(target)
                )
            except CimError as e:
                raise CimError(e.hresult, f"symlink target {_shown(target)}: {e.strerror}", member) from None
            except (ValueError, TypeError, OverflowError) as e:
                raise CimError(E_INVALIDARG, f"symlink target {_shown(target)}: {e}", member) from None
        self._remove_existing(path)
        self.w.create_file(path, meta).close()

    def hardlink(self, m, parts, path, member) -> None:
        tparts = _tar_parts(m.linkname, "hard link target", member)
        if not tparts:
            raise CimError(E_INVALIDARG, "hard link to the root", member)
        _check_parts(tparts, member, "hard link target")
        target = "\\".join(tparts)
        if self.fold(target) == self.fold(path):
            raise CimError(E_INVALIDARG, "hard link to itself", member)
        if self.independent and self.fold(target) in self.tombstoned and self._exists(target):
            raise CimError(ERROR_FILE_NOT_FOUND, f"hard link target {m.linkname!r} was deleted by this layer", member)
        if self.independent and not self._exists(target):
            self._remove_existing(path)
            self.w.merge_link(path, target)  # a file of the layers below: resolved when merged
            return
        if not self._exists(target):
            raise CimError(ERROR_FILE_NOT_FOUND, f"hard link target {m.linkname!r} is not in the image", member)
        if self._is_dir(target):
            raise CimError(E_INVALIDARG, f"hard link target {m.linkname!r} is a directory", member)
        self._remove_existing(path)
        self.w.link(path, target)

    def stream(self, m, parts, member) -> None:
        base = parts[-1]
        pieces = base.split(":")
        if len(pieces) == 2:
            fname, sname, stype = pieces[0], pieces[1], "$DATA"
        elif len(pieces) == 3:
            fname, sname, stype = pieces
        else:
            raise CimError(ERROR_INVALID_NAME, "name has more than two ':' (expected <file>:<stream>:$DATA)", member)
        if stype.upper() != "$DATA":
            raise CimError(E_INVALIDARG, f"alternate stream type {stype!r} is not $DATA", member)
        if not m.isfile():
            raise CimError(E_INVALIDARG, "an alternate data stream entry must be a regular file entry", member)
        fparts = parts[:-1] + [fname]
        _check_parts(fparts, member)
        _check_parts([sname], member, "stream name")
        fpath = "\\".join(fparts)
        if not self._exists(fpath):
            raise CimError(ERROR_FILE_NOT_FOUND, f"alternate stream of {fname!r}, which is not in the image", member)
        if self.last_file is None or self.fold(self.last_file) != self.fold(fpath):
            # [choice] accepted (the file exists), though §17 puts streams right after their file.
            pass
        with self.w.create_stream(f"{fpath}:{sname}", m.size) as s:
            self._copy(m, s, m.size, member)

    def whiteout(self, parts, member) -> None:
        base = parts[-1]
        dir_parts = parts[:-1]
        _check_parts(dir_parts, member)
        if base == WHITEOUT_OPAQUE:
            # Opaque directory: hide everything the layers below have in it.
            if self.independent and dir_parts:
                self._ensure_parents(parts, member)
                self.opaque.add(self._key(dir_parts))
                self.w.make_opaque("\\".join(dir_parts))
                return
            self.prune_lower(dir_parts)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): no meaning here
        name = base[len(WHITEOUT_PREFIX) :]
        _check_parts([name], member, "whiteout name")
        target = dir_parts + [name]
        if self.independent:
            self.independent_whiteout(target, member)
            return
        if self.lower is None:
            return  # nothing below a base layer; this layer's own names stay
        key = self._key(target)
        if key in self.added:
            # The name is this layer's own: only what the layers below had under it goes.
            if self.added[key]:
                self.prune_lower(target)
            return
        path = "\\".join(target)
        try:
            self._remove_existing(path)
        except CimError as e:
            if e.hresult not in (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND):
                raise

    def independent_whiteout(self, target: list[str], member: str) -> None:
        key = self._key(target)
        path = "\\".join(target)
        if key in self.added:
            # The name is this layer's own: only what the layers below had under it goes.
            if self.added[key]:
                self.opaque.add(key)
                self.w.make_opaque(path)
            return
        self._ensure_parents(target, member)
        self.w.tombstone(path)
        self.tombstoned.add(key)

    def prune_lower(self, parts: list[str]) -> None:
        """Delete what the parent image has under directory ``parts`` and this layer did not add."""
        if self.lower is None:
            return
        path = "\\".join(parts)
        try:
            st = self.lower.stat(path)
        except CimError:
            return
        if not st.is_dir or not self._is_dir(path):
            return
        for entry in self.lower.scandir(st.file_id):
            child = parts + [entry.name]
            key = self._key(child)
            cpath = "\\".join(child)
            if key not in self.added:
                try:
                    self._remove_existing(cpath)
                except CimError as e:
                    if e.hresult not in (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND):
                        raise
            elif self.added[key]:
                self.prune_lower(child)


def _image_name(name) -> str:
    name = os.fspath(name)
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise CimError(ERROR_INVALID_NAME, "an image name is a file name, not a path", name)
    return name


def import_layer(
    src,
    containing_dir,
    name,
    parent=None,
    progress=None,
    *,
    before_commit=None,
    consistent: bool = False,
    clamp_time: int | None = None,
    independent: bool = False,
    hive_parents=None,
    hive_time: int = 0,
    label: str | None = None,
    on_hive_bases=None,
) -> str:
    """Import one Windows layer tar as the image ``name`` in ``containing_dir``.

    ``src`` is a path, a binary file object (read once, as a stream: stdin
    works) or an open ``tarfile.TarFile``; any compression ``tarfile`` reads.
    With ``parent`` (a ``.cim`` name in the same directory) the image is a fork
    of it and the layer is applied on top, whiteouts deleting from the parent.
    Returns the new ``.cim`` path.  On any error a :class:`CimError` naming the
    tar member is raised and nothing new is left behind.

    ``before_commit(writer)``, when given, is called after the last member was
    read and before the image is committed: it may add to the image (base
    layer processing) or check what was read (digests); an exception from it
    discards the image.  ``consistent`` and ``clamp_time`` are
    :func:`cimfs.create`'s.

    ``independent``: the layer is converted on its own, to be merged later
    (:func:`cimfs.merge`): whiteouts become tombstones, hard links to files of
    the layers below merge links, an opaque directory is marked so; no parent.

    Registry hives (hcsshim's non-base layer processing, :mod:`.hives`): a
    layer with a parent, or an independent one given ``hive_parents`` (the
    images below it, nearest first: paths or open images), gets for each
    ``Hives\\<X>_DELTA`` it brings a ``Hives\\<X>_BASE`` = the parent's
    ``<X>_BASE`` merged with the delta, stamped with ``hive_time`` (FILETIME).
    ``on_hive_bases(paths)`` is told the paths written, before
    ``before_commit``.  ``label`` names the layer in error messages (default:
    the tar's path or name).  ``src`` may also be a layer read elsewhere
    (:class:`cimfs.oci.readahead.PipedLayer`: ``is_layer_source``).
    """
    directory = os.fspath(containing_dir)
    name = _image_name(name)
    if independent and parent is not None:
        raise CimError(E_INVALIDARG, "an independent layer has no parent image", os.fspath(parent))
    if parent is not None:
        parent = os.fspath(parent)  # cimfs.create checks it is in the same directory
    report = _progress_adapter(progress)
    source = src if getattr(src, "is_layer_source", False) else _TarSource(src, label)
    try:
        with cimfs.create(directory, name, base=parent, consistent=consistent, clamp_time=clamp_time) as w:
            lower = cimfs.open(os.path.join(directory, os.path.basename(parent))) if parent is not None else None
            non_base = lower is not None or (independent and hive_parents is not None)
            importer = _LayerImporter(w, source, lower, report, independent, keep_deltas=non_base)
            try:
                importer.run()
                if non_base:
                    parents = [lower] if lower is not None else list(hive_parents)
                    made = hives.process_non_base_layer(w, importer.layer_deltas(), parents, hive_time, source.label)
                    if on_hive_bases is not None:
                        on_hive_bases(made)
            finally:
                importer.close()
                if lower is not None:
                    lower.close()
            if before_commit is not None:
                before_commit(w)
            return w.commit()
    finally:
        source.close()


def _remove_committed(directory: str, name: str) -> None:
    """Undo a committed layer of a failed import_layers call: its .cim and the
    region files no other image needs (the same rule as ``cimfs rm``)."""
    from ..tools import rm_image  # start-up time: only a failed multi-layer import removes layers

    try:
        rm_image(os.path.join(directory, name))
    except CimError:
        pass


def import_layers(srcs: list, containing_dir, names: list[str], base=None, progress=None) -> list[str]:
    """Import a multi-layer image, bottom layer first: one ``.cim`` per layer, each
    a fork of the one below (the first a fork of ``base`` when given).

    On an error the layers already imported by this call are removed again.
    """
    srcs, names = list(srcs), [_image_name(n) for n in names]
    directory = os.fspath(containing_dir)
    if len(srcs) != len(names):
        raise CimError(E_INVALIDARG, f"{len(srcs)} layer tars but {len(names)} image names")
    if not srcs:
        raise CimError(E_INVALIDARG, "no layers to import")
    folded = [n.casefold() for n in names]
    if len(set(folded)) != len(folded) or (base is not None and os.path.basename(os.fspath(base)).casefold() in folded):
        raise CimError(E_INVALIDARG, "layer image names must be distinct (and differ from the base)")
    for n in names:
        if os.path.lexists(os.path.join(directory, n)):
            raise CimError(ERROR_FILE_EXISTS, "an image of that name already exists", os.path.join(directory, n))
    done: list[str] = []
    parent = base
    try:
        for src, n in zip(srcs, names):
            done.append(import_layer(src, directory, n, parent=parent, progress=progress))
            parent = n
    except BaseException:
        for path in reversed(done):
            _remove_committed(directory, os.path.basename(path))
        raise
    return done
