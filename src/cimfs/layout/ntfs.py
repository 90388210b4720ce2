"""NTFS and WSL metadata blobs that CIM images carry (spec §13, §17–§19):
FILE_FULL_EA_INFORMATION chains, REPARSE_DATA_BUFFERs, self-relative security
descriptors (with SDDL text) and WSL's ``$LX*`` EAs.

This module is the one place that packs and unpacks those bytes.  Parsers take
untrusted input and raise ``CimFormatError`` for anything malformed.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import E_INVALIDARG, CimError, CimFormatError

IO_REPARSE_TAG_MOUNT_POINT = 0xA0000003
IO_REPARSE_TAG_SYMLINK = 0xA000000C
IO_REPARSE_TAG_LX_SYMLINK = 0xA000001D
IO_REPARSE_TAG_AF_UNIX = 0x80000023
IO_REPARSE_TAG_LX_FIFO = 0x80000024
IO_REPARSE_TAG_LX_CHR = 0x80000025
IO_REPARSE_TAG_LX_BLK = 0x80000026
IO_REPARSE_TAG_WCI_TOMBSTONE = 0xA000001F
SYMLINK_FLAG_RELATIVE = 1

# [choice] Merge markers of a layer converted on its own (merge links, opaque
# directories): a non-Microsoft reparse tag (bit 31 clear), which NTFS
# requires to carry REPARSE_GUID_DATA_BUFFER (tag, length, reserved, a GUID
# naming the owner, then data).  A marker is ours only if both the tag and
# CIMFS_MERGE_GUID match, so data written by anybody else cannot be taken for
# one.  The data is u32 kind, then for a merge link (kind 1) the UTF-16LE
# target path, for a directory (kind 2) u32 flags.
IO_REPARSE_TAG_CIMFS_MERGE = 0x0000C1F5
CIMFS_MERGE_GUID = bytes.fromhex("5f8b3a8e0c1d4b6c9e2a71d40c1f5e13")
MERGE_KIND_LINK = 1
MERGE_KIND_DIR = 2
MERGE_DIR_OPAQUE = 0x1  # replaces the lower directory instead of merging with it
MERGE_DIR_PARENT_ONLY = 0x2  # only holds the layer's entries: a lower directory keeps its metadata

_REPARSE_HEADER = struct.Struct("<IHH")
_NAMES = struct.Struct("<HHHH")
_EA_HEADER = struct.Struct("<IBBH")
_U32 = struct.Struct("<I")


# ====================================================================== EAs
# The value classes here are NamedTuples, not frozen dataclasses: as immutable,
# but each costs ~0.1 ms to define instead of ~0.45 ms (start-up time: every
# command that reads or writes an image imports this module).
class EaEntry(NamedTuple):
    name: str
    value: bytes
    flags: int = 0


def pack_eas(entries: Iterable[EaEntry]) -> bytes:
    """A FILE_FULL_EA_INFORMATION chain; entries 4-byte aligned, the last unpadded."""
    parts = []
    entries = list(entries)
    for i, e in enumerate(entries):
        name = e.name.encode("latin-1") if isinstance(e.name, str) else bytes(e.name)
        if not name or len(name) > 255 or b"\0" in name:
            raise CimError(E_INVALIDARG, f"EA name {e.name!r} must be 1-255 bytes without NUL")
        if len(e.value) > 0xFFFF:
            raise CimError(E_INVALIDARG, f"EA {e.name!r} value is longer than 65535 bytes")
        size = _EA_HEADER.size + len(name) + 1 + len(e.value)
        last = i == len(entries) - 1
        padded = size if last else (size + 3) & ~3
        parts.append(
            _EA_HEADER.pack(0 if last else padded, e.flags, len(name), len(e.value))
            + name
            + b"\0"
            + bytes(e.value)
            + bytes(padded - size)
        )
    return b"".join(parts)


def unpack_eas(buf: bytes) -> list[EaEntry]:
    entries = []
    pos = 0
    n = len(buf)
    while pos < n:
        if pos + _EA_HEADER.size > n:
            raise CimFormatError(f"EA entry at {pos} is truncated")
        nxt, flags, name_len, value_len = _EA_HEADER.unpack_from(buf, pos)
        end = pos + _EA_HEADER.size + name_len + 1 + value_len
        if end > n:
            raise CimFormatError(f"EA entry at {pos} runs past the buffer ({end} > {n})")
        name_start = pos + _EA_HEADER.size
        if buf[name_start + name_len] != 0:
            raise CimFormatError(f"EA name at {pos} is not NUL-terminated")
        name = bytes(buf[name_start : name_start + name_len]).decode("latin-1")
        value = bytes(buf[name_start + name_len + 1 : end])
        entries.append(EaEntry(name, value, flags))
        if nxt == 0:
            break
        if nxt < end - pos:
            raise CimFormatError(f"EA entry at {pos} has next-entry offset {nxt} inside itself")
        pos += nxt
    return entries


# ====================================================================== WSL metadata
class LxMetadata(NamedTuple):
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    rdev_major: int | None = None
    rdev_minor: int | None = None


def lx_eas(*, mode=None, uid=None, gid=None, rdev_major=None, rdev_minor=None) -> list[EaEntry]:
    out = []
    if uid is not None:
        out.append(EaEntry("$LXUID", _U32.pack(uid & 0xFFFFFFFF)))
    if gid is not None:
        out.append(EaEntry("$LXGID", _U32.pack(gid & 0xFFFFFFFF)))
    if mode is not None:
        out.append(EaEntry("$LXMOD", _U32.pack(mode & 0xFFFFFFFF)))
    if rdev_major is not None or rdev_minor is not None:
        out.append(
            EaEntry("$LXDEV", struct.pack("<II", (rdev_major or 0) & 0xFFFFFFFF, (rdev_minor or 0) & 0xFFFFFFFF))
        )
    return out


def parse_lx_eas(entries: Iterable[EaEntry]) -> LxMetadata:
    """``$LX*`` values from an EA list; names match case-insensitively (NTFS
    stores EA names upper-case); malformed values are ignored, not guessed."""
    found: dict[str, bytes] = {}
    for e in entries:
        found.setdefault(e.name.upper(), e.value)

    def u32(name):
        v = found.get(name)
        return _U32.unpack(v[:4])[0] if v is not None and len(v) >= 4 else None

    dev = found.get("$LXDEV")
    major, minor = struct.unpack("<II", dev[:8]) if dev is not None and len(dev) >= 8 else (None, None)
    return LxMetadata(u32("$LXMOD"), u32("$LXUID"), u32("$LXGID"), major, minor)


# ====================================================================== reparse points
class ReparsePoint(NamedTuple):
    tag: int
    data: bytes
    substitute_name: str | None = None
    print_name: str | None = None
    relative: bool | None = None
    target: str | None = None


def pack_reparse(tag: int, data: bytes) -> bytes:
    if len(data) > 0xFFFF - _REPARSE_HEADER.size:
        raise CimError(E_INVALIDARG, "reparse data is longer than 16 KiB")
    return _REPARSE_HEADER.pack(tag, len(data), 0) + bytes(data)


def _is_absolute(target: str) -> bool:
    return bool(re.match(r"^([A-Za-z]:[\\/]|[\\/]{2}|\\\?\?\\|[\\/])", target))


#: The longest symlink or mount point target a reparse buffer holds: both
#: names (substitute ``\??\``-prefixed, print name) in a 64 KiB buffer.
MAX_LINK_TARGET_UNITS = (0xFFFF - 8 - 8 - 4 - 4 * 2 - 8 * 2) // 4


def _name_buffer(substitute: str, print_name: str, nul: bool) -> tuple[bytes, bytes]:
    sub = substitute.encode("utf-16-le", "surrogatepass")
    prn = print_name.encode("utf-16-le", "surrogatepass")
    term = b"\0\0" if nul else b""
    if 2 * len(term) + len(sub) + len(prn) > 0xFFFF - _REPARSE_HEADER.size - _NAMES.size - _U32.size:
        raise CimError(
            E_INVALIDARG,
            f"link target of {len(print_name)} characters is too long for a reparse "
            f"buffer (at most {MAX_LINK_TARGET_UNITS} UTF-16 units)",
        )
    offsets = _NAMES.pack(0, len(sub), len(sub) + len(term), len(prn))
    return offsets, sub + term + prn + term


def pack_symlink_reparse(target: str, relative: bool | None = None) -> bytes:
    """An NT symlink; absolute targets get ``\\??\\`` in the substitute name."""
    if relative is None:
        relative = not _is_absolute(target)
    substitute = target
    if not relative and not target.startswith("\\??\\"):
        substitute = "\\??\\UNC\\" + target[2:] if target.startswith("\\\\") else "\\??\\" + target
    print_name = target[4:] if target.startswith("\\??\\") else target
    offsets, names = _name_buffer(substitute, print_name, nul=False)
    return pack_reparse(IO_REPARSE_TAG_SYMLINK, offsets + _U32.pack(SYMLINK_FLAG_RELATIVE if relative else 0) + names)


def pack_mount_point_reparse(target: str) -> bytes:
    substitute = target if target.startswith("\\??\\") else "\\??\\" + target
    print_name = target[4:] if target.startswith("\\??\\") else target
    offsets, names = _name_buffer(substitute, print_name, nul=True)
    return pack_reparse(IO_REPARSE_TAG_MOUNT_POINT, offsets + names)


def pack_lx_symlink_reparse(target: str) -> bytes:
    raw = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else bytes(target)
    return pack_reparse(IO_REPARSE_TAG_LX_SYMLINK, _U32.pack(2) + raw)


def pack_lx_special_reparse(tag: int) -> bytes:
    return pack_reparse(tag, b"")


def reparse_tag(buf: bytes) -> int:
    """The tag of a reparse buffer of at least 8 bytes (its header)."""
    return _U32.unpack_from(buf, 0)[0]


def parse_reparse(buf: bytes) -> ReparsePoint:
    if len(buf) < _REPARSE_HEADER.size:
        raise CimFormatError(f"reparse buffer of {len(buf)} bytes is shorter than its header")
    tag, length, _ = _REPARSE_HEADER.unpack_from(buf, 0)
    if _REPARSE_HEADER.size + length > len(buf):
        raise CimFormatError(f"reparse data length {length} runs past the {len(buf)}-byte buffer")
    data = bytes(buf[_REPARSE_HEADER.size : _REPARSE_HEADER.size + length])
    if tag in (IO_REPARSE_TAG_SYMLINK, IO_REPARSE_TAG_MOUNT_POINT):
        fixed = _NAMES.size + (4 if tag == IO_REPARSE_TAG_SYMLINK else 0)
        if len(data) < fixed:
            raise CimFormatError(f"reparse data of tag {tag:#x} is truncated")
        so, sl, po, pl = _NAMES.unpack_from(data, 0)
        relative = (
            bool(_U32.unpack_from(data, 8)[0] & SYMLINK_FLAG_RELATIVE) if tag == IO_REPARSE_TAG_SYMLINK else False
        )
        path = data[fixed:]
        if so + sl > len(path) or po + pl > len(path) or so % 2 or sl % 2 or po % 2 or pl % 2:
            raise CimFormatError("reparse name offsets lie outside the path buffer")
        sub = path[so : so + sl].decode("utf-16-le", "surrogatepass")
        prn = path[po : po + pl].decode("utf-16-le", "surrogatepass")
        target = prn or (sub[4:] if sub.startswith("\\??\\") else sub)
        return ReparsePoint(tag, data, sub, prn, relative if tag == IO_REPARSE_TAG_SYMLINK else None, target)
    if tag == IO_REPARSE_TAG_LX_SYMLINK:
        if len(data) < 4:
            raise CimFormatError("LX symlink reparse data is truncated")
        return ReparsePoint(tag, data, target=data[4:].decode("utf-8", "surrogateescape"))
    return ReparsePoint(tag, data)


def pack_tombstone_reparse() -> bytes:
    """A WCI tombstone: the name is deleted from the layers below (no data)."""
    return pack_reparse(IO_REPARSE_TAG_WCI_TOMBSTONE, b"")


def pack_merge_link_reparse(target: str) -> bytes:
    return pack_reparse(
        IO_REPARSE_TAG_CIMFS_MERGE,
        CIMFS_MERGE_GUID + _U32.pack(MERGE_KIND_LINK) + target.encode("utf-16-le", "surrogatepass"),
    )


def pack_merge_dir_reparse(flags: int) -> bytes:
    return pack_reparse(IO_REPARSE_TAG_CIMFS_MERGE, CIMFS_MERGE_GUID + _U32.pack(MERGE_KIND_DIR) + _U32.pack(flags))


def parse_merge_reparse(buf: bytes) -> tuple[int, str | int] | None:
    """(MERGE_KIND_LINK, target) or (MERGE_KIND_DIR, flags) of a cimfs merge
    marker; None for any other reparse buffer.  A marker of ours that does
    not parse is a CimFormatError."""
    if len(buf) < _REPARSE_HEADER.size + 16 or _U32.unpack_from(buf, 0)[0] != IO_REPARSE_TAG_CIMFS_MERGE:
        return None
    _, length, _ = _REPARSE_HEADER.unpack_from(buf, 0)
    data = bytes(buf[_REPARSE_HEADER.size : _REPARSE_HEADER.size + length])
    if data[:16] != CIMFS_MERGE_GUID:
        return None
    if len(data) < 20:
        raise CimFormatError("cimfs merge marker is truncated")
    kind = _U32.unpack_from(data, 16)[0]
    if kind == MERGE_KIND_LINK and len(data) > 20 and len(data) % 2 == 0:
        return kind, data[20:].decode("utf-16-le", "surrogatepass")
    if kind == MERGE_KIND_DIR and len(data) == 24:
        flags = _U32.unpack_from(data, 20)[0]
        if not flags & ~(MERGE_DIR_OPAQUE | MERGE_DIR_PARENT_ONLY):
            return kind, flags
    raise CimFormatError(f"cimfs merge marker of kind {kind} and {len(data) - 20} data bytes is not valid")


# ====================================================================== security descriptors
SE_DACL_PRESENT = 0x0004
SE_SACL_PRESENT = 0x0010
SE_DACL_AUTO_INHERIT_REQ = 0x0100
SE_SACL_AUTO_INHERIT_REQ = 0x0200
SE_DACL_AUTO_INHERITED = 0x0400
SE_SACL_AUTO_INHERITED = 0x0800
SE_DACL_PROTECTED = 0x1000
SE_SACL_PROTECTED = 0x2000
SE_SELF_RELATIVE = 0x8000

_SD_HEADER = struct.Struct("<BBHIIII")
_ACL_HEADER = struct.Struct("<BBHHH")
_ACE_HEADER = struct.Struct("<BBH")

SID_ALIASES = {
    "SY": "S-1-5-18",
    "BA": "S-1-5-32-544",
    "BU": "S-1-5-32-545",
    "BG": "S-1-5-32-546",
    "WD": "S-1-1-0",
    "AU": "S-1-5-11",
    "CO": "S-1-3-0",
    "CG": "S-1-3-1",
    "OW": "S-1-3-4",
    "LS": "S-1-5-19",
    "NS": "S-1-5-20",
    "IU": "S-1-5-4",
    "SU": "S-1-5-6",
    "NU": "S-1-5-2",
    "AN": "S-1-5-7",
    "BO": "S-1-5-32-551",
    "PU": "S-1-5-32-547",
    "SO": "S-1-5-32-549",
    "AO": "S-1-5-32-548",
    "PO": "S-1-5-32-550",
    "RD": "S-1-5-32-555",
    "RE": "S-1-5-32-552",
    "NO": "S-1-5-32-556",
    "RU": "S-1-5-32-554",
    "AC": "S-1-15-2-1",
    "RC": "S-1-5-12",
    "PS": "S-1-5-10",
    "ED": "S-1-5-9",
    "SS": "S-1-18-2",
    "AS": "S-1-18-1",
    "LW": "S-1-16-4096",
    "ME": "S-1-16-8192",
    "HI": "S-1-16-12288",
    "SI": "S-1-16-16384",
}
SID_NAMES = {
    "S-1-5-18": "NT AUTHORITY\\SYSTEM",
    "S-1-5-32-544": "BUILTIN\\Administrators",
    "S-1-5-32-545": "BUILTIN\\Users",
    "S-1-1-0": "Everyone",
    "S-1-5-11": "NT AUTHORITY\\Authenticated Users",
    "S-1-3-0": "CREATOR OWNER",
    "S-1-3-1": "CREATOR GROUP",
    "S-1-5-19": "NT AUTHORITY\\LOCAL SERVICE",
    "S-1-5-20": "NT AUTHORITY\\NETWORK SERVICE",
    "S-1-15-2-1": "APPLICATION PACKAGE AUTHORITY\\ALL APPLICATION PACKAGES",
    "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464": "NT SERVICE\\TrustedInstaller",
}
_ALIAS_OF = {v: k for k, v in SID_ALIASES.items()}
ACE_TYPES = {"A": 0, "D": 1, "AU": 2, "AL": 3}
_ACE_TYPE_NAMES = {v: k for k, v in ACE_TYPES.items()}
_ACE_TYPE_WORDS = {0: "allow", 1: "deny", 2: "audit", 3: "alarm"}
ACE_FLAGS = {"OI": 0x1, "CI": 0x2, "NP": 0x4, "IO": 0x8, "ID": 0x10, "SA": 0x40, "FA": 0x80}
# [choice] rights print as one of these names when the mask matches exactly, else as hex.
RIGHTS = {
    "FA": 0x1F01FF,
    "FR": 0x120089,
    "FW": 0x120116,
    "FX": 0x1200A0,
    "KA": 0xF003F,
    "KR": 0x20019,
    "KW": 0x20006,
    "GA": 0x10000000,
    "GR": 0x80000000,
    "GW": 0x40000000,
    "GX": 0x20000000,
    "RC": 0x20000,
    "SD": 0x10000,
    "WD": 0x40000,
    "WO": 0x80000,
    "CC": 0x1,
    "DC": 0x2,
    "LC": 0x4,
    "SW": 0x8,
    "RP": 0x10,
    "WP": 0x20,
    "DT": 0x40,
    "LO": 0x80,
    "CR": 0x100,
}
_RIGHT_NAMES = {
    v: k for k, v in RIGHTS.items() if k in ("FA", "FR", "FW", "FX", "KA", "KR", "KW", "GA", "GR", "GW", "GX")
}


def _sid_at(buf: bytes, off: int, what: str) -> tuple[str, int]:
    if off + 8 > len(buf):
        raise CimFormatError(f"{what} SID at {off} is truncated")
    rev, count = buf[off], buf[off + 1]
    if rev != 1 or count > 15:
        raise CimFormatError(f"{what} SID at {off} has revision {rev} and {count} sub-authorities")
    end = off + 8 + 4 * count
    if end > len(buf):
        raise CimFormatError(f"{what} SID at {off} runs past the descriptor")
    authority = int.from_bytes(buf[off + 2 : off + 8], "big")
    subs = struct.unpack_from(f"<{count}I", buf, off + 8)
    return "S-1-" + "-".join(str(x) for x in (authority, *subs)), end - off


def _pack_sid(text: str) -> bytes:
    text = SID_ALIASES.get(text, text)
    m = re.fullmatch(r"S-1-(\d+)((?:-\d+){0,15})", text)
    if not m:
        raise CimError(E_INVALIDARG, f"{text!r} is not a SID or a known SID alias")
    authority = int(m.group(1))
    subs = [int(x) for x in m.group(2).split("-")[1:]]
    if authority >= 1 << 48 or any(s >= 1 << 32 for s in subs):
        raise CimError(E_INVALIDARG, f"SID {text!r} is out of range")
    return bytes([1, len(subs)]) + authority.to_bytes(6, "big") + struct.pack(f"<{len(subs)}I", *subs)


def _acl_at(buf: bytes, off: int, what: str) -> list[tuple[int, int, int, str]]:
    if off + _ACL_HEADER.size > len(buf):
        raise CimFormatError(f"{what} at {off} is truncated")
    _rev, _, size, count, _ = _ACL_HEADER.unpack_from(buf, off)
    if off + size > len(buf) or size < _ACL_HEADER.size:
        raise CimFormatError(f"{what} of {size} bytes at {off} runs past the descriptor")
    aces = []
    pos = off + _ACL_HEADER.size
    end = off + size
    for _ in range(count):
        if pos + _ACE_HEADER.size > end:
            raise CimFormatError(f"{what}: ACE at {pos} is truncated")
        ace_type, flags, ace_size = _ACE_HEADER.unpack_from(buf, pos)
        if ace_size < _ACE_HEADER.size + 4 or pos + ace_size > end:
            raise CimFormatError(f"{what}: ACE at {pos} has size {ace_size}")
        if ace_type not in _ACE_TYPE_NAMES:
            raise CimFormatError(f"{what}: ACE type {ace_type} is not supported")
        mask = _U32.unpack_from(buf, pos + 4)[0]
        sid, _n = _sid_at(buf[: pos + ace_size], pos + 8, what)
        aces.append((ace_type, flags, mask, sid))
        pos += ace_size
    return aces


def _parse_sd(sd: bytes):
    if len(sd) < _SD_HEADER.size:
        raise CimFormatError(f"security descriptor of {len(sd)} bytes is shorter than its header")
    rev, _, control, owner, group, sacl, dacl = _SD_HEADER.unpack_from(sd, 0)
    if rev != 1:
        raise CimFormatError(f"security descriptor revision {rev}")
    if not control & SE_SELF_RELATIVE:
        raise CimFormatError("security descriptor is not self-relative")
    return (
        control,
        _sid_at(sd, owner, "owner")[0] if owner else None,
        _sid_at(sd, group, "group")[0] if group else None,
        _acl_at(sd, sacl, "SACL") if control & SE_SACL_PRESENT and sacl else None,
        _acl_at(sd, dacl, "DACL") if control & SE_DACL_PRESENT and dacl else None,
    )


def _sid_text(sid: str) -> str:
    return _ALIAS_OF.get(sid, sid)


def _acl_text(control: int, aces, present: int, protected: int, inherited: int, req: int) -> str:
    flags = (
        ("P" if control & protected else "") + ("AR" if control & req else "") + ("AI" if control & inherited else "")
    )
    if aces is None:
        return flags + "NO_ACCESS_CONTROL"
    out = [flags]
    for ace_type, ace_flags, mask, sid in aces:
        f = "".join(k for k, v in ACE_FLAGS.items() if ace_flags & v)
        rights = _RIGHT_NAMES.get(mask, f"0x{mask:x}")
        out.append(f"({_ACE_TYPE_NAMES[ace_type]};{f};{rights};;;{_sid_text(sid)})")
    return "".join(out)


def sd_to_sddl(sd: bytes) -> str:
    control, owner, group, sacl, dacl = _parse_sd(sd)
    text = ""
    if owner:
        text += "O:" + _sid_text(owner)
    if group:
        text += "G:" + _sid_text(group)
    if control & SE_DACL_PRESENT:
        text += "D:" + _acl_text(
            control, dacl, SE_DACL_PRESENT, SE_DACL_PROTECTED, SE_DACL_AUTO_INHERITED, SE_DACL_AUTO_INHERIT_REQ
        )
    if control & SE_SACL_PRESENT:
        text += "S:" + _acl_text(
            control, sacl, SE_SACL_PRESENT, SE_SACL_PROTECTED, SE_SACL_AUTO_INHERITED, SE_SACL_AUTO_INHERIT_REQ
        )
    return text


def _pack_acl(aces: list[bytes]) -> bytes:
    body = b"".join(aces)
    return _ACL_HEADER.pack(2, 0, _ACL_HEADER.size + len(body), len(aces), 0) + body


def _parse_acl_text(text: str, where: str) -> tuple[int, list[bytes] | None]:
    m = re.match(r"^((?:P|AI|AR|NO_ACCESS_CONTROL)*)", text)
    assert m is not None  # the pattern matches the empty string
    flag_text = m.group(1)
    flags = 0
    if "P" in flag_text.replace("NO_ACCESS_CONTROL", ""):
        flags |= 1
    if "AR" in flag_text:
        flags |= 2
    if "AI" in flag_text:
        flags |= 4
    rest = text[m.end() :]
    if "NO_ACCESS_CONTROL" in flag_text:
        if rest:
            raise CimError(E_INVALIDARG, f"{where}: ACEs after NO_ACCESS_CONTROL")
        return flags, None
    aces = []
    for ace in re.findall(r"\(([^()]*)\)", rest):
        fields = ace.split(";")
        if len(fields) < 6:
            raise CimError(E_INVALIDARG, f"ACE ({ace}) needs 6 fields")
        t, f, rights, obj, inh, sid = fields[:6]
        if t not in ACE_TYPES or obj or inh:
            raise CimError(E_INVALIDARG, f"ACE type {t!r} (or an object ACE) is not supported")
        ace_flags = 0
        for i in range(0, len(f), 2):
            if f[i : i + 2] not in ACE_FLAGS:
                raise CimError(E_INVALIDARG, f"unknown ACE flag {f[i : i + 2]!r}")
            ace_flags |= ACE_FLAGS[f[i : i + 2]]
        if rights.lower().startswith("0x"):
            mask = int(rights, 16)
        elif rights.isdigit():
            mask = int(rights)
        else:
            mask = 0
            for i in range(0, len(rights), 2):
                if rights[i : i + 2] not in RIGHTS:
                    raise CimError(E_INVALIDARG, f"unknown access right {rights[i : i + 2]!r}")
                mask |= RIGHTS[rights[i : i + 2]]
        body = _U32.pack(mask & 0xFFFFFFFF) + _pack_sid(sid)
        aces.append(_ACE_HEADER.pack(ACE_TYPES[t], ace_flags, _ACE_HEADER.size + len(body)) + body)
    if re.sub(r"\([^()]*\)", "", rest):
        raise CimError(E_INVALIDARG, f"{where}: cannot parse {rest!r}")
    return flags, aces


def sddl_to_sd(sddl: str) -> bytes:
    """A self-relative descriptor (owner, group, SACL, DACL in that order)."""
    parts = dict.fromkeys("OGDS")
    for m in re.finditer(r"([OGDS]):(.*?)(?=[OGDS]:(?![^()]*\))|$)", sddl.strip()):
        parts[m.group(1)] = m.group(2)
    if all(v is None for v in parts.values()) and sddl.strip():
        raise CimError(E_INVALIDARG, f"cannot parse SDDL {sddl!r}")
    control = SE_SELF_RELATIVE
    owner = _pack_sid(parts["O"]) if parts["O"] else b""
    group = _pack_sid(parts["G"]) if parts["G"] else b""
    sacl = dacl = b""
    if parts["S"] is not None:
        flags, aces = _parse_acl_text(parts["S"], "SACL")
        control |= (
            SE_SACL_PRESENT
            | (SE_SACL_PROTECTED if flags & 1 else 0)
            | (SE_SACL_AUTO_INHERIT_REQ if flags & 2 else 0)
            | (SE_SACL_AUTO_INHERITED if flags & 4 else 0)
        )
        sacl = _pack_acl(aces) if aces is not None else b""
    if parts["D"] is not None:
        flags, aces = _parse_acl_text(parts["D"], "DACL")
        control |= (
            SE_DACL_PRESENT
            | (SE_DACL_PROTECTED if flags & 1 else 0)
            | (SE_DACL_AUTO_INHERIT_REQ if flags & 2 else 0)
            | (SE_DACL_AUTO_INHERITED if flags & 4 else 0)
        )
        dacl = _pack_acl(aces) if aces is not None else b""
    pos = _SD_HEADER.size
    offsets = []
    for blob in (owner, group, sacl, dacl):
        offsets.append(pos if blob else 0)
        pos += len(blob)
    return _SD_HEADER.pack(1, 0, control, *offsets) + owner + group + sacl + dacl


def describe_sd(sd: bytes) -> dict:
    """A readable form: owner, group, ACEs with names where well known, and the SDDL."""
    control, owner, group, sacl, dacl = _parse_sd(sd)

    def who(sid):
        return f"{sid} ({SID_NAMES[sid]})" if sid in SID_NAMES else sid

    def aces(acl):
        if acl is None:
            return None
        return [
            {
                "type": _ACE_TYPE_WORDS[t],
                "flags": [k for k, v in ACE_FLAGS.items() if f & v],
                "mask": f"0x{m:x}",
                "rights": _RIGHT_NAMES.get(m),
                "sid": who(s),
            }
            for t, f, m, s in acl
        ]

    return {
        "control": f"0x{control:04x}",
        "owner": who(owner) if owner else None,
        "group": who(group) if group else None,
        "dacl": aces(dacl),
        "sacl": aces(sacl),
        "sddl": sd_to_sddl(sd),
    }
