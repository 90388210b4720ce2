"""Reading registry hives: ``Hive`` (over bytes, a memoryview or an mmap), ``Key`` and ``Value``, and
``open_hive``.  The reader never trusts its input and is lazy: a key is decoded when visited.

Every offset is checked against the bins (a cell lies inside one bin, after its header, and is allocated),
every count against the cell that holds it and the hive's size, every signature, every name and data length.
A traversal (``Hive.walk``, the merge) owns a ``Coverage`` map: each cell it reads must not overlap a cell
it read before, so a key reachable twice, a list pointing at itself or an ancestor, an ri pointing at the
same leaf twice, or data cells shared between values are refused, and the bytes a traversal produces are
bounded by the hive's size.  Nesting deeper than 512 keys is refused (Windows' limit).  Any damage is a
one-line ``HiveFormatError`` naming the hive, the cell and the reason.

[choice] A bad base-block checksum or unequal sequence numbers (a "dirty" hive whose logs we do not have)
are tolerated, as hivex and yarp without logs do: the hive is read as it is and the fact is recorded in
``Hive.notes``.  Everything structural is checked regardless.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import ERROR_FILE_NOT_FOUND, CimError, hresult_from_oserror
from . import layout as L
from .errors import HiveFormatError
from .names import decode_name, upcase

_MIN_NK_CELL = 4 + L.NK_HEAD.size  # the smallest cell an nk can live in; bounds subkey counts
_MIN_VK_CELL = 4 + L.VK_HEAD.size
_CELL_SIZE_UNPACK = L.CELL_SIZE.unpack_from
_ONES = [b"\x01" * n for n in range(2048)]  # coverage marks of cells up to 16 KiB, prebuilt


class HiveKeyNotFound(CimError, KeyError):
    """No key at that path (``CimError`` with ERROR_FILE_NOT_FOUND; also a ``KeyError``)."""

    def __init__(self, hive: str, path: str):
        CimError.__init__(self, ERROR_FILE_NOT_FOUND, f"no key {path!r} in the hive", hive)

    def __str__(self) -> str:
        return CimError.__str__(self)

    def __reduce__(self) -> tuple[object, tuple]:
        return (_key_not_found, (self.filename, self.strerror))


def _key_not_found(hive: str, reason: str) -> HiveKeyNotFound:
    e = HiveKeyNotFound(hive, "")
    e.strerror = reason
    return e


class Coverage:
    """The cells one traversal has read: one byte per 8-byte unit of the hive bins."""

    __slots__ = ("_map", "_hive")

    def __init__(self, hive: Hive):
        self._hive = hive
        self._map = bytearray((hive.length >> 3) + 1)

    def claim(self, cell: int, size: int) -> None:
        """Record the cell at ``cell`` of ``size`` bytes (its size field included); refuse an overlap."""
        a, b = cell >> 3, (cell + size + 7) >> 3
        m = self._map
        if m.find(1, a, b) >= 0:
            raise HiveFormatError(
                self._hive.name, cell, "cell reached twice or overlapping another cell (a cycle or a shared cell)"
            )
        m[a:b] = b"\x01" * (b - a)


class Hive:
    """A registry hive read from ``data``; ``name`` labels it in errors (a file path or an image path)."""

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, name: str = "<hive>"):
        self.name = name
        self.notes: list[str] = []
        self._sk_cache: dict[int, bytes] = {}
        self._root: Key | None = None
        self._closer: mmap.mmap | None = None
        self._buf = memoryview(b"")  # the bins, set by _open
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            flat = mv.cast("B")
            mv.release()
            mv = flat
        self._whole = mv
        try:
            self._open(mv, name)
        except BaseException:
            self.close()
            raise

    def _open(self, mv: memoryview, name: str) -> None:
        head, stored_sum = L.unpack_base_block(mv, name)
        (
            _sig,
            seq1,
            seq2,
            self.last_written,
            self.major,
            self.minor,
            ftype,
            fmt,
            root,
            length,
            _cluster,
            fname,
            *_rest,
        ) = head
        self.flags = head[14]
        if self.major != L.MAJOR or self.minor not in L.MINORS:
            raise HiveFormatError(
                name,
                None,
                f"unsupported hive version {self.major}.{self.minor} (1.{L.MINORS[0]} to 1.{L.MINORS[-1]} are read)",
            )
        if ftype != L.FILE_TYPE_PRIMARY:
            raise HiveFormatError(name, None, f"file type {ftype} is a transaction log, not a primary hive")
        if fmt != L.FILE_FORMAT_DIRECT:
            raise HiveFormatError(name, None, f"unknown hive file format {fmt}")
        if length == 0 or length % L.BIN_ALIGN:
            raise HiveFormatError(name, None, f"hive bins length {length} is not a positive multiple of 4096")
        if L.BASE_BLOCK_SIZE + length > len(mv):
            raise HiveFormatError(
                name,
                None,
                f"truncated: the header promises {length} bytes of bins, the file has {len(mv) - L.BASE_BLOCK_SIZE}",
            )
        if L.checksum(mv) != stored_sum:
            self.notes.append("base block checksum mismatch (read anyway)")
        if seq1 != seq2:
            self.notes.append(f"sequence numbers differ ({seq1} != {seq2}): a dirty hive, its logs are not applied")
        self.file_name = bytes(fname).decode("utf-16-le", "replace").split("\0", 1)[0]
        self.length = length
        self._buf = mv[L.BASE_BLOCK_SIZE : L.BASE_BLOCK_SIZE + length]
        self._scan_bins()
        self.root_offset = root
        self._big_data = self.minor >= L.BIG_DATA_MIN_MINOR

    @property
    def layered(self) -> bool:
        return bool(self.flags & L.HIVE_FLAG_LAYERED)

    def _scan_bins(self) -> None:
        starts, ends = [], []
        off, buf, length = 0, self._buf, self.length
        while off < length:
            if length - off < L.HBIN_HEADER_SIZE:
                raise HiveFormatError(self.name, None, f"bin at 0x{off:x}: truncated header")
            sig, at, size, *_ = L.HBIN_HEAD.unpack_from(buf, off)
            if sig != L.HBIN:
                raise HiveFormatError(self.name, None, f"bin at 0x{off:x}: no 'hbin' signature")
            if at != off:
                raise HiveFormatError(self.name, None, f"bin at 0x{off:x} says it is at 0x{at:x}")
            if size == 0 or size % L.BIN_ALIGN or off + size > length:
                raise HiveFormatError(self.name, None, f"bin at 0x{off:x}: bad size {size}")
            starts.append(off)
            ends.append(off + size)
            off += size
        # per 4096-byte page: the start and end of its bin (one entry per page, not per cell)
        self._page_start, self._page_end = [], []
        for a, z in zip(starts, ends):
            n = (z - a) >> 12
            self._page_start += [a + L.HBIN_HEADER_SIZE] * n
            self._page_end += [z] * n
        self._npages = len(self._page_end)

    # ---- context manager ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._root = None
        self._sk_cache.clear()
        for view in ("_buf", "_whole"):
            v = getattr(self, view, None)
            if v is not None:
                v.release()
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> Hive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hive {self.name!r} {self.major}.{self.minor}{' layered' if self.layered else ''}>"

    # ---- cells -----------------------------------------------------------------------------------------------
    def error(self, cell: int | None, reason: str) -> HiveFormatError:
        return HiveFormatError(self.name, cell, reason)

    def cell(self, off: int, what: str, cov: Coverage | None = None) -> tuple[int, int]:
        """(data start, data length) of the allocated cell at rel offset ``off``, checked against its bin;
        with ``cov``, the cell is claimed for the traversal (refused if it overlaps a cell claimed before)."""
        page = off >> 12
        if off < 0 or page >= self._npages or off < self._page_start[page]:
            raise self.error(off, f"{what}: offset outside the hive's cells")
        end = self._page_end[page]
        if end - off < 4:
            raise self.error(off, f"{what}: cell crosses the end of its bin")
        size = -_CELL_SIZE_UNPACK(self._buf, off)[0]
        if size < 8 or off + size > end:
            if size <= 0:
                raise self.error(off, f"{what}: points to a free cell")
            raise self.error(off, f"{what}: cell of {size} bytes crosses the end of its bin")
        if cov is not None:
            m = cov._map
            a, b = off >> 3, (off + size + 7) >> 3
            if m.find(1, a, b) >= 0:
                raise self.error(off, "cell reached twice or overlapping another cell (a cycle or a shared cell)")
            m[a:b] = _ONES[b - a] if b - a < len(_ONES) else b"\x01" * (b - a)
        return off + 4, size - 4

    def nk(self, off: int, cov: Coverage | None = None) -> tuple:
        """The nk fields at ``off`` plus the name's start; validated."""
        start, n = self.cell(off, "key node", cov)
        if n < L.NK_HEAD.size:
            raise self.error(off, "key node: cell too small")
        f = L.NK_HEAD.unpack_from(self._buf, start)
        if f[0] != L.NK:
            raise self.error(off, f"expected a key node ('nk'), found {bytes(f[0])!r}")
        if L.NK_HEAD.size + f[L.NKF_NAMELEN] > n:
            raise self.error(off, f"key name of {f[L.NKF_NAMELEN]} bytes overruns its cell")
        if f[L.NKF_NSUB] >= 1 << 31 or f[L.NKF_NSUB] * _MIN_NK_CELL > self.length:
            raise self.error(off, f"subkey count {f[L.NKF_NSUB]} is more than the hive can hold")
        if f[L.NKF_NVAL] >= 1 << 31 or f[L.NKF_NVAL] * _MIN_VK_CELL > self.length:
            raise self.error(off, f"value count {f[L.NKF_NVAL]} is more than the hive can hold")
        return f, start + L.NK_HEAD.size

    def name_at(self, off: int, start: int, length: int, compressed: bool) -> str:
        try:
            if compressed:
                return str(self._buf[start : start + length], "latin-1")
            return decode_name(self._buf[start : start + length], False)
        except UnicodeDecodeError:
            raise self.error(off, "UTF-16 name of an odd number of bytes") from None

    def subkey_offsets(self, f: tuple, off: int, cov: Coverage | None = None) -> list[int]:
        """The nk offsets of a key's subkey list (stored order), checked against the key's count."""
        count = f[L.NKF_NSUB]
        if count == 0:
            return []
        list_off = f[L.NKF_SUBLIST]
        sig, items, start = self._list(list_off, cov)
        if sig == L.RI:
            leaves = items
            if len(set(leaves)) != len(leaves):
                raise self.error(list_off, "ri lists the same leaf twice")
            out: list[int] = []
            for leaf in leaves:
                lsig, litems, _ = self._list(leaf, cov)
                if lsig == L.RI:
                    raise self.error(leaf, "ri points to another ri")
                if len(out) + len(litems) > count:
                    break
                out += litems
        else:
            out = items
        if len(out) != count:
            raise self.error(off, f"key says {count} subkeys, its list holds {len(out)}")
        if len(set(out)) != count:
            raise self.error(list_off, "subkey list names the same key twice")
        return out

    def _list(self, off: int, cov: Coverage | None) -> tuple[bytes, list[int], int]:
        start, n = self.cell(off, "subkey list", cov)
        if n < 4:
            raise self.error(off, "subkey list: cell too small")
        sig, count = L.LIST_HEAD.unpack_from(self._buf, start)
        sig = bytes(sig)
        per = 8 if sig in (L.LF, L.LH) else 4 if sig in (L.LI, L.RI) else 0
        if not per:
            raise self.error(off, f"expected a subkey list (lf/lh/li/ri), found {sig!r}")
        if 4 + per * count > n:
            raise self.error(off, f"{sig.decode()} of {count} entries overruns its cell")
        if per == 8:
            items = list(L.u32_array(2 * count).unpack_from(self._buf, start + 4)[::2])
        else:
            items = list(L.u32_array(count).unpack_from(self._buf, start + 4))
        return sig, items, start

    def value_offsets(self, f: tuple, off: int, cov: Coverage | None = None) -> tuple:
        count = f[L.NKF_NVAL]
        if count == 0:
            return ()
        lo = f[L.NKF_VALLIST]
        start, n = self.cell(lo, "value list", cov)
        if 4 * count > n:
            raise self.error(off, f"key says {count} values, its value list cell holds {n // 4}")
        offs = L.u32_array(count).unpack_from(self._buf, start)
        if cov is None and len(set(offs)) != count:
            raise self.error(lo, "value list names the same value twice")
        return offs

    def vk(self, off: int, cov: Coverage | None = None) -> tuple:
        start, n = self.cell(off, "value", cov)
        if n < L.VK_HEAD.size:
            raise self.error(off, "value: cell too small")
        f = L.VK_HEAD.unpack_from(self._buf, start)
        if f[0] != L.VK:
            raise self.error(off, f"expected a value ('vk'), found {bytes(f[0])!r}")
        if L.VK_HEAD.size + f[L.VKF_NAMELEN] > n:
            raise self.error(off, f"value name of {f[L.VKF_NAMELEN]} bytes overruns its cell")
        return f, start + L.VK_HEAD.size

    def data_parts(self, f: tuple, off: int, cov: Coverage | None = None) -> list:
        """A value's data as a list of memoryviews/bytes (one for a plain cell, several for big data)."""
        raw = f[L.VKF_SIZE]
        if raw & L.DATA_INLINE:
            size = raw & ~L.DATA_INLINE
            if size > L.INLINE_MAX:
                raise self.error(off, f"inline data of {size} bytes (at most 4 fit)")
            return [L.inline_data(f[L.VKF_DATA], size)]
        if raw == 0:
            return []
        if raw > self.length:
            raise self.error(off, f"value claims {raw} bytes of data in a hive of {self.length}")
        start, n = self.cell(f[L.VKF_DATA], "value data", cov)
        buf = self._buf
        if raw > L.SEGMENT_BYTES and self._big_data and n >= L.DB_HEAD.size and buf[start : start + 2] == L.DB:
            return self._big_parts(f[L.VKF_DATA], start, raw, cov)
        if raw > n:
            raise self.error(f[L.VKF_DATA], f"value data of {raw} bytes overruns its {n}-byte cell")
        return [buf[start : start + raw]]

    def _big_parts(self, db_off: int, start: int, size: int, cov: Coverage | None) -> list:
        _sig, count, list_off, _ = L.DB_HEAD.unpack_from(self._buf, start)
        if count == 0 or (count - 1) * L.SEGMENT_BYTES >= size or count * L.SEGMENT_BYTES < size:
            raise self.error(db_off, f"big data of {size} bytes in {count} segments")
        lstart, n = self.cell(list_off, "big data segment list", cov)
        if 4 * count > n:
            raise self.error(list_off, "big data segment list overruns its cell")
        segs = L.u32_array(count).unpack_from(self._buf, lstart)
        if len(set(segs)) != count:
            raise self.error(list_off, "big data lists the same segment twice")
        parts, left = [], size
        for seg in segs:
            sstart, sn = self.cell(seg, "big data segment", cov)
            take = min(left, L.SEGMENT_BYTES)
            if take > sn:
                raise self.error(seg, f"big data segment of {sn} bytes, {take} expected")
            parts.append(self._buf[sstart : sstart + take])
            left -= take
        return parts

    def security_at(self, off: int) -> bytes:
        sd = self._sk_cache.get(off)
        if sd is None:
            start, n = self.cell(off, "security")
            if n < L.SK_HEAD.size:
                raise self.error(off, "security: cell too small")
            f = L.SK_HEAD.unpack_from(self._buf, start)
            if f[0] != L.SK:
                raise self.error(off, f"expected a security cell ('sk'), found {bytes(f[0])!r}")
            if L.SK_HEAD.size + f[L.SKF_LEN] > n:
                raise self.error(off, "security descriptor overruns its cell")
            sd = self._sk_cache[off] = bytes(self._buf[start + L.SK_HEAD.size : start + L.SK_HEAD.size + f[L.SKF_LEN]])
        return sd

    def class_bytes(self, f: tuple, off: int, cov: Coverage | None = None) -> bytes | None:
        if f[L.NKF_CLASS] == L.NONE:
            return None
        start, n = self.cell(f[L.NKF_CLASS], "class name", cov)
        if f[L.NKF_CLASSLEN] > n:
            raise self.error(off, f"class name of {f[L.NKF_CLASSLEN]} bytes overruns its cell")
        return bytes(self._buf[start : start + f[L.NKF_CLASSLEN]])

    # ---- public navigation ----------------------------------------------------------------------------------------
    @property
    def root(self) -> Key:
        if self._root is None:
            self._root = Key(self, self.root_offset, "")
        return self._root

    def key(self, path: str) -> Key:
        """The key at ``path`` (``\\``-separated, relative to the root, case-insensitive as in Windows)."""
        key = self.root
        for part in path.replace("/", "\\").split("\\"):
            if not part:
                continue
            sub = key.subkey(part)
            if sub is None:
                raise HiveKeyNotFound(self.name, path)
            key = sub
        return key

    def walk(self, path: str = "") -> Iterator[tuple[str, Key]]:
        """(path, Key) for every key under ``path`` (default: the whole hive), depth first in stored order, the
        starting key first; paths are from the root.  Refuses cycles, keys reached twice and nesting deeper
        than 512."""
        cov = Coverage(self)
        start = self.key(path) if path.strip("\\/") else None
        depth = len(start.path.split("\\")) if start is not None else 0
        top = Key(self, start.offset if start else self.root_offset, start.path if start else "", cov)
        stack = [(top, depth)]
        while stack:
            key, depth = stack.pop()
            yield key.path, key
            if key.subkey_count:
                if depth >= L.MAX_DEPTH:
                    raise self.error(key.offset, f"keys nested deeper than {L.MAX_DEPTH}")
                kids = [Key(self, o, None, cov, key) for o in self.subkey_offsets(key._f, key.offset, cov)]
                stack.extend((k, depth + 1) for k in reversed(kids))


