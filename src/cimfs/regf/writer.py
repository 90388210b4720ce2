"""Writing clean registry hives from nothing: the in-memory model (``NewKey``, ``NewValue``), ``write_hive``,
and ``HiveBuilder``, the streaming cell writer underneath both it and the merge.

Every rule of regf-notes §2 holds for what comes out: a clean base block (sequence numbers equal, checksum,
``OfRg``), bins of 4096-byte multiples tiled exactly (free cells over the leftovers; a cell larger than a
page gets a bin of its own), the root at 0x20 with flags 0x2c, parent offsets, subkey lists sorted by
Windows' upcase with no duplicates, exact lh hashes / lf hints, leaves split under an ri beyond 511 (lf/lh)
or 1012 (li) entries, data inline (<= 4 bytes), in one cell (<= 16 344) or as big data (more, minor >= 4),
exact Max* fields, one sk ring with deduplicated descriptors and exact reference counts (tombstone keys
counted), names compressed whenever every character is below U+0100.

[choice]s: the version written is 1.5 unless asked (1.3 to 1.6 are possible); 1.3/1.4 lists are lf
(li on request), 1.5/1.6 lists lh.  Leaves under an ri are filled evenly.  The root's parent field is
0xFFFFFFFF.  The header carries ``OfRg``/1 at 176 as offreg 10.0 writes, sequence numbers 1/1, zero GUIDs,
timestamps 0 unless given.  Keys are written depth first (a key, then its subtree), values in the given order.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from ..errors import E_INVALIDARG, CimError
from . import layout as L
from .names import encode_name, lh_hash, order_key, upcase, utf16_bytes

_ZERO_BIN = bytes(L.BIN_ALIGN)


@dataclass
class NewValue:
    name: str
    type: int
    data: bytes = b""
    tombstone: bool = False


@dataclass
class NewKey:
    name: str
    values: list = field(default_factory=list)
    subkeys: list = field(default_factory=list)
    class_name: str | None = None
    last_written: int = 0
    security: bytes | None = None
    layer_semantics: int = L.MERGE
    inherit_class: bool = False
    flags: int = 0
    user_flags: int = 0

    def __init__(
        self,
        name: str,
        *,
        values: Iterable[NewValue] = (),
        subkeys: Iterable[NewKey] = (),
        class_name: str | None = None,
        last_written: int = 0,
        security: bytes | None = None,
        layer_semantics: int = L.MERGE,
        inherit_class: bool = False,
        flags: int = 0,
        user_flags: int = 0,
    ) -> None:
        self.name, self.values, self.subkeys = name, list(values), list(subkeys)
        self.class_name, self.last_written, self.security = class_name, last_written, security
        self.layer_semantics, self.inherit_class, self.flags, self.user_flags = (
            layer_semantics,
            inherit_class,
            flags,
            user_flags,
        )


class HiveBuilder:
    """Appends cells to a growing hive; ``finish`` seals it.  Cells are placed first-come in 4096-byte bins;
    the first cell allocated is at 0x20, so the caller allocates the root key first."""

    def __init__(self, minor: int = 5, leaf: bytes | None = None, name: str = "<new hive>"):
        if minor not in L.MINORS:
            raise CimError(E_INVALIDARG, f"hive version 1.{minor} cannot be written (1.3 to 1.6 can)", name)
        self.minor = minor
        self.name = name
        self.leaf = leaf or (L.LH if minor >= L.LH_MIN_MINOR else L.LF)
        if self.leaf not in L.LEAF_LIMIT or (self.leaf == L.LH and minor < L.LH_MIN_MINOR):
            raise CimError(E_INVALIDARG, f"a 1.{minor} hive cannot use {self.leaf!r} lists", name)
        self.big_data = minor >= L.BIG_DATA_MIN_MINOR
        self.buf = bytearray(L.BASE_BLOCK_SIZE)
        self.pos = self.bin_end = 0  # rel offsets
        self._sk_of_sd: dict[bytes, int] = {}
        self.sk_refs: dict[int, int] = {}  # sk cell -> reference count, in ring order

    # ---- cells --------------------------------------------------------------------------------------------------
    def alloc(self, payload: int) -> int:
        """A new allocated cell holding ``payload`` bytes; returns its rel offset."""
        size = (payload + 4 + 7) & ~7
        if self.pos + size > self.bin_end:
            self._new_bin(size)
        off = self.pos
        self.pos = off + size
        L.CELL_SIZE.pack_into(self.buf, L.BASE_BLOCK_SIZE + off, -size)
        return off

    def _new_bin(self, size: int) -> None:
        self._close_bin()
        start = self.bin_end
        bin_size = max(L.BIN_ALIGN, (size + L.HBIN_HEADER_SIZE + L.BIN_ALIGN - 1) & ~(L.BIN_ALIGN - 1))
        if start + bin_size > L.MAX_HIVE_BINS:
            raise CimError(E_INVALIDARG, "the hive would be larger than a hive can be (2 GiB of bins)", self.name)
        if bin_size == L.BIN_ALIGN:
            self.buf += _ZERO_BIN
        else:
            self.buf += bytes(bin_size)
        L.HBIN_HEAD.pack_into(self.buf, L.BASE_BLOCK_SIZE + start, L.HBIN, start, bin_size, 0, 0, 0)
        self.pos, self.bin_end = start + L.HBIN_HEADER_SIZE, start + bin_size

    def _close_bin(self) -> None:
        if self.bin_end > self.pos:
            L.CELL_SIZE.pack_into(self.buf, L.BASE_BLOCK_SIZE + self.pos, self.bin_end - self.pos)
            self.pos = self.bin_end

    def put(self, data: bytes | bytearray | memoryview) -> int:
        """A cell holding ``data``."""
        off = self.alloc(len(data))
        at = L.BASE_BLOCK_SIZE + off + 4
        self.buf[at : at + len(data)] = data
        return off

    # ---- records ------------------------------------------------------------------------------------------------
    def sk(self, descriptor: bytes) -> int:
        """The sk cell of ``descriptor`` (one per distinct descriptor), its reference count raised by one."""
        off = self._sk_of_sd.get(descriptor)
        if off is None:
            off = self.alloc(L.SK_HEAD.size + len(descriptor))
            at = L.BASE_BLOCK_SIZE + off + 4 + L.SK_HEAD.size
            self.buf[at : at + len(descriptor)] = descriptor
            self._sk_of_sd[descriptor] = off
            self.sk_refs[off] = 1
        else:
            self.sk_refs[off] += 1
        return off

    def value(
        self,
        name_raw: bytes | bytearray | memoryview,
        compressed: bool,
        type_: int,
        data: bytes | bytearray | memoryview | list,
        tombstone: bool = False,
    ) -> int:
        """A vk (and its data cells); ``name_raw`` is the stored name, ``data`` bytes-like or a list of parts."""
        if isinstance(data, list):
            data = data[0] if len(data) == 1 else b"".join(data)
        size = len(data)
        if tombstone:
            size_field, data_field, type_ = 0, L.NONE, L.REG_NONE
        elif size <= L.INLINE_MAX:
            size_field, data_field = size | L.DATA_INLINE, L.inline_field(data)
        elif size > L.MAX_DATA_SIZE or (self.big_data and size > L.SEGMENT_BYTES * L.MAX_SEGMENTS):
            raise CimError(E_INVALIDARG, f"value data of {size} bytes is too large for a hive", self.name)
        elif size > L.SEGMENT_BYTES and self.big_data:
            size_field, data_field = size, self._big_data(data)
        else:
            size_field, data_field = size, self.put(data)
        off = self.alloc(L.VK_HEAD.size + len(name_raw))
        at = L.BASE_BLOCK_SIZE + off + 4
        flags = (L.VALUE_COMP_NAME if compressed and name_raw else 0) | (L.VALUE_TOMBSTONE if tombstone else 0)
        L.VK_HEAD.pack_into(self.buf, at, L.VK, len(name_raw), size_field, data_field, type_, flags, 0)
        at += L.VK_HEAD.size
        self.buf[at : at + len(name_raw)] = name_raw
        return off

    def _big_data(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data)
        segs = []
        for i in range(0, len(mv), L.SEGMENT_BYTES):
            off = self.alloc(L.SEGMENT_CELL - 4)
            chunk = mv[i : i + L.SEGMENT_BYTES]
            at = L.BASE_BLOCK_SIZE + off + 4
            self.buf[at : at + len(chunk)] = chunk
            segs.append(off)
        seg_list = self.put(L.u32_array(len(segs)).pack(*segs))
        return self.put(L.DB_HEAD.pack(L.DB, len(segs), seg_list, 0))

    def value_list(self, offsets: list[int]) -> int:
        return self.put(L.u32_array(len(offsets)).pack(*offsets)) if offsets else L.NONE

    def subkey_list(self, entries: list[tuple[int, str, bytes, bool]]) -> int:
        """The list (a leaf, or an ri over leaves) of ``entries``: (nk offset, upcased name, stored name,
        compressed) already sorted by upcased name."""
        if not entries:
            return L.NONE
        limit = L.LEAF_LIMIT[self.leaf]
        if len(entries) <= limit:
            return self._leaf(entries)
        nleaves = -(-len(entries) // limit)
        if nleaves > L.MAX_LIST_COUNT:
            raise CimError(E_INVALIDARG, f"{len(entries)} subkeys are too many for one key", self.name)
        leaves = []
        for i in range(nleaves):
            leaves.append(self._leaf(entries[i * len(entries) // nleaves : (i + 1) * len(entries) // nleaves]))
        return self.put(L.LIST_HEAD.pack(L.RI, len(leaves)) + L.u32_array(len(leaves)).pack(*leaves))

    def _leaf(self, entries: list[tuple[int, str, bytes, bool]]) -> int:
        kind = self.leaf
        if kind == L.LI:
            items = [e[0] for e in entries]
        elif kind == L.LH:
            items = []
            for e in entries:
                items += (e[0], lh_hash(e[1]))
        else:
            items = []
            for e in entries:
                hint = e[2][:4].ljust(4, b"\0") if e[3] else bytes(4)
                items += (e[0], L.inline_field(hint))
        return self.put(L.LIST_HEAD.pack(kind, len(entries)) + L.u32_array(len(items)).pack(*items))

    def key(
        self,
        off: int,
        name_raw: bytes | bytearray | memoryview,
        compressed: bool,
        *,
        flags: int,
        last_written: int,
        layer: int,
        parent: int,
        nsub: int,
        sublist: int,
        nval: int,
        vallist: int,
        sk: int,
        class_off: int,
        class_len: int,
        maxname: int,
        user_flags: int,
        maxclass: int,
        maxvalname: int,
        maxvaldata: int,
    ) -> None:
        """Fill the nk cell reserved at ``off`` (by ``alloc(key_size(len(name_raw)))``)."""
        flags = (flags & ~(L.KEY_NEVER_ON_DISK | L.KEY_COMP_NAME)) | (L.KEY_COMP_NAME if compressed else 0)
        at = L.BASE_BLOCK_SIZE + off + 4
        L.NK_HEAD.pack_into(
            self.buf,
            at,
            L.NK,
            flags,
            last_written,
            0,
            layer,
            0,
            parent,
            nsub,
            0,
            sublist,
            L.NONE,
            nval,
            vallist,
            sk,
            class_off,
            (maxname & 0xFFFF) | (user_flags & 0xFFFF) << 16,
            maxclass,
            maxvalname,
            maxvaldata,
            0,
            len(name_raw),
            class_len,
        )
        at += L.NK_HEAD.size
        self.buf[at : at + len(name_raw)] = name_raw

    @staticmethod
    def key_size(name_len: int) -> int:
        return L.NK_HEAD.size + name_len

    # ---- the end ------------------------------------------------------------------------------------------------
    def finish(
        self, root: int, *, layered: bool = False, file_name: str = "", sequence: int = 1, last_written: int = 0
    ) -> bytearray:
        """Seal the hive: the last bin's free cell, the sk ring and refcounts, the base block."""
        self._close_bin()
        ring = list(self.sk_refs)
        for i, off in enumerate(ring):
            L.SK_HEAD.pack_into(
                self.buf,
                L.BASE_BLOCK_SIZE + off + 4,
                L.SK,
                0,
                ring[(i + 1) % len(ring)],
                ring[i - 1],
                self.sk_refs[off],
                len(self._sd_at(off)),
            )
        block = L.pack_base_block(
            sequence=sequence,
            last_written=last_written,
            minor=self.minor,
            root=root,
            length=self.bin_end,
            file_name=file_name,
            flags=L.HIVE_FLAG_LAYERED if layered else 0,
        )
        self.buf[: L.BASE_BLOCK_SIZE] = block
        return self.buf

    def _sd_at(self, off: int) -> bytes:
        if not hasattr(self, "_sd_of_sk"):
            self._sd_of_sk = {v: k for k, v in self._sk_of_sd.items()}
        return self._sd_of_sk[off]


