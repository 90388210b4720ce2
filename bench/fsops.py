"""The client side of the mounted-filesystem operations, run as a child process
against a mount point (the same code for every filesystem, so only the
filesystem differs).

    python bench/fsops.py read   MNT            # walk, read every regular file fully (1 MiB reads)
    python bench/fsops.py stat   MNT            # walk, lstat every entry
    python bench/fsops.py random MNT LIST N SEED  # N x (open, pread 4 KiB at a random offset, close)

LIST is a file of "size<TAB>relative path" lines (regular files of at least 4 KiB,
from the source tree).  Prints one JSON line: counts and a checksum-like total,
so runs on different filesystems can be checked against each other.
"""

from __future__ import annotations

import json
import os
import random
import stat
import sys
import zlib


def read_all(root: str) -> dict:
    files = nbytes = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                while True:
                    n = os.readv(fd, [view])
                    if not n:
                        break
                    nbytes += n
            finally:
                os.close(fd)
            files += 1
    return {"files": files, "bytes": nbytes}


def stat_walk(root: str) -> dict:
    entries = total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return {"entries": entries, "file_bytes": total}


def random_reads(root: str, listing: str, count: int, seed: int) -> dict:
    with open(listing) as f:
        files = [(int(s), p) for s, p in (line.rstrip("\n").split("\t", 1) for line in f if line.strip())]
    rng = random.Random(seed)
    crc = 0
    nbytes = 0
    for _ in range(count):
        size, rel = files[rng.randrange(len(files))]
        off = rng.randrange(0, max(1, size - 4096 + 1)) & ~511
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            data = os.pread(fd, 4096, off)
        finally:
            os.close(fd)
        nbytes += len(data)
        crc = zlib.crc32(data, crc)
    return {"reads": count, "bytes": nbytes, "crc": crc}


def main(argv: list[str]) -> int:
    op, root = argv[0], argv[1]
    if op == "read":
        out = read_all(root)
    elif op == "stat":
        out = stat_walk(root)
    elif op == "random":
        out = random_reads(root, argv[2], int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown op {op}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
