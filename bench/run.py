#!/usr/bin/env python3
"""cimfs benchmark suite: cimfs against squashfs / erofs / tar on the same trees,
in the same run.  See bench/README.md.

    python bench/run.py                      # everything, 3 alternating runs, writes bench/RESULTS.md
    python bench/run.py --quick              # smoke run (small workloads, 1 run), results in the work dir
    python bench/run.py -w 1,3 -o create     # pick workloads / operations
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import workloads as wl  # noqa: E402

PY = sys.executable
OPS = ("create", "extract", "read", "stat", "random", "fork")
CMD_TIMEOUT = 4 * 3600

# ---------------------------------------------------------------- targets
# (workload key or "*", operation, cimfs tool, peer tool) -> highest acceptable ratio cimfs/peer
TARGETS = {
    ("1", "create", "*", "mksquashfs"): 1.0,
    ("3", "create", "*", "mksquashfs"): 1.0,
    ("2", "create", "*", "mksquashfs"): 1.5,
    ("*", "extract", "cimfs extract", "unsquashfs"): 1.0,
    ("*", "read", "cimfs mount", "squashfuse"): 1.0,
    ("*", "stat", "cimfs mount", "squashfuse"): 1.0,
    ("*", "random", "cimfs mount", "squashfuse"): 1.0,
    ("4", "fork", "*", "cimfs create of (1)"): 0.1,
}
RSS_TARGET_KIB = {("5", "create"): 1 << 20}  # 1 GiB
SIZE_TARGET = {"1": 0.05, "3": 0.05}  # |cimfs/squashfs - 1|

CIMFS_TOOLS = ("cimfs create", "cimfs (library)", "cimfs extract", "cimfs mount", "cimfs fork", "cimfs fork (library)")


def target_for(wkey: str, op: str, tool: str, peer: str):
    for k in ((wkey, op, tool, peer), (wkey, op, "*", peer), ("*", op, tool, peer), ("*", op, "*", peer)):
        if k in TARGETS:
            return TARGETS[k]
    return None


# ---------------------------------------------------------------- measuring
@dataclass
class Sample:
    wall: float
    rss_kib: int  # peak RSS of the measured process (the mount daemon for mounted ops)
    rc: int
    out: str = ""


def run_measured(cmd: list[str], timeout: float = CMD_TIMEOUT, cwd: str | None = None) -> Sample:
    """Run ``cmd``; wall time and the child's own peak RSS.

    ``ru_maxrss`` from ``wait4`` of a child forked from this (large) Python
    process starts at this process's RSS, so when GNU time is installed the
    command runs under ``/usr/bin/time -f %M``, whose own small process forks
    the command: its figure is the command's alone."""
    rss_file = None
    if os.access("/usr/bin/time", os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="rss-")
        os.close(fd)
        cmd = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file, *cmd]
    tree_peak = [0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        done = threading.Event()

        def sample() -> None:
            # RSS every 20 ms on a thread that sleeps in between: the timed
            # wait below blocks in wait4, so the harness takes no CPU from
            # the command (a 2 ms polling loop cost a few % of a core).
            deadline = t0 + timeout
            while not done.wait(0.02):
                tree_peak[0] = max(tree_peak[0], tree_rss_kib(p.pid, skip_root=rss_file is not None))
                if time.perf_counter() > deadline:
                    p.kill()
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        tree_peak = tree_peak[0]
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        etext = err.read().decode(errors="replace")
    rss = ru.ru_maxrss
    if rss_file:
        try:
            with open(rss_file) as f:
                rss = int(f.read().split()[-1])
        except (OSError, ValueError, IndexError):
            pass
        os.unlink(rss_file)
    # GNU time's %M is the largest single process; a command that forks
    # workers (cimfs create's data process) is charged the sum of its
    # processes, sampled every 20 ms (pages they share are counted twice).
    rss = max(rss, tree_peak)
    s = Sample(wall, rss, p.returncode, text)
    if p.returncode:
        s.out = (text + etext)[-2000:]
    return s


def tree_rss_kib(pid: int, skip_root: bool = False) -> int:
    """Resident KiB of ``pid`` and all its descendants (``skip_root``: not of
    ``pid`` itself, the GNU time wrapper)."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        if not (skip_root and p == pid):
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
            except (OSError, ValueError, IndexError):
                continue
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return total


def last_line(text: str, n: int = 160) -> str:
    """The last non-empty line of an error output, fit for a table cell."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return (lines[-1] if lines else "").replace("|", "/")[:n]


def sync() -> None:
    os.sync()


def rm(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def size_of(path: str) -> int:
    """Apparent bytes of a file, or of every file in a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def warm(path: str) -> None:
    """Read a file, or a tree once, so every contender starts with it in the page cache."""
    buf = bytearray(1 << 20)
    if os.path.isfile(path):
        paths = [path]
    else:
        paths = (os.path.join(dirpath, f) for dirpath, _, files in os.walk(path) for f in files)
    for p in paths:
        try:
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        except OSError:
            pass


def same_start(*inputs: str) -> None:
    """Bring the page cache to the same state before a run that writes a
    tree: previous runs' output written back and dropped (as root), the
    inputs read back in.  Otherwise a run's speed depends on how many of the
    earlier runs' pages still fill memory (on this VM, writing into pages
    the host has to hand back costs several times the kernel time)."""
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass  # not root: the state is as the previous runs left it
    for p in inputs:
        warm(p)


# ---------------------------------------------------------------- mounts
def _pids_mentioning(arg: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(arg) in argv:
            pids.append(int(d))
    return pids


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Mount:
    """A FUSE mount held for one measurement: started untimed, its daemon's peak
    RSS read from /proc before unmounting."""

    def __init__(self, cmd: list[str], mnt: str, umount: list[str], foreground: bool):
        self.cmd, self.mnt, self.umount_cmd, self.foreground = cmd, mnt, umount, foreground
        self.proc = None
        self.pids: list[int] = []

    def __enter__(self):
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        os.makedirs(self.mnt, exist_ok=True)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not os.path.ismount(self.mnt):
            if (self.foreground and self.proc.poll() is not None) or time.time() > deadline:
                self.log.seek(0)
                msg = self.log.read().decode(errors="replace")[-600:]
                self._kill()
                raise RuntimeError(f"mount failed: {last_line(msg)}")
            time.sleep(0.02)
        self.pids = [self.proc.pid] if self.foreground else _pids_mentioning(self.mnt) or _pids_mentioning(os.path.abspath(self.mnt))
        return self

    def peak_rss(self) -> int:
        return max((_vm_hwm_kib(p) for p in self.pids), default=0)

    def _kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __exit__(self, *exc):
        subprocess.run(self.umount_cmd, capture_output=True)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        if self.foreground and self.proc:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self._kill()
        elif self.proc:
            self.proc.wait(30)
        self.log.close()


# ---------------------------------------------------------------- contests
@dataclass
class Contender:
    tool: str
    run: callable  # () -> Sample ; does its own untimed setup
    na: str = ""  # "n/a" reason when it cannot run
    output: str = ""  # image produced (for sizes)


@dataclass
class Record:
    workload: str
    op: str
    tool: str
    times: list = field(default_factory=list)
    rss_kib: list = field(default_factory=list)
    status: str = "ok"  # ok | n/a: reason | failed: reason
    size: int = 0
    note: str = ""
    commit: str = ""
    date: str = ""
    quick: bool = False

    @property
    def median(self):
        return statistics.median(self.times) if self.times else None

    @property
    def peak_rss(self):
        return max(self.rss_kib) if self.rss_kib else None


def contest(wkey: str, op: str, contenders: list[Contender], runs: int, log, meta: dict) -> list[Record]:
    """Runs alternate: in run i every contender goes once, the order rotated by i."""
    recs = {c.tool: Record(wkey, op, c.tool, **meta) for c in contenders}
    live = []
    for c in contenders:
        if c.na:
            recs[c.tool].status = f"n/a: {c.na}"
        else:
            live.append(c)
    for i in range(runs):
        order = live[i % len(live):] + live[: i % len(live)] if live else []
        for c in order:
            r = recs[c.tool]
            if r.status != "ok":
                continue
            try:
                s = c.run()
            except Exception as e:  # a tool that cannot run is reported, not fatal
                msg = last_line(str(e))
                missing = any(x in msg for x in ("needs the 'mount' extra", "No such command", "not available"))
                r.status = f"{'n/a' if missing else 'failed'}: {msg}"
                log(f"    {c.tool}: {r.status}")
                continue
            if s.rc:
                r.status = f"failed: exit {s.rc}: {last_line(s.out)}"
                log(f"    {c.tool}: {r.status}")
                continue
            r.times.append(s.wall)
            r.rss_kib.append(s.rss_kib)
            if s.out.strip().startswith("{"):
                r.note = s.out.strip().splitlines()[-1]
            log(f"    run {i + 1}/{runs} {c.tool:24s} {s.wall:8.2f} s  {s.rss_kib / 1024:8.1f} MiB")
    for c in contenders:
        if c.output and recs[c.tool].status == "ok" and os.path.exists(c.output):
            recs[c.tool].size = size_of(c.output)
    return list(recs.values())


class Suite:
    def __init__(self, args, log=print):
        self.a = args
        self.log = log
        self.work = os.path.abspath(args.work_dir)
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out, exist_ok=True)
        self.tools = peers.ensure(install=not args.no_install, log=log)
        self.cimfs = peers.cimfs_command()
        self.cli = {}
        for sub in ("create", "extract", "fork", "mount", "umount"):
            ok, text = peers.cimfs_has(self.cimfs, sub)
            self.cli[sub] = (ok, text)
        self.workloads = wl.all_workloads(self.work, args.quick)
        self.meta = {"commit": git_commit(), "date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": args.quick}
        self.records: list[Record] = []
        self.cli_create_broken = False

    # ------------------------------------------------ helpers
    def tool(self, name):
        return self.tools.get(name)

    def cli_na(self, sub: str) -> str:
        if not self.cimfs:
            return "`cimfs` CLI not available yet"
        if not self.cli[sub][0]:
            return f"`cimfs {sub}` not available yet"
        return ""

    def wdir(self, w) -> str:
        d = os.path.join(self.out, f"w{w.key}{'-quick' if self.a.quick else ''}")
        os.makedirs(d, exist_ok=True)
        return d

    def _fresh_dir(self, d):
        rm(d)
        os.makedirs(d)
        sync()

    # image makers (also used untimed by ensure_*)
    def mk_cli(self, w, d):
        self._fresh_dir(d)
        return run_measured([*self.cimfs, "create", w.src, os.path.join(d, "img.cim")])

    def mk_lib(self, w, d, sync_=True):
        self._fresh_dir(d)
        cmd = [PY, os.path.join(HERE, "libcreate.py"), w.src, d, "img.cim"]
        if not sync_:
            cmd.append("--no-sync")
        return run_measured(cmd)

    def mk_squash(self, w, img):
        rm(img)
        sync()
        return run_measured([self.tool("mksquashfs"), w.src, img, "-noI", "-noD", "-noF", "-noX", "-no-xattrs",
                             "-noappend", "-no-progress", "-quiet"])

    def mk_erofs(self, w, img):
        rm(img)
        sync()
        return run_measured([self.tool("mkfs.erofs"), "--quiet", img, w.src])

    def cimfs_image(self, w) -> str:
        """A cimfs image of the workload for extract/mount: the CLI's when
        ``cimfs create`` works, else the library-built one."""
        d = self.wdir(w)
        errors = []
        for kind in ("cli", "lib"):
            if kind == "cli" and (self.cli_na("create") or self.cli_create_broken):
                continue
            sub = os.path.join(d, kind)
            img = os.path.join(sub, "img.cim")
            if os.path.exists(img):
                return img
            self.log(f"  building {img} (untimed)")
            s = self.mk_cli(w, sub) if kind == "cli" else self.mk_lib(w, sub)
            if not s.rc:
                return img
            errors.append(f"{kind}: {last_line(s.out)}")
            if kind == "cli":
                self.cli_create_broken = True
        raise RuntimeError("cannot build the cimfs image: " + "; ".join(errors))

    def squash_image(self, w) -> str:
        img = os.path.join(self.wdir(w), "squash.img")
        if not os.path.exists(img):
            self.log(f"  building {img} (untimed)")
            s = self.mk_squash(w, img)
            if s.rc:
                raise RuntimeError(f"mksquashfs failed: {s.out[-300:]}")
        return img

    def tarball(self, w) -> str:
        t = os.path.join(self.wdir(w), "tree.tar")
        if not os.path.exists(t):
            self.log(f"  building {t} (untimed)")
            subprocess.run([self.tool("tar"), "cf", t, "-C", w.src, "."], check=True)
        return t

    # ------------------------------------------------ operations
    def op_create(self, w) -> list[Record]:
        d = self.wdir(w)
        warm(w.src)
        cs = [
            Contender("cimfs create", lambda: self.mk_cli(w, os.path.join(d, "cli")), self.cli_na("create"),
                      os.path.join(d, "cli")),
            Contender("cimfs (library)", lambda: self.mk_lib(w, os.path.join(d, "lib")), "" if not self.a.no_lib else "disabled",
                      os.path.join(d, "lib")),
            Contender("mksquashfs", lambda: self.mk_squash(w, os.path.join(d, "squash.img")),
                      "" if self.tool("mksquashfs") else "mksquashfs not installed", os.path.join(d, "squash.img")),
            Contender("mkfs.erofs", lambda: self.mk_erofs(w, os.path.join(d, "erofs.img")),
                      "" if self.tool("mkfs.erofs") else "mkfs.erofs not installed", os.path.join(d, "erofs.img")),
        ]
        if self.a.nosync_variant:
            cs.append(Contender("cimfs (library, no fsync)", lambda: self.mk_lib(w, os.path.join(d, "lib-nosync"), False),
                                output=os.path.join(d, "lib-nosync")))
        recs = contest(w.key, "create", cs, self.a.runs, self.log, self.meta)
        rm(os.path.join(d, "erofs.img"))
        rm(os.path.join(d, "lib-nosync"))
        return recs

    def op_extract(self, w) -> list[Record]:
        d = os.path.join(self.a.extract_dir, f"w{w.key}") if self.a.extract_dir else self.wdir(w)
        os.makedirs(d, exist_ok=True)
        # Every run extracts into a directory of its own, and they are all
        # removed at the end: ext4 without a journal skips inodes freed in the
        # last minute or more when allocating (`recently_deleted`), so deleting
        # one run's 60 000 files just before the next one slowed every tool
        # 5-10 x, whichever came next.
        outputs: list[str] = []

        def next_dest() -> str:
            path = os.path.join(d, f"extract-{len(outputs)}")
            rm(path)
            outputs.append(path)
            return path
        na = self.cli_na("extract")
        img = sq = tarf = None
        try:
            img = self.cimfs_image(w) if not na else None
        except RuntimeError as e:
            na = str(e)
        sq = self.squash_image(w)
        tarf = self.tarball(w)
        inputs = [p for p in (os.path.dirname(img) if img else None, sq, tarf) if p]  # read back before each run

        def ext(cmd):
            def f():
                dest = next_dest()  # the tools create it
                same_start(*inputs)
                return run_measured([dest if a == "{dest}" else a for a in cmd])
            return f

        def tarx():
            dest = next_dest()
            os.makedirs(dest)
            same_start(*inputs)
            return run_measured([self.tool("tar"), "xf", tarf, "-C", dest])

        cs = [
            Contender("cimfs extract", ext([*(self.cimfs or []), "extract", img or "", "{dest}"]), na),
            Contender("unsquashfs", ext([self.tool("unsquashfs") or "unsquashfs", "-no-progress", "-d", "{dest}", sq]),
                      "" if self.tool("unsquashfs") else "unsquashfs not installed"),
            Contender("tar x", tarx),
        ]
        try:
            recs = contest(w.key, "extract", cs, self.a.runs, self.log, self.meta)
        finally:
            for path in outputs:
                rm(path)
            rm(tarf)
        return recs

    def random_list(self, w) -> str:
        path = os.path.join(self.wdir(w), "random-files.txt")
        if not os.path.exists(path):
            rows = []
            for dirpath, dirnames, files in os.walk(w.src):
                dirnames.sort()
                for f in sorted(files):
                    p = os.path.join(dirpath, f)
                    st = os.lstat(p)
                    if st.st_mode & 0o170000 == 0o100000 and st.st_size >= 4096:
                        rows.append(f"{st.st_size}\t{os.path.relpath(p, w.src)}")
            with open(path, "w") as f:
                f.write("\n".join(rows) + "\n")
        return path

    def op_mounted(self, w, op) -> list[Record]:
        mnt = os.path.join(self.work, "mnt")
        na = self.cli_na("mount")
        img = None
        if not na:
            try:
                img = self.cimfs_image(w)
            except RuntimeError as e:
                na = str(e)
        sq = self.squash_image(w)
        if op == "random":
            client = [PY, os.path.join(HERE, "fsops.py"), "random", mnt, self.random_list(w),
                      str(2000 if self.a.quick else 20000), "7"]
        else:
            client = [PY, os.path.join(HERE, "fsops.py"), op, mnt]
        fg_help = self.cli["mount"][1] if not na else ""
        fg = "--foreground" in fg_help or " -f" in fg_help

        def through(mount: Mount):
            def f():
                with mount as m:
                    s = run_measured(client)
                    s.rss_kib = m.peak_rss()  # the filesystem daemon's, not the client's
                return s
            return f

        cim_mount = Mount([*(self.cimfs or []), "mount", *(["--foreground"] if "--foreground" in fg_help else ["-f"] if fg else []),
                           img or "", mnt], mnt, [*(self.cimfs or []), "umount", mnt], fg)
        sq_mount = Mount([self.tool("squashfuse") or "squashfuse", "-f", sq, mnt], mnt, ["fusermount3", "-u", mnt], True)
        warm(os.path.dirname(img)) if img else None
        warm(sq)
        cs = [
            Contender("cimfs mount", through(cim_mount), na),
            Contender("squashfuse", through(sq_mount), "" if self.tool("squashfuse") else "squashfuse not installed"),
        ]
        recs = contest(w.key, op, cs, self.a.runs, self.log, self.meta)
        notes = {r.note for r in recs if r.status == "ok"}
        if len(notes) > 1:
            for r in recs:
                r.status = r.status if r.status != "ok" else "ok"
                r.note += "  MISMATCH between filesystems"
            self.log(f"    WARNING: results differ between filesystems: {notes}")
        return recs

    def op_fork(self, w) -> list[Record]:
        parent_w = self.workloads[w.fork_parent]
        d = os.path.join(self.wdir(w), "chain")
        base_na = ""
        want = "lib" if (self.cli_na("create") or self.cli_create_broken) else "cli"
        if not os.path.exists(os.path.join(d, "parent.cim")) or self._parent_kind(d) != want:
            for kind in ([want, "lib"] if want == "cli" else ["lib"]):
                self.log(f"  building the parent image of (4) in {d} with the {kind} (untimed)")
                rm(d)
                os.makedirs(d)
                if kind == "cli":
                    s = run_measured([*self.cimfs, "create", parent_w.src, os.path.join(d, "parent.cim")])
                else:
                    s = run_measured([PY, os.path.join(HERE, "libcreate.py"), parent_w.src, d, "parent.cim"])
                if s.rc:
                    base_na = f"parent image failed: {last_line(s.out)}"
                else:
                    base_na = ""
                    with open(os.path.join(d, ".kind"), "w") as f:
                        f.write(kind)
                    break
        before = set(os.listdir(d)) if os.path.isdir(d) else set()

        def cleanup():
            for f in set(os.listdir(d)) - before:
                rm(os.path.join(d, f))
            sync()

        def fork_cli():
            cleanup()
            adds = [x for h, p in w.fork_add for x in ("--add", f"{h}:{p}")]
            try:
                return run_measured([*self.cimfs, "fork", os.path.join(d, "parent.cim"), os.path.join(d, "fork.cim"), *adds])
            finally:
                cleanup()

        def fork_lib():
            cleanup()
            try:
                return run_measured([PY, os.path.join(HERE, "libcreate.py"), "-", d, "fork.cim", "--fork-of", "parent.cim",
                                     "--add", *[f"{h}:{p}" for h, p in w.fork_add]])
            finally:
                cleanup()

        # squashfs's nearest equivalent: append the ten files to a copy of the image.
        sq_na = "" if self.tool("mksquashfs") else "mksquashfs not installed"
        addsrc = os.path.join(self.wdir(w), "sq-add")
        sq_copy = os.path.join(self.wdir(w), "sq-append.img")

        def sq_append():
            rm(addsrc)
            for h, p in w.fork_add:
                dst = os.path.join(addsrc, p.lstrip("/"))
                assert os.path.abspath(dst).startswith(addsrc + os.sep)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(h, dst)
            shutil.copyfile(self.squash_image(parent_w), sq_copy)
            sync()
            try:
                return run_measured([self.tool("mksquashfs"), addsrc, sq_copy, "-noI", "-noD", "-noF", "-noX",
                                     "-no-xattrs", "-no-progress", "-quiet"])
            finally:
                rm(sq_copy)
                rm(addsrc)

        cs = [
            Contender("cimfs fork", fork_cli, base_na or self.cli_na("fork")),
            Contender("cimfs fork (library)", fork_lib, base_na or ("disabled" if self.a.no_lib else "")),
            Contender("mksquashfs append", sq_append, sq_na),
        ]
        return contest(w.key, "fork", cs, self.a.runs, self.log, self.meta)

    @staticmethod
    def _parent_kind(d):
        try:
            with open(os.path.join(d, ".kind")) as f:
                return f.read().strip()
        except OSError:
            return ""

    # ------------------------------------------------ driver
    def run(self, wkeys, ops):
        for k in wkeys:
            w = self.workloads[k]
            self.log(f"== workload {k}: {w.name} ({w.description})")
            wl.prepare(w, self.work, self.a.quick, log=self.log)
            if w.src:
                self.log(f"  source: {w.src}")
            for op in ops:
                if op == "fork" and k != "4" or op != "fork" and k == "4":
                    continue
                if op not in ("fork",) and op not in w.ops:
                    continue
                self.log(f"  -- {op}")
                t0 = time.time()
                if op == "create":
                    recs = self.op_create(w)
                elif op == "extract":
                    recs = self.op_extract(w)
                elif op in ("read", "stat", "random"):
                    recs = self.op_mounted(w, op)
                else:
                    recs = self.op_fork(w)
                self.records.extend(recs)
                self.log(f"     ({time.time() - t0:.0f} s)")
                self.save_partial()
            if not self.a.keep:
                for f in ("tree.tar", "erofs.img"):
                    rm(os.path.join(self.wdir(w), f))

    def save_partial(self):
        with open(os.path.join(self.work, "last-run.json"), "w") as f:
            json.dump([asdict(r) for r in self.records], f, indent=1)


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "../src"], capture_output=True, text=True)
        return r.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


# ---------------------------------------------------------------- report
def machine() -> dict:
    m = {"platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    m["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            m["memory"] = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    try:
        r = subprocess.run(["df", "-T", HERE], capture_output=True, text=True)
        parts = r.stdout.splitlines()[1].split()
        m["filesystem"] = f"{parts[1]} on {parts[0]}"
    except (OSError, IndexError):
        pass
    return m


def merge(old: list[dict], new: list[Record]) -> list[dict]:
    key = lambda r: (r["workload"], r["op"], r["tool"])  # noqa: E731
    out = {key(r): r for r in old}
    for r in new:
        d = asdict(r)
        if d["status"].startswith("n/a") and key(d) in out and out[key(d)]["status"] == "ok":
            continue  # keep an earlier real measurement rather than a skip
        out[key(d)] = d
    return sorted(out.values(), key=lambda r: (r["workload"], OPS.index(r["op"]) if r["op"] in OPS else 99, r["tool"]))


def fmt_s(x):
    return "—" if x is None else (f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.0f} ms")


def fmt_mib(kib):
    return "—" if not kib else (f"{kib / 1024:.0f} MiB" if kib < 10 << 20 else f"{kib / (1 << 20):.1f} GiB")


def fmt_bytes(n):
    return "—" if not n else f"{n / 1e6:,.1f} MB"


def paired_ratio(a: dict, b: dict):
    """Median over runs of a[i]/b[i] (runs alternate, so pairs share conditions)."""
    ta, tb = a["times"], b["times"]
    n = min(len(ta), len(tb))
    if not n:
        return None
    return statistics.median(ta[i] / tb[i] for i in range(n))


def render(records: list[dict], wdesc: dict, mach: dict, vers: dict, runs_note: str) -> tuple[str, list]:
    by = {}
    for r in records:
        by.setdefault((r["workload"], r["op"]), {})[r["tool"]] = r
    lines = []
    plot = []  # (label, ratio, target)
    lines.append("| workload | operation | cimfs | cimfs time | peer | peer time | ratio cimfs/peer | target | cimfs peak RSS | peer peak RSS |")
    lines.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    fullcreate = None
    if ("1", "create") in by:
        for t in ("cimfs create", "cimfs (library)"):
            r = by[("1", "create")].get(t)
            if r and r["status"] == "ok":
                fullcreate = r
                break
    for (wk, op), tools in sorted(by.items(), key=lambda kv: (kv[0][0], OPS.index(kv[0][1]) if kv[0][1] in OPS else 99)):
        cims = [t for t in tools if t.startswith("cimfs")]
        peers_ = [t for t in tools if not t.startswith("cimfs")]
        if op == "fork" and fullcreate:
            peers_ = ["cimfs create of (1)"] + peers_
        for c in cims:
            cr = tools[c]
            for p in peers_ or ["—"]:
                pr = fullcreate if p == "cimfs create of (1)" else tools.get(p)
                ctime = statistics.median(cr["times"]) if cr["status"] == "ok" and cr["times"] else None
                ptime = statistics.median(pr["times"]) if pr and pr["status"] == "ok" and pr["times"] else None
                if p == "cimfs create of (1)":
                    ratio = ctime / ptime if ctime and ptime else None
                else:
                    ratio = paired_ratio(cr, pr) if ctime and ptime else None
                tgt = target_for(wk, op, c, p)
                ctext = fmt_s(ctime) if cr["status"] == "ok" else cr["status"]
                ptext = fmt_s(ptime) if pr and pr["status"] == "ok" else (pr["status"] if pr else "—")
                if p == "cimfs create of (1)":
                    ptext += f" ({pr['tool']})"
                mark = ""
                if ratio is not None and tgt is not None:
                    mark = " ✅" if ratio <= tgt else " ❌"
                rtext = f"{ratio:.2f}{mark}" if ratio is not None else "n/a"
                lines.append(f"| {wk} {wdesc.get(wk, '')} | {op} | {c} | {ctext} | {p} | {ptext} | {rtext} | "
                             f"{'≤ %.1f' % tgt if tgt is not None else ''} | {fmt_mib(max(cr['rss_kib']) if cr['rss_kib'] else 0)} | "
                             f"{fmt_mib(max(pr['rss_kib']) if pr and pr.get('rss_kib') else 0)} |")
                if ratio is not None and (tgt is not None or c in ("cimfs create", "cimfs (library)")):
                    plot.append((f"{wk} {op}: {c.replace('cimfs ', '')} / {p}", ratio, tgt))
    # sizes
    size_lines = ["| workload | cimfs (CLI) | cimfs (library) | squashfs (uncompressed) | erofs | cimfs/squashfs | target |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
    for (wk, op), tools in sorted(by.items()):
        if op != "create":
            continue
        g = lambda t: tools.get(t, {}).get("size", 0)  # noqa: E731
        c = g("cimfs create") or g("cimfs (library)")
        s = g("mksquashfs")
        ratio = f"{c / s:.3f}" if c and s else "n/a"
        tgt = SIZE_TARGET.get(wk)
        if tgt is not None and c and s:
            ratio += " ✅" if abs(c / s - 1) <= tgt else " ❌"
        size_lines.append(f"| {wk} {wdesc.get(wk, '')} | {fmt_bytes(g('cimfs create'))} | {fmt_bytes(g('cimfs (library)'))} | "
                          f"{fmt_bytes(s)} | {fmt_bytes(g('mkfs.erofs'))} | {ratio} | {'±%d %%' % (tgt * 100) if tgt else ''} |")
    rss_lines = []
    for (wk, op), kib in RSS_TARGET_KIB.items():
        tools = by.get((wk, op), {})
        for t in ("cimfs create", "cimfs (library)"):
            r = tools.get(t)
            if r and r["status"] == "ok" and r["rss_kib"]:
                v = max(r["rss_kib"])
                rss_lines.append(f"- workload {wk} {op}, {t}: peak RSS {fmt_mib(v)} (target ≤ {fmt_mib(kib)}) {'✅' if v <= kib else '❌'}")
    return "\n".join(lines), size_lines, rss_lines, plot


def svg_plot(plot: list, path: str) -> None:
    """A horizontal bar chart of the ratios (log scale), target marks in red."""
    import math

    if not plot:
        return
    w, row, left, right = 900, 22, 330, 40
    h = 50 + row * len(plot)
    lo, hi = 0.01, max(10.0, max(r for _, r, _ in plot) * 1.2)
    x = lambda v: left + (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (w - left - right)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="16" font-weight="bold">time ratio cimfs / peer (log scale; red tick = target; &lt; 1 means cimfs is faster)</text>']
    for v in (0.01, 0.1, 1, 10, 100):
        if v <= hi:
            out.append(f'<line x1="{x(v):.1f}" y1="24" x2="{x(v):.1f}" y2="{h - 8}" stroke="#ccc"/>'
                       f'<text x="{x(v):.1f}" y="{h - 0}" text-anchor="middle" fill="#666">{v:g}</text>')
    for i, (label, r, tgt) in enumerate(plot):
        y = 30 + i * row
        ok = tgt is None or r <= tgt
        color = "#4a90d9" if tgt is None else ("#3a3" if ok else "#d33")
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{label.replace("&", "&amp;").replace("<", "&lt;")}</text>')
        out.append(f'<rect x="{x(lo):.1f}" y="{y + 3}" width="{x(r) - x(lo):.1f}" height="{row - 6}" fill="{color}"/>')
        out.append(f'<text x="{x(r) + 4:.1f}" y="{y + 14}">{r:.2f}</text>')
        if tgt is not None:
            out.append(f'<line x1="{x(tgt):.1f}" y1="{y}" x2="{x(tgt):.1f}" y2="{y + row}" stroke="red" stroke-width="2"/>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_report(records: list[dict], path: str, suite: Suite, extra: str = "") -> None:
    wdesc = {k: f"{w.name}" for k, w in suite.workloads.items()}
    mach = machine()
    vers = peers.versions(suite.tools)
    table, sizes, rss, plot = render(records, wdesc, mach, vers, "")
    svg = os.path.splitext(path)[0].lower().replace("results", "results") + ".svg"
    svg_plot(plot, svg)
    commits = sorted({r.get("commit", "?") for r in records})
    dates = sorted({r.get("date", "?") for r in records})
    md = [f"# cimfs benchmark results{' (quick)' if suite.a.quick else ''}", "",
          "Generated by `python bench/run.py` (see `bench/README.md`). Times are medians of alternating runs; "
          "the ratio is the median over runs of cimfs/peer from the same run (lower is better, < 1 means cimfs is faster). "
          "Peak RSS is the measured command's: the larger of GNU time's `%M` and the sum over its processes sampled every 20 ms "
          "(cimfs create forks data processes); for mounted operations it is the FUSE daemon's `VmHWM`.",
          "",
          f"- measured: {', '.join(dates)} at commit(s) {', '.join(commits)}",
          "- machine: " + "; ".join(f"{k} {v}" for k, v in mach.items()),
          "- tools: " + "; ".join(f"{v}" for v in vers.values()),
          "", "## Workloads", ""]
    for k, w in suite.workloads.items():
        src = w.src if w.src else f"parent: image of ({w.fork_parent})"
        md.append(f"{k}. **{w.name}**: {w.description} — `{src}`")
    md += ["", "## Time", "", table, "", f"![ratios]({os.path.basename(svg)})", "", "## Image size (apparent bytes; cimfs = .cim + region + objectid files)", ""]
    md += sizes
    md += ["", "## Memory", ""] + (rss or ["- (workload 5 not measured yet)"])
    if extra:
        md += ["", extra]
    md.append("")
    with open(path, "w") as f:
        f.write("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cimfs benchmark suite")
    ap.add_argument("-w", "--workloads", default="1,2,3,4,5", help="comma-separated workload numbers (default all)")
    ap.add_argument("-o", "--ops", default=",".join(OPS), help=f"comma-separated operations from {','.join(OPS)}")
    ap.add_argument("--runs", type=int, default=None, help="alternating runs per operation (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="small workloads for a smoke run")
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work"))
    ap.add_argument("--results", default=None, help="markdown report to write (default bench/RESULTS.md; --quick: WORK/RESULTS-quick.md)")
    ap.add_argument("--fresh", action="store_true", help="do not merge with the previous results of other workloads/operations")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    ap.add_argument("--no-lib", action="store_true", help="skip the library-level create/fork")
    ap.add_argument("--nosync-variant", action="store_true", help="also time the library create without fsync")
    ap.add_argument("--keep", action="store_true", help="keep tarballs and erofs images after each workload")
    ap.add_argument("--extract-dir", default=None,
                    help="where extractions go (default: the work directory); e.g. a journaled ext4")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the report from the saved JSON and NOTES.md")
    a = ap.parse_args(argv)
    a.runs = a.runs or (1 if a.quick else 3)
    wkeys = [k.strip() for k in a.workloads.split(",") if k.strip()]
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown operation {o}")
    if "4" in wkeys and "fork" not in ops:
        pass
    os.makedirs(a.work_dir, exist_ok=True)
    suite = Suite(a, log=lambda *x: print(*x, flush=True))
    print(f"cimfs CLI: {' '.join(suite.cimfs) if suite.cimfs else 'not available'}; "
          f"subcommands: {', '.join(k for k, v in suite.cli.items() if v[0]) or 'none'}", flush=True)
    if not a.report_only:
        suite.run(wkeys, ops)
    if a.results:
        path = a.results
    else:
        path = os.path.join(a.work_dir, "RESULTS-quick.md") if a.quick else os.path.join(HERE, "RESULTS.md")
    jpath = os.path.splitext(path)[0] + ".json"
    old = []
    if not a.fresh and os.path.exists(jpath):
        with open(jpath) as f:
            old = json.load(f)
    merged = merge(old, suite.records)
    with open(jpath, "w") as f:
        json.dump(merged, f, indent=1)
    extra = ""
    notes_path = os.path.join(HERE, "NOTES.md")
    if not a.quick and os.path.exists(notes_path):
        with open(notes_path) as f:
            extra = f.read()
    write_report(merged, path, suite, extra)
    print(f"\nwrote {path} (+ {os.path.basename(jpath)}, .svg)\n")
    table, sizes, rss, _ = render(merged, {k: w.name for k, w in suite.workloads.items()}, {}, {}, "")
    print(table)
    print()
    print("\n".join(sizes))
    print("\n".join(rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