@contextlib.contextmanager
def deep_recursion() -> Iterator[None]:
    """Room for a recursion over MAX_DEPTH keys, whatever the caller's depth."""
    need = sys.getrecursionlimit()
    want = len(_frames()) + 3 * L.MAX_DEPTH + 100
    if want > need:
        sys.setrecursionlimit(want)
    try:
        yield
    finally:
        if want > need:
            sys.setrecursionlimit(need)


def _frames() -> list[FrameType]:
    f: FrameType | None = sys._getframe()
    out: list[FrameType] = []
    while f is not None:
        out.append(f)
        f = f.f_back
    return out


def write_hive(
    root: NewKey,
    *,
    minor: int = 5,
    layered: bool = False,
    file_name: str = "",
    sequence: int = 1,
    last_written: int = 0,
    leaf: str | None = None,
) -> bytes:
    """The bytes of a clean hive holding ``root`` and its tree.  ``layered`` sets the base-block flag of a
    differencing hive (required for keys with layer semantics, inherit class or tombstone values)."""
    b = HiveBuilder(minor, leaf.encode() if isinstance(leaf, str) else leaf)
    w = _TreeWriter(b, layered)
    with deep_recursion():
        root_off = w.write(root, L.NONE, "", 0)
    return bytes(b.finish(root_off, layered=layered, file_name=file_name, sequence=sequence, last_written=last_written))


