"""The ``cimfs`` command driven as a subprocess, as a user would.

Trees are compared byte for byte and metadata field for field against the
source (type, mode, owner, device, size, mtime/atime to 100 ns, symlink
targets, hard-link structure, sparseness).  Run as root: devices and
ownership are part of what is compared.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import stat as S
import subprocess
import sys
import tarfile

import pytest

pytest.importorskip("cimfs.layout.ntfs")

import cimfs  # noqa: E402

ROOT = os.geteuid() == 0


def run(*args, input=None, check=True, cwd=None):
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], input=input, capture_output=True, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"cimfs {' '.join(map(str, args))} -> {p.returncode}\n{p.stderr.decode()}")
    return p


# ------------------------------------------------------------------ trees
T0 = 1_600_000_000_123_456_789  # not a multiple of 100 ns on purpose


def _set_times(path, k):
    os.utime(path, ns=(T0 + k * 1_000_000_007 + 11, T0 + k * 3_000_000_001 + 55), follow_symlinks=False)


def make_tree(root: str) -> None:
    os.makedirs(root)
    j = os.path.join
    os.makedirs(j(root, "dir/sub/deeper"))
    os.makedirs(j(root, "empty"))
    with open(j(root, "hello.txt"), "wb") as f:
        f.write(b"hello world\n")
    with open(j(root, "empty.bin"), "wb"):
        pass
    with open(j(root, "dir/binary"), "wb") as f:
        f.write(bytes(range(256)) * 1000)
    with open(j(root, "dir/sub/big"), "wb") as f:
        f.write(os.urandom(3 << 20) if False else bytes((i * 7) % 251 for i in range(300_000)))
    # a sparse file: data, a hole, data, and a hole at the end
    with open(j(root, "sparse.img"), "wb") as f:
        f.write(b"head" * 1024)
        f.seek(8 << 20)
        f.write(b"middle" * 1000)
        f.truncate(20 << 20)
    os.link(j(root, "hello.txt"), j(root, "dir/hello-hard"))
    os.link(j(root, "hello.txt"), j(root, "dir/sub/hello-hard2"))
    os.symlink("../hello.txt", j(root, "dir/rel-link"))
    os.symlink("/etc/passwd", j(root, "abs-link"))
    os.symlink("does/not/exist", j(root, "dangling"))
    os.symlink("sub", j(root, "dir/dirlink"))
    os.mkfifo(j(root, "fifo"))
    s = socket.socket(socket.AF_UNIX)
    s.bind(j(root, "sock"))
    s.close()
    if ROOT:
        os.mknod(j(root, "null"), S.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(j(root, "blk"), S.S_IFBLK | 0o640, os.makedev(7, 200))
        os.chown(j(root, "hello.txt"), 1234, 5678)
        os.chown(j(root, "dir"), 42, 43)
        os.lchown(j(root, "dir/rel-link"), 7, 8)
    # names a CIM cannot hold as such (WSL escapes them) and non-ASCII ones
    with open(j(root, 'we:ird*na?me<>|"\\'), "wb") as f:
        f.write(b"weird")
    with open(j(root, "ünïcødé-日本"), "wb") as f:
        f.write("ünï".encode())
    os.chmod(j(root, "dir"), 0o2755)
    os.chmod(j(root, "hello.txt"), 0o4751)
    os.chmod(j(root, "empty"), 0o1777)
    os.chmod(j(root, "empty.bin"), 0o600)
    # times last, deepest first, so directory times stick
    paths = []
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            paths.append(os.path.join(dp, n))
    for k, p in enumerate(sorted(paths, key=lambda p: -p.count("/"))):
        _set_times(p, k)
    _set_times(root, 999)


def snapshot(root: str, *, sockets: bool = True) -> dict:
    """Every entry: metadata field by field, content bytes, hard-link groups."""
    out = {}
    inodes: dict = {}
    for dp, dns, fns in os.walk(root):
        for n in sorted(dns + fns) + ([] if dp != root else [""]):
            p = os.path.join(dp, n) if n else root
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if S.S_ISSOCK(st.st_mode) and not sockets:
                continue
            e = {
                "mode": oct(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": st.st_mtime_ns // 100 * 100,
            }
            if not S.S_ISDIR(st.st_mode) and not S.S_ISLNK(st.st_mode):
                # (reading a directory or a symlink updates its atime, so those are not compared)
                e["atime"] = st.st_atime_ns // 100 * 100
            if S.S_ISREG(st.st_mode):
                e["size"] = st.st_size
                fd = os.open(p, os.O_RDONLY | os.O_NOATIME)
                with open(fd, "rb") as f:
                    e["data"] = f.read()
                e["sparse"] = st.st_blocks * 512 < st.st_size
            elif S.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif S.S_ISCHR(st.st_mode) or S.S_ISBLK(st.st_mode):
                e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if not S.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
            out[rel] = e
    for group in inodes.values():
        for rel in group:
            out[rel]["links"] = sorted(group)
    return out


def assert_same(a: dict, b: dict, *, ignore_root_times=False, exact_atime=False) -> None:
    """``b`` (read back from an image) holds what the source ``a`` held.  A
    consistent image (the CLI's default) stores no atime of its own: the
    source's atime reads back as its mtime, unless ``exact_atime``
    (``--no-consistent``)."""
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = dict(a[k]), dict(b[k])
        if not exact_atime and "atime" in x:
            x["atime"] = x["mtime"]
        if ignore_root_times and k == ".":
            for d in (x, y):
                d.pop("mtime", None)
                d.pop("atime", None)
        assert x == y, f"{k}: {x} != {y}"


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    make_tree(str(src))
    return str(src), snapshot(str(src))


# ------------------------------------------------------------------ round trips
def test_directory_round_trip_through_extract(tree, tmp_path):
    src, snap = tree
    img = tmp_path / "img"
    img.mkdir()
    run("create", src, img / "a.cim")
    out = tmp_path / "out"
    p = run("extract", img / "a.cim", out)
    assert p.stderr == b""
    got = snapshot(str(out))
    assert_same(snap, got)
    # the sparse file stays sparse
    st = os.stat(out / "sparse.img")
    assert st.st_blocks * 512 < 1 << 20
    # and the image passes fsck
    assert run("fsck", img / "a.cim").returncode == 0
    # --no-consistent keeps the atimes of the scan
    run("create", "--no-consistent", src, img / "b.cim")
    run("extract", img / "b.cim", tmp_path / "out-b")
    assert_same(snap, snapshot(str(tmp_path / "out-b")), exact_atime=True)


def test_ls_stat_cat_info(tree, tmp_path):
    src, snap = tree
    img = tmp_path / "a.cim"
    run("create", src, img)
    names = run("ls", img).stdout.decode().split("\n")
    assert "hello.txt" in names and "dir" in names
    listing = json.loads(run("ls", img, "/", "-R", "--json").stdout)
    by_path = {e["path"]: e for e in listing}
    assert by_path["dir/rel-link"]["type"] == "symlink"
    assert by_path["dir/rel-link"]["target"] == "../hello.txt"
    assert by_path["hello.txt"]["mode"] == "104751"
    assert by_path["hello.txt"]["nlink"] == 3
    assert by_path["fifo"]["type"] == "fifo" and by_path["sock"]["type"] == "sock"
    if ROOT:
        assert by_path["blk"]["rdev"] == [7, 200]
        assert by_path["hello.txt"]["uid"] == 1234 and by_path["hello.txt"]["gid"] == 5678
    long = run("ls", img, "dir", "-l").stdout.decode()
    assert "rel-link -> ../hello.txt" in long
    assert run("cat", img, "dir/binary").stdout == bytes(range(256)) * 1000
    assert run("cat", img, "\\dir\\sub\\big").stdout == snap["dir/sub/big"]["data"]
    st = json.loads(run("stat", img, "hello.txt", "--json").stdout)
    assert st["posix"]["mode"] == "104751"
    assert {e["name"] for e in st["eas"]} >= {"$LXMOD", "$LXUID", "$LXGID"}
    assert st["times"]["last_write_time"]["filetime"] == snap["hello.txt"]["mtime"] // 100 + 116444736000000000
    lst = json.loads(run("stat", img, "dir/rel-link", "--json").stdout)
    assert lst["reparse"]["tag_name"] == "LX_SYMLINK" and lst["reparse"]["target"] == "../hello.txt"
    text = run("stat", img, "null" if ROOT else "fifo").stdout.decode()
    assert "Reparse: tag 0x8000002" in text
    info = json.loads(run("info", img, "--json").stdout)
    assert info["version"].startswith("2")
    assert info["counts"]["hard_link_names"] == 2
    assert info["counts"]["symlinks"] == 4
    assert info["parent_region_sets"] == []
    assert "Version" in run("info", img).stdout.decode()


def test_export_tar_round_trip(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "a.cim")
    run("export", d / "a.cim", tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tf:
        names = tf.getnames()
        assert "dir/sub/hello-hard2" in names or any(n.endswith("hello-hard2") for n in names)
        # times to 100 ns in PAX headers
        m = tf.getmember("hello.txt")
        assert m.pax_headers["mtime"].endswith(f"{snap['hello.txt']['mtime'] % 10**9:09d}")
    # a tar from the export becomes an identical image (sockets do not fit in a tar)
    run("create", tmp_path / "a.tar", d / "b.cim")
    diff = json.loads(run("diff", d / "a.cim", d / "b.cim", "--json").stdout)
    assert diff == {"added": [], "removed": ["sock"], "changed": []}
    out = tmp_path / "out"
    run("extract", d / "b.cim", out)
    snap_nosock = {k: v for k, v in snap.items() if k != "sock"}
    assert_same(snap_nosock, snapshot(str(out)))
    assert os.stat(out / "sparse.img").st_blocks * 512 < 1 << 20
    # GNU tar reads it too (sparse member included)
    if os.path.exists("/usr/bin/tar"):
        gx = tmp_path / "gnu"
        gx.mkdir()
        subprocess.run(["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(gx)], check=True, capture_output=True)
        with open(gx / "sparse.img", "rb") as f:
            assert f.read() == snap["sparse.img"]["data"]


def test_create_from_stdin_and_compressed(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "a.cim")
    run("export", d / "a.cim", tmp_path / "a.tar.gz")
    with gzip.open(tmp_path / "a.tar.gz") as f:
        f.read(10)
    run("create", tmp_path / "a.tar.gz", d / "gz.cim")
    with open(tmp_path / "a.tar.gz", "rb") as f:
        run("create", "-", d / "stdin.cim", input=f.read())
    for name in ("gz.cim", "stdin.cim"):
        diff = json.loads(run("diff", d / "a.cim", d / name, "--json").stdout)
        assert diff == {"added": [], "removed": ["sock"], "changed": []}
    assert run("diff", d / "gz.cim", d / "stdin.cim").stdout == b""


def test_tar_made_by_gnu_tar(tree, tmp_path):
    src, snap = tree
    if not os.path.exists("/usr/bin/tar"):
        pytest.skip("no GNU tar")
    tarpath = tmp_path / "gnu.tar"
    subprocess.run(
        ["tar", "--format=posix", "--sparse", "-C", src, "-cf", str(tarpath), "."], check=True, capture_output=True
    )
    d = tmp_path / "img"
    d.mkdir()
    run("create", tarpath, d / "g.cim")
    out = tmp_path / "out"
    run("extract", d / "g.cim", out)
    want = {k: v for k, v in snap.items() if k != "sock"}
    got = snapshot(str(out))
    # GNU tar's PAX output keeps times to the nanosecond and every type
    assert_same(want, got)


# ------------------------------------------------------------------ forks
def test_fork_from_directory_stores_only_changes(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "base.cim")
    src2 = tmp_path / "src2"
    subprocess.run(["cp", "-a", src, str(src2)], check=True)
    os.unlink(src2 / "fifo")
    with open(src2 / "dir/sub/new.txt", "wb") as f:
        f.write(b"new file")
    with open(src2 / "dir/binary", "r+b") as f:
        f.write(b"XX")
    os.utime(src2 / "dir/binary", ns=(T0, T0))
    snap2 = snapshot(str(src2))
    run("create", src2, d / "v2.cim", "--fork-from", d / "base.cim")
    diff = json.loads(run("diff", d / "base.cim", d / "v2.cim", "--json").stdout)
    assert diff["added"] == ["dir/sub/new.txt"]
    assert diff["removed"] == ["fifo"]
    changed = {c["path"]: c["fields"] for c in diff["changed"]}
    assert "data" in changed["dir/binary"]
    out = tmp_path / "out"
    run("extract", d / "v2.cim", out)
    assert_same(snap2, snapshot(str(out)), ignore_root_times=True)
    info = json.loads(run("info", d / "v2.cim", "--json").stdout)
    assert len(info["parent_region_sets"]) == 1
    # the fork's own regions hold only the changes, not the 20 MiB sparse file or the big file again
    assert info["bytes_stored"]["own_regions"] < 600_000
    # the parent is untouched
    out0 = tmp_path / "out0"
    run("extract", d / "base.cim", out0)
    assert_same(snap, snapshot(str(out0)))


def test_fork_command_add_and_delete(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "base.cim")
    extra = tmp_path / "extra"
    os.makedirs(extra / "bin")
    with open(extra / "bin/tool", "wb") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    os.chmod(extra / "bin/tool", 0o755)
    with open(tmp_path / "motd", "wb") as f:
        f.write(b"welcome\n")
    run(
        "fork",
        d / "base.cim",
        d / "f.cim",
        "--add",
        f"{extra}:/opt/extra",
        "--add",
        f"{tmp_path / 'motd'}:/etc/motd",
        "--add",
        tmp_path / "motd",
        "--delete",
        "dir/sub",
        "--delete",
        "/fifo",
    )
    diff = json.loads(run("diff", d / "base.cim", d / "f.cim", "--json").stdout)
    assert diff["added"] == sorted(
        ["etc", "etc/motd", "motd", "opt", "opt/extra", "opt/extra/bin", "opt/extra/bin/tool"]
    )
    assert diff["removed"] == sorted(["dir/sub", "dir/sub/big", "dir/sub/deeper", "dir/sub/hello-hard2", "fifo"])
    assert run("cat", d / "f.cim", "opt/extra/bin/tool").stdout == b"#!/bin/sh\necho hi\n"
    st = json.loads(run("stat", d / "f.cim", "opt/extra/bin/tool", "--json").stdout)
    assert st["posix"]["mode"] == "100755"
    # deleting a path that is not there is an error naming it
    p = run("fork", d / "base.cim", d / "g.cim", "--delete", "nope", check=False)
    assert p.returncode == 1 and b"nope" in p.stderr and not (d / "g.cim").exists()


def test_extend(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "a.cim")
    more = tmp_path / "more"
    os.makedirs(more / "dir")
    with open(more / "dir/added", "wb") as f:
        f.write(b"added")
    run("create", more, d / "a.cim", "--extend")
    assert run("cat", d / "a.cim", "dir/added").stdout == b"added"
    assert run("cat", d / "a.cim", "hello.txt").stdout == b"hello world\n"


# ------------------------------------------------------------------ collisions
def test_case_collision_error_rename_skip(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src / "Dir")
    os.makedirs(src / "dir")
    (src / "Dir" / "a").write_bytes(b"upper")
    (src / "dir" / "b").write_bytes(b"lower")
    (src / "README").write_bytes(b"1")
    (src / "readme").write_bytes(b"2")
    d = tmp_path / "img"
    d.mkdir()
    p = run("create", src, d / "x.cim", check=False)
    assert p.returncode == 1
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "Dir" in err and "dir" in err
    assert os.listdir(d) == []  # nothing written
    p = run("create", src, d / "r.cim", "--on-collision", "rename")
    msgs = p.stderr.decode()
    assert "renamed" in msgs
    names = set(run("ls", d / "r.cim").stdout.decode().split())
    assert names == {"Dir", "dir~2", "README", "readme~2"}
    assert run("cat", d / "r.cim", "dir~2/b").stdout == b"lower"
    p = run("create", src, d / "s.cim", "--on-collision", "skip")
    assert "skipped" in p.stderr.decode()
    listing = json.loads(run("ls", d / "s.cim", "-R", "--json").stdout)
    assert sorted(e["path"] for e in listing) == ["Dir", "Dir/a", "README"]


# ------------------------------------------------------------------ bad input
def _make_tar(path, n=3, size=10000):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size = size
            tf.addfile(ti, __import__("io").BytesIO(bytes([i]) * size))


@pytest.mark.parametrize("cut", [100, 512, 1536, 5000, 15000, 30000, -1024, -1])
def test_truncated_tar_leaves_nothing(tmp_path, cut):
    good = tmp_path / "good.tar"
    _make_tar(good)
    data = good.read_bytes()
    # cut inside headers, inside data, at a header boundary and in the end marker
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:cut] if cut > 0 else data[: len(data) + cut - 10240 + 1024 if cut == -1024 else -10239])
    d = tmp_path / "img"
    d.mkdir()
    p = run("create", bad, d / "x.cim", check=False)
    assert p.returncode == 1, p.stderr
    err = p.stderr.decode()
    assert err.startswith("cimfs: ") and err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(d) == []


def test_truncated_gzip_and_garbage(tmp_path):
    good = tmp_path / "good.tar"
    _make_tar(good, n=5, size=100000)
    gz = gzip.compress(good.read_bytes())
    (tmp_path / "bad.tar.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "garbage.tar").write_bytes(os.urandom(5000))
    d = tmp_path / "img"
    d.mkdir()
    for name in ("bad.tar.gz", "garbage.tar"):
        p = run("create", tmp_path / name, d / "x.cim", check=False)
        assert p.returncode == 1
        assert p.stderr.decode().count("\n") == 1 and "Traceback" not in p.stderr.decode()
        assert os.listdir(d) == []
    p = run("create", "-", d / "x.cim", input=gz[: len(gz) // 2], check=False)
    assert p.returncode == 1 and os.listdir(d) == []


def test_errors_are_one_line(tmp_path):
    p = run("ls", tmp_path / "missing.cim", check=False)
    assert p.returncode == 1
    assert p.stderr.decode() == f"cimfs: {tmp_path / 'missing.cim'}: no such image\n"
    (tmp_path / "junk.cim").write_bytes(b"not a cim at all" * 10)
    p = run("ls", tmp_path / "junk.cim", check=False)
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1 and "junk.cim" in p.stderr.decode()
    p = run("create", check=False)
    assert p.returncode == 2
    p = run("bogus", check=False)
    assert p.returncode == 2
    src = tmp_path / "s"
    src.mkdir()
    run("create", src, tmp_path / "a.cim")
    p = run("cat", tmp_path / "a.cim", "nope/x", check=False)
    assert p.returncode == 1 and "nope" in p.stderr.decode() and p.stderr.decode().count("\n") == 1
    p = run("create", src, tmp_path / "a.cim", check=False)
    assert p.returncode == 1 and "already exists" in p.stderr.decode()
    assert "Examples" in run("create", "--help").stdout.decode()


# ------------------------------------------------------------------ fsck / rm / gc
def test_fsck_finds_damage(tree, tmp_path):
    src, _ = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "a.cim")
    assert run("fsck", d / "a.cim").returncode == 0
    regions = sorted(n for n in os.listdir(d) if n.startswith("region_"))
    # truncate the biggest region: data can no longer be read
    biggest = max(regions, key=lambda n: os.path.getsize(d / n))
    with open(d / biggest, "r+b") as f:
        f.truncate(os.path.getsize(d / biggest) // 2)
    p = run("fsck", d / "a.cim", check=False)
    assert p.returncode == 1 and p.stderr


def test_rm_and_gc_keep_what_others_need(tree, tmp_path):
    src, snap = tree
    d = tmp_path / "img"
    d.mkdir()
    run("create", src, d / "base.cim")
    base_files = set(os.listdir(d))
    run("fork", d / "base.cim", d / "f.cim", "--delete", "fifo")
    fork_files = set(os.listdir(d)) - base_files
    assert "f.cim" in fork_files and len(fork_files) > 1
    # removing the parent keeps its regions: the fork needs them
    run("rm", d / "base.cim")
    assert set(os.listdir(d)) == (base_files - {"base.cim"}) | fork_files
    out = tmp_path / "out"
    run("extract", d / "f.cim", out)
    assert_same({k: v for k, v in snap.items() if k != "fifo"}, snapshot(str(out)))
    # removing the fork now removes everything
    run("rm", d / "f.cim")
    assert os.listdir(d) == []
    # gc removes orphans only
    run("create", src, d / "a.cim")
    keep = set(os.listdir(d))
    orphan = d / "region_01234567-89ab-cdef-0123-456789abcdef_0"
    orphan.write_bytes(b"x")
    (d / "objectid_01234567-89ab-cdef-0123-456789abcdef_0").write_bytes(b"x")
    run("gc", d)
    assert set(os.listdir(d)) == keep


# ------------------------------------------------------------------ safety
def _lx_symlink_dir_image(d, name, target, kind="lx"):
    from cimfs.layout import ntfs

    FA = cimfs.FileAttributes
    with cimfs.create(str(d), name) as w:
        if kind == "lx":
            rp = ntfs.pack_lx_symlink_reparse(target)
        elif kind == "mount":
            rp = ntfs.pack_mount_point_reparse(target)
        else:
            rp = ntfs.pack_symlink_reparse(target)
        w.mkdir("evil", cimfs.FileMetadata(attributes=FA.DIRECTORY | FA.REPARSE_POINT, reparse_data=rp))
        w.add_file("evil/pwned", b"owned", cimfs.FileMetadata())
        w.mkdir("evil/sub")
        w.add_file("evil/sub/deep", b"owned", cimfs.FileMetadata())
        w.add_file(
            "abs",
            b"",
            cimfs.FileMetadata(attributes=FA.REPARSE_POINT, reparse_data=ntfs.pack_lx_symlink_reparse(target)),
        )
        w.mkdir("real")
        w.add_file("real/file", b"fine")


@pytest.mark.parametrize("kind", ["lx", "mount", "nt"])
def test_extract_never_leaves_dest(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    d = tmp_path / "img"
    d.mkdir()
    target = str(outside) if kind == "lx" else "C:\\outside" if kind == "mount" else str(outside)
    _lx_symlink_dir_image(d, "e.cim", target, kind)
    dest = tmp_path / "dest"
    p = run("extract", d / "e.cim", dest)
    assert os.listdir(outside) == []
    assert os.path.islink(dest / "evil")
    assert (dest / "real" / "file").read_bytes() == b"fine"
    assert b"not extracted" in p.stderr
    # a destination that already holds a link where the image has a directory
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    os.symlink(str(outside), dest2 / "real")
    run("extract", d / "e.cim", dest2)
    assert os.listdir(outside) == []
    assert not os.path.islink(dest2 / "real") and (dest2 / "real" / "file").read_bytes() == b"fine"
    # extracting a subtree below the link touches nothing outside either
    run("extract", d / "e.cim", tmp_path / "dest3", "evil", check=False)
    assert os.listdir(outside) == []


def test_extract_subtree_and_alternate_stream(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    with cimfs.create(str(d), "s.cim") as w:
        w.mkdir("a")
        w.mkdir("a/b")
        w.add_file("a/b/f", b"data")
        w.add_stream("a/b/f:meta", b"stream data")
    run("extract", d / "s.cim", tmp_path / "out", "a/b")
    assert (tmp_path / "out" / "f").read_bytes() == b"data"
    assert run("cat", d / "s.cim", "a/b/f:meta").stdout == b"stream data"
    st = json.loads(run("stat", d / "s.cim", "a/b/f", "--json").stdout)
    assert st["streams"] == [{"name": "meta", "size": 11}]


def test_export_to_stdout(tree, tmp_path):
    src, snap = tree
    run("create", src, tmp_path / "a.cim")
    p = run("export", tmp_path / "a.cim", "-")
    import io

    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tf:
        assert tf.extractfile("hello.txt").read() == b"hello world\n"


# ------------------------------------------------------------------ Windows layers
def _windows_layer(path, files):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("Files", "Hives"):
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE
            ti.pax_headers = {"MSWINDOWS.fileattr": "16"}
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.REGTYPE
                tf.addfile(ti, io.BytesIO(b""))
                continue
            ti.size = len(data)
            ti.pax_headers = {"MSWINDOWS.fileattr": "32"}
            tf.addfile(ti, io.BytesIO(data))


def test_windows_layer_create_fork_export(tmp_path):
    pytest.importorskip("cimfs.winlayer")
    d = tmp_path / "img"
    d.mkdir()
    _windows_layer(tmp_path / "base.tar", {"Files/a.txt": b"A", "Files/b.txt": b"B"})
    _windows_layer(tmp_path / "top.tar", {"Files/c.txt": b"C", "Files/.wh.a.txt": None})
    run("create", tmp_path / "base.tar", d / "base.cim")
    run("create", tmp_path / "top.tar", d / "top.cim", "--fork-from", d / "base.cim")
    names = set(run("ls", d / "top.cim", "Files").stdout.decode().split())
    assert names == {"b.txt", "c.txt"}
    st = json.loads(run("stat", d / "top.cim", "Files/c.txt", "--json").stdout)
    assert "ARCHIVE" in st["attribute_names"]
    run("export", d / "top.cim", tmp_path / "out.tar", "--format", "windows-layer")
    run("create", tmp_path / "out.tar", d / "again.cim")
    assert run("diff", d / "top.cim", d / "again.cim").stdout == b""
    # a layer on stdin is detected too
    run("create", "-", d / "stdin.cim", input=(tmp_path / "base.tar").read_bytes())
    assert run("diff", d / "base.cim", d / "stdin.cim").stdout == b""
