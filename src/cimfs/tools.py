"""Library-level operations behind the ``cimfs`` command: describe, info, diff,
fsck, rm and gc.  Clients of the public reader API (plus :mod:`cimfs.posix`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import stat as S
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import cimfs

from . import posix
from .atomic import fsync_dir
from .errors import (
    E_INVALIDARG,
    ERROR_FILE_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    CimError,
    CimFormatError,
    hresult_from_oserror,
)
from .layout import cim, ntfs
from .names import split_stream  # noqa: F401  (lives with the path rules; callers import it here)

if TYPE_CHECKING:  # annotations only
    from .reader import Stat

_ATTR_NAMES = [
    (0x1, "READONLY"),
    (0x2, "HIDDEN"),
    (0x4, "SYSTEM"),
    (0x10, "DIRECTORY"),
    (0x20, "ARCHIVE"),
    (0x80, "NORMAL"),
    (0x200, "SPARSE_FILE"),
    (0x400, "REPARSE_POINT"),
]


def attribute_names(attrs: int) -> list[str]:
    names = [n for bit, n in _ATTR_NAMES if attrs & bit]
    rest = attrs & ~sum(b for b, _ in _ATTR_NAMES)
    if rest:
        names.append(f"{rest:#x}")
    return names


def filetime_iso(ft: int) -> str:
    """A FILETIME as ISO 8601 UTC with all seven fractional digits."""
    if ft <= 0:
        return "1601-01-01T00:00:00.0000000Z" if ft == 0 else str(ft)
    secs, ticks = divmod(ft, 10_000_000)
    try:
        d = _dt.datetime(1601, 1, 1) + _dt.timedelta(seconds=secs)
    except OverflowError:
        return str(ft)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{ticks:07d}Z"


def _tag_names() -> dict[int, str]:
    names = {
        posix.TAG_MOUNT_POINT: "MOUNT_POINT",
        posix.TAG_SYMLINK: "SYMLINK",
        posix.TAG_LX_SYMLINK: "LX_SYMLINK",
        posix.TAG_AF_UNIX: "AF_UNIX",
        posix.TAG_LX_FIFO: "LX_FIFO",
        posix.TAG_LX_CHR: "LX_CHR",
        posix.TAG_LX_BLK: "LX_BLK",
        0xA000001F: "WCI_TOMBSTONE",
    }
    for k in dir(ntfs):
        v = getattr(ntfs, k)
        if k.startswith("IO_REPARSE_TAG_") and isinstance(v, int):
            names.setdefault(v, k[len("IO_REPARSE_TAG_") :])
    return names


def mode_string(mode: int) -> str:
    return S.filemode(mode)


# --------------------------------------------------------------------- stat
def describe(image, path: str) -> dict:
    """Every field of one entry, with EAs, reparse data and the security descriptor decoded."""
    st = image.stat(path)
    info = posix.posix_info(st)
    out = {
        "path": path or "\\",
        "file_id": st.file_id,
        "type": info.kind,
        "attributes": st.attributes,
        "attribute_names": attribute_names(st.attributes),
        "size": st.size,
        "nlink": st.nlink,
        "is_dir": st.is_dir,
        "is_sparse": st.is_sparse,
        "parent_file_id": getattr(st, "parent_file_id", None),
        "times": {
            k: {"filetime": getattr(st, k), "iso": filetime_iso(getattr(st, k))}
            for k in ("creation_time", "last_write_time", "change_time", "last_access_time")
        },
        "posix": {
            "mode": f"{info.mode:o}",
            "mode_string": mode_string(info.mode),
            "uid": info.uid,
            "gid": info.gid,
            "rdev": list(info.rdev) if info.kind in ("chr", "blk") else None,
            "target": info.target,
        },
    }
    # security descriptor
    if st.security_descriptor:
        sd = {"length": len(st.security_descriptor), "hex": st.security_descriptor.hex()}
        try:
            sd["sddl"] = ntfs.sd_to_sddl(st.security_descriptor)
        except Exception as e:  # noqa: BLE001 - a bad blob is reported, not fatal
            sd["error"] = str(e)
        try:
            sd["decoded"] = ntfs.describe_sd(st.security_descriptor)
        except Exception as e:  # noqa: BLE001
            sd.setdefault("error", str(e))
        out["security_descriptor"] = sd
    else:
        out["security_descriptor"] = None
    # EAs
    if st.ea_buffer:
        try:
            entries = ntfs.unpack_eas(st.ea_buffer)
            eas = []
            for ea in entries:
                d = {"name": _s(ea.name), "flags": ea.flags, "value_hex": bytes(ea.value).hex()}
                dec = _decode_lx_ea(_s(ea.name), bytes(ea.value))
                if dec is not None:
                    d["decoded"] = dec
                eas.append(d)
            out["eas"] = eas
        except Exception as e:  # noqa: BLE001
            out["eas"] = {"error": str(e), "hex": st.ea_buffer.hex()}
    else:
        out["eas"] = []
    # reparse
    if st.reparse_data:
        rp = {
            "tag": f"{st.reparse_tag:#010x}",
            "tag_name": _tag_names().get(st.reparse_tag, "unknown"),
            "length": len(st.reparse_data),
        }
        try:
            p = ntfs.parse_reparse(st.reparse_data)
            for k in ("substitute_name", "print_name", "relative", "target"):
                v = getattr(p, k, None)
                if v is not None:
                    rp[k] = _s(v)
            if getattr(p, "data", None):
                rp["data_hex"] = bytes(p.data).hex()
        except Exception as e:  # noqa: BLE001
            rp["error"] = str(e)
            rp["hex"] = st.reparse_data.hex()
        out["reparse"] = rp
    else:
        out["reparse"] = None
    out["streams"] = [{"name": s, "size": image.stream_size(st.file_id, s)} for s in image.streams(st.file_id)]
    return out


def _s(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    return v


def _decode_lx_ea(name: str, value: bytes):
    if len(value) != {"$LXUID": 4, "$LXGID": 4, "$LXMOD": 4, "$LXDEV": 8}.get(name):
        return None
    lx = ntfs.parse_lx_eas([ntfs.EaEntry(name, value)])
    if name == "$LXMOD":
        assert lx.mode is not None  # a 4-byte $LXMOD always parses
        return f"{lx.mode:o} ({S.filemode(lx.mode)})"
    if name == "$LXDEV":
        return [lx.rdev_major, lx.rdev_minor]
    return lx.uid if name == "$LXUID" else lx.gid


# --------------------------------------------------------------------- walking
def iter_entries(image, path: str = "") -> Iterator[tuple[str, int, Stat]]:
    """(path, file_id, Stat) for ``path`` and everything below it, depth first, no loops."""
    fid = image.lookup(path) if path else image.root_id
    st = image.stat(fid)
    base = path.replace("\\", "/").strip("/")
    yield base, fid, st
    if not st.is_dir:
        return
    stack = [(fid, base)]
    # Each directory entered once (a second name is listed, not entered), and
    # no more link-table bytes read than the image has.
    guard = image.directory_guard()
    guard.admit(fid)
    while stack:
        did, prefix = stack.pop()
        sub = []
        for e in image.scandir(did):
            p = f"{prefix}/{e.name}" if prefix else e.name
            cst = image.stat(e.file_id)
            yield p, e.file_id, cst
            if cst.is_dir and guard.admit(e.file_id) is None:
                sub.append((e.file_id, p))
        stack.extend(reversed(sub))


# --------------------------------------------------------------------- info
def _region_files(image) -> list[str]:
    return list(image.info().get("region_files", []))


def _file_sizes(sizes: dict[str, tuple[int, int]], names: list[str]) -> tuple[int, int]:
    """Total (bytes, bytes allocated) of the files ``names`` among ``Image.stored_sizes()``."""
    found = [sizes[n] for n in names if n in sizes]
    return sum(a for a, _ in found), sum(b for _, b in found)


def image_info(image) -> dict:
    info = dict(image.info())
    counts = {"files": 0, "directories": 0, "symlinks": 0, "special": 0, "hard_link_names": 0, "alternate_streams": 0}
    logical = 0  # bytes of content, every distinct file once
    by_path = 0  # bytes of content as seen through every path
    seen: set[int] = set()
    unique_objects: dict = {}
    for p, fid, st in iter_entries(image):
        kind = posix.posix_info(st).kind
        key = {"dir": "directories", "file": "files", "symlink": "symlinks"}.get(kind, "special")
        if fid in seen:
            counts["hard_link_names"] += 1
            by_path += st.size
            continue
        seen.add(fid)
        counts[key] += 1
        by_path += st.size
        logical += st.size
        desc = getattr(image, "stream_descriptor", None)
        if desc is not None and not st.is_dir and st.size and not st.is_sparse:
            try:
                d = desc(fid)
                unique_objects[(d.offset, d.length)] = d.length
            except CimError:
                pass
        for s in image.streams(fid):
            counts["alternate_streams"] += 1
            size = image.stream_size(fid, s)
            logical += size
            by_path += size
    info["counts"] = counts
    info["bytes_logical"] = logical
    if unique_objects or logical == 0:
        info["bytes_unique_content"] = sum(unique_objects.values())
        info["dedup_savings"] = max(0, logical - info["bytes_unique_content"])
    regions = _region_files(image)
    own_id = (info.get("region_set") or {}).get("id", "")
    own = [r for r in regions if own_id and own_id.lower() in os.path.basename(r).lower()]
    sizes = image.stored_sizes()
    app, alloc = _file_sizes(sizes, regions)
    own_app, own_alloc = _file_sizes(sizes, own)
    cim_size = sizes.get(image.name, (0, 0))[0]
    info["bytes_stored"] = {
        "all_regions": app,
        "all_regions_allocated": alloc,
        "own_regions": own_app,
        "own_regions_allocated": own_alloc,
        "cim_file": cim_size,
    }
    return info


# --------------------------------------------------------------------- diff
_COMPARED = (
    "attributes",
    "creation_time",
    "last_write_time",
    "change_time",
    "last_access_time",
    "security_descriptor",
    "ea_buffer",
    "reparse_data",
)


def _same_stream(a, fa, b, fb, size, stream=None) -> bool:
    # A sparse stream is all zeros and costs nothing to compare: only the
    # bytes a side actually stores are read (a 2^48-byte sparse length must
    # not be read as zeros for hours).
    da, db = a.stream_descriptor(fa, stream), b.stream_descriptor(fb, stream)
    if da.sparse and db.sparse:
        return True
    if da.sparse or db.sparse:
        image, desc = (b, db) if da.sparse else (a, da)
        pos = 0
        while pos < size:
            n = min(posix.CHUNK, size - pos)
            if image.read_at(desc, pos, n).count(0) != n:
                return False
            pos += n
        return True
    pos = 0
    while pos < size:
        n = min(posix.CHUNK, size - pos)
        if a.read_at(da, pos, n) != b.read_at(db, pos, n):
            return False
        pos += n
    return True


def diff_images(a, b) -> dict:
    """Paths added in ``b``, removed from ``a`` and changed (with the fields that differ)."""
    ea = {p: (fid, st) for p, fid, st in iter_entries(a)}
    eb = {p: (fid, st) for p, fid, st in iter_entries(b)}
    added = [p for p in eb if p not in ea]
    removed = [p for p in ea if p not in eb]
    changed = []

    # hard-link structure: the set of paths sharing each file
    def groups(entries):
        by_id: dict[int, list[str]] = {}
        for p, (fid, st) in entries.items():
            if not st.is_dir:
                by_id.setdefault(fid, []).append(p)
        return {p: tuple(sorted(v)) for v in by_id.values() for p in v}

    ga, gb = groups(ea), groups(eb)
    for p in ea:
        if p not in eb:
            continue
        fa, sa = ea[p]
        fb, sb = eb[p]
        fields = [f for f in _COMPARED if getattr(sa, f) != getattr(sb, f)]
        if sa.is_dir != sb.is_dir:
            fields.append("type")
        if not sa.is_dir and not sb.is_dir:
            if sa.size != sb.size:
                fields.append("size")
            elif sa.size and not _same_stream(a, fa, b, fb, sa.size):
                fields.append("data")
            if sa.is_sparse != sb.is_sparse:
                fields.append("sparse")
            if [x for x in ga.get(p, ()) if x in eb] != [x for x in gb.get(p, ()) if x in ea]:
                fields.append("hard_links")
        sta, stb = a.streams(fa), b.streams(fb)
        if sorted(sta) != sorted(stb):
            fields.append("streams")
        else:
            for s in sta:
                za, zb = a.stream_size(fa, s), b.stream_size(fb, s)
                if za != zb or not _same_stream(a, fa, b, fb, za, s):
                    fields.append(f"stream:{s}")
        if fields:
            changed.append({"path": p or "/", "fields": fields})
    return {"added": sorted(added), "removed": sorted(removed), "changed": changed}


# --------------------------------------------------------------------- fsck
_LINK_TAGS = (ntfs.IO_REPARSE_TAG_SYMLINK, ntfs.IO_REPARSE_TAG_MOUNT_POINT, ntfs.IO_REPARSE_TAG_LX_SYMLINK)
_BAD_NAME = re.compile(r'[\x00-\x1f\\/:*?"<>|]')


def fsck(
    cim_path: str, progress: Callable[[int], None] | None = None, storage_options: dict | None = None
) -> list[str]:
    """Check every structure reachable from the root and read every byte; returns findings.
    ``cim_path`` may be an fsspec URL (see :func:`cimfs.open`)."""
    progress = progress or (lambda n: None)
    findings: list[str] = []
    try:
        image = cimfs.open(cim_path, storage_options)
    except CimError as err:
        return [str(err)]
    with image:
        try:
            info = image.info()
        except CimError as err:
            return [str(err)]
        present = image.stored_sizes()
        for r in info.get("region_files", []):
            if r not in present:
                findings.append(f"{r}: region file missing")
        findings.extend(image.check())
        fold = getattr(image, "fold", posix.fold)
        guard = image.directory_guard()
        guard.admit(image.root_id)
        links: dict[int, int] = {}
        checked: set[int] = set()
        stack = [(image.root_id, "")]

        def check_entry(path: str, fid: int) -> Stat | None:
            try:
                st = image.stat(fid)
            except CimError as e:
                findings.append(f"{path or '/'}: {e.strerror}")
                return None
            if fid in checked:
                return st
            checked.add(fid)
            try:
                if st.security_descriptor:
                    ntfs.describe_sd(st.security_descriptor)
            except Exception as e:  # noqa: BLE001
                findings.append(f"{path}: bad security descriptor ({e})")
            try:
                if st.ea_buffer:
                    ntfs.unpack_eas(st.ea_buffer)
            except Exception as e:  # noqa: BLE001
                findings.append(f"{path}: bad EA buffer ({e})")
            if st.reparse_data:
                try:
                    rp = ntfs.parse_reparse(st.reparse_data)
                    if rp.tag != st.reparse_tag:
                        findings.append(
                            f"{path}: reparse tag {st.reparse_tag:#x} in the record, {rp.tag:#x} in the buffer"
                        )
                    if rp.target and "\0" in rp.target:  # no path can hold one: extract and the mount skip it
                        findings.append(f"{path}: link target contains NUL")
                    elif rp.target == "" and rp.tag in _LINK_TAGS:  # no path is empty: extract skips it
                        findings.append(f"{path}: link target is empty")
                except Exception as e:  # noqa: BLE001
                    findings.append(f"{path}: bad reparse buffer ({e})")
            streams: list[str | None] = [None]
            try:
                streams += image.streams(fid)
            except CimError as e:
                findings.append(f"{path}: {e.strerror}")
            for s in streams:
                if s is None and st.is_dir:
                    continue
                try:
                    desc = image.stream_descriptor(fid, s)
                    size = desc.length
                    with image.open(fid, stream=s) as f:
                        if desc.sparse:
                            continue  # all holes: nothing stored to read
                        got = 0
                        while True:
                            buf = f.read(posix.CHUNK)
                            if not buf:
                                break
                            got += len(buf)
                            progress(len(buf))
                    if got != size:
                        findings.append(f"{path}{':' + s if s else ''}: read {got} bytes of {size}")
                except CimError as e:
                    findings.append(f"{path}{':' + s if s else ''}: {e.strerror}")
            return st

        check_entry("", image.root_id)
        while stack:
            did, prefix = stack.pop()
            try:
                entries = image.scandir(did)
            except CimError as err:
                findings.append(f"{prefix or '/'}: {err.strerror}")
                continue
            prev = None
            for e in entries:
                path = f"{prefix}/{e.name}" if prefix else e.name
                if not e.name or e.name in (".", "..") or _BAD_NAME.search(e.name):
                    findings.append(f"{path}: invalid name {e.name!r}")
                k = fold(e.name)
                if prev is not None and not prev < k:
                    findings.append(f"{path}: directory entries out of order or duplicated")
                prev = k
                try:  # by name in its directory: a lookup from the root would be O(depth) per entry
                    if image.child(did, e.name) != e.file_id:
                        findings.append(f"{path}: lookup finds a different file")
                except CimError as err:
                    findings.append(f"{path}: lookup fails ({err.strerror})")
                links[e.file_id] = links.get(e.file_id, 0) + 1
                st = check_entry(path, e.file_id)
                if st is None:
                    continue
                if st.is_dir:
                    reason = guard.admit(e.file_id)
                    if reason is not None:
                        findings.append(f"{path}: {reason}: not entered")
                        continue
                    pid = getattr(st, "parent_file_id", None)
                    if pid is not None and pid != did:
                        findings.append(f"{path}: parent FileID {pid}, expected {did}")
                    stack.append((e.file_id, path))
        for fid, count in links.items():
            try:
                st = image.stat(fid)
            except CimError:
                continue
            if not st.is_dir and st.nlink != count:
                findings.append(f"FileID {fid}: link count {st.nlink}, found {count} names")
    return findings


# --------------------------------------------------------------------- rm / gc
# [choice] The project's rule for what is an image: every regular file of the
# directory whose header is a CIM filesystem header, whatever its name
# (``base.img``, ``child``).  Only the header is read (own and parent region
# sets), so even an image damaged past its header keeps its region files.  A
# file that starts like a CIM file but whose header cannot be read counts as
# an image that may need anything.  Files named like region files are region
# files unless their header says image; a commit's leftover temporary file
# (writer.COMMIT_TEMP_NAME) is never an image: gc removes it.


def _writers_lock(directory: str):
    """rm and gc take the writers' own lock, so they never race an image being written."""
    from .writer import DirectoryLock  # start-up time: the reading commands of this module need no writer

    return DirectoryLock(directory)