class _TreeWriter:
    def __init__(self, b: HiveBuilder, layered: bool):
        self.b, self.layered = b, layered
        self.default_sd = L.default_security_descriptor()

    def bad(self, path: str, reason: str) -> CimError:
        return CimError(E_INVALIDARG, f"key {path or '(root)'!r}: {reason}", self.b.name)

    def write(self, key: NewKey, parent: int, path: str, depth: int) -> int:
        b = self.b
        if depth > L.MAX_DEPTH:
            raise self.bad(path, f"keys nested deeper than {L.MAX_DEPTH}")
        name = key.name
        if not isinstance(name, str) or (depth and (not name or "\\" in name)):
            raise self.bad(path, f"bad key name {name!r} (empty or containing a backslash)")
        if len(name) > L.MAX_KEY_NAME_CHARS:
            raise self.bad(path, f"key name longer than {L.MAX_KEY_NAME_CHARS} characters")
        sem = key.layer_semantics
        if sem not in L.LAYER_SEMANTICS_NAMES:
            raise self.bad(path, f"layer semantics {sem} (0 to 3)")
        if (sem or key.inherit_class) and not self.layered:
            raise self.bad(path, "layer semantics or inherit class need layered=True")
        if sem == L.TOMBSTONE and (key.subkeys or key.values or key.class_name is not None):
            raise self.bad(path, "a tombstone key has no subkeys, values or class")
        raw, comp = encode_name(name)
        off = b.alloc(b.key_size(len(raw)))
        sk = b.sk(key.security if key.security is not None else self.default_sd)
        class_off, class_len = L.NONE, 0
        if key.class_name is not None:
            craw = key.class_name.encode("utf-16-le", "surrogatepass")
            if len(craw) > 0xFFFF:
                raise self.bad(path, "class name longer than 32767 characters")
            class_off, class_len = b.put(craw), len(craw)
        entries: list[tuple[int, str, bytes, bool]] = []
        seen: dict[str, str] = {}  # upper-cased name -> the name as given
        maxname = maxclass = 0
        for sub in key.subkeys:
            if not isinstance(sub, NewKey):
                raise self.bad(path, f"subkey {sub!r} is not a NewKey")
            up = upcase(sub.name) if isinstance(sub.name, str) else sub.name
            if up in seen:
                raise self.bad(path, f"duplicate subkey name {sub.name!r} (same as {seen[up]!r} in Windows' case)")
            seen[up] = sub.name
        kids = sorted(((upcase(s.name), s) for s in key.subkeys), key=_first(order_key(seen)))
        for up, sub in kids:
            sub_path = f"{path}\\{sub.name}" if path else sub.name
            sub_off = self.write(sub, off, sub_path, depth + 1)
            sraw, scomp = encode_name(sub.name)
            entries.append((sub_off, up, sraw, scomp))
            maxname = max(maxname, utf16_bytes(sub.name))
            if sub.class_name is not None:
                maxclass = max(maxclass, len(sub.class_name.encode("utf-16-le", "surrogatepass")))
        sublist = b.subkey_list(entries)
        vals: list[int] = []
        vseen: dict[str, str] = {}
        maxvalname = maxvaldata = 0
        for v in key.values:
            if not isinstance(v, NewValue):
                raise self.bad(path, f"value {v!r} is not a NewValue")
            if not isinstance(v.name, str) or len(v.name) > L.MAX_VALUE_NAME_CHARS:
                raise self.bad(path, f"bad value name {v.name!r}")
            vup = upcase(v.name)
            if vup in vseen:
                raise self.bad(path, f"duplicate value name {v.name!r} (same as {vseen[vup]!r} in Windows' case)")
            vseen[vup] = v.name
            if v.tombstone and not self.layered:
                raise self.bad(path, f"tombstone value {v.name!r} needs layered=True")
            if not 0 <= v.type <= 0xFFFFFFFF:
                raise self.bad(path, f"value {v.name!r}: type {v.type} out of range")
            if not isinstance(v.data, (bytes, bytearray, memoryview)):
                raise self.bad(path, f"value {v.name!r}: data must be bytes, not {type(v.data).__name__}")
            vraw, vcomp = encode_name(v.name)
            data = b"" if v.tombstone else bytes(v.data)
            vals.append(b.value(vraw, vcomp, v.type, data, v.tombstone))
            maxvalname = max(maxvalname, utf16_bytes(v.name))
            maxvaldata = max(maxvaldata, len(data))
        flags = key.flags | (L.ROOT_FLAGS if depth == 0 else 0)
        if depth:
            flags &= ~L.KEY_HIVE_ENTRY
        b.key(
            off,
            raw,
            comp,
            flags=flags,
            last_written=key.last_written,
            layer=sem | (L.LAYER_INHERIT_CLASS if key.inherit_class else 0),
            parent=parent,
            nsub=len(entries),
            sublist=sublist,
            nval=len(vals),
            vallist=b.value_list(vals),
            sk=sk,
            class_off=class_off,
            class_len=class_len,
            maxname=maxname,
            user_flags=key.user_flags,
            maxclass=maxclass,
            maxvalname=maxvalname,
            maxvaldata=maxvaldata,
        )
        return off


def _first(key: Callable[[str], bytes] | None) -> Callable[[tuple[str, NewKey]], str | bytes]:
    if key is None:
        return lambda pair: pair[0]
    return lambda pair: key(pair[0])
