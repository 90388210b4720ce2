"""Reading a Windows layer tar: detecting one (:func:`is_windows_layer`),
opening it as a stream with checked, bounded headers (:class:`_TarSource`),
turning read failures into one-line :class:`CimError` errors, validating member
names as CIM names, and mapping a member's PAX records to
:class:`cimfs.metadata.FileMetadata`.
"""

from __future__ import annotations

import base64
import binascii
import os
import tarfile
import weakref
import zlib
from collections.abc import Iterable, Mapping
from typing import IO

from ..errors import E_INVALIDARG, ERROR_INVALID_NAME, CimError, hresult_from_oserror
from ..metadata import FileAttributes, FileMetadata
from ..names import check_name
from ..tarbounds import BoundedTarInfo
from .pax import (
    _FILETIME_MAX,
    LAYER_TOP_LEVEL,
    PAX_CREATIONTIME,
    PAX_EA_PREFIX,
    PAX_FILEATTR,
    PAX_RAWSD,
    PAX_SDDL,
    WHITEOUT_PREFIX,
    _ntfs,
    filetime_to_pax_time,
    pax_time_to_filetime,
)

_DETECT_MEMBERS = 64  # members is_windows_layer reads from a seekable tar


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


# How each tar's header reading ended ("eof" or the HeaderError), for members().
_HEADER_END: weakref.WeakKeyDictionary[tarfile.TarFile, object] = weakref.WeakKeyDictionary()


class _CheckedTarInfo(BoundedTarInfo):
    """Records how header reading ended, so a tar cut at a header boundary
    (which ``tarfile`` silently treats as the end) is reported as truncated.
    Header sizes are bounded (:mod:`cimfs.tarbounds`)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            _HEADER_END[tf] = "eof"
            raise
        except tarfile.HeaderError as e:
            _HEADER_END[tf] = e
            raise


class _TarSource:
    """Opens ``src`` (path, binary file object or TarFile) as a stream tar."""

    def __init__(self, src, label: str | None = None):
        self._own_file = None
        self._own_stream = False
        self.tf = None
        if isinstance(src, tarfile.TarFile):
            self.tf = src
            self.label = label or (os.fsdecode(src.name) if src.name else "<tar>")
            src.tarinfo = _CheckedTarInfo  # later headers are checked
            _HEADER_END.pop(src, None)
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
            self.tf = tarfile.open(
                fileobj=f, mode="r|*", tarinfo=_CheckedTarInfo, encoding="utf-8", errors="surrogateescape"
            )
        except BaseException as e:
            self.close()
            if isinstance(e, CimError):
                raise
            if isinstance(e, (tarfile.TarError, EOFError, zlib.error, ValueError, UnicodeError)) or _is_codec_error(e):
                raise CimError(E_INVALIDARG, f"not a readable tar archive ({e})", self.label) from None
            if isinstance(e, OSError):
                raise CimError(hresult_from_oserror(e), f"cannot read the tar: {e.strerror or e}", self.label) from None
            raise
        _HEADER_END.pop(self.tf, None)
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
                end = _HEADER_END.get(tf)
                if end == "eof" or (end is None and last is None):
                    return
                why = (
                    "the archive ends without its end-of-archive blocks"
                    if isinstance(end, tarfile.EmptyHeaderError)
                    else f"bad header ({end})"
                    if isinstance(end, tarfile.InvalidHeaderError)
                    else f"cut inside a header ({end})"
                )
                raise CimError(E_INVALIDARG, f"truncated or corrupt tar: {why}", _after(last, self.label))
            last = m
            yield m
            if self._own_file is not None or self._own_stream:
                # A stream tar keeps every TarInfo it read; a layer of a
                # million files need not (nothing looks members up by name).
                tf.members.clear()

    def extractfile(self, m: tarfile.TarInfo) -> IO[bytes] | None:
        assert self.tf is not None  # open from _TarSource() to its close()
        return self.tf.extractfile(m)

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
        import lzma  # start-up time: only xz-compressed layers need it

        if isinstance(e, lzma.LZMAError):
            return True
    except ImportError:
        pass
    return type(e).__name__ in ("BadGzipFile", "CompressionError")


def _is_read_error(e: BaseException) -> bool:
    return isinstance(
        e, (tarfile.TarError, EOFError, zlib.error, UnicodeError, ValueError, KeyError, OSError, OverflowError)
    ) or _is_codec_error(e)


def _read_error_text(e: BaseException, where: str, member) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, tarfile.ReadError) and text in ("empty header", "truncated header"):
        return f"truncated tar: the archive ends inside a member's headers ({text})"
    if isinstance(e, (tarfile.ReadError, EOFError)) and (
        "end of data" in text or "ended" in text or isinstance(e, EOFError)
    ):
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
_OLD_FILETIMES = {
    "MSWINDOWS.createtime": PAX_CREATIONTIME,
    "MSWINDOWS.writetime": "mtime",
    "MSWINDOWS.changetime": "ctime",
    "MSWINDOWS.accesstime": "atime",
}


def _normalize_headers(h: Mapping[str, str], member: str) -> Mapping[str, str]:
    if not any(k.startswith(_SCHILY + "MSWINDOWS.") or k in _OLD_FILETIMES for k in h):
        return h
    out: dict[str, str] = {}
    for k, v in h.items():
        if k.startswith(_SCHILY + "MSWINDOWS."):
            plain = k[len(_SCHILY) :]
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
            raise CimError(
                E_INVALIDARG, f"PAX record {PAX_FILEATTR} {h[PAX_FILEATTR]!r} is not a 32-bit decimal number", member
            )
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
            name = k[len(PAX_EA_PREFIX) :]
            if not name or not name.isascii() or len(name) > 255 or any(ord(c) < 32 for c in name):
                raise CimError(
                    E_INVALIDARG, f"extended attribute name {name!r} is not 1-255 printable ASCII characters", member
                )
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
    return FileMetadata(
        attributes=attrs,
        creation_time=creation,
        last_write_time=write,
        change_time=change,
        last_access_time=access,
        security_descriptor=sd,
        ea_buffer=ea_buffer,
    )


def _check_sd(sd: bytes, member: str) -> None:
    # A self-relative SECURITY_DESCRIPTOR: revision 1, 20-byte header, the
    # SE_SELF_RELATIVE control bit (0x8000).
    if len(sd) < 20 or sd[0] != 1 or not (sd[3] & 0x80):
        raise CimError(E_INVALIDARG, f"PAX record {PAX_RAWSD} is not a self-relative security descriptor", member)
    if len(sd) > 0xFFFF:
        raise CimError(E_INVALIDARG, "security descriptor is longer than 65535 bytes", member)
