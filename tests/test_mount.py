"""Mount images for real with FUSE and compare what the kernel shows with the
source tree and with the library reader."""

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import threading
import uuid

import pytest

import cimfs
from cimfs import FileAttributes as A
from cimfs import FileMetadata
from cimfs.layout import ntfs

pyfuse3 = pytest.importorskip(
    "pyfuse3", reason="pyfuse3 is not installed (scripts/install-system-deps.sh + the mount extra)"
)
if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
    pytest.skip("no /dev/fuse or fusermount3 on this machine", allow_module_level=True)

from test_hostile import _linked_twice  # noqa: E402

from cimfs import mount as cmount  # noqa: E402

_TAG = None  # this test's tmp_path: daemons of other users of the machine are not ours


def daemons(tag: str | None = None):
    """Mount daemons serving something under ``tag`` (default: this test's tmp_path)."""
    tag = tag or _TAG
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"cimfs.mount.daemon" in cmd and (tag is None or os.fsencode(tag) in cmd):
                out.append(int(pid))
    return out


def _force_unmount(mnt, vid):
    """Test clean-up that works even when the code under test is broken."""
    entry = next((e for e in cmount.mounts() if e["volume_id"] == str(vid)), None)
    if cmount.is_cimfs_mount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    if entry is not None:
        try:
            os.kill(entry["pid"], 9)
        except ProcessLookupError:
            pass
    cmount.remove_entry(vid)


@pytest.fixture(autouse=True)
def own_registry(tmp_path, monkeypatch):
    """A registry of our own; at the end nothing may be left: no mount, no daemon, no entry."""
    global _TAG
    _TAG = str(tmp_path)
    reg = tmp_path / "registry"
    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(reg))
    before = set(daemons())
    yield reg
    leftovers = [e for e in cmount.mounts()]
    for e in leftovers:
        _force_unmount(e["mountpoint"], e["volume_id"])
    assert not leftovers, f"mounts left behind: {leftovers}"
    assert set(daemons()) <= before, "a mount daemon was left running"


@pytest.fixture
def mounted(tmp_path):
    """mount(image) -> mountpoint; everything is unmounted at the end, even on failure."""
    live = []

    def do_mount(image, **kw):
        mnt = tmp_path / f"mnt{len(live)}"
        mnt.mkdir()
        vid = cmount.mount(image, mnt, **kw)
        live.append((mnt, vid))
        return mnt

    yield do_mount
    for mnt, vid in live:
        try:
            if cmount.is_cimfs_mount(mnt):
                cmount.unmount(mnt)
        finally:
            _force_unmount(mnt, vid)
        assert not os.path.ismount(mnt) and os.listdir(mnt) == []