_UNKNOWN = None  # the region sets of an image whose header cannot be read


def _read_head(path: str, size: int) -> bytes | None:
    """The first ``size`` bytes of ``path``, or None when it is not a regular
    file.  Non-blocking open: a FIFO never hangs the scan."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not S.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def image_region_sets(path: str) -> set[str]:
    """The region set ids (lower-case) an image file refers to, its own and
    its parents', read from its header alone.  Raises CimFormatError when the
    file starts like a CIM filesystem file but its header cannot be read, and
    CimError when it is no image at all or cannot be read."""
    try:
        head = _read_head(path, cim.FILESYSTEM_HEADER.size)
        if head is not None and cim.sniff_file_type(head) == cim.FILE_TYPE_FILESYSTEM:
            head = _read_head(path, cim.filesystem_header_length(head))
            header = cim.unpack_filesystem_header(head or b"")
            return {str(s.id).lower() for s in (header.region_set, *header.parent_sets)}
    except CimError:
        raise
    except OSError as e:
        raise CimError(hresult_from_oserror(e), f"cannot read ({e.strerror})", path) from None
    raise CimError(E_INVALIDARG, "not a CIM image (no CIM filesystem header)", path)


class _Directory:
    """What a directory of images holds: images (name -> region sets, or
    _UNKNOWN), region/object ID files (name -> set id) and leftovers of
    killed commits."""

    def __init__(self, directory: str, warn):
        self.images: dict[str, set[str] | None] = {}
        self.regions: dict[str, str] = {}
        self.leftovers: list[str] = []
        from .writer import COMMIT_TEMP_NAME  # start-up time, as in _writers_lock

        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if COMMIT_TEMP_NAME.match(name):
                self.leftovers.append(name)
                continue
            try:
                if not S.S_ISREG(os.stat(path).st_mode):
                    continue  # directories, FIFOs, sockets, devices: never images
                head = _read_head(path, cim.COMMON_HEADER.size)
            except FileNotFoundError:
                continue
            except OSError as e:
                # Unreadable: it may be an image; keep what any image may need.
                warn(f"{path}: cannot read ({e.strerror}); it may be an image, so every region file is kept")
                self.images[name] = _UNKNOWN
                continue
            if head is None:
                continue
            kind = cim.sniff_file_type(head)
            region = cim.REGION_FILE_NAME.match(name)
            if region and kind != cim.FILE_TYPE_FILESYSTEM:
                self.regions[name] = region.group(2).lower()
            elif kind is not None and kind not in (cim.FILE_TYPE_REGION, cim.FILE_TYPE_OBJECTID):
                try:
                    self.images[name] = image_region_sets(path)
                except CimError as e:
                    warn(f"{path}: an image whose header cannot be read ({e.strerror}); every region file is kept")
                    self.images[name] = _UNKNOWN

    def needed(self, exclude: str | None = None) -> set[str] | None:
        """Region sets some image (other than ``exclude``) refers to; None when
        an image's header cannot be read (then every set may be needed)."""
        out: set[str] = set()
        for name, sets in self.images.items():
            if name == exclude:
                continue
            if sets is _UNKNOWN:
                return None
            out |= sets
        return out


