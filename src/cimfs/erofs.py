"""EROFS indexes of CIM images: the Linux kernel serves the image's tree.

:func:`write_index` writes an EROFS image that holds the image's metadata
(inodes, directories, xattrs) and chunk indexes pointing at the file
contents where they already are, in the image's region files, which the
kernel is given as extra devices (one device per region file holding data).
Contents that no EROFS block can address in place (objects not aligned to
the block size, PE-image streams) are copied into the index; with
``standalone=True`` everything is, and the result needs no region files.

The tree is the one the FUSE mount shows (:mod:`cimfs.mount.view`), with
these differences, all forced by EROFS:

- one time per inode: atime and ctime read as the last write time (the
  creation, access and change times stay in ``trusted.ntfs_times``);
- the NTFS metadata that FUSE serves as ``system.ntfs_*`` (by name only) are
  ``trusted.ntfs_attrib``, ``trusted.ntfs_times``, ``trusted.ntfs_acl``,
  ``trusted.ntfs_reparse_data`` and ``trusted.ntfs_ea`` (listed, readable by
  root); the ``_be`` and ``crtime`` variants are left out (``ntfs_times``
  holds the creation time);
- an alternate stream longer than 65535 bytes (an EROFS xattr value's limit)
  or whose name is longer than 255 bytes has no ``user.`` xattr; names longer
  than 255 bytes have no directory entry (FUSE cannot look them up either).

This module is a client of the public reader (``cimfs.open``); every EROFS
byte is packed by :mod:`cimfs.layout.erofs`.
"""

from __future__ import annotations

import os
import stat as S
import uuid as _uuid
from collections import Counter
from typing import TYPE_CHECKING

from .atomic import open_new, replacing
from .errors import E_INVALIDARG, CimError
from .layout import cim
from .layout import erofs as L
from .metadata import filetime_to_ns
from .mount.view import DAMAGED, Options, PosixView, fs_name, lx_metadata, ntfs_xattrs_main, posix_view, symlink_target

if TYPE_CHECKING:  # annotations only: this module is a client of the reader
    from .reader import Image, Stat

__all__ = ["write_index", "IndexInfo"]


_FT = {
    S.S_IFREG: L.FT_REG_FILE,
    S.S_IFDIR: L.FT_DIR,
    S.S_IFCHR: L.FT_CHRDEV,
    S.S_IFBLK: L.FT_BLKDEV,
    S.S_IFIFO: L.FT_FIFO,
    S.S_IFSOCK: L.FT_SOCK,
    S.S_IFLNK: L.FT_SYMLINK,
}

# What a regular file's data plan is.
_EMPTY, _HOLE, _IN_PLACE, _COPY = range(4)


class IndexInfo(dict):
    """What :func:`write_index` wrote: ``devices`` (region file paths, in
    device order), ``inodes``, ``size``, ``copied_files``, ``copied_bytes``,
    ``in_place_files``, ``skipped_names``."""


class _Inode:
    __slots__ = (
        "fid",
        "mode",
        "uid",
        "gid",
        "rdev",
        "nlink",
        "size",
        "mtime_ns",
        "xattrs",
        "plan",
        "where",
        "children",
        "parent",
        "nid",
        "record",
        "blkaddr",
        "data",
        "chunkbits",
        "nchunks",
        "shared",
        "tail",
        "loc",
        "eof_tail",
        "start",
    )
    # Set by _Builder._inode (the entry's view), collect() (links, parent) and write() (layout).
    mode: int
    uid: int
    gid: int
    rdev: int
    nlink: int
    size: int
    mtime_ns: int
    record: Stat
    xattrs: list[tuple[int, bytes, bytes]]
    parent: _Inode
    chunkbits: int
    nchunks: int
    shared: tuple[bytes, int]  # the xattr ibody and its icount
    where: cim.Stream  # the contents' stream (regular files with data)
    start: tuple[int, int]  # (device, block) of contents addressed in place

    def __init__(self, fid: int):
        self.fid = fid
        self.children: list[tuple[bytes, _Inode]] | None = None
        self.data: bytes | None = None  # directory blocks or symlink target
        self.plan = _EMPTY
        self.blkaddr = 0
        self.nid = 0  # set by write()
        self.tail = 0
        self.loc: tuple[str, int, int] | None = None
        self.eof_tail = False  # the last block lies past the region file's end (a short read in the kernel)