@pytest.fixture(scope="module")
def posix_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("posix")
    src = root / "src"
    src.mkdir()
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a.txt").write_bytes(b"alpha\n")
    (src / "Ünïcödé 😀.txt").write_text("unicode")
    (src / "big.bin").write_bytes(random.Random(1).randbytes(8 << 20))
    os.link(src / "dir" / "a.txt", src / "hard.txt")
    os.symlink("dir/a.txt", src / "link")
    os.mkfifo(src / "fifo")
    if os.geteuid() == 0:
        os.mknod(src / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        os.chown(src / "dir" / "a.txt", 1234, 5678)
    os.chmod(src / "dir" / "sub", 0o750)
    with open(src / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"data in a hole")
    subprocess.run([sys.executable, "-m", "cimfs.cli", "create", str(src), str(root / "img.cim")], check=True)
    return src, root / "img.cim"


@pytest.mark.parametrize("loop", ["wire", "pyfuse3"])
def test_tree_matches_source_and_reader(posix_image, mounted, monkeypatch, loop):
    if loop == "pyfuse3":
        monkeypatch.setenv("CIMFS_FUSE_LOOP", "pyfuse3")  # pyfuse3's request loop instead of mount/wire.py
    src, image = posix_image
    mnt = mounted(image)
    with cimfs.open(image) as im:
        for dirpath, dirs, files in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            m = os.path.join(mnt, rel)
            assert sorted(os.listdir(m)) == sorted(dirs + files)
            for name in dirs + files:
                s, t = os.lstat(os.path.join(dirpath, name)), os.lstat(os.path.join(m, name))
                assert (t.st_mode, t.st_uid, t.st_gid) == (s.st_mode, s.st_uid, s.st_gid), name
                assert t.st_mtime_ns == s.st_mtime_ns // 100 * 100, name
                ipath = os.path.normpath(os.path.join(rel, name)).replace("/", "\\")
                if stat.S_ISREG(s.st_mode):
                    assert t.st_size == s.st_size == im.stat(ipath).size
                    with open(os.path.join(dirpath, name), "rb") as a, open(os.path.join(m, name), "rb") as b:
                        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
                elif stat.S_ISLNK(s.st_mode):
                    assert os.readlink(os.path.join(m, name)) == os.readlink(os.path.join(dirpath, name))
                elif stat.S_ISCHR(s.st_mode):
                    assert t.st_rdev == s.st_rdev
    # hard links share an inode and count their links
    a, h = os.stat(mnt / "dir" / "a.txt"), os.stat(mnt / "hard.txt")
    assert a.st_ino == h.st_ino and a.st_nlink == h.st_nlink == 2
    # case-insensitive lookups, stored names listed
    assert (mnt / "DIR" / "A.TXT").read_bytes() == b"alpha\n"
    assert (mnt / "ünïcödé 😀.TXT").read_text() == "unicode"
    assert "Ünïcödé 😀.txt" in os.listdir(mnt)
    assert os.statvfs(mnt).f_blocks > 0


def test_small_files_read_in_listing_order_are_pushed_ahead_exactly(tmp_path, mounted, monkeypatch):
    """A reader walking a directory's small files in listing order gets most of
    them from the page cache, pushed ahead by the daemon: fewer READ requests
    than files, and every byte as stored; a large file is read as usual."""
    rng = random.Random(5)
    contents = {f"f{i:03}": rng.randbytes(rng.randrange(1, 20000)) for i in range(200)}
    contents["zbig"] = rng.randbytes(600_000)
    contents["empty"] = b""
    with cimfs.create(tmp_path, "p.cim") as w:
        w.mkdir("d")
        for name, data in contents.items():
            w.add_file(f"d/{name}", data)
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("CIMFS_FUSE_STATS", str(stats))
    mnt = mounted(tmp_path / "p.cim")
    names = os.listdir(mnt / "d")
    assert sorted(names) == sorted(contents)
    for name in names:
        assert (mnt / "d" / name).read_bytes() == contents[name], name
    for name in random.Random(6).sample(names, 50):  # again, in another order
        assert (mnt / "d" / name).read_bytes() == contents[name], name
    cmount.unmount(mnt)
    reads = json.loads(stats.read_text())["opcodes"].get("15", 0)  # FUSE_READ
    assert 0 < reads < 50


def test_wire_protocol_over_a_socket_with_an_older_kernel(tmp_path):
    """The request loop speaks FUSE over any message socket: INIT from a kernel
    without no-open support (protocol 7.26) gets that minor and only offered
    flags; OPEN is then answered (keep_cache), and LOOKUP, GETATTR, READ, a
    missing name, a write and an unknown opcode get their replies."""
    import socket

    from cimfs.mount import wire

    with cimfs.create(tmp_path, "w.cim") as w:
        w.add_file("hello", b"hello wire")
    image = cimfs.open(tmp_path / "w.cim")
    fs = wire.WireFs(image)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def ask(opcode, unique, nodeid, body=b""):
        ours.send(wire.IN_HEADER.pack(wire.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body)

    def answer(unique):
        out = ours.recv(1 << 16)
        length, err, got = wire.OUT_HEADER.unpack_from(out)
        assert got == unique and length == len(out)
        return err, out[wire.OUT_HEADER.size :]

    offered = wire.ASYNC_READ | wire.DO_READDIRPLUS | (1 << 1)  # (1 << 1): POSIX locks, not wanted
    ask(wire.INIT, 1, 0, wire.INIT_IN.pack(7, 26, 131072, offered) + bytes(48))
    fs.handshake(theirs.fileno())
    err, body = answer(1)
    assert err == 0 and struct.unpack_from("<IIII", body) == (7, 26, 131072, wire.ASYNC_READ | wire.DO_READDIRPLUS)
    loop = threading.Thread(target=fs.serve_requests, args=(theirs.fileno(),))
    loop.start()
    try:
        ask(wire.LOOKUP, 2, 1, b"HELLO\0")  # case-insensitive, as stored names are
        err, entry = answer(2)
        ino = struct.unpack_from("<Q", entry)[0]
        assert err == 0 and ino > 1 and struct.unpack_from("<Q", entry, wire.ENTRY_PREFIX.size + 8)[0] == 10
        ask(wire.GETATTR, 3, ino, bytes(16))
        err, attr = answer(3)
        assert err == 0 and stat.S_ISREG(struct.unpack_from("<I", attr, wire.ATTR_OUT_PREFIX.size + 60)[0])
        ask(wire.OPEN, 4, ino, bytes(8))
        assert answer(4) == (0, wire.OPEN_OUT.pack(0, wire.FOPEN_KEEP_CACHE, 0))
        ask(wire.READ, 5, ino, wire.READ_IN.pack(0, 6, 100) + bytes(20))
        assert answer(5) == (0, b"wire")
        ask(wire.LOOKUP, 6, 1, b"missing\0")
        err, entry = answer(6)
        assert err == 0 and struct.unpack_from("<Q", entry)[0] == 0  # a negative entry the kernel may keep
        ask(wire.MKDIR, 7, 1, bytes(8) + b"d\0")
        assert answer(7) == (-errno.EROFS, b"")
        ask(99, 8, 1)
        assert answer(8) == (-errno.ENOSYS, b"")
    finally:
        ours.close()
        loop.join(timeout=10)
        theirs.close()
        image.close()
    assert not loop.is_alive()


def test_read_only(posix_image, mounted):
    mnt = mounted(posix_image[1])
    attempts = [
        lambda: open(mnt / "dir" / "a.txt", "r+b"),
        lambda: open(mnt / "new", "wb"),
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(mnt / "hard.txt"),
        lambda: os.rename(mnt / "hard.txt", mnt / "moved"),
        lambda: os.chmod(mnt / "hard.txt", 0o777),
        lambda: os.utime(mnt / "hard.txt"),
        lambda: os.setxattr(mnt / "hard.txt", "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_parallel_reads_of_one_large_file(posix_image, mounted):
    src, image = posix_image
    mnt = mounted(image)
    expected = (src / "big.bin").read_bytes()
    errors = []
    # Out of the page cache: the first reads wait for the disk, in the daemon's threads.
    for f in image.parent.iterdir():
        if f.name.startswith("region_"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def worker(seed):
        rng = random.Random(seed)
        try:
            with open(mnt / "big.bin", "rb", buffering=0) as f:
                for _ in range(300):
                    off = rng.randrange(len(expected))
                    n = rng.choice((1, 4096, 65536, 1 << 20))
                    assert os.pread(f.fileno(), n, off) == expected[off : off + n]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_windows_metadata_as_xattrs_and_symlinks(tmp_path, mounted):
    sd = ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)")
    with cimfs.create(tmp_path, "w.cim") as w:
        w.mkdir("Windows", FileMetadata(attributes=A.DIRECTORY | A.SYSTEM))
        w.add_file(
            "Windows/notepad.exe",
            b"MZ" + bytes(100),
            FileMetadata(
                attributes=A.ARCHIVE | A.HIDDEN,
                creation_time=132000000000000000,
                last_write_time=132000000010000000,
                change_time=132000000020000000,
                last_access_time=132000000030000000,
                security_descriptor=sd,
                ea_buffer=ntfs.pack_eas([ntfs.EaEntry("USER.NOTE", b"x")]),
            ),
        )
        w.add_stream("Windows/notepad.exe:Zone.Identifier", b"[ZoneTransfer]")
        w.add_file("rel", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("Windows\\notepad.exe")))
        w.add_file("abs", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("C:\\Windows\\System32")))
        w.mkdir(
            "junction", FileMetadata(attributes=A.DIRECTORY, reparse_data=ntfs.pack_mount_point_reparse("D:\\data"))
        )
        w.create_file("sparse.vhd", FileMetadata(file_size=5 << 30, attributes=A.SPARSE_FILE)).close()
    mnt = mounted(tmp_path / "w.cim")
    f = mnt / "Windows" / "notepad.exe"
    # like ntfs-3g: streams are listed, the system.ntfs_* values are read by name
    assert os.listxattr(f) == ["user.Zone.Identifier"]
    assert os.listxattr(mnt / "sparse.vhd") == []
    assert os.getxattr(f, "user.Zone.Identifier") == b"[ZoneTransfer]"
    assert struct.unpack("<I", os.getxattr(f, "system.ntfs_attrib"))[0] == A.ARCHIVE | A.HIDDEN
    assert struct.unpack(">I", os.getxattr(f, "system.ntfs_attrib_be"))[0] == A.ARCHIVE | A.HIDDEN
    assert struct.unpack("<I", os.getxattr(mnt / "Windows", "system.ntfs_attrib"))[0] == A.DIRECTORY | A.SYSTEM
    assert os.getxattr(f, "system.ntfs_ea") == ntfs.pack_eas([ntfs.EaEntry("USER.NOTE", b"x")])
    for absent in ("system.ntfs_acl", "system.ntfs_ea", "system.ntfs_reparse_data"):
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "sparse.vhd", absent)
        assert e.value.errno == errno.ENODATA
    assert os.getxattr(f, "system.ntfs_acl") == sd
    assert struct.unpack("<Q", os.getxattr(f, "system.ntfs_crtime"))[0] == 132000000000000000
    assert struct.unpack("<4Q", os.getxattr(f, "system.ntfs_times")) == (
        132000000000000000,
        132000000010000000,
        132000000030000000,
        132000000020000000,
    )
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o444 and stat.S_IMODE(os.stat(mnt / "Windows").st_mode) == 0o555
    assert os.stat(f).st_mtime_ns == (132000000010000000 - 116444736000000000) * 100
    vhd = os.stat(mnt / "sparse.vhd")
    assert vhd.st_size == 5 << 30 and vhd.st_blocks == 0
    with open(mnt / "sparse.vhd", "rb") as fh:
        fh.seek((5 << 30) - 4096)
        assert fh.read() == bytes(4096)
    assert os.readlink(mnt / "rel") == "Windows/notepad.exe"
    assert os.readlink(mnt / "abs") == "/mnt/c/Windows/System32"
    assert os.readlink(mnt / "junction") == "/mnt/d/data"
    assert os.getxattr(mnt / "rel", "system.ntfs_reparse_data", follow_symlinks=False)[:4] == struct.pack(
        "<I", ntfs.IO_REPARSE_TAG_SYMLINK
    )
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.nothing")
    assert e.value.errno == errno.ENODATA


def test_options_uid_gid_umask(tmp_path, mounted):
    with cimfs.create(tmp_path, "o.cim") as w:
        w.mkdir("d")
        w.add_file("d/f", b"x")
    mnt = mounted(tmp_path / "o.cim", uid=1000, gid=100, umask=0o027)
    st = os.stat(mnt / "d" / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 100, 0o640)
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o750


def test_api_mount_and_dismount_from_another_process(tmp_path):
    with cimfs.create(tmp_path, "api.cim") as w:
        w.add_file("f", b"via the API")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = set(daemons())
    vid = uuid.uuid4()
    got = cimfs.CimMountImage(str(tmp_path), "api.cim", 0, vid, mountpoint=str(mnt))
    try:
        assert got == vid and os.path.ismount(mnt)
        assert (mnt / "f").read_bytes() == b"via the API"
        assert any(e["volume_id"] == str(vid) for e in cmount.mounts())
        out = subprocess.run(
            [sys.executable, "-c", f"import cimfs, uuid; cimfs.CimDismountImage(uuid.UUID('{vid}'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert not os.path.ismount(mnt)
        assert set(daemons()) <= before  # the daemon is gone
        assert not any(e["volume_id"] == str(vid) for e in cmount.mounts())
        assert os.listdir(mnt) == []
        with pytest.raises(cimfs.CimError):
            cimfs.CimDismountImage(vid)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_corrupt_image_fails_cleanly(tmp_path):
    with cimfs.create(tmp_path, "c.cim") as w:
        w.add_file("f", b"x")
    data = bytearray((tmp_path / "c.cim").read_bytes())
    data[0:8] = b"garbage!"
    (tmp_path / "c.cim").write_bytes(bytes(data))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = set(daemons())
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", str(tmp_path / "c.cim"), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "magic" in out.stderr
    assert not os.path.ismount(mnt) and set(daemons()) <= before


def test_damaged_file_gives_eio_and_the_mount_stays_up(tmp_path, mounted):
    with cimfs.create(tmp_path, "d.cim") as w:
        w.add_file("good", b"fine")
        w.add_file("bad", os.urandom(100_000))
    with cimfs.open(tmp_path / "d.cim") as im:
        rec = im.record(im.lookup("bad"))
        t = im.file_tables[(im.lookup("bad") - 1) // 1024]
        slot = (im.lookup("bad") - 1) % 1024
        _, off = rec.stream.offset >> 48, (t.offset & ((1 << 48) - 1)) + slot * t.entry_size
        region = im.region_names[t.offset >> 48][0]
    # make the stream claim far more bytes than its region holds
    with open(tmp_path / region, "r+b") as f:
        f.seek(off + 48)
        f.write(struct.pack("<Q", (1 << 40)))
    mnt = mounted(tmp_path / "d.cim")
    with pytest.raises(OSError) as e:
        with open(mnt / "bad", "rb") as f:
            f.read(65536)
    assert e.value.errno == errno.EIO
    assert (mnt / "good").read_bytes() == b"fine"
    assert os.path.ismount(mnt)


def test_lx_specials_exact_symlinks_and_hostile_metadata(tmp_path, mounted):
    with cimfs.create(tmp_path, "lx.cim") as w:
        w.mkdir("d")
        w.mkdir("d/e")
        w.add_file("lxlink", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("../we\\ird/ target")))
        w.add_file("abslink", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("/etc/passwd")))
        w.add_file(
            "chr",
            b"",
            FileMetadata(
                reparse_data=ntfs.pack_lx_special_reparse(ntfs.IO_REPARSE_TAG_LX_CHR),
                ea_buffer=ntfs.pack_eas(
                    ntfs.lx_eas(mode=stat.S_IFCHR | 0o620, uid=7, gid=8, rdev_major=4, rdev_minor=64)
                ),
            ),
        )
        w.add_file(
            "blk",
            b"",
            FileMetadata(
                reparse_data=ntfs.pack_lx_special_reparse(ntfs.IO_REPARSE_TAG_LX_BLK),
                ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFBLK | 0o660, rdev_major=8, rdev_minor=1)),
            ),
        )
        w.add_file("fifo", b"", FileMetadata(reparse_data=ntfs.pack_lx_special_reparse(ntfs.IO_REPARSE_TAG_LX_FIFO)))
        w.add_file(
            "exe", b"#!/bin/sh\n", FileMetadata(ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFREG | 0o4755)))
        )
        # damaged metadata: an EA chain that runs past its end, a reparse buffer shorter than its header
        w.add_file("bad-ea", b"still readable", FileMetadata(ea_buffer=b"\x00\x00\x00\x00\x00\x05\xff\xff$LXMO"))
        w.add_file(
            "bad-link", b"", FileMetadata(reparse_data=struct.pack("<IHH", ntfs.IO_REPARSE_TAG_SYMLINK, 2, 0) + b"xx")
        )
    mnt = mounted(tmp_path / "lx.cim")
    assert os.readlink(mnt / "lxlink") == "../we\\ird/ target"
    assert os.readlink(mnt / "abslink") == "/etc/passwd"
    assert os.lstat(mnt / "lxlink").st_size == len("../we\\ird/ target")
    c = os.lstat(mnt / "chr")
    assert stat.S_ISCHR(c.st_mode) and stat.S_IMODE(c.st_mode) == 0o620 and (c.st_uid, c.st_gid) == (7, 8)
    assert (os.major(c.st_rdev), os.minor(c.st_rdev)) == (4, 64)
    b = os.lstat(mnt / "blk")
    assert stat.S_ISBLK(b.st_mode) and os.major(b.st_rdev) == 8
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(mnt / "exe").st_mode) == 0o4755
    # directories count "." and their subdirectories
    assert os.stat(mnt).st_nlink == 3 and os.stat(mnt / "d").st_nlink == 3 and os.stat(mnt / "d" / "e").st_nlink == 2
    # damaged metadata costs only what it describes
    assert (mnt / "bad-ea").read_bytes() == b"still readable"
    assert stat.S_IMODE(os.stat(mnt / "bad-ea").st_mode) == 0o444
    assert stat.S_ISLNK(os.lstat(mnt / "bad-link").st_mode)
    with pytest.raises(OSError) as e:
        os.readlink(mnt / "bad-link")
    assert e.value.errno == errno.EIO
    # absent names stay absent (also when asked again, from the kernel's negative cache)
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "D" / "nothing")
    assert sorted(os.listdir(mnt)) == sorted(
        ["d", "lxlink", "abslink", "chr", "blk", "fifo", "exe", "bad-ea", "bad-link"]
    )
    assert os.path.ismount(mnt)


