#!/usr/bin/env python3
"""cimfs benchmark suite: cimfs against squashfs / erofs / tar on the same trees,
in the same run.  See bench/README.md.

    python bench/run.py                      # everything, 3 alternating runs, writes bench/RESULTS.md
    python bench/run.py --quick              # smoke run (small workloads, 1 run), results in the work dir
    python bench/run.py -w 1,3 -o create     # pick workloads / operations
    python bench/run.py --create             # cimfs create vs mksquashfs on workload 1 alone (~1 minute)

This module holds the operations (how each tool is run on a workload) and
the command line; ``workloads.py`` makes the trees, ``peers.py`` finds the
other tools, ``measure.py`` times a command and alternates the tools, and
``report.py`` writes RESULTS.md and the README's speed figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import workloads as wl  # noqa: E402
from measure import Contender, Mount, Record, contest, last_line, rm, run_measured, same_start, sync, warm  # noqa: E402
from report import merge, render, update_readme, write_report  # noqa: E402
from workloads import OPS  # noqa: E402

PY = sys.executable


class Suite:
    def __init__(self, args, log=print):
        self.a = args
        self.log = log
        self.work = os.path.abspath(args.work_dir)
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out, exist_ok=True)
        self.tools = peers.ensure(install=not (args.no_install or args.report_only), log=log)
        self.cimfs = peers.cimfs_command()
        self.cli = {}
        for sub in ("create", "extract", "fork", "mount", "umount"):
            ok, text = peers.cimfs_has(self.cimfs, sub)
            self.cli[sub] = (ok, text)
        self.workloads = wl.all_workloads(self.work, args.quick)
        self.meta = {
            "commit": git_commit(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "quick": args.quick,
        }
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
        return run_measured(
            [
                self.tool("mksquashfs"),
                w.src,
                img,
                "-noI",
                "-noD",
                "-noF",
                "-noX",
                "-no-xattrs",
                "-noappend",
                "-no-progress",
                "-quiet",
            ]
        )

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
            Contender(
                "cimfs create",
                lambda: self.mk_cli(w, os.path.join(d, "cli")),
                self.cli_na("create"),
                os.path.join(d, "cli"),
            ),
            Contender(
                "cimfs (library)",
                lambda: self.mk_lib(w, os.path.join(d, "lib")),
                "" if not self.a.no_lib else "disabled",
                os.path.join(d, "lib"),
            ),
            Contender(
                "mksquashfs",
                lambda: self.mk_squash(w, os.path.join(d, "squash.img")),
                "" if self.tool("mksquashfs") else "mksquashfs not installed",
                os.path.join(d, "squash.img"),
            ),
        ]
        if not self.a.create:  # --create: cimfs create against mksquashfs alone
            cs.append(
                Contender(
                    "mkfs.erofs",
                    lambda: self.mk_erofs(w, os.path.join(d, "erofs.img")),
                    "" if self.tool("mkfs.erofs") else "mkfs.erofs not installed",
                    os.path.join(d, "erofs.img"),
                )
            )
        if self.a.nosync_variant:
            cs.append(
                Contender(
                    "cimfs (library, no fsync)",
                    lambda: self.mk_lib(w, os.path.join(d, "lib-nosync"), False),
                    output=os.path.join(d, "lib-nosync"),
                )
            )
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
            Contender(
                "unsquashfs",
                ext([self.tool("unsquashfs") or "unsquashfs", "-no-progress", "-d", "{dest}", sq]),
                "" if self.tool("unsquashfs") else "unsquashfs not installed",
            ),
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
            client = [
                PY,
                os.path.join(HERE, "fsops.py"),
                "random",
                mnt,
                self.random_list(w),
                str(2000 if self.a.quick else 20000),
                "7",
            ]
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

        cim_mount = Mount(
            [
                *(self.cimfs or []),
                "mount",
                *(["--foreground"] if "--foreground" in fg_help else ["-f"] if fg else []),
                img or "",
                mnt,
            ],
            mnt,
            [*(self.cimfs or []), "umount", mnt],
            fg,
        )
        sq_mount = Mount(
            [self.tool("squashfuse") or "squashfuse", "-f", sq, mnt], mnt, ["fusermount3", "-u", mnt], True
        )
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
            for kind in [want, "lib"] if want == "cli" else ["lib"]:
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
                return run_measured(
                    [*self.cimfs, "fork", os.path.join(d, "parent.cim"), os.path.join(d, "fork.cim"), *adds]
                )
            finally:
                cleanup()

        def fork_lib():
            cleanup()
            try:
                return run_measured(
                    [
                        PY,
                        os.path.join(HERE, "libcreate.py"),
                        "-",
                        d,
                        "fork.cim",
                        "--fork-of",
                        "parent.cim",
                        "--add",
                        *[f"{h}:{p}" for h, p in w.fork_add],
                    ]
                )
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
                return run_measured(
                    [
                        self.tool("mksquashfs"),
                        addsrc,
                        sq_copy,
                        "-noI",
                        "-noD",
                        "-noF",
                        "-noX",
                        "-no-xattrs",
                        "-no-progress",
                        "-quiet",
                    ]
                )
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
        dirty = subprocess.run(
            ["git", "-C", HERE, "status", "--porcelain", "--", "../src"], capture_output=True, text=True
        )
        return r.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="cimfs benchmark suite")
    ap.add_argument("-w", "--workloads", default="1,2,3,4,5", help="comma-separated workload numbers (default all)")
    ap.add_argument("-o", "--ops", default=",".join(OPS), help=f"comma-separated operations from {','.join(OPS)}")
    ap.add_argument("--runs", type=int, default=None, help="alternating runs per operation (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="small workloads for a smoke run")
    ap.add_argument("--work-dir", default=os.path.join(HERE, "work"))
    ap.add_argument(
        "--results",
        default=None,
        help="markdown report to write (default bench/RESULTS.md; --quick: WORK/RESULTS-quick.md)",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="do not merge with the previous results of other workloads/operations"
    )
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    ap.add_argument("--no-lib", action="store_true", help="skip the library-level create/fork")
    ap.add_argument("--nosync-variant", action="store_true", help="also time the library create without fsync")
    ap.add_argument("--keep", action="store_true", help="keep tarballs and erofs images after each workload")
    ap.add_argument(
        "--extract-dir", default=None, help="where extractions go (default: the work directory); e.g. a journaled ext4"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the report from the saved JSON and NOTES.md",
    )
    ap.add_argument(
        "--create",
        action="store_true",
        help="only `cimfs create` of workload 1 against mksquashfs (= -w 1 -o create --no-lib, no mkfs.erofs); "
        "5 runs unless --runs",
    )
    a = ap.parse_args(argv)
    if a.create:
        a.workloads, a.ops, a.no_lib = "1", "create", True
        a.runs = a.runs or 5
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
    print(
        f"cimfs CLI: {' '.join(suite.cimfs) if suite.cimfs else 'not available'}; "
        f"subcommands: {', '.join(k for k, v in suite.cli.items() if v[0]) or 'none'}",
        flush=True,
    )
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
    wdesc = {k: w.name for k, w in suite.workloads.items()}
    write_report(merged, path, suite, extra)
    print(f"\nwrote {path} (+ {os.path.basename(jpath)}, .svg)\n")
    readme = os.path.join(HERE, os.pardir, "README.md")
    if not a.quick and not a.results and os.path.exists(readme) and update_readme(readme, merged, wdesc):
        print(f"updated the speed figures in {os.path.normpath(readme)}\n")
    table, sizes, rss, _ = render(merged, wdesc, {}, {}, "")
    print(table)
    print()
    print("\n".join(sizes))
    print("\n".join(rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