def write_index(
    image: Image,
    out_path: str | os.PathLike[str] | int,
    *,
    standalone: bool = False,
    options: Options | None = None,
    block_bits: int | None = None,
    ntfs_xattrs: bool = True,
) -> IndexInfo:
    """Write the EROFS index of ``image`` (an open :class:`cimfs.Image`) to
    ``out_path`` (through a temporary name: nothing partial is ever left
    there), or to an open descriptor of an empty file (``out_path`` an int:
    publishing it is the caller's).  ``options`` sets owner and umask of
    entries without WSL metadata (the FUSE mount's defaults otherwise)."""
    options = options or Options()
    b = _Builder(image, options, block_bits, standalone, ntfs_xattrs)
    b.collect()
    if isinstance(out_path, int):
        b.write(out_path)
        os.fsync(out_path)
        return b.info
    with replacing(os.fspath(out_path)) as tmp:
        fd = open_new(tmp)
        try:
            b.write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    return b.info


class _Builder:
    def __init__(self, image: Image, options: Options, block_bits: int | None, standalone: bool, ntfs_xattrs: bool):
        if block_bits is not None and not 9 <= block_bits <= 12:
            raise CimError(E_INVALIDARG, f"EROFS block size 2^{block_bits} (9..12)", image.path)
        self.image = image
        self.options = options
        self.block_bits = block_bits
        self.aligned: list[int] = []  # byte offsets of the data objects that could be addressed in place
        self._views: dict[tuple, PosixView] = {}
        self.standalone = standalone
        self.ntfs_xattrs = ntfs_xattrs
        self.inodes: list[_Inode] = []
        self.devices: dict[str, int] = {}  # region file path -> device id (1-based)
        self.device_sizes: dict[str, int] = {}
        self.info = IndexInfo(
            devices=[], inodes=0, size=0, copied_files=0, copied_bytes=0, in_place_files=0, skipped_names=0
        )

    # ------------------------------------------------------------ the tree
    def collect(self) -> None:
        image = self.image
        by_fid: dict[int, _Inode] = {}
        root = self._inode(image.root_id)
        root.parent = root
        by_fid[image.root_id] = root
        queue = [root]
        i = 0
        while i < len(queue):
            d = queue[i]
            i += 1
            if d.children is None:
                continue
            subdirs = 0
            for e in image.scandir(d.fid):
                raw = fs_name(e.name)
                if raw is None or len(raw) > L.NAME_LEN:
                    self.info["skipped_names"] += 1
                    continue
                node = by_fid.get(e.file_id)
                if node is not None and node.children is None:
                    node.nlink += 1
                if node is None:
                    node = by_fid[e.file_id] = self._inode(e.file_id)
                    node.parent = d
                    node.nlink = 1
                    queue.append(node)
                elif node.children is not None:  # a directory with two names: corrupt
                    raise CimError(E_INVALIDARG, f"directory FileID {e.file_id} has more than one name", image.path)
                if node.record.is_dir:
                    subdirs += 1
                d.children.append((raw, node))
            d.nlink = 2 + subdirs
        self.inodes = queue
        self.info["inodes"] = len(queue)

    def _inode(self, fid: int) -> _Inode:
        image = self.image
        node = _Inode(fid)
        st = image.stat(fid, links=False)  # links are counted by collect()'s walk
        node.record = st
        # Most entries share their EA buffer and attributes: map each combination once.
        key = (st.ea_buffer, st.attributes, st.is_dir, st.reparse_tag if st.reparse_data else 0)
        view = self._views.get(key)
        if view is None:
            try:
                lx = lx_metadata(st.ea_buffer)
            except DAMAGED:
                lx = lx_metadata(b"")
            view = self._views[key] = posix_view(st, lx, self.options)
        node.mode, node.uid, node.gid = view.mode, view.uid, view.gid
        node.rdev = L.encode_rdev(os.major(view.rdev), os.minor(view.rdev)) if view.rdev else 0
        node.nlink = 0
        node.mtime_ns = filetime_to_ns(st.last_write_time) if st.last_write_time else 0
        kind = S.S_IFMT(view.mode)
        node.size = 0
        if kind == S.S_IFDIR:
            node.children = []
        elif kind == S.S_IFLNK:
            try:
                target = symlink_target(st.reparse_data)
            except DAMAGED:
                target = None
            node.data = target or b""
            node.size = len(node.data)
        elif kind == S.S_IFREG and st.size:
            node.size = st.size
            self._plan_data(node)
        xattrs = []
        for name in image.streams(fid) if st.stream_count else ():
            raw = name.encode("utf-8", "surrogatepass")
            if not raw or b"\0" in raw or len(raw) > L.XATTR_NAME_MAX:
                continue
            desc = image.stream_descriptor(fid, name)
            if desc.length <= L.XATTR_VALUE_MAX:
                xattrs.append((L.XATTR_INDEX_USER, raw, image.read_at(desc, 0, desc.length)))
        if self.ntfs_xattrs:
            for fuse_name, value in ntfs_xattrs_main(st):
                if len(value) <= L.XATTR_VALUE_MAX:
                    xattrs.append((L.XATTR_INDEX_TRUSTED, fuse_name[7:], value))
        node.xattrs = xattrs
        return node

    def _plan_data(self, node: _Inode) -> None:
        desc = self.image.record(node.fid).stream
        node.where = desc
        if desc.sparse:
            node.plan = _HOLE
            return
        node.plan = _COPY
        loc = self.image.data_location(desc)
        if loc is not None and not self.standalone:
            node.loc = loc
            self.aligned.append(loc[1])

    def _choose_block_size(self) -> None:
        """[choice] 4096-byte blocks (what Debian's fsck.erofs checks) when every
        object is 4096-aligned or some are not even 512-aligned (older images:
        those are copied, tails packed inline); 512 when that makes every
        object addressable in place."""
        if self.block_bits is not None:
            self.bits = self.block_bits
        elif all(off % 4096 == 0 for off in self.aligned) or not all(off % 512 == 0 for off in self.aligned):
            self.bits = 12
        else:
            self.bits = 9
        self.bs = 1 << self.bits
        for node in self.inodes:
            if node.plan != _COPY:
                continue
            if node.loc is not None and node.loc[1] % self.bs == 0:
                path, off, size = node.loc
                if path not in self.devices:
                    self.devices[path] = len(self.devices) + 1
                    self.device_sizes[path] = size
                node.plan = _IN_PLACE
                node.start = (self.devices[path], off // self.bs)
                node.eof_tail = L.align(off + node.size, self.bs) > size
                self.info["in_place_files"] += 1
            else:
                self.info["copied_files"] += 1
                self.info["copied_bytes"] += node.size
        self.info["block_size"] = self.bs

    # ------------------------------------------------------------ layout
    def _chunking(self, node: _Inode) -> None:
        # One chunk for the whole file where it can; chunks of at most 1 MiB
        # when the last one must come from the index (a copy of the region
        # file's end, whose last block would be a short read for the kernel).
        bits = max(self.bits, (node.size - 1).bit_length())
        if node.eof_tail:
            bits = max(self.bits, min(bits, _EOF_CHUNK_BITS))
        node.chunkbits = min(bits, self.bits + L.CHUNK_FORMAT_BLKBITS_MASK)
        node.nchunks = -(-node.size // (1 << node.chunkbits))

    def write(self, fd: int) -> None:
        self._choose_block_size()
        bs = self.bs
        # Shared xattrs: every (name, value) that more than one inode carries.
        counts = Counter(x for n in self.inodes for x in n.xattrs)
        shared_area = bytearray()
        shared_ids: dict[tuple, int] = {}
        for x, c in counts.items():
            if c > 1:
                shared_ids[x] = len(shared_area) // 4
                shared_area += L.pack_xattr_entry(*x)
        # Fixed head: superblock at 1024, device slots after it, then the shared xattrs.
        ndev = len(self.devices)
        slots_at = L.SUPER_OFFSET + L.SUPER_BLOCK.size
        head_end = slots_at + ndev * L.DEVICE_SLOT.size
        xattr_blkaddr = L.align(head_end, bs) // bs
        meta_blkaddr = xattr_blkaddr + L.align(len(shared_area), bs) // bs
        meta_start = meta_blkaddr * bs
        # Directory sizes depend on the names only (nids are fixed-size).
        for node in self.inodes:
            if node.children is not None:
                node.children.append((b".", node))
                node.children.append((b"..", node.parent))
                node.children.sort(key=lambda e: e[0])
                node.size = L.directory_size([len(name) for name, _ in node.children], bs)
        # Inode records: inode, inline xattrs, then chunk indexes or the inline
        # tail of flat data (which must not cross a block); 32-byte slots.
        pos = L.INODE_SLOT  # nid 0 would be inode number 0, which readdir callers skip
        for node in self.inodes:
            body, icount = L.pack_xattr_ibody(
                [shared_ids[x] for x in node.xattrs if x in shared_ids],
                b"".join(L.pack_xattr_entry(*x) for x in node.xattrs if x not in shared_ids),
            )
            node.shared = (body, icount)
            head = L.INODE_EXTENDED.size + len(body)
            node.tail = 0
            if node.plan in (_HOLE, _IN_PLACE):
                self._chunking(node)
                end = L.align(pos + head, L.CHUNK_INDEX.size) + node.nchunks * L.CHUNK_INDEX.size
            else:
                tail = node.size % bs
                if tail and head + tail <= bs:
                    node.tail = tail
                    if (meta_start + pos + head) % bs + tail > bs:
                        pos = L.align(meta_start + pos, bs) - meta_start
                end = pos + head + node.tail
            node.nid = pos // L.INODE_SLOT
            pos = L.align(end, L.INODE_SLOT)
        if self.inodes[0].nid != 1:
            raise AssertionError("the root must be the first inode")
        # Data blocks: the whole blocks of flat data (directories, symlink
        # targets, copied contents); the tail is inline when it fits.
        data_block = L.align(meta_start + pos, bs) // bs
        for node in self.inodes:
            if node.children is not None:
                node.data = L.pack_directory(self._dirents(node), bs)
            if (node.data is not None or node.plan == _COPY) and node.size > node.tail:
                node.blkaddr = data_block
                data_block += -(-(node.size - node.tail) // bs)
            elif node.eof_tail:
                node.blkaddr = data_block
                data_block += -(-(node.size - ((node.nchunks - 1) << node.chunkbits)) // bs)
        total_blocks = data_block
        meta = bytearray(meta_start + pos)
        sb = L.pack_super_block(
            blkszbits=self.bits,
            root_nid=self.inodes[0].nid,
            inos=len(self.inodes),
            build_time=0,
            build_time_nsec=0,
            blocks=total_blocks,
            meta_blkaddr=meta_blkaddr,
            xattr_blkaddr=xattr_blkaddr,
            uuid=_uuid.uuid4().bytes,
            volume_name=b"cimfs",
            feature_incompat=L.FEATURE_INCOMPAT_CHUNKED_FILE | (L.FEATURE_INCOMPAT_DEVICE_TABLE if ndev else 0),
            extra_devices=ndev,
            devt_slotoff=slots_at // L.DEVICE_SLOT.size if ndev else 0,
        )
        meta[L.SUPER_OFFSET : L.SUPER_OFFSET + len(sb)] = sb
        for path, dev in self.devices.items():
            at = slots_at + (dev - 1) * L.DEVICE_SLOT.size
            tag = os.path.basename(path).encode("utf-8", "surrogateescape")
            meta[at : at + L.DEVICE_SLOT.size] = L.pack_device_slot(tag, -(-self.device_sizes[path] // bs))
        meta[xattr_blkaddr * bs : xattr_blkaddr * bs + len(shared_area)] = shared_area
        for ino, node in enumerate(self.inodes, 1):
            self._put_inode(fd, meta, meta_start + node.nid * L.INODE_SLOT, node, ino)
        os.pwrite(fd, meta, 0)
        os.ftruncate(fd, total_blocks * bs)
        self.info["devices"] = list(self.devices)
        self.info["size"] = total_blocks * bs

    @staticmethod
    def _dirents(node: _Inode) -> list:
        assert node.children is not None  # called for directories only
        return [(name, child.nid, _FT[S.S_IFMT(child.mode)]) for name, child in node.children]

    def _put_inode(self, fd: int, meta: bytearray, at: int, node: _Inode, ino: int) -> None:
        body, icount = node.shared
        kind = S.S_IFMT(node.mode)
        if node.plan in (_HOLE, _IN_PLACE):
            layout = L.DATALAYOUT_CHUNK_BASED
            i_u = L.chunk_format(node.chunkbits, self.bits)
        else:
            layout = L.DATALAYOUT_FLAT_INLINE if node.tail else L.DATALAYOUT_FLAT_PLAIN
            i_u = node.rdev if kind in (S.S_IFCHR, S.S_IFBLK) else node.blkaddr
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        raw = L.pack_inode_extended(
            datalayout=layout,
            xattr_icount=icount,
            mode=node.mode,
            size=node.size,
            i_u=i_u,
            ino=ino,
            uid=node.uid,
            gid=node.gid,
            mtime=sec,
            mtime_nsec=nsec,
            nlink=node.nlink,
        )
        meta[at : at + len(raw)] = raw
        at += len(raw)
        meta[at : at + len(body)] = body
        at += len(body)
        if layout == L.DATALAYOUT_CHUNK_BASED:
            at = L.align(at, L.CHUNK_INDEX.size)
            if node.plan == _HOLE:
                chunks = [(0, L.NULL_ADDR)] * node.nchunks
            else:
                dev, blk = node.start
                step = 1 << (node.chunkbits - self.bits)
                chunks = [(dev, blk + k * step) for k in range(node.nchunks)]
                if node.eof_tail:
                    chunks[-1] = (0, node.blkaddr)
                    last = (node.nchunks - 1) << node.chunkbits
                    os.pwrite(fd, self.image.read_at(node.where, last, node.size - last), node.blkaddr * self.bs)
            raw = L.pack_chunk_indexes(chunks)
            meta[at : at + len(raw)] = raw
            return
        head = node.size - node.tail
        if node.data is not None:
            if head:
                os.pwrite(fd, node.data[:head], node.blkaddr * self.bs)
            meta[at : at + node.tail] = node.data[head:]
        elif node.plan == _COPY:
            done = 0
            while done < head:
                chunk = self.image.read_at(node.where, done, min(_COPY_STEP, head - done))
                os.pwrite(fd, chunk, node.blkaddr * self.bs + done)
                done += len(chunk)
            if node.tail:
                meta[at : at + node.tail] = self.image.read_at(node.where, head, node.tail)


_COPY_STEP = 8 << 20
_EOF_CHUNK_BITS = 20