class Key:
    """A key of a ``Hive``, decoded when created; subkeys and values are read when asked for."""

    __slots__ = ("_hive", "offset", "_f", "_name_at", "_path", "_parent", "_name")

    def __init__(
        self, hive: Hive, offset: int, path: str | None, cov: Coverage | None = None, parent: Key | None = None
    ):
        self._hive, self.offset = hive, offset
        self._f, self._name_at = hive.nk(offset, cov)
        self._path, self._parent = path, parent
        self._name: str | None = None

    @property
    def name(self) -> str:
        if self._name is None:
            f = self._f
            self._name = self._hive.name_at(
                self.offset, self._name_at, f[L.NKF_NAMELEN], bool(f[L.NKF_FLAGS] & L.KEY_COMP_NAME)
            )
        return self._name

    @property
    def path(self) -> str:
        """The path from the root (the root's is ""), with the stored spelling."""
        if self._path is None:
            assert self._parent is not None  # a key is made with its path or its parent
            pp = self._parent.path
            self._path = f"{pp}\\{self.name}" if pp else self.name
            self._parent = None
        return self._path

    def __repr__(self) -> str:
        return f"<Key {self.path or '(root)'!r}>"

    def subkeys(self) -> list[Key]:
        return [Key(self._hive, o, None, None, self) for o in self._hive.subkey_offsets(self._f, self.offset)]

    def subkey(self, name: str) -> Key | None:
        """The subkey named ``name`` (case-insensitive with Windows' upcase), or None."""
        up = upcase(name)
        for k in self.subkeys():
            if upcase(k.name) == up:
                return k
        return None

    def values(self) -> list[Value]:
        h = self._hive
        return [Value(h, o) for o in h.value_offsets(self._f, self.offset)]

    def value(self, name: str) -> Value | None:
        """The value named ``name`` ("" for the default value), case-insensitive, tombstones included."""
        up = upcase(name)
        for v in self.values():
            if upcase(v.name) == up:
                return v
        return None

    @property
    def class_name(self) -> str | None:
        raw = self._hive.class_bytes(self._f, self.offset)
        if raw is None:
            return None
        try:
            return raw.decode("utf-16-le", "surrogatepass")
        except UnicodeDecodeError:
            raise self._hive.error(self.offset, "class name of an odd number of bytes") from None

    @property
    def last_written(self) -> int:
        return self._f[L.NKF_TIME]

    @property
    def layer_semantics(self) -> int:
        return self._f[L.NKF_LAYER] & L.LAYER_SEMANTICS_MASK

    @property
    def inherit_class(self) -> bool:
        return bool(self._f[L.NKF_LAYER] & L.LAYER_INHERIT_CLASS)

    @property
    def security(self) -> bytes:
        return self._hive.security_at(self._f[L.NKF_SK])

    @property
    def flags(self) -> int:
        return self._f[L.NKF_FLAGS]

    @property
    def user_flags(self) -> int:
        return self._f[L.NKF_MAXNAME] >> 16

    @property
    def subkey_count(self) -> int:
        return self._f[L.NKF_NSUB]

    @property
    def value_count(self) -> int:
        return self._f[L.NKF_NVAL]