def _remove(directory: str, names, dry_run: bool) -> list[tuple[str, int]]:
    removed = []
    for n in sorted(names):
        p = os.path.join(directory, n)
        try:
            size = os.lstat(p).st_size
            if not dry_run:
                os.unlink(p)
        except FileNotFoundError:
            continue
        removed.append((p, size))
    return removed


def _mounted_at(cim_path: str) -> list[str]:
    """Mount points where this user's live mounts serve ``cim_path``."""
    from . import mount as _mount  # the registry needs no pyfuse3

    out = []
    for entry in _mount.mounts():
        try:
            if os.path.samefile(entry.get("image", ""), cim_path):
                out.append(entry.get("mountpoint", "?"))
        except (OSError, TypeError, ValueError):
            continue
    return out


def rm_image(
    cim_path: str, *, dry_run: bool = False, force: bool = False, warn=lambda m: None
) -> list[tuple[str, int]]:
    """Remove an image and the region/object ID files no other image in its
    directory refers to.  An image that is mounted is refused unless ``force``."""
    directory = os.path.dirname(os.path.abspath(cim_path))
    name = os.path.basename(cim_path)
    if not os.path.isfile(cim_path):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image", cim_path)
    with _writers_lock(directory):
        try:
            mine = image_region_sets(cim_path)
        except CimFormatError as e:
            warn(f"{cim_path}: cannot read ({e.strerror}); removing only the image file (then run gc)")
            mine = set()
        if not force:
            where = _mounted_at(cim_path)
            if where:
                raise CimError(
                    ERROR_SHARING_VIOLATION,
                    f"the image is mounted at {', '.join(where)} (unmount it first, or force)",
                    cim_path,
                )
        contents = _Directory(directory, warn)
        needed = contents.needed(exclude=name)
        removable = set() if needed is None else mine - needed
        size = os.path.getsize(cim_path)
        if not dry_run:
            os.unlink(cim_path)
            fsync_dir(directory)
        removed = [(os.path.abspath(cim_path), size)]
        removed += _remove(directory, [n for n, s in contents.regions.items() if s in removable], dry_run)
        return removed


def gc(directory: str, *, dry_run: bool = False, warn=lambda m: None) -> list[tuple[str, int]]:
    """Remove every region/object ID file that no image in ``directory``
    refers to, and the temporary files of commits that were killed."""
    if not os.path.isdir(directory):
        raise CimError(ERROR_FILE_NOT_FOUND, "no such directory", directory)
    with _writers_lock(directory):
        contents = _Directory(directory, warn)
        needed = contents.needed()
        if needed is None:
            raise CimError(E_INVALIDARG, "an image in the directory cannot be read; nothing removed", directory)
        unused = [n for n, s in contents.regions.items() if s not in needed]
        return _remove(directory, unused + contents.leftovers, dry_run)
