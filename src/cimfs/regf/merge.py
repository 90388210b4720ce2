"""Flattening a base hive and differencing (layered) hives into one plain hive, as offline registry's
``ORMergeHives([base, delta1, ...])`` does for hcsshim's layer import (regf-notes §3.3).

Layers: H[0] is the base, H[i] the i-th delta; a higher layer wins.  For each key path the node stack is
scanned from the highest layer down: a tombstone (semantics 1) hides its layer and everything below; a
supersede-tree node (3) hides everything below, itself and its subtree included; a supersede-local node (2)
stops the key's own data (values, class, security) from coming from lower layers while their subkeys still
merge; a merge node (0) adds to the nodes below.  Values are the union over the contributing nodes, the
highest winning for a name (Windows' case-insensitive compare) and a tombstone value hiding the name.

[choice]s for the points the public record leaves open (notes §6; docs/REGF.md):
- Q1 output: a plain hive: no layer bits, no inherit-class bits, base-block flag 0x2 clear, no tombstones;
  the version is the base hive's (major 1, its minor) so a merged base looks like the hives around it.
- Q2 order: subkeys sorted (Windows' order, required); values keep the lowest contributing layer's order,
  a value changed by a higher layer keeping its slot, new names appended in the order of the layer that adds
  them.  Names take the spelling of the highest contributing node (the base's spelling for the root).
- Q3 class: the highest contributing node with InheritClass clear gives the class; when every contributing
  node inherits, the search goes on down the stack past a supersede boundary (xboxgipsvc's 0x83: a replaced
  key keeps the class it inherits) but never past a tombstone or below what the parent's layers admit.
- Q4 security descriptor, key flags and the user/virtualization flags at nk+52: the highest contributing node's.
- Q5 last-written time: the newest among the contributing nodes (tombstone nodes do not contribute).
- Q6 supersede-local: lower layers' subkeys still merge under it (dfir's reading), only the key's own data stops.
- A tombstone root key is refused (a hive cannot delete its root).  Layer bits are honoured whether or not a
  hive sets the base-block "layered" flag; in the base they only hide (tombstones) or do nothing.
- Value names duplicated inside one node (Windows tolerates them): the later one wins in a merged key; in a
  key that only one layer contributes the values are copied as stored.

Speed: a key whose path has a node in one layer only (most of a base) is copied with its subtree straight
from that hive's buffer, without a per-layer name map; values are copied from their vk and data cells.
Every cell read is claimed in a per-hive ``Coverage`` map, so a hostile hive cannot make the output larger
than its inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..atomic import fsync_dir, replacing
from ..errors import CimError, hresult_from_oserror
from . import layout as L
from .names import encode_name, order_key, upcase
from .reader import Coverage, Hive, open_hive
from .writer import HiveBuilder, deep_recursion

_SEM, _INHERIT = L.LAYER_SEMANTICS_MASK, L.LAYER_INHERIT_CLASS
_FL, _NAMELEN, _LAYER, _TIME, _SK = L.NKF_FLAGS, L.NKF_NAMELEN, L.NKF_LAYER, L.NKF_TIME, L.NKF_SK
_INLINE_MASK = (0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF)  # inline bytes beyond the size are not copied


def merge(
    base: Hive | bytes | bytearray | memoryview,
    deltas: Sequence[Hive | bytes | bytearray | memoryview] = (),
    *,
    file_name: str = "",
) -> bytes:
    """The plain hive flattening ``base`` (a ``Hive`` or hive bytes) and ``deltas`` (each on top of the previous)."""
    return bytes(_merge_buffer(base, deltas, file_name))


def merge_files(
    base_path: str | os.PathLike[str], delta_paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]
) -> None:
    """Write ``merge(base, deltas)`` to ``out_path`` atomically (a temporary file renamed into place; nothing
    is left behind on failure)."""
    hives = []
    try:
        hives.append(open_hive(base_path))
        for p in delta_paths:
            hives.append(open_hive(p))
        out = _merge_buffer(hives[0], hives[1:], os.fspath(out_path))
    finally:
        for h in hives:
            h.close()
    try:
        with replacing(os.fspath(out_path)) as tmp, open(tmp, "wb") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(os.path.dirname(os.path.abspath(out_path)))
    except CimError:
        raise
    except OSError as e:
        raise CimError(hresult_from_oserror(e), e.strerror or str(e), os.fspath(out_path)) from None


def _as_hive(h: Hive | bytes | bytearray | memoryview, label: str) -> Hive:
    return h if isinstance(h, Hive) else Hive(h, label)


def _merge_buffer(
    base: Hive | bytes | bytearray | memoryview, deltas: Sequence[Hive | bytes | bytearray | memoryview], file_name: str
) -> bytearray:
    hives = [_as_hive(base, "base hive")] + [_as_hive(d, f"delta hive {i + 1}") for i, d in enumerate(deltas)]
    b = HiveBuilder(hives[0].minor, name=file_name or "<merged hive>")
    m = _Merger(hives, b)
    with deep_recursion():
        root = m.root()
    return b.finish(root, layered=False, file_name=file_name)


class _Node:
    """A key node of one layer at some path."""

    __slots__ = ("li", "off", "f", "name_at", "name")

    def __init__(self, li: int, off: int, f: tuple, name_at: int, name: str) -> None:
        self.li, self.off, self.f, self.name_at, self.name = li, off, f, name_at, name


class _Merger:
    def __init__(self, hives: list[Hive], b: HiveBuilder):
        self.hives, self.b, self.top = hives, b, len(hives) - 1
        self.cov = [Coverage(h) for h in hives]
        self.sk_out: list[dict[int, int]] = [{} for _ in hives]  # per layer: sk offset -> new sk offset

    # ---- shared pieces --------------------------------------------------------------------------------------------
    def node(self, li: int, off: int) -> _Node:
        h = self.hives[li]
        f, name_at = h.nk(off, self.cov[li])
        return _Node(li, off, f, name_at, h.name_at(off, name_at, f[_NAMELEN], bool(f[_FL] & L.KEY_COMP_NAME)))

    def children(self, n: _Node) -> list[_Node]:
        h, cov = self.hives[n.li], self.cov[n.li]
        return [self.node(n.li, o) for o in h.subkey_offsets(n.f, n.off, cov)]

    def security(self, n: _Node) -> int:
        m = self.sk_out[n.li]
        src = n.f[_SK]
        out = m.get(src)
        if out is None:
            out = m[src] = self.b.sk(self.hives[n.li].security_at(src))
        else:
            self.b.sk_refs[out] += 1
        return out

    def class_of(self, n: _Node) -> tuple[int, int]:
        raw = self.hives[n.li].class_bytes(n.f, n.off, self.cov[n.li])
        if not raw:
            return L.NONE, 0
        return self.b.put(raw), len(raw)

    def copy_value(self, li: int, vo: int, vf: tuple, name_at: int) -> tuple[int, int, int]:
        """(new vk offset, name length in UTF-16 bytes, data size) of a value copied from layer ``li``."""
        h = self.hives[li]
        nl = vf[L.VKF_NAMELEN]
        comp = bool(vf[L.VKF_FLAGS] & L.VALUE_COMP_NAME)
        parts = h.data_parts(vf, vo, self.cov[li])
        size = sum(len(p) for p in parts)
        out = self.b.value(h._buf[name_at : name_at + nl], comp, vf[L.VKF_TYPE], parts)
        return out, 2 * nl if comp else nl, size

    def emit(
        self,
        off: int,
        name: str,
        top: _Node,
        parent: int,
        *,
        layer_nodes: Sequence[_Node],
        entries: list,
        values: tuple[list[int], int, int],
        class_off: int,
        class_len: int,
        sk: int,
        root: bool = False,
        stored: tuple[bytes, bool] | None = None,
    ) -> tuple:
        """Fill the nk at ``off``; ``values`` is (vk offsets, MaxValueNameLen, MaxValueDataLen); returns the
        parent's list entry for the key."""
        b = self.b
        raw, comp = stored or encode_name(name)
        sublist = b.subkey_list(entries)
        maxname = maxclass = 0
        for e in entries:
            if e[4] > maxname:
                maxname = e[4]
            if e[5] > maxclass:
                maxclass = e[5]
        voffs, maxvalname, maxvaldata = values
        flags = top.f[_FL] | L.ROOT_FLAGS if root else top.f[_FL] & ~L.KEY_HIVE_ENTRY
        ts = top.f[_TIME]
        for n in layer_nodes:
            if n.f[_TIME] > ts:
                ts = n.f[_TIME]
        b.key(
            off,
            raw,
            comp,
            flags=flags,
            last_written=ts,
            layer=0,
            parent=parent,
            nsub=len(entries),
            sublist=sublist,
            nval=len(voffs),
            vallist=b.value_list(voffs),
            sk=sk,
            class_off=class_off,
            class_len=class_len,
            maxname=maxname,
            user_flags=top.f[L.NKF_MAXNAME] >> 16,
            maxclass=maxclass,
            maxvalname=maxvalname,
            maxvaldata=maxvaldata,
        )
        return off, upcase(name), raw, comp, 2 * len(raw) if comp else len(raw), class_len

    def copy_values(self, n: _Node) -> tuple[list, int, int]:
        """The values of one node copied (tombstones dropped): (vk offsets, max name length, max data size).
        The common case, inline data, is handled here without building a record per value."""
        li = n.li
        h, cov, b = self.hives[li], self.cov[li], self.b
        buf, cell, unpack, pack, out = h._buf, h.cell, L.VK_HEAD.unpack_from, L.VK_CELL.pack_into, b.buf
        put_size, BB, VKS = L.CELL_SIZE.pack_into, L.BASE_BLOCK_SIZE, L.VK_HEAD.size
        offs, maxn, maxd = [], 0, 0
        for vo in h.value_offsets(n.f, n.off, cov):
            s, cn = cell(vo, "value", cov)
            if cn < L.VK_HEAD.size:
                raise h.error(vo, "value: cell too small")
            vf = unpack(buf, s)
            sig, nl, raw, dfield, typ, flags, _ = vf
            if sig != L.VK:
                raise h.error(vo, f"expected a value ('vk'), found {bytes(sig)!r}")
            if L.VK_HEAD.size + nl > cn:
                raise h.error(vo, f"value name of {nl} bytes overruns its cell")
            if flags & L.VALUE_TOMBSTONE:
                continue
            comp = flags & L.VALUE_COMP_NAME
            nl16 = 2 * nl if comp else nl
            if raw & L.DATA_INLINE:
                size = raw & ~L.DATA_INLINE
                if size > L.INLINE_MAX:
                    raise h.error(vo, f"inline data of {size} bytes (at most 4 fit)")
                vsize = (VKS + nl + 11) & ~7
                o = b.pos
                if o + vsize <= b.bin_end:  # bump allocation inlined
                    b.pos = o + vsize
                else:  # the builder opens a new bin (and writes the same size field)
                    o = b.alloc(VKS + nl)
                at = BB + o
                pack(out, at, -vsize, L.VK, nl, raw, dfield & _INLINE_MASK[size], typ, comp, 0)
                at += 4 + VKS
                out[at : at + nl] = buf[s + VKS : s + VKS + nl]
            elif L.INLINE_MAX < raw <= L.SEGMENT_BYTES:  # one data cell, copied as it is
                ds, dn = cell(dfield, "value data", cov)
                if raw > dn:
                    raise h.error(dfield, f"value data of {raw} bytes overruns its {dn}-byte cell")
                size = raw
                dsize, vsize = (raw + 11) & ~7, (VKS + nl + 11) & ~7
                d = b.pos
                if d + dsize + vsize <= b.bin_end:  # both cells fit the open bin: bump allocation inlined
                    o = d + dsize
                    b.pos = o + vsize
                else:  # the builder opens new bins (it writes the same size fields)
                    d = b.alloc(raw)
                    o = b.alloc(VKS + nl)
                put_size(out, BB + d, -dsize)
                out[BB + d + 4 : BB + d + 4 + raw] = buf[ds : ds + raw]
                at = BB + o
                pack(out, at, -vsize, L.VK, nl, raw, d, typ, comp, 0)
                at += 4 + VKS
                out[at : at + nl] = buf[s + VKS : s + VKS + nl]
            else:  # big data, empty data, or short data stored in a cell (re-inlined by the writer)
                parts = h.data_parts(vf, vo, cov)
                size = sum(len(p) for p in parts)
                o = b.value(buf[s + L.VK_HEAD.size : s + L.VK_HEAD.size + nl], comp, typ, parts)
            offs.append(o)
            if nl16 > maxn:
                maxn = nl16
            if size > maxd:
                maxd = size
        return offs, maxn, maxd

    # ---- a subtree one layer alone contributes -------------------------------------------------------------------
    def copy(self, n: _Node, parent: int, depth: int) -> tuple | None:
        if n.f[_LAYER] & _SEM == L.TOMBSTONE:
            return None
        b, h = self.b, self.hives[n.li]
        stored = encode_name(n.name)
        off = b.alloc(b.key_size(len(stored[0])))
        sk = self.security(n)
        class_off, class_len = (L.NONE, 0) if n.f[_LAYER] & _INHERIT else self.class_of(n)
        kids = self.children(n)
        if kids and depth >= L.MAX_DEPTH:
            raise h.error(n.off, f"keys nested deeper than {L.MAX_DEPTH}")
        entries = []
        for k in kids:  # a plain loop: one Python frame per key level
            e = self.copy(k, off, depth + 1)
            if e is not None:
                entries.append(e)
        self._sort_entries(entries, h, n)
        values = self.copy_values(n)
        return self.emit(
            off,
            n.name,
            n,
            parent,
            layer_nodes=(n,),
            entries=entries,
            values=values,
            class_off=class_off,
            class_len=class_len,
            sk=sk,
            stored=stored,
        )

    @staticmethod
    def _sort_entries(entries: list, h: Hive, n: _Node) -> None:
        ups = [e[1] for e in entries]
        k = order_key(ups)
        if k is not None or any(a >= c for a, c in zip(ups, ups[1:])):
            entries.sort(key=(lambda e: e[1]) if k is None else (lambda e: k(e[1])))
        for a, c in zip(entries, entries[1:]):
            if a[1] == c[1]:
                raise h.error(n.off, f"two subkeys named {a[1]!r} (in Windows' case) under {n.name!r}")

    # ---- a key several layers contribute to ---------------------------------------------------------------------
    def root(self) -> int:
        nodes = []
        for li, h in enumerate(self.hives):
            n = self.node(li, h.root_offset)
            if n.f[_LAYER] & _SEM == L.TOMBSTONE:
                raise h.error(n.off, "the root key is a tombstone")
            nodes.append(n)
        entry = self.merged(nodes, 0, L.NONE, 0, root_name=nodes[0].name)
        assert entry is not None  # only a tombstone is merged away, and a root tombstone was refused above
        return entry[0]

    def merged(self, nodes: list, lo: int, parent: int, depth: int, root_name: str | None = None) -> tuple | None:
        own: list[_Node] = []
        closed = False
        tree_lo = lo
        stop = lo  # the class search never goes below this layer
        for i in range(self.top, lo - 1, -1):
            n = nodes[i]
            if n is None:
                continue
            sem = n.f[_LAYER] & _SEM
            if sem == L.TOMBSTONE:
                tree_lo = stop = i + 1
                break
            if not closed:
                own.append(n)
            if sem == L.SUPERSEDE_TREE:
                tree_lo = i
                break
            if sem == L.SUPERSEDE_LOCAL:
                closed = True
        if not own:
            return None
        top = own[0]
        b = self.b
        name = root_name if root_name is not None else top.name
        off = b.alloc(b.key_size(len(encode_name(name)[0])))
        sk = self.security(top)
        class_off, class_len = self._merged_class(own, nodes, stop)
        entries = self._merged_children(nodes, tree_lo, off, depth)
        values = self._merged_values(own)
        return self.emit(
            off,
            name,
            top,
            parent,
            layer_nodes=own,
            entries=entries,
            values=values,
            class_off=class_off,
            class_len=class_len,
            sk=sk,
            root=root_name is not None,
        )

    def _merged_class(self, own: list[_Node], nodes: list, stop: int) -> tuple[int, int]:
        for n in own:
            if not n.f[_LAYER] & _INHERIT:
                return self.class_of(n)
        for i in range(own[-1].li - 1, stop - 1, -1):
            n = nodes[i]
            if n is None:
                continue
            if n.f[_LAYER] & _SEM == L.TOMBSTONE:
                break
            if not n.f[_LAYER] & _INHERIT:
                return self.class_of(n)
        return L.NONE, 0

    def _merged_children(self, nodes: list, tree_lo: int, parent: int, depth: int) -> list:
        per_layer: dict[int, dict[str, _Node]] = {}
        for i in range(tree_lo, self.top + 1):
            n = nodes[i]
            if n is None:
                continue
            kids = self.children(n)
            if kids and depth >= L.MAX_DEPTH:
                raise self.hives[i].error(n.off, f"keys nested deeper than {L.MAX_DEPTH}")
            by_name: dict[str, _Node] = {}
            for k in kids:
                up = upcase(k.name)
                if up in by_name:
                    raise self.hives[i].error(n.off, f"two subkeys named {up!r} (in Windows' case) under {n.name!r}")
                by_name[up] = k
            per_layer[i] = by_name
        union: set[str] = set()
        for by_name in per_layer.values():
            union.update(by_name)
        order = sorted(union, key=order_key(union))
        entries = []
        for up in order:
            stack: list[_Node | None] = [None] * (self.top + 1)
            present = 0
            for i, by_name in per_layer.items():
                node = by_name.get(up)
                if node is not None:
                    stack[i] = node
                    present += 1
                    last = node
            e = self.copy(last, parent, depth + 1) if present == 1 else self.merged(stack, tree_lo, parent, depth + 1)
            if e is not None:
                entries.append(e)
        return entries

    def _merged_values(self, own: list[_Node]) -> tuple[list[int], int, int]:
        slots: dict[str, tuple] = {}
        for n in reversed(own):  # lowest first: a higher layer replaces a name in its slot
            h, cov = self.hives[n.li], self.cov[n.li]
            for vo in h.value_offsets(n.f, n.off, cov):
                vf, name_at = h.vk(vo, cov)
                name = h.name_at(vo, name_at, vf[L.VKF_NAMELEN], bool(vf[L.VKF_FLAGS] & L.VALUE_COMP_NAME))
                slots[upcase(name)] = (n.li, vo, vf, name_at)
        copied = [self.copy_value(*s) for s in slots.values() if not s[2][L.VKF_FLAGS] & L.VALUE_TOMBSTONE]
        return ([c[0] for c in copied], max((c[1] for c in copied), default=0), max((c[2] for c in copied), default=0))
