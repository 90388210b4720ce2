"""The benchmark workloads: deterministic source trees under the work dir.

Every generated tree is a pure function of its parameters (seeded PRNG, fixed
sizes, fixed names, fixed mtimes), so two machines running the suite measure
the same bytes.  A tree is generated once and reused while its parameters do
not change (a ``.done`` stamp holds them); ``clean()`` removes it.

Workloads (``--quick`` shrinks each one for a smoke run):

1. ``stdlib``  - the running interpreter's stdlib directory with its
   site-packages, used in place (``sysconfig.get_paths()["stdlib"]``).
   Quick: its ``test`` sub-directory.
2. ``small``   - 200 000 files of 0-8 KiB in a deep tree (quick: 20 000).
3. ``dedup``   - eight 256 MiB files, four of them copies of the other four
   (quick: 16 MiB each).
4. ``fork``    - workload 1 as the parent image, plus ten new files added
   with ``cimfs fork ... --add`` (the ten files live in ``fork-add/``).
5. ``million`` - 1 000 000 files of 0-63 bytes (quick: 100 000), for the
   writer's peak memory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sysconfig
from dataclasses import dataclass, field

OPS = ("create", "extract", "read", "stat", "random", "fork")  # the operations, in the order run and reported

FIXED_MTIME = 1_700_000_000  # 2023-11-14, every generated file and directory


@dataclass
class Workload:
    key: str  # "1".."5"
    name: str
    description: str
    src: str = ""  # the source tree (created by prepare())
    fork_parent: str | None = None  # workload key whose image is the parent (fork)
    fork_add: list[tuple[str, str]] = field(default_factory=list)  # (host file, image path)
    ops: tuple[str, ...] = ()  # operations that make sense for it


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stamp_ok(path: str, params: dict) -> bool:
    try:
        with open(os.path.join(path, ".done")) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def _stamp(path: str, params: dict) -> None:
    with open(os.path.join(path, ".done"), "w") as f:
        json.dump(params, f)


def _fresh(path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)


def _set_dir_times(root: str) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        os.utime(dirpath, (FIXED_MTIME, FIXED_MTIME))


def gen_small(path: str, count: int, seed: int = 2) -> None:
    """``count`` files of 0-8192 bytes; directories 6 levels deep, fan-out 8,
    about 30 files per leaf directory; names of 4-24 characters."""
    params = {"kind": "small", "count": count, "seed": seed, "v": 1}
    if _stamp_ok(path, params):
        return
    _fresh(path)
    rng = random.Random(seed)
    per_dir = 30
    n_dirs = (count + per_dir - 1) // per_dir
    made = 0
    for d in range(n_dirs):
        # Spread leaves over a fan-out-8 tree of depth 6 (8^5 = 32768 leaf slots).
        parts, x = [], d
        for _ in range(5):
            parts.append(f"d{x % 8}_{'abcdefgh'[x % 8] * (1 + x % 5)}")
            x //= 8
        parts.append(f"leaf{d}")
        dpath = os.path.join(path, *parts)
        os.makedirs(dpath, exist_ok=True)
        for i in range(min(per_dir, count - made)):
            size = rng.randrange(0, 8193)
            name = f"f{i:02d}_" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789_", k=rng.randrange(0, 20)))
            # Compressible-ish but distinct content: a random header and repeated text.
            head = rng.randbytes(min(size, 64))
            body = (name.encode() * (size // max(1, len(name)) + 1))[: size - len(head)]
            fp = os.path.join(dpath, name + ".dat")
            with open(fp, "wb") as f:
                f.write(head + body)
            os.utime(fp, (FIXED_MTIME, FIXED_MTIME))
            made += 1
    _set_dir_times(path)
    _stamp(path, params)


def gen_dedup(path: str, size: int, seed: int = 3) -> None:
    """Eight files of ``size`` bytes: ``a0..a3`` random, ``b0..b3`` copies of them."""
    params = {"kind": "dedup", "size": size, "seed": seed, "v": 1}
    if _stamp_ok(path, params):
        return
    _fresh(path)
    rng = random.Random(seed)
    chunk = 16 << 20
    for i in range(4):
        a = os.path.join(path, f"a{i}.bin")
        with open(a, "wb") as f:
            left = size
            while left:
                n = min(chunk, left)
                f.write(rng.randbytes(n))
                left -= n
        b = os.path.join(path, "copies", f"b{i}.bin")
        os.makedirs(os.path.dirname(b), exist_ok=True)
        shutil.copyfile(a, b)
        for p in (a, b):
            os.utime(p, (FIXED_MTIME, FIXED_MTIME))
    _set_dir_times(path)
    _stamp(path, params)


def gen_million(path: str, count: int, seed: int = 5) -> None:
    """``count`` files of 0-63 bytes, 1000 per directory, two levels."""
    params = {"kind": "million", "count": count, "seed": seed, "v": 1}
    if _stamp_ok(path, params):
        return
    _fresh(path)
    rng = random.Random(seed)
    per_dir = 1000
    for d in range((count + per_dir - 1) // per_dir):
        dpath = os.path.join(path, f"g{d // 100:03d}", f"d{d:05d}")
        os.makedirs(dpath, exist_ok=True)
        for i in range(min(per_dir, count - d * per_dir)):
            fp = os.path.join(dpath, f"file{i:04d}")
            fd = os.open(fp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            n = rng.randrange(0, 64)
            if n:
                os.write(fd, rng.randbytes(n))
            os.close(fd)
    _set_dir_times(path)
    _stamp(path, params)


def gen_fork_add(path: str, seed: int = 4) -> list[tuple[str, str]]:
    """Ten files (1 KiB .. 512 KiB) to add to the fork, with their image paths."""
    params = {"kind": "fork-add", "seed": seed, "v": 1}
    rng = random.Random(seed)
    files = []
    for i in range(10):
        host = os.path.join(path, f"added{i}.bin")
        files.append((host, f"/site-packages/added_by_fork/added{i}.bin" if i % 2 else f"/added{i}.py"))
    if not _stamp_ok(path, params):
        _fresh(path)
        for i, (host, _) in enumerate(files):
            with open(host, "wb") as f:
                f.write(rng.randbytes(1024 << (i % 10)))
        _stamp(path, params)
    return files


def all_workloads(work: str, quick: bool) -> dict[str, Workload]:
    std = stdlib_dir()
    return {
        "1": Workload(
            "1",
            "stdlib",
            "stdlib + site-packages" + (" (quick: test/ only)" if quick else ""),
            os.path.join(std, "test") if quick else std,
            ops=("create", "libcreate", "extract", "read", "stat", "random"),
        ),
        "2": Workload(
            "2",
            "small",
            f"{20_000 if quick else 200_000} files of 0-8 KiB, deep tree",
            os.path.join(work, "src", "small-q" if quick else "small"),
            ops=("create", "libcreate", "extract", "read", "stat", "random"),
        ),
        "3": Workload(
            "3",
            "dedup",
            f"8 x {16 if quick else 256} MiB, half duplicates",
            os.path.join(work, "src", "dedup-q" if quick else "dedup"),
            ops=("create", "libcreate", "extract", "read", "random"),
        ),
        "4": Workload("4", "fork", "fork of (1) adding 10 files", "", fork_parent="1", ops=("fork", "libfork")),
        "5": Workload(
            "5",
            "million",
            f"{100_000 if quick else 1_000_000} files of 0-63 B",
            os.path.join(work, "src", "million-q" if quick else "million"),
            ops=("create", "libcreate"),
        ),
    }


def prepare(w: Workload, work: str, quick: bool, log=print) -> None:
    """Generate the workload's source tree if it is missing or stale."""
    if w.key == "2":
        log(f"  generating {w.src} ...")
        gen_small(w.src, 20_000 if quick else 200_000)
    elif w.key == "3":
        log(f"  generating {w.src} ...")
        gen_dedup(w.src, (16 if quick else 256) << 20)
    elif w.key == "5":
        log(f"  generating {w.src} ...")
        gen_million(w.src, 100_000 if quick else 1_000_000)
    elif w.key == "4":
        w.fork_add = gen_fork_add(os.path.join(work, "src", "fork-add"))


def tree_stats(path: str) -> tuple[int, int]:
    """(entries, bytes of regular files) of a tree, not following symlinks."""
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        n += len(dirnames) + len(filenames)
        for f in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if st.st_mode & 0o170000 == 0o100000:
                size += st.st_size
    return n, size