class Value:
    """A value of a key; its data is read when ``.data`` is asked for."""

    __slots__ = ("_hive", "offset", "_f", "name")

    def __init__(self, hive: Hive, offset: int):
        self._hive, self.offset = hive, offset
        self._f, name_at = hive.vk(offset)
        self.name = hive.name_at(
            offset, name_at, self._f[L.VKF_NAMELEN], bool(self._f[L.VKF_FLAGS] & L.VALUE_COMP_NAME)
        )

    @property
    def type(self) -> int:
        return self._f[L.VKF_TYPE]

    @property
    def tombstone(self) -> bool:
        return bool(self._f[L.VKF_FLAGS] & L.VALUE_TOMBSTONE)

    @property
    def size(self) -> int:
        return self._f[L.VKF_SIZE] & ~L.DATA_INLINE

    @property
    def data(self) -> bytes:
        if self.tombstone:
            return b""
        return b"".join(self._hive.data_parts(self._f, self.offset))

    def __repr__(self) -> str:
        kind = "tombstone" if self.tombstone else L.REG_TYPE_NAMES.get(self.type, hex(self.type))
        return f"<Value {self.name!r} {kind} {self.size} bytes>"


def open_hive(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO, name: str | None = None
) -> Hive:
    """A ``Hive`` from a path, bytes-like data or a binary file object; usable as a context manager
    (closing it unmaps the file)."""
    if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
        return Hive(source, name or "<hive>")
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        try:
            with open(source, "rb") as f:
                return _hive_of_file(f, label)
        except OSError as e:
            if isinstance(e, CimError):
                raise
            raise CimError(hresult_from_oserror(e), e.strerror or str(e), label) from None
    label = name or getattr(source, "name", None) or "<hive>"
    return _hive_of_file(source, str(label))


def _hive_of_file(f: BinaryIO, label: str) -> Hive:
    try:
        fd = f.fileno()
        size = os.fstat(fd).st_size
    except (AttributeError, OSError, ValueError):
        fd, size = None, 0
    if fd is not None and size > 0:
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        try:
            h = Hive(m, label)
        except BaseException:
            m.close()
            raise
        h._closer = m
        return h
    return Hive(f.read(), label)
