"""Windows container layer tars <-> CimFS images (spec §17, docs/WINDOWS-LAYERS.md).

A Windows layer tar is a PAX tar whose top-level directories are ``Files/``
(the file system), ``Hives/`` (registry hive deltas) and, in base layers,
sometimes ``UtilityVM/``.  They are kept as plain paths in the image
(``Files\\Windows\\...``).  Windows metadata travels in PAX records:

==============================  ==============================================
``MSWINDOWS.fileattr``          Win32 attributes, decimal
``MSWINDOWS.rawsd``             base64 self-relative security descriptor
``MSWINDOWS.sd``                (old tars) the descriptor as SDDL text
``MSWINDOWS.xattr.<name>``      base64 value of the extended attribute <name>
``MSWINDOWS.mountpoint``        on a symlink entry: a mount point (junction)
``LIBARCHIVE.creationtime``     creation time, PAX time ``sec[.frac]``
``mtime`` / ``ctime`` / ``atime``  last write / change / last access times
``CIMFS.rawreparse``            (this project) base64 REPARSE_DATA_BUFFER of a
                                reparse point a symlink entry cannot express
==============================  ==============================================

Symlink entries are NT symlinks (or mount points), type ``1`` entries are hard
links, ``<file>:<stream>:$DATA`` regular entries following their file are
alternate data streams, and ``.wh.<name>`` entries delete ``<name>`` from the
layers below.  Each layer of a multi-layer image is imported as a fork of the
layer below it.

Only the public library API is used: :func:`cimfs.create` to write (it discards
everything on an exception, so a failed import leaves nothing behind) and
:func:`cimfs.open` to read; the NTFS blobs (EA chains, reparse buffers, SDDL)
are packed and parsed by :mod:`cimfs.layout.ntfs`.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import os
import re
import tarfile
import zlib
from typing import Callable, Iterable

import cimfs
from .errors import (
    E_INVALIDARG,
    ERROR_FILE_EXISTS,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_NAME,
    ERROR_PATH_NOT_FOUND,
    CimError,
    hresult_from_oserror,
)
from .atomic import replacing
from .metadata import FileAttributes, FileMetadata
from .names import check_name
from .tarbounds import BoundedTarInfo

__all__ = ["is_windows_layer", "import_layer", "import_layers", "export_layer",
           "parse_pax_time", "format_pax_time", "pax_time_to_filetime", "filetime_to_pax_time"]

# ------------------------------------------------------------------ constants
PAX_FILEATTR = "MSWINDOWS.fileattr"
PAX_RAWSD = "MSWINDOWS.rawsd"
PAX_SDDL = "MSWINDOWS.sd"
PAX_MOUNTPOINT = "MSWINDOWS.mountpoint"
PAX_EA_PREFIX = "MSWINDOWS.xattr."
PAX_CREATIONTIME = "LIBARCHIVE.creationtime"
# [choice] our own record: the exact reparse buffer, written on export only when
# the symlink entry's link name would not rebuild the same bytes (or the tag is
# not a symlink / mount point).  Other readers ignore unknown PAX records.
PAX_RAWREPARSE = "CIMFS.rawreparse"

LAYER_TOP_LEVEL = ("Files", "Hives", "UtilityVM")
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

FILETIME_UNIX_EPOCH = 116444736000000000
_FILETIME_MAX = (1 << 64) - 1

IO_REPARSE_TAG_MOUNT_POINT = 0xA0000003
IO_REPARSE_TAG_SYMLINK = 0xA000000C

CHUNK = 1 << 20
_DETECT_MEMBERS = 64  # members is_windows_layer reads from a seekable tar

Progress = Callable[[int, str], None]


def _ntfs():
    from .layout import ntfs  # imported late: a sibling module of the library

    return ntfs


# ------------------------------------------------------------------ times
_PAX_TIME = re.compile(r"([-+]?)([0-9]+)(?:\.([0-9]*))?")


def parse_pax_time(text: str) -> int:
    """A PAX time (``[-]sec[.frac]``) as integer nanoseconds, exactly (no float).

    ``-1.5`` is 1.5 s before the epoch (Go's and libarchive's reading).
    """
    m = _PAX_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a PAX time: {text!r}")
    sign, sec, frac = m.groups()
    ns = int(sec) * 1_000_000_000 + int(((frac or "") + "000000000")[:9])
    return -ns if sign == "-" else ns


def format_pax_time(ns: int) -> str:
    """Integer nanoseconds as a PAX time with nine fractional digits."""
    sign = "-" if ns < 0 else ""
    a = abs(ns)
    return f"{sign}{a // 1_000_000_000}.{a % 1_000_000_000:09d}"


def pax_time_to_filetime(text: str) -> int:
    """``sec.nsec`` → FILETIME ticks (sec*10^7 + nsec//100 + 116444736000000000)."""
    ticks = parse_pax_time(text) // 100 + FILETIME_UNIX_EPOCH
    if not 0 <= ticks <= _FILETIME_MAX:
        raise ValueError(f"time {text!r} is outside the FILETIME range")
    return ticks


def filetime_to_pax_time(ticks: int) -> str:
    return format_pax_time((ticks - FILETIME_UNIX_EPOCH) * 100)


# ------------------------------------------------------------------ progress
def _progress_adapter(progress) -> Callable[[int, str], None]:
    """``progress(n, path)``; a callable taking only ``n`` is accepted too."""
    if progress is None:
        return lambda n, path: None
    try:
        sig = inspect.signature(progress)
    except (TypeError, ValueError):
        return progress
    try:
        sig.bind(0, "")
        return progress
    except TypeError:
        pass
    try:
        sig.bind(0)
    except TypeError:
        return progress
    return lambda n, path: progress(n)


# ------------------------------------------------------------------ detection
def _top(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return parts[0] if parts else ""


def _has_windows_headers(m: tarfile.TarInfo) -> bool:
    return any(k.startswith("MSWINDOWS.") for k in m.pax_headers)


def is_windows_layer(tf: tarfile.TarFile | None = None, *, names: Iterable[str] = ()) -> bool:
    """Whether a tar looks like a Windows container layer (spec §17).

    The heuristic: at least one member lies under a top-level ``Files/`` or
    ``Hives/`` (compared case-insensitively), no member lies outside
    ``Files/``, ``Hives/`` and ``UtilityVM/`` (top-level ``.wh.`` whiteouts
    allowed), and, when a ``TarFile`` is given, at least one inspected member
    carries a ``MSWINDOWS.*`` PAX record.  With only ``names`` the PAX test
    cannot be made and the name test decides.

    What is inspected: ``names`` when given; else the members ``tf`` has read
    so far, and for a seekable (``r:*``) tar up to 64 members in all (reading
    on does not lose data there: iterating the tar later starts again from
    the first member).  A stream (``r|*``) tar is not read further than the
    members already loaded (its first member after ``tarfile.open``), since
    that would make earlier members unreadable.
    """
    headers_seen = False
    if tf is None:
        candidates = list(names)
        need_headers = False
    else:
        need_headers = True
        members = list(getattr(tf, "members", []) or [])
        first = getattr(tf, "firstmember", None)
        if first is not None and first not in members:
            members.insert(0, first)
        if not _is_stream(tf) and not getattr(tf, "_loaded", False):
            try:
                while len(members) < _DETECT_MEMBERS:
                    m = tf.next()
                    if m is None:
                        break
                    if m not in members:
                        members.append(m)
            except (tarfile.TarError, EOFError, OSError, zlib.error):
                pass
        headers_seen = any(_has_windows_headers(m) for m in members)
        candidates = [m.name for m in members]
        candidates += list(names)
    allowed = {t.casefold() for t in LAYER_TOP_LEVEL}
    core = {"files", "hives"}
    found_core = False
    for n in candidates:
        top = _top(n)
        if not top:
            continue  # "./" and the like
        folded = top.casefold()
        if folded in core:
            found_core = True
        elif folded not in allowed and not top.startswith(WHITEOUT_PREFIX):
            return False
    return found_core and (headers_seen or not need_headers)


# ------------------------------------------------------------------ tar reading
def _is_stream(tf: tarfile.TarFile) -> bool:
    """A ``r|*`` tar: reading on makes earlier members' data unreadable."""
    stream_type = getattr(tarfile, "_Stream", None)
    return stream_type is not None and isinstance(getattr(tf, "fileobj", None), stream_type)


class _CheckedTarInfo(BoundedTarInfo):
    """Records how header reading ended, so a tar cut at a header boundary
    (which ``tarfile`` silently treats as the end) is reported as truncated.
    Header sizes are bounded (:mod:`cimfs.tarbounds`)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf._cimfs_end = "eof"
            raise
        except tarfile.HeaderError as e:
            tf._cimfs_end = e
            raise


class _TarSource:
    """Opens ``src`` (path, binary file object or TarFile) as a stream tar."""

    def __init__(self, src, label: str | None = None):
        self._own_file = None
        self._own_stream = False
        self.tf = None
        if isinstance(src, tarfile.TarFile):
            self.tf = src
            self.label = label or (src.name or "<tar>")
            src.tarinfo = _CheckedTarInfo  # later headers are checked
            src._cimfs_end = None
            return
        if isinstance(src, (str, bytes, os.PathLike)):
            path = os.fsdecode(src)
            self.label = label or path
            try:
                self._own_file = f = open(path, "rb")
            except OSError as e:
                raise CimError(hresult_from_oserror(e), f"cannot open the tar: {e.strerror or e}", path) from None
        else:
            f = src
            self.label = label or getattr(src, "name", None) or "<stream>"
            if not isinstance(self.label, str):
                self.label = "<stream>"
        try:
            self.tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=_CheckedTarInfo,
                                   encoding="utf-8", errors="surrogateescape")
        except BaseException as e:
            self.close()
            if isinstance(e, CimError):
                raise
            if isinstance(e, (tarfile.TarError, EOFError, zlib.error, ValueError, UnicodeError)) or _is_codec_error(e):
                raise CimError(E_INVALIDARG, f"not a readable tar archive ({e})", self.label) from None
            if isinstance(e, OSError):
                raise CimError(hresult_from_oserror(e), f"cannot read the tar: {e.strerror or e}", self.label) from None
            raise
        self.tf._cimfs_end = None
        self._own_stream = True

    def members(self):
        tf = self.tf
        last = None
        # Members an open TarFile given as the source has loaded already (by
        # tarfile.open or a format check) come first; next() may hand the
        # first one out again, so each is yielded once.
        loaded = list(tf.members)
        seen = {id(m) for m in loaded}
        for m in loaded:
            last = m
            yield m
        if getattr(tf, "_loaded", False):
            return
        while True:
            try:
                m = tf.next()
            except CimError:
                raise
            except Exception as e:  # noqa: BLE001 - everything tarfile/decompressors raise
                if not _is_read_error(e):
                    raise
                raise CimError(E_INVALIDARG, _read_error_text(e, "header", last), _after(last, self.label)) from None
            if m is not None and id(m) in seen:
                continue
            if m is None:
                end = getattr(tf, "_cimfs_end", None)
                if end == "eof" or (end is None and last is None):
                    return
                why = "the archive ends without its end-of-archive blocks" if isinstance(end, tarfile.EmptyHeaderError) \
                    else f"bad header ({end})" if isinstance(end, tarfile.InvalidHeaderError) \
                    else f"cut inside a header ({end})"
                raise CimError(E_INVALIDARG, f"truncated or corrupt tar: {why}", _after(last, self.label))
            last = m
            yield m
            if self._own_file is not None or self._own_stream:
                # A stream tar keeps every TarInfo it read; a layer of a
                # million files need not (nothing looks members up by name).
                tf.members.clear()

    def close(self) -> None:
        if self.tf is not None and self._own_file is not None:
            try:
                self.tf.close()
            except Exception:  # noqa: BLE001
                pass
        if self._own_file is not None:
            self._own_file.close()
            self._own_file = None


def _after(m, label):
    return f"{label} (after member {m.name!r})" if m is not None else label


def _is_codec_error(e: BaseException) -> bool:
    try:
        import lzma

        if isinstance(e, lzma.LZMAError):
            return True
    except ImportError:
        pass
    return type(e).__name__ in ("BadGzipFile", "CompressionError")


def _is_read_error(e: BaseException) -> bool:
    return isinstance(e, (tarfile.TarError, EOFError, zlib.error, UnicodeError, ValueError, KeyError, OSError,
                          OverflowError)) or _is_codec_error(e)


def _read_error_text(e: BaseException, where: str, member) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, tarfile.ReadError) and text in ("empty header", "truncated header"):
        return f"truncated tar: the archive ends inside a member's headers ({text})"
    if isinstance(e, (tarfile.ReadError, EOFError)) and ("end of data" in text or "ended" in text or isinstance(e, EOFError)):
        return f"truncated tar: {text}"
    if isinstance(e, OSError) and not isinstance(e, CimError):
        return f"cannot read the tar: {e.strerror or text}"
    return f"malformed tar ({where}): {text}"


# ------------------------------------------------------------------ names
def _shown(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: quoted, and cut when long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _tar_parts(name: str, what: str, member: str) -> list[str]:
    """Components of a tar path, validated as CIM names (spec §15)."""
    if any("\ud800" <= c <= "\udfff" for c in name):
        raise CimError(ERROR_INVALID_NAME, f"{what} is not valid UTF-8", member)
    if name.startswith("/"):
        raise CimError(ERROR_INVALID_NAME, f"{what} is an absolute path", member)
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise CimError(ERROR_INVALID_NAME, f"{what} contains '..'", member)
        parts.append(p)
    if parts and len(parts[0]) == 2 and parts[0][1] == ":" and parts[0][0].isalpha():
        raise CimError(ERROR_INVALID_NAME, f"{what} starts with a drive letter", member)
    return parts


def _check_parts(parts: list[str], member: str, what: str = "name") -> None:
    for p in parts:
        try:
            check_name(p, member, what)
        except CimError as e:
            raise CimError(e.hresult, f"{e.strerror} (not a valid CIM name)", member) from None


# ------------------------------------------------------------------ metadata from PAX records
# Early hcsshim tars: the records went through Go's Header.Xattrs (so PAX
# "SCHILY.xattr.MSWINDOWS.*") and carried times as FILETIME decimals.
_SCHILY = "SCHILY.xattr."
_OLD_FILETIMES = {"MSWINDOWS.createtime": PAX_CREATIONTIME, "MSWINDOWS.writetime": "mtime",
                  "MSWINDOWS.changetime": "ctime", "MSWINDOWS.accesstime": "atime"}


def _normalize_headers(h: dict, member: str) -> dict:
    if not any(k.startswith(_SCHILY + "MSWINDOWS.") or k in _OLD_FILETIMES for k in h):
        return h
    out = {}
    for k, v in h.items():
        if k.startswith(_SCHILY + "MSWINDOWS."):
            plain = k[len(_SCHILY):]
            if plain not in h:  # the plain record, if both exist, wins
                out[plain] = v
        else:
            out[k] = v
    for old, new in _OLD_FILETIMES.items():
        if old in out:
            try:
                ticks = int(out.pop(old).strip(), 10)
                if not 0 <= ticks <= _FILETIME_MAX:
                    raise ValueError
            except ValueError:
                raise CimError(E_INVALIDARG, f"PAX record {old} is not a FILETIME decimal", member) from None
            out[new] = filetime_to_pax_time(ticks)  # exact: the FILETIME wins over a coarser tar time
    return out


def _b64(value: str, key: str, member: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        raise CimError(E_INVALIDARG, f"PAX record {key} is not valid base64", member) from None


def _times(m: tarfile.TarInfo, member: str) -> tuple[int, int, int, int]:
    h = m.pax_headers

    def get(key, default):
        v = h.get(key)
        if v is None:
            return default
        try:
            return pax_time_to_filetime(v)
        except ValueError as e:
            raise CimError(E_INVALIDARG, f"PAX record {key}: {e}", member) from None

    mtime = get("mtime", None)
    if mtime is None:
        try:
            mtime = pax_time_to_filetime(str(int(m.mtime)))
        except (ValueError, TypeError, OverflowError):
            raise CimError(E_INVALIDARG, f"bad mtime {m.mtime!r}", member) from None
    # [choice] a missing creation / change / access time is the last write time.
    return get(PAX_CREATIONTIME, mtime), mtime, get("ctime", mtime), get("atime", mtime)


def _metadata(m: tarfile.TarInfo, member: str, *, is_dir: bool) -> FileMetadata:
    h = m.pax_headers
    attrs = 0
    if PAX_FILEATTR in h:
        v = h[PAX_FILEATTR].strip()
        try:
            attrs = int(v, 10)
        except ValueError:
            attrs = -1
        if not 0 <= attrs <= 0xFFFFFFFF:
            raise CimError(E_INVALIDARG, f"PAX record {PAX_FILEATTR} {h[PAX_FILEATTR]!r} is not a 32-bit decimal number", member)
    attrs &= ~(FileAttributes.DIRECTORY | FileAttributes.REPARSE_POINT | FileAttributes.NORMAL)
    if is_dir:
        attrs |= FileAttributes.DIRECTORY
    sd = b""
    if PAX_RAWSD in h:
        sd = _b64(h[PAX_RAWSD], PAX_RAWSD, member)
        _check_sd(sd, member)
    elif PAX_SDDL in h:
        try:
            sd = _ntfs().sddl_to_sd(h[PAX_SDDL])
        except CimError as e:
            raise CimError(e.hresult, f"PAX record {PAX_SDDL}: {e.strerror}", member) from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CimError(E_INVALIDARG, f"PAX record {PAX_SDDL} is not valid SDDL ({e})", member) from None
    eas = []
    for k, v in h.items():
        if k.startswith(PAX_EA_PREFIX):
            name = k[len(PAX_EA_PREFIX):]
            if not name or not name.isascii() or len(name) > 255 or any(ord(c) < 32 for c in name):
                raise CimError(E_INVALIDARG, f"extended attribute name {name!r} is not 1-255 printable ASCII characters", member)
            value = _b64(v, k, member)
            if len(value) > 0xFFFF:
                raise CimError(E_INVALIDARG, f"extended attribute {name!r} value is longer than 65535 bytes", member)
            eas.append((name, value))
    ea_buffer = b""
    if eas:
        ntfs = _ntfs()
        try:
            ea_buffer = ntfs.pack_eas([ntfs.EaEntry(n, v) for n, v in eas])
        except CimError as e:
            raise CimError(e.hresult, f"extended attributes: {e.strerror}", member) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise CimError(E_INVALIDARG, f"extended attributes: {e}", member) from None
    creation, write, change, access = _times(m, member)
    return FileMetadata(attributes=attrs, creation_time=creation, last_write_time=write, change_time=change,
                        last_access_time=access, security_descriptor=sd, ea_buffer=ea_buffer)


def _check_sd(sd: bytes, member: str) -> None:
    # A self-relative SECURITY_DESCRIPTOR: revision 1, 20-byte header, the
    # SE_SELF_RELATIVE control bit (0x8000).
    if len(sd) < 20 or sd[0] != 1 or not (sd[3] & 0x80):
        raise CimError(E_INVALIDARG, f"PAX record {PAX_RAWSD} is not a self-relative security descriptor", member)
    if len(sd) > 0xFFFF:
        raise CimError(E_INVALIDARG, "security descriptor is longer than 65535 bytes", member)


# ------------------------------------------------------------------ import
class _LayerImporter:
    def __init__(self, writer, source: _TarSource, parent_image, progress, independent: bool = False):
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

    def _copy(self, m: tarfile.TarInfo, stream, size: int, member: str) -> None:
        f = self.src.tf.extractfile(m)
        if f is None:
            raise CimError(E_INVALIDARG, "entry has no data", member)
        remaining = size
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise CimError(E_INVALIDARG, f"truncated tar: data ends {remaining} bytes early", member)
            stream.write(chunk)
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
            with self.w.create_file(path, meta) as s:
                self._copy(m, s, m.size, member)
            self.added[key] = False
            self.last_file = path
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "FIFO"}.get(m.type, f"type {m.type!r}")
            raise CimError(E_INVALIDARG, f"a {kind} entry has no meaning in a Windows layer", member)

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
                meta.reparse_data = ntfs.pack_mount_point_reparse(target) if mount else ntfs.pack_symlink_reparse(target)
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
        name = base[len(WHITEOUT_PREFIX):]
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


def import_layer(src, containing_dir, name, parent=None, progress=None, *, before_commit=None,
                 consistent: bool = False, clamp_time: int | None = None, independent: bool = False) -> str:
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
    """
    directory = os.fspath(containing_dir)
    name = _image_name(name)
    if independent and parent is not None:
        raise CimError(E_INVALIDARG, "an independent layer has no parent image", os.fspath(parent))
    if parent is not None:
        parent = os.fspath(parent)  # cimfs.create checks it is in the same directory
    report = _progress_adapter(progress)
    source = _TarSource(src)
    try:
        with cimfs.create(directory, name, base=parent, consistent=consistent, clamp_time=clamp_time) as w:
            lower = cimfs.open(os.path.join(directory, os.path.basename(parent))) if parent is not None else None
            try:
                _LayerImporter(w, source, lower, report, independent).run()
            finally:
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
    from .tools import rm_image

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


def export_layer(image, out, progress=None, *, compression: str | None = None, parent=None,
                 exclude: Iterable[str] = (), independent: bool = False) -> None:
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
    if lower is not None or exclude:
        def make(tf, rep):
            return _DiffExporter(img, tf, rep, lower, exclude)
    else:
        def make(tf, rep):
            return _Exporter(img, tf, rep, independent)
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


def _export(make_exporter, f, report, compression: str, label) -> None:
    if compression not in ("", "gz", "bz2", "xz"):
        raise CimError(E_INVALIDARG, f"unknown compression {compression!r} (gz, bz2 or xz)")
    tf = tarfile.open(fileobj=f, mode=f"w|{compression}", format=tarfile.PAX_FORMAT, encoding="utf-8")
    # Only a complete export gets its end-of-archive blocks: a reader of a
    # failed export (a pipe, say) sees a truncated tar, not a shorter valid one.
    try:
        make_exporter(tf, report).run()
    except BaseException:
        # Abandon the tar without its end blocks (and without tarfile's
        # flush-on-garbage-collection writing into a closed file later).
        tf.closed = True
        if _is_stream(tf):
            tf.fileobj.closed = True
        raise
    tf.close()


class _Exporter:
    def __init__(self, img, tf: tarfile.TarFile, report, independent: bool = False):
        self.img, self.tf, self.report = img, tf, report
        self.independent = independent
        self.first_name: dict[int, str] = {}

    def run(self) -> None:
        """Pre-order: each directory right before its children, children in image order."""
        img = self.img
        seen_dirs = {img.root_id}
        stack = [([], iter(img.scandir(img.root_id)))]
        while stack:
            parts, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            cparts = parts + [entry.name]
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
            raise CimError(ERROR_INVALID_NAME, "name is not valid Unicode (an unpaired surrogate); a tar cannot hold it",
                           "\\".join(parts)) from None
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
            st = st._replace(reparse_data=b"", reparse_tag=0,
                             attributes=st.attributes & ~FileAttributes.REPARSE_POINT)
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


_UNCHANGED_FIELDS = ("attributes", "creation_time", "last_write_time", "change_time", "last_access_time",
                     "security_descriptor", "ea_buffer", "reparse_data", "is_dir", "size", "is_sparse")


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

    def __init__(self, img, tf, report, lower, exclude: frozenset):
        super().__init__(img, tf, report)
        self.lower = lower
        self.exclude = exclude

    def run(self) -> None:
        if self.lower is None:  # nothing to compare with: written as it is walked
            self._plan_dir([], self.img.root_id, None, _WriteNow(self))
            return
        plan: list[tuple[str, list[str], object]] = []  # ("entry" | "whiteout", parts, stat): changes only
        self._plan_dir([], self.img.root_id, self.lower.root_id, plan)
        for item in plan:
            self._write(*item)

    def _excluded(self, parts) -> bool:
        return bool(self.exclude) and self.img.fold("\\".join(parts)) in self.exclude

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

    def _whiteout(self, parts) -> None:
        ti = tarfile.TarInfo(self._tarname(parts[:-1] + [WHITEOUT_PREFIX + parts[-1]]))
        ti.type = tarfile.REGTYPE
        ti.mode = 0o644
        self.tf.addfile(ti)
        self.report(0, ti.name)


class _WriteNow:
    """A plan that is carried out as it is made."""

    def __init__(self, exporter: _DiffExporter):
        self.exporter = exporter

    def append(self, item) -> None:
        self.exporter._write(*item)