def test_foreground_cli_mount_and_umount(tmp_path):
    with cimfs.create(tmp_path, "fg.cim") as w:
        w.add_file("hello", b"foreground")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cimfs.cli",
            "mount",
            "-f",
            str(tmp_path / "fg.cim"),
            str(mnt),
            "-o",
            "uid=4321,umask=077",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):
            if cmount.is_cimfs_mount(mnt) or proc.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert cmount.is_cimfs_mount(mnt), proc.stderr.read() if proc.poll() is not None else "not mounted"
        assert (mnt / "hello").read_bytes() == b"foreground"
        st = os.stat(mnt / "hello")
        assert st.st_uid == 4321 and stat.S_IMODE(st.st_mode) == 0o600
        assert [e["pid"] for e in cmount.mounts()] == [proc.pid]
        out = subprocess.run(
            [sys.executable, "-m", "cimfs.cli", "umount", str(mnt)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert proc.wait(timeout=60) == 0
        assert not cmount.is_cimfs_mount(mnt) and cmount.mounts() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _force_unmount(mnt, "-")


def test_sigterm_unmounts_and_errors_leave_nothing(tmp_path):
    with cimfs.create(tmp_path, "t.cim") as w:
        w.add_file("f", b"x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vid = cmount.mount(tmp_path / "t.cim", mnt)
    try:
        with pytest.raises(cimfs.CimError) as e:  # the same volume id twice
            other = tmp_path / "other"
            other.mkdir()
            cmount.mount(tmp_path / "t.cim", other, volume_id=vid)
        assert e.value.hresult == cimfs.errors.ERROR_ALREADY_EXISTS
        with pytest.raises(cimfs.CimError):  # something is mounted here already
            cmount.mount(tmp_path / "t.cim", mnt)
        [entry] = cmount.mounts()
        os.kill(entry["pid"], 15)
        for _ in range(600):
            if not cmount.is_cimfs_mount(mnt) and not cmount._alive(entry["pid"]):
                break
            threading.Event().wait(0.05)
        assert not cmount.is_cimfs_mount(mnt) and not cmount._alive(entry["pid"])
        assert cmount.mounts() == [] and os.listdir(cmount.registry_dir()) == []
    finally:
        _force_unmount(mnt, vid)
    with pytest.raises(cimfs.CimError) as e:
        cmount.unmount(mnt)
    assert e.value.hresult == cimfs.errors.ERROR_FILE_NOT_FOUND
    with pytest.raises(cimfs.CimError):
        cmount.mount(tmp_path / "t.cim", tmp_path / "missing")
    assert os.listdir(cmount.registry_dir()) == []


def _mounted_tree(mnt) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(mnt):
        rel = os.path.relpath(dirpath, mnt)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.normpath(os.path.join(rel, f))] = (open(p, "rb").read(), os.stat(p).st_ino)
    return out


def test_merge_mount_of_layers_in_two_directories(tmp_path, own_registry):
    """CimMergeMountImage / cimfs mount TOP ... BASE: the merged view, nothing written next to the images."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    with cimfs.create(lower, "base.cim") as w:
        w.mkdir("a")
        w.add_file("a\\x", b"x" * 70000)
        w.add_file("a\\y", b"old y")
        w.mkdir("gone")
        w.add_file("gone\\f", b"f")
    with cimfs.create(upper, "top.cim") as w:
        w.mkdir("a")
        w.add_file("a\\y", b"new y")
        w.tombstone("gone")
        w.merge_link("a\\x-link", "a\\x")
    before = {str(p) for d in (lower, upper) for p in d.iterdir()}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vid = cimfs.CimMergeMountImage([str(upper / "top.cim"), str(lower / "base.cim")], 0, mountpoint=str(mnt))
    try:
        tree = _mounted_tree(mnt)
        assert sorted(tree) == ["a", "a/x", "a/x-link", "a/y"]
        assert tree["a/y"][0] == b"new y" and tree["a/x-link"][0] == b"x" * 70000
        assert tree["a/x"][1] == tree["a/x-link"][1]  # the merge link is a hard link
        # no merged image next to the sources, and the private directory is gone already
        assert {str(p) for d in (lower, upper) for p in d.iterdir()} == before
        assert not [n for n in os.listdir(own_registry) if n.startswith("merged-")]
        entry = next(e for e in cmount.mounts() if e["volume_id"] == str(vid))
        assert entry["sources"] == [str(upper / "top.cim"), str(lower / "base.cim")]
        assert entry["image"] == str(upper / "top.cim")
    finally:
        cimfs.CimDismountImage(vid)
    assert not os.path.ismount(mnt)
    with pytest.raises(cimfs.CimError) as e:
        cimfs.CimMergeMountImage([str(upper / "top.cim")], 0x10, mountpoint=str(mnt))
    assert e.value.hresult == 0x80004001
    with pytest.raises(cimfs.CimError) as e:
        cimfs.CimMergeMountImage([str(upper / "top.cim")], 0x1000, mountpoint=str(mnt))
    assert e.value.hresult == 0x80070057
    # the command line: several images, then the mount point
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", str(upper / "top.cim"), str(lower / "base.cim"), str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert out.returncode == 0, out.stderr
        assert (mnt / "a" / "y").read_bytes() == b"new y" and not (mnt / "gone").exists()
    finally:
        out = subprocess.run(
            [sys.executable, "-m", "cimfs.cli", "umount", str(mnt)], capture_output=True, text=True, timeout=60
        )
        _force_unmount(mnt, "-")
    assert out.returncode == 0, out.stderr
    assert not [n for n in os.listdir(own_registry) if n.startswith("merged-")]


# ------------------------------------------------------------------ issue 17: ids, names, rm
def _mount_source(mnt) -> str:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if cmount._unescape_mountinfo(left.split()[4]) == os.path.realpath(mnt):
                return right.split()[1]
    raise AssertionError(f"{mnt} is not mounted")


def test_image_path_in_any_script_mounts(tmp_path, mounted):
    d = tmp_path / "Bilder ä 画像 %"
    d.mkdir()
    with cimfs.create(str(d), "ïmage 😀.cim") as w:
        w.add_file("f", b"content")
    image = d / "ïmage 😀.cim"
    mnt = mounted(image)
    assert (mnt / "f").read_bytes() == b"content"
    source = _mount_source(mnt).replace("\\040", " ")
    # percent-encoded UTF-8, reversible to the path
    assert source.isascii()
    from urllib.parse import unquote_to_bytes

    assert unquote_to_bytes(source) == os.fsencode(str(image))


@pytest.mark.parametrize("option", ["uid=-1", "gid=-1", "uid=4294967295", "gid=99999999999", "umask=1000"])
def test_invalid_ids_are_refused(tmp_path, option):
    with cimfs.create(str(tmp_path), "i.cim") as w:
        w.add_file("f", b"x")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", str(tmp_path / "i.cim"), str(mnt), "-o", option],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and p.stderr.strip() and len(p.stderr.strip().splitlines()) <= 3, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.ismount(mnt) and cmount.mounts() == []
    key, _, value = option.partition("=")
    with pytest.raises(cimfs.CimError):
        cmount.mount(tmp_path / "i.cim", mnt, **{key: int(value, 8 if key == "umask" else 10)})


def test_rm_of_a_mounted_image_is_refused_unless_forced(tmp_path, mounted):
    d = tmp_path / "imgs"
    d.mkdir()
    with cimfs.create(str(d), "m.img") as w:
        w.add_file("f", b"x" * 70000)
    before = set(os.listdir(d))
    mnt = mounted(d / "m.img")
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", "rm", str(d / "m.img")], capture_output=True, text=True)
    assert p.returncode == 1 and "mounted at" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert set(os.listdir(d)) == before and (mnt / "f").read_bytes() == b"x" * 70000
    from cimfs import tools

    with pytest.raises(cimfs.CimError, match="mounted"):
        tools.rm_image(str(d / "m.img"))
    p = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "rm", "--force", str(d / "m.img")], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert os.listdir(d) == []


def test_region_file_that_is_a_fifo_fails_one_read_not_the_daemon(tmp_path, mounted):
    """Issue 17 class 5: a FIFO where a region file belongs blocked open()
    forever, and every later request and the umount with it."""
    with cimfs.create(tmp_path, "f.cim") as w:
        w.add_file("big", os.urandom(200_000))  # the data region
        w.add_file("small", b"metadata-side")
    with cimfs.open(tmp_path / "f.cim") as im:
        big_region = im.region_names[im.record(im.lookup("big")).stream.offset >> 48][0]
        small_region = im.region_names[im.record(im.lookup("small")).stream.offset >> 48][0]
    assert big_region != small_region
    (tmp_path / big_region).unlink()
    os.mkfifo(tmp_path / big_region)  # nobody ever writes it
    mnt = mounted(tmp_path / "f.cim")
    assert sorted(os.listdir(mnt)) == ["big", "small"]
    with pytest.raises(OSError) as e:
        (mnt / "big").read_bytes()
    assert e.value.errno == errno.EIO
    assert (mnt / "small").read_bytes() == b"metadata-side"
    assert os.stat(mnt / "big").st_size == 200_000  # the daemon still answers


def test_directory_under_two_names_does_not_hide_the_mount(tmp_path, mounted):
    """Issue 17 class 7: ls of the root and cat of an intact file work."""
    mnt = mounted(_linked_twice(tmp_path))
    assert sorted(os.listdir(mnt)) == ["a", "b", "top", "top2"]
    assert (mnt / "top").read_bytes() == b"intact file"
    assert os.stat(mnt / "top").st_nlink == 2
    assert os.listdir(mnt / "b") == ["inner"]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_link_entries_sharing_one_long_name_fail_one_listing_not_the_daemon(tmp_path, mounted):
    """Issue 22 item 18: the daemon, held to 1 GiB of address space, answers
    the damaged directory with EIO and goes on serving the rest."""
    from test_hostile import _shared_long_name

    mnt = mounted(_shared_long_name(tmp_path))
    pid = next(e["pid"] for e in cmount.mounts() if e["mountpoint"] == str(mnt))
    subprocess.run(["prlimit", f"--pid={pid}", f"--as={1 << 30}"], check=True)
    assert os.listdir(mnt) == ["top"]  # a directory whose attributes cannot be read is left out
    with pytest.raises(OSError) as e:
        os.listdir(mnt / "d")
    assert e.value.errno == errno.EIO
    assert (mnt / "top").read_bytes() == b"intact file"
    assert pid in daemons() and os.path.ismount(mnt)


def test_failed_merge_mount_names_the_source_not_the_private_view(tmp_path, own_registry):
    """Issue 22 item 17: the daemon fails to open a region file of the base
    (a FIFO): the one-line error names the base the user gave, not the
    private ``merged-XXXX/merged.cim`` it was serving."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    with cimfs.create(lower, "base.cim") as w:
        w.add_file("big", os.urandom(200_000))  # the data region, which the merge never reads
        w.add_file("small", b"metadata-side")
    with cimfs.create(upper, "top.cim") as w:
        w.add_file("t", b"top")
    with cimfs.open(lower / "base.cim") as im:
        big_region = im.region_names[im.record(im.lookup("big")).stream.offset >> 48][0]
    (lower / big_region).unlink()
    os.mkfifo(lower / big_region)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = set(daemons())
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", str(upper / "top.cim"), str(lower / "base.cim"), str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"cimfs: {lower / 'base.cim'}: ") and big_region in out.stderr, out.stderr
    assert "merged-" not in out.stderr
    assert not os.path.ismount(mnt) and set(daemons()) <= before
    assert not [n for n in os.listdir(own_registry) if n.startswith("merged-")]
