"""Library-level create: walk a tree and write it with the cimfs Python API.

Used by ``bench/run.py`` as the "create (library)" operation, in a child
process so its wall time and peak RSS are measured like a command's.  This is
what a user of the library would write; it stands in for ``cimfs create`` until
the CLI exists and stays as a measurement of the writer core alone.

    python bench/libcreate.py SRC_DIR IMAGE_DIR IMAGE_NAME [--no-posix] [--no-sync]
    python bench/libcreate.py - IMAGE_DIR NEW_NAME --fork-of PARENT_NAME --add HOST_FILE:IMAGE_PATH ...

POSIX metadata is stored the WSL way (spec §18): ``$LXUID``/``$LXGID``/``$LXMOD``
EAs on every entry and LX symlink reparse points, so the image carries what an
uncompressed squashfs carries (mode, owner, symlinks).
"""

from __future__ import annotations

import argparse
import os
import stat
import struct
import sys

import cimfs
from cimfs import FileAttributes, FileMetadata, filetime_from_ns

IO_REPARSE_TAG_LX_SYMLINK = 0xA000001D


def _ea_chain(entries: list[tuple[bytes, bytes]]) -> bytes:
    out = bytearray()
    for i, (name, value) in enumerate(entries):
        body = struct.pack("<BBH", 0, len(name), len(value)) + name + b"\0" + value
        size = 4 + len(body)
        pad = (-size) % 4 if i + 1 < len(entries) else 0
        nxt = size + pad if i + 1 < len(entries) else 0
        out += struct.pack("<I", nxt) + body + bytes(pad)
    return bytes(out)


_ea_cache: dict[tuple[int, int, int], bytes] = {}


def posix_ea(st: os.stat_result) -> bytes:
    key = (st.st_uid, st.st_gid, st.st_mode)
    ea = _ea_cache.get(key)
    if ea is None:
        ea = _ea_cache[key] = _ea_chain(
            [
                (b"$LXUID", struct.pack("<I", st.st_uid)),
                (b"$LXGID", struct.pack("<I", st.st_gid)),
                (b"$LXMOD", struct.pack("<I", st.st_mode)),
            ]
        )
    return ea


def lx_symlink(target: str) -> bytes:
    data = struct.pack("<I", 2) + os.fsencode(target)
    return struct.pack("<IHH", IO_REPARSE_TAG_LX_SYMLINK, len(data), 0) + data


def metadata(st: os.stat_result, posix: bool, **kw) -> FileMetadata:
    return FileMetadata(
        file_size=kw.pop("file_size", 0),
        creation_time=filetime_from_ns(st.st_ctime_ns),
        last_write_time=filetime_from_ns(st.st_mtime_ns),
        change_time=filetime_from_ns(st.st_ctime_ns),
        last_access_time=filetime_from_ns(st.st_atime_ns),
        ea_buffer=posix_ea(st) if posix else b"",
        **kw,
    )


def build(src: str, image_dir: str, name: str, posix: bool = True, sync: bool = True) -> dict:
    src = os.path.abspath(src)
    n_files = n_dirs = n_links = 0
    inodes: dict[tuple[int, int], str] = {}
    with cimfs.create(image_dir, name, sync=sync) as w:
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            prefix = "" if rel == "." else rel + "/"
            rel_dir = "" if rel == "." else rel
            for d in list(dirnames):
                p = os.path.join(dirpath, d)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    dirnames.remove(d)  # os.walk does not follow it; store as a symlink below
                    filenames.append(d)
                    continue
                w.mkdir(prefix + d, metadata(st, posix, attributes=FileAttributes.DIRECTORY))
                n_dirs += 1
            plain = []  # this directory's regular files, added in one add_local_files() call
            for f in filenames:
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    w.add_file(
                        prefix + f,
                        b"",
                        metadata(
                            st, posix, attributes=FileAttributes.REPARSE_POINT, reparse_data=lx_symlink(os.readlink(p))
                        ),
                    )
                    n_links += 1
                elif stat.S_ISREG(st.st_mode):
                    meta = metadata(st, posix, file_size=st.st_size, attributes=FileAttributes.ARCHIVE)
                    if st.st_nlink > 1:
                        first = inodes.get((st.st_dev, st.st_ino))
                        if first is not None:
                            w.add_local_files(rel_dir, plain)  # the first name may be among them
                            plain.clear()
                            w.link(prefix + f, first)
                            continue
                        inodes[(st.st_dev, st.st_ino)] = prefix + f
                    # By path: the writer's data process opens, hashes and copies it.
                    if st.st_size:
                        plain.append((f, p, meta))
                    else:
                        w.add_file(prefix + f, b"", meta)
                    n_files += 1
            w.add_local_files(rel_dir, plain)
    stats = w.stats()  # after the commit: asked before, it would wait for the copies first
    stats.update(files=n_files, dirs=n_dirs, symlinks=n_links)
    return stats


def fork(image_dir: str, name: str, parent: str, adds: list[str], posix: bool = True, sync: bool = True) -> dict:
    """A fork of ``parent`` adding files (``cimfs fork PARENT NEW --add HOST:PATH`` by hand)."""
    with cimfs.create(image_dir, name, base=parent, sync=sync) as w:
        for spec in adds:
            host, path = spec.rsplit(":", 1)
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if not w.exists(d):
                    w.mkdir(d, metadata(os.stat(os.path.dirname(host)), posix, attributes=FileAttributes.DIRECTORY))
            st = os.stat(host)
            with open(host, "rb") as fh:
                w.add_file(path, fh, metadata(st, posix, file_size=st.st_size, attributes=FileAttributes.ARCHIVE))
        stats = w.stats()
    stats.update(added=len(adds))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("image_dir")
    ap.add_argument("name")
    ap.add_argument("--no-posix", action="store_true", help="store no $LX* EAs")
    ap.add_argument("--no-sync", action="store_true", help="skip fsync at commit")
    ap.add_argument("--fork-of", help="parent image name in IMAGE_DIR: write a fork (SRC is then '-')")
    ap.add_argument("--add", nargs="+", default=[], metavar="HOST:PATH", help="files to add to the fork")
    a = ap.parse_args(argv)
    os.makedirs(a.image_dir, exist_ok=True)
    if a.fork_of:
        stats = fork(a.image_dir, a.name, a.fork_of, a.add, posix=not a.no_posix, sync=not a.no_sync)
    else:
        stats = build(a.src, a.image_dir, a.name, posix=not a.no_posix, sync=not a.no_sync)
    print(" ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
