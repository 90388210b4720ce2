"""Measuring one command: wall time and peak RSS of it and its children,
the page-cache state before a run, FUSE mounts held for a measurement, and
the contest that alternates the tools of one operation run by run."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

CMD_TIMEOUT = 4 * 3600


# ---------------------------------------------------------------- measuring
@dataclass
class Sample:
    wall: float
    rss_kib: int  # peak RSS of the measured process (the mount daemon for mounted ops)
    rc: int
    out: str = ""
    cpu: float | None = None  # user + system seconds of the command and the processes it waited for


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
    # wait4's usage covers the command and every descendant it reaped (a
    # forking tool's workers too): on a shared machine CPU time varies far
    # less with the load than wall time does.
    s = Sample(wall, rss, p.returncode, text, ru.ru_utime + ru.ru_stime)
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
        self.pids = (
            [self.proc.pid]
            if self.foreground
            else _pids_mentioning(self.mnt) or _pids_mentioning(os.path.abspath(self.mnt))
        )
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
    cpu: list = field(default_factory=list)  # user + system seconds per run (None where not measured)
    load: list = field(default_factory=list)  # 1-minute load average as each run started
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
        order = live[i % len(live) :] + live[: i % len(live)] if live else []
        for c in order:
            r = recs[c.tool]
            if r.status != "ok":
                continue
            load = os.getloadavg()[0]
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
            r.cpu.append(s.cpu)
            r.load.append(round(load, 2))
            if s.out.strip().startswith("{"):
                r.note = s.out.strip().splitlines()[-1]
            cpu = f"  cpu {s.cpu:6.2f} s" if s.cpu is not None else ""
            log(
                f"    run {i + 1}/{runs} {c.tool:24s} {s.wall:8.2f} s  {s.rss_kib / 1024:8.1f} MiB{cpu}  load {load:.1f}"
            )
    for c in contenders:
        if c.output and recs[c.tool].status == "ok" and os.path.exists(c.output):
            recs[c.tool].size = size_of(c.output)
    return list(recs.values())
