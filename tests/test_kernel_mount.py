"""The kernel engine: EROFS indexes of images, checked by fsck.erofs, mounted
by the kernel and compared with the library reader and the FUSE mount."""

import errno
import hashlib
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import uuid

import pytest

import cimfs
from cimfs import FileAttributes as A
from cimfs import FileMetadata, erofs
from cimfs import mount as cmount  # noqa: E402
from cimfs.errors import E_INVALIDARG, ERROR_ALREADY_EXISTS, ERROR_FILE_NOT_FOUND
from cimfs.layout import erofs as L
from cimfs.layout import ntfs
from cimfs.mount import _newmount, kernel  # noqa: E402

FSCK = shutil.which("fsck.erofs")
needs_kernel = pytest.mark.skipif(not kernel.available(), reason="the kernel engine needs root and EROFS")


def have_fuse():
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def fsck(index, devices=()):
    """fsck.erofs of an index (and extraction of every file, which reads all data)."""
    if FSCK is None:
        pytest.fail("fsck.erofs is missing (scripts/install-system-deps.sh installs erofs-utils)")
    args = [FSCK] + [f"--device={d}" for d in devices] + [str(index)]
    out = subprocess.run(args, capture_output=True, text=True)
    if "blksize 512 isn't supported" in out.stderr:
        return False  # erofs-utils 1.5 (Debian 12) reads 4096-byte blocks only
    assert out.returncode == 0, out.stderr
    return True


def loops_of(tmp_path):
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(tmp_path) in line]


def erofs_mounts_under(tmp_path):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if " - erofs " in line and str(tmp_path) in line]


@pytest.fixture(autouse=True)
def own_dirs(tmp_path, monkeypatch):
    """Our own registry and index cache; at the end nothing may be left:
    no mount, no loop device, no registry entry."""
    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("CIMFS_CACHE_DIR", str(tmp_path / "cache"))
    yield
    left = cmount.mounts()
    for e in left:
        try:
            cmount.unmount(e["mountpoint"])
        except cimfs.CimError:
            pass
    for line in erofs_mounts_under(tmp_path):
        _newmount.umount(line.split()[4], detach=True)
    for line in loops_of(tmp_path):
        subprocess.run(["losetup", "-d", line.split(":")[0]])
    assert not left, f"mounts left behind: {left}"
    assert not erofs_mounts_under(tmp_path) and not loops_of(tmp_path)


@pytest.fixture
def mounted(tmp_path):
    live = []

    def do_mount(image, **kw):
        mnt = tmp_path / f"mnt{len(live)}"
        mnt.mkdir()
        cmount.mount(image, mnt, **kw)
        live.append(mnt)
        return mnt

    yield do_mount
    for mnt in live:
        if os.path.ismount(mnt):
            cmount.unmount(mnt)
        assert not os.path.ismount(mnt) and os.listdir(mnt) == []


def stored(rel):
    """A source path as the POSIX importer stores it (WSL's private-use characters)."""
    return rel.replace("\n", "\uf00a").replace("\\", "\uf05c")


def tree_of(root, *, xattr_names=None, skip=("sparse.vhd",)):
    """{relative path: what a POSIX reader sees} plus hard-link groups (the
    contents of the names in ``skip`` are not read)."""
    out, inodes = {}, {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and name in skip:
                what = None
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                try:
                    what = os.readlink(p)
                except OSError as e:
                    what = f"errno {e.errno}"
            else:
                what = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            xattrs = {}
            for x in xattr_names(p, st) if xattr_names else []:
                try:
                    xattrs[x] = os.getxattr(p, x, follow_symlinks=False)
                except OSError as e:
                    xattrs[x] = f"errno {e.errno}"
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, what, xattrs)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
    return out, sorted(sorted(g) for g in inodes.values() if len(g) > 1)


def user_xattrs(p, st):
    return sorted(x for x in os.listxattr(p, follow_symlinks=False) if x.startswith("user."))


NTFS_NAMES = ["ntfs_attrib", "ntfs_times", "ntfs_acl", "ntfs_reparse_data", "ntfs_ea"]


def kernel_xattrs(p, st):
    return user_xattrs(p, st) + [f"trusted.{n}" for n in NTFS_NAMES]


def fuse_xattrs(p, st):
    return user_xattrs(p, st) + [f"system.{n}" for n in NTFS_NAMES]


def same_names(tree):
    """FUSE's system.ntfs_* as the kernel's trusted.ntfs_*."""
    t, links = tree
    return {k: v[:-1] + ({x.replace("system.", "trusted."): y for x, y in v[-1].items()},) for k, v in t.items()}, links


def assert_same_view(fuse_tree, kernel_tree):
    """Equal but for a directory's st_size (FUSE: 0; EROFS: its directory
    blocks), streams too long for an EROFS xattr (FUSE lists them, E2BIG) and
    a damaged symlink (FUSE: readlink fails with EIO; EROFS: an empty target)."""
    (f, flinks), (k, klinks) = same_names(fuse_tree), kernel_tree
    assert sorted(f) == sorted(k)
    for rel in f:
        a, b = f[rel], k[rel]
        a = a[:-1] + ({x: v for x, v in a[-1].items() if v != f"errno {errno.E2BIG}"},)
        if stat.S_ISDIR(a[0]):
            a, b = a[:3] + a[4:], b[:3] + b[4:]
        if stat.S_ISLNK(a[0]) and a[6] == f"errno {errno.EIO}" and b[6] == "":
            a = a[:6] + ("",) + a[7:]
        assert a == b, rel
    assert flinks == klinks


def reader_tree(image_path, uid, gid):
    """What the library reader says about names, sizes, contents and times."""
    out = {}
    with cimfs.open(image_path) as im:
        for dirpath, dirs, files in im.walk():
            for name in dirs + files:
                p = f"{dirpath}\\{name}" if dirpath else name
                st = im.stat(p)
                data = None
                if not st.is_dir and not st.reparse_data and name != "sparse.vhd":
                    data = hashlib.sha256(im.read_bytes(p)).hexdigest()
                out[p.replace("\\", "/")] = (
                    st.size if data else None,
                    data,
                    cimfs.filetime_to_ns(st.last_write_time) if st.last_write_time else 0,
                )
    return out


def assert_matches_reader(mnt, image_path):
    want = reader_tree(image_path, 0, 0)
    got, _ = tree_of(mnt)
    assert sorted(got) == sorted(want)
    for rel, (size, data, mtime) in want.items():
        mode, _, _, gsize, gmtime, _, what, _ = got[rel]
        assert gmtime == mtime, rel
        if data is not None and stat.S_ISREG(mode):
            assert (gsize, what) == (size, data), rel


# ===================================================================== images
@pytest.fixture(scope="module")
def kinds_image(tmp_path_factory):
    """Every metadata kind and some hostile names, from a POSIX tree and from Windows metadata."""
    root = tmp_path_factory.mktemp("kinds")
    src = root / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "a.txt").write_bytes(b"alpha\n")
    (src / "Ünïcödé 😀.txt").write_text("unicode")
    (src / "new\nline").write_bytes(b"newline name")
    (src / "back\\slash").write_bytes(b"backslash name")
    (src / " lead and trail ").write_bytes(b"spaces")
    (src / ("ü" * 127)).write_bytes(b"254 bytes of name")
    (src / "-dash").write_bytes(b"sorts before the dots")
    (src / "big.bin").write_bytes(random.Random(1).randbytes(3 << 20))
    (src / "page.bin").write_bytes(random.Random(2).randbytes(40960))
    (src / "empty").write_bytes(b"")
    os.link(src / "dir" / "a.txt", src / "hard.txt")
    os.link(src / "dir" / "a.txt", src / "dir" / "sub" / "hard2")
    os.symlink("dir/a.txt", src / "link")
    os.symlink("/" + "x" * 3000, src / "longlink")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(src / "sda1", stat.S_IFBLK | 0o600, os.makedev(8, 1))
    os.mknod(src / "bigdev", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
    os.chown(src / "dir" / "a.txt", 1234, 5678)
    os.chmod(src / "dir" / "sub", 0o750)
    os.chmod(src / "page.bin", 0o4755)
    with open(src / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"data in a hole")
    for i in range(300):  # a directory spanning several blocks
        (src / "dir" / f"many-{i:04d}-{'x' * (i % 40)}").write_bytes(str(i).encode())
    subprocess.run([sys.executable, "-m", "cimfs.cli", "create", str(src), str(root / "img.cim")], check=True)
    return src, root / "img.cim"


@pytest.fixture(scope="module")
def windows_image(tmp_path_factory):
    root = tmp_path_factory.mktemp("win")
    sd = ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)")
    with cimfs.create(root, "w.cim") as w:
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
        w.add_stream("Windows/notepad.exe:huge", bytes(70000))  # longer than an EROFS xattr
        w.add_file("rel", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("Windows\\notepad.exe")))
        w.add_file("abs", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("C:\\Windows\\System32")))
        w.mkdir(
            "junction", FileMetadata(attributes=A.DIRECTORY, reparse_data=ntfs.pack_mount_point_reparse("D:\\data"))
        )
        w.create_file("sparse.vhd", FileMetadata(file_size=5 << 30, attributes=A.SPARSE_FILE)).close()
        w.create_file("sparse-small", FileMetadata(file_size=3 << 20, attributes=A.SPARSE_FILE)).close()
        w.add_file("old", b"before 1970", FileMetadata(last_write_time=100_000_000_000_000_000))
        w.add_file("bad-ea", b"still readable", FileMetadata(ea_buffer=b"\x00\x00\x00\x00\x00\x05\xff\xff$LXMO"))
        w.add_file(
            "exe", b"#!/bin/sh\n", FileMetadata(ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=stat.S_IFREG | 0o4755)))
        )
        w.add_file(
            "bad-link", b"", FileMetadata(reparse_data=struct.pack("<IHH", ntfs.IO_REPARSE_TAG_SYMLINK, 2, 0) + b"xx")
        )
        w.add_file("sock", b"", FileMetadata(reparse_data=ntfs.pack_lx_special_reparse(ntfs.IO_REPARSE_TAG_AF_UNIX)))
    return root / "w.cim"


@pytest.fixture(scope="module")
def fork_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("forks")
    big = random.Random(3).randbytes(300_000)
    with cimfs.create(root, "l0.cim") as w:
        w.mkdir("etc")
        w.add_file("etc/conf", b"v0")
        w.add_file("etc/remove-me", b"bye")
        w.add_file("big", big)
        w.add_file("linked", b"L")
        w.link("alias", "linked")
    with cimfs.create(root, "l1.cim", base="l0.cim") as w:
        w.add_file("etc/conf", b"v1")
        w.delete("etc/remove-me")
        w.add_file("big2", random.Random(4).randbytes(200_000))
        w.add_stream("linked:s", b"ads on a parent file")
    with cimfs.create(root, "l2.cim", base="l1.cim") as w:
        w.add_file("etc/new", b"n2" * 50_000)
        w.delete("alias")
    return root / "l2.cim"


# ===================================================================== the index alone
def test_index_passes_fsck_and_addresses_data_in_place(kinds_image, tmp_path):
    _, image = kinds_image
    with cimfs.open(image) as im:
        # new images align small objects to 512: everything is addressed in place
        info = erofs.write_index(im, tmp_path / "i.erofs")
        assert info["block_size"] == 512 and info["copied_files"] == 0 and info["in_place_files"] >= 300
        regions = {os.path.basename(p) for p in info["devices"]}
        assert regions <= set(im.info()["region_files"]) and regions
        # 4096-byte blocks (what Debian's fsck.erofs reads): small objects are copied, tails inline
        info4k = erofs.write_index(im, tmp_path / "i4k.erofs", block_bits=12)
        assert info4k["block_size"] == 4096 and info4k["copied_files"] > 200 and info4k["in_place_files"] >= 2
    fsck(tmp_path / "i.erofs", info["devices"])
    assert fsck(tmp_path / "i4k.erofs", info4k["devices"])
    for path, i in ((tmp_path / "i.erofs", info), (tmp_path / "i4k.erofs", info4k)):
        sb = L.unpack_super_block(path.read_bytes())
        assert sb["magic"] == L.MAGIC and sb["extra_devices"] == len(i["devices"]) and sb["inos"] == i["inodes"]
        assert 1 << sb["blkszbits"] == i["block_size"] == os.path.getsize(path) // sb["blocks"]
    # metadata only: far smaller than the contents it describes
    assert info["size"] < 1 << 20
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_directory_blocks_round_trip():
    entries = sorted(
        [(b".", 1, L.FT_DIR), (b"..", 1, L.FT_DIR)]
        + [(f"name-{i}-{'y' * (i % 50)}".encode(), 100 + i, L.FT_REG_FILE) for i in range(500)]
    )
    for bs in (512, 4096):
        raw = L.pack_directory(entries, bs)
        assert len(raw) == L.directory_size([len(e[0]) for e in entries], bs)
        assert L.unpack_directory(raw, bs) == entries
        assert len(raw) > bs  # several blocks, every one starting with its own dirents


def test_standalone_image_extracts_to_the_source(kinds_image, tmp_path):
    src, image = kinds_image
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "to-erofs", "--standalone", str(image), str(tmp_path / "s.erofs")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "device=" not in out.stderr
    fsck(tmp_path / "s.erofs")
    subprocess.run([FSCK, f"--extract={tmp_path / 'x'}", str(tmp_path / "s.erofs")], check=True, capture_output=True)
    for dirpath, dirs, files in os.walk(src):
        for name in files:
            p = os.path.join(dirpath, name)
            q = os.path.join(tmp_path / "x", stored(os.path.relpath(p, src)))
            if stat.S_ISREG(os.lstat(p).st_mode):
                assert open(p, "rb").read() == open(q, "rb").read(), p
    if kernel.available():  # an ordinary EROFS image: no devices
        mnt = tmp_path / "m"
        mnt.mkdir()
        _newmount.mount_fs("erofs", str(tmp_path / "s.erofs"), str(mnt), [])
        try:
            assert_matches_reader(mnt, image)
        finally:
            _newmount.umount(str(mnt))


def test_cli_to_erofs_lists_devices(kinds_image, tmp_path):
    _, image = kinds_image
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "to-erofs", str(image), str(tmp_path / "i.erofs")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    devices = [line[len("device=") :] for line in out.stderr.splitlines() if line.startswith("device=")]
    assert devices and all(os.path.isfile(d) for d in devices)
    fsck(tmp_path / "i.erofs", devices)


def test_bad_input_is_a_cim_error(tmp_path):
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x" * 100_000)
    with cimfs.open(tmp_path / "g.cim") as im:
        with pytest.raises(cimfs.CimError):
            erofs.write_index(im, tmp_path / "x.erofs", block_bits=16)
    regions = [n for n in os.listdir(tmp_path) if n.startswith("region_")]
    for n in regions:
        os.unlink(tmp_path / n)
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "to-erofs", str(tmp_path / "g.cim"), str(tmp_path / "o.erofs")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr and "region" in out.stderr
    assert not os.path.exists(tmp_path / "o.erofs") and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ===================================================================== mounted by the kernel
@needs_kernel
def test_kernel_tree_equals_reader_and_fuse(kinds_image, mounted, tmp_path):
    src, image = kinds_image
    mnt = mounted(image, engine="kernel")
    assert kernel.is_live({"mountpoint": str(mnt)}, cmount._mounted())
    assert_matches_reader(mnt, image)
    ktree = tree_of(mnt, xattr_names=kernel_xattrs)
    # against the source tree: modes, owners, devices, links
    stree, slinks = tree_of(src)
    assert sorted(ktree[0]) == sorted(stored(k) for k in stree)
    for rel, s in stree.items():
        k = ktree[0][stored(rel)]
        assert k[:3] == s[:3] and k[6] == s[6], rel
        if not stat.S_ISDIR(s[0]):
            assert k[3] == s[3] and k[5] == s[5], rel
    assert ktree[1] == slinks and len(slinks) == 1 and len(slinks[0]) == 3
    for d in ("", "dir", "dir/sub"):
        assert os.stat(mnt / d).st_nlink == os.stat(src / d).st_nlink, d
    if have_fuse():
        fmnt = mounted(image, engine="fuse")
        assert_same_view(tree_of(fmnt, xattr_names=fuse_xattrs), ktree)
    else:
        pytest.skip("no FUSE here: compared with the reader and the source only")


@needs_kernel
def test_windows_metadata_on_the_kernel_mount(windows_image, mounted):
    mnt = mounted(windows_image, engine="kernel")
    f = mnt / "Windows" / "notepad.exe"
    sd = ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)")
    assert sorted(x for x in os.listxattr(f) if x.startswith("user.")) == ["user.Zone.Identifier"]
    assert os.getxattr(f, "user.Zone.Identifier") == b"[ZoneTransfer]"
    assert struct.unpack("<I", os.getxattr(f, "trusted.ntfs_attrib"))[0] == A.ARCHIVE | A.HIDDEN
    assert struct.unpack("<I", os.getxattr(mnt / "Windows", "trusted.ntfs_attrib"))[0] == A.DIRECTORY | A.SYSTEM
    assert os.getxattr(f, "trusted.ntfs_acl") == sd
    assert os.getxattr(f, "trusted.ntfs_ea") == ntfs.pack_eas([ntfs.EaEntry("USER.NOTE", b"x")])
    assert struct.unpack("<4Q", os.getxattr(f, "trusted.ntfs_times")) == (
        132000000000000000,
        132000000010000000,
        132000000030000000,
        132000000020000000,
    )
    assert os.stat(f).st_mtime_ns == (132000000010000000 - 116444736000000000) * 100
    assert os.stat(mnt / "old").st_mtime_ns == (100_000_000_000_000_000 - 116444736000000000) * 100
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o444 and stat.S_IMODE(os.stat(mnt / "Windows").st_mode) == 0o555
    vhd = os.stat(mnt / "sparse.vhd")
    assert vhd.st_size == 5 << 30
    with open(mnt / "sparse.vhd", "rb") as fh:
        fh.seek((5 << 30) - 4096)
        assert fh.read() == bytes(4096)
    assert os.readlink(mnt / "rel") == "Windows/notepad.exe"
    assert os.readlink(mnt / "abs") == "/mnt/c/Windows/System32"
    assert os.readlink(mnt / "junction") == "/mnt/d/data"
    assert (mnt / "bad-ea").read_bytes() == b"still readable"
    assert stat.S_IMODE(os.stat(mnt / "exe").st_mode) == 0o4755
    assert stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.nothing")
    assert e.value.errno == errno.ENODATA
    # read-only like the FUSE mount
    for attempt in (lambda: open(f, "r+b"), lambda: os.mkdir(mnt / "x"), lambda: os.unlink(mnt / "old")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    if have_fuse():
        fmnt = mounted(windows_image, engine="fuse")
        assert_same_view(tree_of(fmnt, xattr_names=fuse_xattrs), tree_of(mnt, xattr_names=kernel_xattrs))


@needs_kernel
def test_fork_chain_kernel_mount_uses_every_region_set(fork_chain, mounted, tmp_path):
    mnt = mounted(fork_chain, engine="kernel")
    assert_matches_reader(mnt, fork_chain)
    assert (mnt / "etc" / "conf").read_bytes() == b"v1"
    assert not (mnt / "alias").exists() and not (mnt / "etc" / "remove-me").exists()
    assert os.getxattr(mnt / "linked", "user.s") == b"ads on a parent file"
    entry = next(e for e in cmount.mounts() if e["mountpoint"] == str(mnt))
    fsck(entry["index"], kernel.ensure_index(str(fork_chain), kernel.Options())[1])
    with cimfs.open(fork_chain) as im:
        info4k = erofs.write_index(im, tmp_path / "f4k.erofs", block_bits=12)
    assert fsck(tmp_path / "f4k.erofs", info4k["devices"])
    devices = kernel.ensure_index(str(fork_chain), kernel.Options())[1]
    with cimfs.open(fork_chain) as im:
        sets = {str(rs.id) for rs in im.region_sets}
    assert len({next(s for s in sets if s in d) for d in devices}) >= 2  # parents' region files too
    if have_fuse():
        fmnt = mounted(fork_chain, engine="fuse")
        assert_same_view(tree_of(fmnt, xattr_names=fuse_xattrs), tree_of(mnt, xattr_names=kernel_xattrs))


@needs_kernel
def test_second_mount_builds_nothing_and_cli_umount(kinds_image, tmp_path):
    _, image = kinds_image
    mnt = tmp_path / "m"
    mnt.mkdir()
    first = None
    for round_ in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "cimfs.cli", "mount", "--kernel", str(image), str(mnt)],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        cache = sorted(os.listdir(tmp_path / "cache"))
        stamps = {n: os.stat(tmp_path / "cache" / n).st_mtime_ns for n in cache}
        if round_:
            assert stamps == first
        first = stamps
        assert len(cache) == 2 and (mnt / "dir" / "a.txt").read_bytes() == b"alpha\n"
        assert _newmount_live(mnt)
        out = subprocess.run([sys.executable, "-m", "cimfs.cli", "umount", str(mnt)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert not os.path.ismount(mnt) and cmount.mounts() == []
    assert kernel.ensure_index(str(image), kernel.Options())[2] is False


def _newmount_live(mnt):
    return cmount._mounted().get(os.path.realpath(mnt)) == "erofs"


@needs_kernel
def test_win32_mount_with_engine_and_dismount_from_another_process(tmp_path):
    with cimfs.create(tmp_path, "api.cim") as w:
        w.add_file("f", b"via the API")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vid = uuid.uuid4()
    assert cimfs.CimMountImage(str(tmp_path), "api.cim", 0, vid, mountpoint=str(mnt), engine="kernel") == vid
    assert (mnt / "f").read_bytes() == b"via the API" and _newmount_live(mnt)
    out = subprocess.run(
        [sys.executable, "-c", f"import cimfs, uuid; cimfs.CimDismountImage(uuid.UUID('{vid}'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not os.path.ismount(mnt)
    with pytest.raises(cimfs.CimError):
        cimfs.CimDismountImage(vid)


@needs_kernel
def test_loop_device_fallback_detaches_on_umount(kinds_image, tmp_path, monkeypatch):
    _, image = kinds_image
    monkeypatch.setenv("CIMFS_EROFS_LOOP", "1")
    mnt = tmp_path / "m"
    mnt.mkdir()
    cmount.mount(image, mnt, engine="kernel")
    try:
        entry = next(e for e in cmount.mounts() if e["mountpoint"] == str(mnt))
        assert entry["loops"] and all(dev.startswith("/dev/loop") for dev in entry["loops"])
        assert (mnt / "big.bin").stat().st_size == 3 << 20
        assert_matches_reader(mnt, image)
    finally:
        cmount.unmount(mnt)
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not [line for line in out.splitlines() if entry["index"] in line or str(image.parent) in line]


@needs_kernel
def test_failed_mounts_leave_nothing(tmp_path, monkeypatch):
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x" * 100_000)
    mnt = tmp_path / "m"
    mnt.mkdir()
    # the mount point is taken
    cmount.mount(tmp_path / "g.cim", mnt, engine="kernel")
    with pytest.raises(cimfs.CimError):
        cmount.mount(tmp_path / "g.cim", mnt, engine="kernel")
    cmount.unmount(mnt)
    # a region file is missing: no index, no mount
    os.makedirs(tmp_path / "b")
    with cimfs.create(tmp_path / "b", "b.cim") as w:
        w.add_file("f", b"y" * 100_000)
    for n in os.listdir(tmp_path / "b"):
        if n.startswith("region_"):
            os.unlink(tmp_path / "b" / n)
            break
    before = sorted(os.listdir(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", "--kernel", str(tmp_path / "b" / "b.cim"), str(mnt)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "cache")) == before
    assert not os.path.ismount(mnt) and cmount.mounts() == []
    # the kernel refuses (the index damaged after it was checked): nothing mounted, nothing attached
    monkeypatch.setattr(kernel, "_before_mount", damage_index)
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount(tmp_path / "g.cim", mnt, engine="kernel")
    assert "kernel refused" in str(e.value) and "/proc/self/fd" not in str(e.value)
    assert not os.path.ismount(mnt) and cmount.mounts() == []


def damage_index(prepared):
    """Zero the index's magic through the very descriptor the kernel is about to be given."""
    with open(f"/proc/self/fd/{prepared.index_fd}", "r+b") as f:
        f.seek(L.SUPER_OFFSET)
        f.write(b"\0\0\0\0")


def test_engine_choice_is_checked(tmp_path):
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x")
    (tmp_path / "m").mkdir()
    with pytest.raises(cimfs.CimError):
        cmount.mount(tmp_path / "g.cim", tmp_path / "m", engine="warp")
    assert kernel.check_engine("auto", "x") in ("kernel", "fuse")


@pytest.fixture(scope="module")
def old_image(tmp_path_factory):
    """An image as cimfs wrote them before small objects were 512-aligned (8-aligned)."""
    from cimfs.layout import cim

    root = tmp_path_factory.mktemp("old")
    rng = random.Random(5)
    saved = dict(cim.REGION_ALIGNMENT)
    cim.REGION_ALIGNMENT[cim.REGION_SMALL_DATA] = 8
    try:
        with cimfs.create(root, "old.cim") as w:
            w.mkdir("d")
            for i, size in enumerate((1, 7, 100, 511, 512, 513, 4000, 4095, 4096, 4097, 9000, 20000, 32767, 40000)):
                w.add_file(f"d/f{i}", rng.randbytes(size))
            w.add_file("d/zero", b"")
            w.add_file("link", b"", FileMetadata(reparse_data=ntfs.pack_lx_symlink_reparse("d/f1")))
    finally:
        cim.REGION_ALIGNMENT.update(saved)
    return root / "old.cim"


@needs_kernel
@pytest.mark.parametrize("bits", [None, 9, 12])
def test_older_images_copy_unaligned_objects(old_image, tmp_path, bits):
    with cimfs.open(old_image) as im:
        offsets = [im.data_location(im.stream_descriptor(f"d\\f{i}"))[1] for i in range(14)]
        info = erofs.write_index(im, tmp_path / "i.erofs", block_bits=bits)
    assert any(off % 512 for off in offsets)  # really unaligned
    assert info["block_size"] == (512 if bits == 9 else 4096)
    assert 0 < info["copied_files"] < 14 and info["in_place_files"] >= 1
    if info["block_size"] == 4096:
        assert fsck(tmp_path / "i.erofs", info["devices"])
    mnt = tmp_path / "m"
    mnt.mkdir()
    _newmount.mount_fs("erofs", str(tmp_path / "i.erofs"), str(mnt), [("device", d) for d in info["devices"]])
    try:
        assert_matches_reader(mnt, old_image)
        assert os.readlink(mnt / "link") == "d/f1"
    finally:
        _newmount.umount(str(mnt))


def test_kernel_engine_refuses_non_root_and_auto_falls_back(tmp_path, monkeypatch):
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x")
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount(tmp_path / "g.cim", tmp_path / "m", engine="kernel")
    assert e.value.errno == errno.EACCES and "root" in str(e.value)
    assert kernel.check_engine("auto", "x") == "fuse"
    assert not os.path.ismount(tmp_path / "m") and not os.path.exists(tmp_path / "cache")


@needs_kernel
def test_umount_without_a_registry_entry(tmp_path):
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x" * 10_000)
    mnt = tmp_path / "m"
    mnt.mkdir()
    vid = cmount.mount(tmp_path / "g.cim", mnt, engine="kernel")
    cmount.remove_entry(vid)  # as a reboot of /run, or another tool, would
    assert cmount.mounts() == [] and os.path.ismount(mnt)
    out = subprocess.run([sys.executable, "-m", "cimfs.cli", "umount", str(mnt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not os.path.ismount(mnt)
    # an EROFS mount that is not ours is not touched
    other = tmp_path / "other.erofs"
    with cimfs.open(tmp_path / "g.cim") as im:
        erofs.write_index(im, other, standalone=True)
    _newmount.mount_fs("erofs", str(other), str(mnt), [])
    try:
        with pytest.raises(cimfs.CimError):
            cmount.unmount(mnt)
        assert os.path.ismount(mnt)
    finally:
        _newmount.umount(str(mnt))


# ===================================================================== merged views
def _merge_layers(root, base):
    """A top and a middle layer, each in its own directory, over ``base`` (a
    fork chain): new files, replaced files, tombstones, merge links, modes, times."""
    mid_src, mid_dir, top_dir = root / "mid-src", root / "mid", root / "top"
    for d in (mid_src / "etc", mid_dir, top_dir):
        d.mkdir(parents=True)
    (mid_src / "etc" / "conf").write_bytes(b"mid conf")
    (mid_src / "tool").write_bytes(random.Random(5).randbytes(150_000))
    (mid_src / "doomed").write_bytes(b"removed by the top")
    os.chmod(mid_src / "tool", 0o751)
    os.utime(mid_src / "tool", ns=(1_500_000_000_123_456_700, 1_500_000_000_123_456_700))
    subprocess.run([sys.executable, "-m", "cimfs.cli", "create", str(mid_src), str(mid_dir / "mid.cim")], check=True)
    when = cimfs.filetime_from_ns(1_600_000_000_000_000_000)
    with cimfs.create(top_dir, "top.cim") as w:
        w.mkdir("etc")
        w.add_file("etc/new", b"top new", FileMetadata(last_write_time=when, creation_time=when))
        w.tombstone("doomed")
        w.tombstone("big2")
        w.merge_link("tool-again", "tool")
        w.merge_link("etc/big-link", "big")
    return [top_dir / "top.cim", mid_dir / "mid.cim", base]


def _cache_files(tmp_path):
    return sorted(os.listdir(tmp_path / "cache")) if (tmp_path / "cache").exists() else []


def _private_dirs(tmp_path):
    return [n for n in os.listdir(tmp_path / "registry") if n.startswith("merged-")]


@needs_kernel
def test_kernel_merged_view_equals_fuse_merged_view(fork_chain, tmp_path):
    layers = _merge_layers(tmp_path, fork_chain)
    before = {str(p) for d in {p.parent for p in layers} for p in d.iterdir()}
    kmnt = tmp_path / "k"
    kmnt.mkdir()
    vid = cimfs.CimMergeMountImage([str(p) for p in layers], 0, mountpoint=str(kmnt), engine="kernel")
    try:
        assert kernel.is_live({"mountpoint": str(kmnt)}, cmount._mounted())
        entry = next(e for e in cmount.mounts() if e["volume_id"] == str(vid))
        assert entry["engine"] == "kernel" and entry["sources"] == [str(p) for p in layers]
        assert entry["image"] == str(layers[0])
        assert not _private_dirs(tmp_path)  # gone before the mount was reported
        assert {str(p) for d in {p.parent for p in layers} for p in d.iterdir()} == before
        # the index's devices are the sources' own region files (fork chain: several sets)
        with open(entry["index"][:-6] + ".json") as f:
            devices = __import__("json").load(f)["paths"]
        assert devices and all(
            os.path.realpath(d) == d and os.path.dirname(d) in {str(p.parent) for p in layers} for d in devices
        )
        assert {os.path.dirname(d) for d in devices} == {str(p.parent) for p in layers}
        # what the merge rules say, independently of any engine
        assert (kmnt / "etc" / "conf").read_bytes() == b"mid conf"
        assert (kmnt / "etc" / "new").read_bytes() == b"top new"
        assert (kmnt / "etc" / "new").stat().st_mtime_ns == 1_600_000_000_000_000_000
        assert (kmnt / "etc" / "big-link").read_bytes() == random.Random(3).randbytes(300_000)
        assert os.path.samestat((kmnt / "etc" / "big-link").stat(), (kmnt / "big").stat())
        assert os.path.samestat((kmnt / "tool-again").stat(), (kmnt / "tool").stat())
        st = (kmnt / "tool").stat()
        assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_mtime_ns == 1_500_000_000_123_456_700
        assert st.st_nlink == 2
        for gone in ("doomed", "big2", "alias", "etc/remove-me"):
            assert not (kmnt / gone).exists(), gone
        assert (kmnt / "etc" / "new").exists() and (kmnt / "linked").read_bytes() == b"L"
        ktree = tree_of(kmnt, xattr_names=kernel_xattrs)
        if have_fuse():
            fmnt = tmp_path / "f"
            fmnt.mkdir()
            fvid = cmount.mount_merged([str(p) for p in layers], fmnt, engine="fuse")
            try:
                assert_same_view(tree_of(fmnt, xattr_names=fuse_xattrs), ktree)
            finally:
                cimfs.CimDismountImage(fvid)
    finally:
        cimfs.CimDismountImage(vid)
    assert not os.path.ismount(kmnt) and cmount.mounts() == []
    # the command line, "auto" as root, and the cache: a second mount builds nothing
    cached = _cache_files(tmp_path)
    assert len(cached) == 2
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", "--kernel"] + [str(p) for p in layers] + [str(kmnt)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    try:
        assert (kmnt / "etc" / "conf").read_bytes() == b"mid conf" and not (kmnt / "doomed").exists()
        assert _cache_files(tmp_path) == cached and not _private_dirs(tmp_path)
    finally:
        out = subprocess.run([sys.executable, "-m", "cimfs.cli", "umount", str(kmnt)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert not os.path.ismount(kmnt)
    cmount.mount_merged([str(p) for p in layers], kmnt, engine="auto")
    try:
        assert [e["engine"] for e in cmount.mounts()] == ["kernel"]
    finally:
        cmount.unmount(kmnt)
    # other sources are another view, another index
    cmount.mount_merged([str(layers[1]), str(layers[2])], kmnt, engine="kernel")
    try:
        assert (kmnt / "doomed").read_bytes() == b"removed by the top"  # no tombstone above it now
        assert (kmnt / "big2").exists() and not (kmnt / "tool-again").exists()
    finally:
        cmount.unmount(kmnt)
    assert len(_cache_files(tmp_path)) == 4


@needs_kernel
def test_failed_kernel_merged_mounts_leave_nothing(fork_chain, tmp_path, monkeypatch):
    layers = _merge_layers(tmp_path, fork_chain)
    paths = [str(p) for p in layers]
    mnt = tmp_path / "m"
    mnt.mkdir()
    (tmp_path / "registry").mkdir(exist_ok=True)

    def nothing_left(cache_before):
        assert not os.path.ismount(mnt) and os.listdir(mnt) == [] and cmount.mounts() == []
        assert not _private_dirs(tmp_path) and _cache_files(tmp_path) == cache_before
        assert not erofs_mounts_under(tmp_path) and not loops_of(tmp_path)
        assert not [n for n in os.listdir(tmp_path / "registry") if n.endswith(".json")]

    # no foreground mode; a missing source
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount_merged(paths, mnt, engine="kernel", foreground=True)
    assert e.value.hresult == E_INVALIDARG
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount_merged(paths[:1] + [str(tmp_path / "missing.cim")], mnt, engine="kernel")
    assert e.value.hresult == ERROR_FILE_NOT_FOUND
    nothing_left([])
    # the merge itself fails (a merge link whose target is not below): nothing built
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount_merged([paths[0], paths[2]], mnt, engine="kernel")
    assert e.value.hresult == ERROR_FILE_NOT_FOUND and "merge link" in str(e.value)
    nothing_left([])
    # a region file of the middle layer is missing: no index, no private directory
    mid_dir = layers[1].parent
    region = next(n for n in os.listdir(mid_dir) if n.startswith("region_"))
    os.rename(mid_dir / region, tmp_path / region)
    out = subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", "--kernel"] + paths + [str(mnt)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    nothing_left([])
    os.rename(tmp_path / region, mid_dir / region)
    # the mount point is taken: refused before anything is built
    other = tmp_path / "other"
    other.mkdir()
    cmount.mount(fork_chain, mnt, engine="kernel")
    cached = _cache_files(tmp_path)
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount_merged(paths, mnt, engine="kernel")
    assert e.value.hresult == ERROR_ALREADY_EXISTS
    assert _cache_files(tmp_path) == cached and not _private_dirs(tmp_path)
    cmount.unmount(mnt)
    # the kernel refuses (the index damaged after it was checked), on files and on loop devices
    cmount.mount_merged(paths, mnt, engine="kernel")
    cmount.unmount(mnt)
    cached = _cache_files(tmp_path)
    monkeypatch.setattr(kernel, "_before_mount", damage_index)
    for loop in ("0", "1"):
        monkeypatch.setenv("CIMFS_EROFS_LOOP", loop)
        with pytest.raises(cimfs.CimError) as e:
            cmount.mount_merged(paths, mnt, engine="kernel")
        assert "kernel refused" in str(e.value)
        nothing_left(cached)


@needs_kernel
def test_kernel_merged_view_on_loop_devices(fork_chain, tmp_path, monkeypatch):
    layers = _merge_layers(tmp_path, fork_chain)
    monkeypatch.setenv("CIMFS_EROFS_LOOP", "1")
    mnt = tmp_path / "m"
    mnt.mkdir()
    vid = cmount.mount_merged([str(p) for p in layers], mnt, engine="kernel")
    try:
        entry = next(e for e in cmount.mounts() if e["volume_id"] == str(vid))
        assert len(entry["loops"]) >= 3 and not _private_dirs(tmp_path)
        assert (mnt / "etc" / "big-link").read_bytes() == random.Random(3).randbytes(300_000)
        assert (mnt / "tool").read_bytes() == random.Random(5).randbytes(150_000)
    finally:
        cimfs.CimDismountImage(vid)
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not [line for line in out.splitlines() if entry["index"] in line]
    assert not loops_of(tmp_path)


# ===================================================================== trust (issue 22)
def _trust_image(root, size=(2 << 20) + 300_000, seed=7):
    """An image whose file ``f`` ends its region file: the kernel reads its
    head from the region file and its last chunk from a copy in the index."""
    root.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    with cimfs.create(root, "t.cim") as w:
        w.add_file("f", data)
    with cimfs.open(root / "t.cim") as im:
        region, off, rsize = im.data_location(im.stream_descriptor("f"))
    assert off + size == rsize  # really the end of the region file
    return root / "t.cim", data, region, off


def _cached_trust_image(tmp_path):
    """:func:`_trust_image` in ``tmp_path/img``, mounted once with the kernel
    engine so its index is in the test's cache: (image, data, region, mnt, cache)."""
    image, data, region, _ = _trust_image(tmp_path / "img")
    mnt = tmp_path / "m"
    mnt.mkdir()
    cmount.mount(image, mnt, engine="kernel")
    cmount.unmount(mnt)
    return image, data, region, mnt, tmp_path / "cache"


def _secret_index(root):
    """A standalone index of an image holding ``secret`` (what a planted index would serve)."""
    with cimfs.create(root, "secret.cim") as w:
        w.add_file("f", b"root's secret")
    with cimfs.open(root / "secret.cim") as im:
        erofs.write_index(im, root / "secret.erofs", standalone=True)
    return (root / "secret.erofs").read_bytes()


def _cli_mount(*args):
    return subprocess.run(
        [sys.executable, "-m", "cimfs.cli", "mount", "--kernel", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_kernel
@pytest.mark.parametrize("how", ["other-owner", "group-writable", "world-writable"])
def test_cache_dir_others_can_write_is_refused(tmp_path, how):
    image, data, _, mnt, cache = _cached_trust_image(tmp_path)
    # plant: every cached index replaced by one serving another image, devices dropped
    planted = _secret_index(tmp_path)
    for n in os.listdir(cache):
        if n.endswith(".erofs"):
            (cache / n).write_bytes(planted)
        elif n.endswith(".json"):
            (cache / n).write_text('{"devices": [], "regions": []}')
    if how == "other-owner":
        os.chown(cache, 12345, 12345)
        reason = "owned by uid 12345"
    else:
        os.chmod(cache, 0o770 if how == "group-writable" else 0o707)
        reason = "writable by group" if how == "group-writable" else "writable by others"
    out = _cli_mount(image, mnt)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and str(cache) in out.stderr and reason in out.stderr
    with pytest.raises(cimfs.CimError) as e:
        cmount.mount(image, mnt, engine="kernel")
    assert e.value.filename == str(cache) and reason in str(e.value)
    assert not os.path.ismount(mnt) and cmount.mounts() == []
    os.chown(cache, 0, 0)
    os.chmod(cache, 0o700)
    # back in the caller's hands: the planted entry is found out and rebuilt
    cmount.mount(image, mnt, engine="kernel")
    try:
        assert (mnt / "f").read_bytes() == data
    finally:
        cmount.unmount(mnt)


@needs_kernel
def test_cache_dirs_created_private(tmp_path, monkeypatch):
    image, data, _, _ = _trust_image(tmp_path / "img")
    monkeypatch.delenv("CIMFS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg" / "cache"))
    old = os.umask(0o002)  # a permissive umask must not leak into the cache's modes
    try:
        mnt = tmp_path / "m"
        mnt.mkdir()
        cmount.mount(image, mnt, engine="kernel")
        try:
            assert (mnt / "f").read_bytes() == data
        finally:
            cmount.unmount(mnt)
    finally:
        os.umask(old)
    for d in ("xdg", "xdg/cache", "xdg/cache/cimfs", "xdg/cache/cimfs/erofs"):
        st = os.lstat(tmp_path / d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0, d
    for n in os.listdir(tmp_path / "xdg/cache/cimfs/erofs"):
        assert stat.S_IMODE(os.stat(tmp_path / "xdg/cache/cimfs/erofs" / n).st_mode) & 0o022 == 0, n


@needs_kernel
def test_planted_symlinks_at_temporary_names_are_not_followed(tmp_path, monkeypatch):
    import cimfs.atomic

    image, data, _, mnt, cache = _cached_trust_image(tmp_path)
    keys = {n.split(".")[0] for n in os.listdir(cache)}
    for n in os.listdir(cache):
        os.unlink(cache / n)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    # the names a build would write first: <key>.<ext>.<pid>.tmp (before), .<key>.<ext>.<random>.tmp (now)
    import secrets  # cimfs.atomic imports it when it names a temporary file

    monkeypatch.setattr(secrets, "token_hex", lambda n: "planted")
    for key in keys:
        for ext in ("erofs", "json"):
            os.symlink(victim, cache / f"{key}.{ext}.{os.getpid()}.tmp")
            os.symlink(victim, cache / f".{key}.{ext}.planted.tmp")
    try:
        cmount.mount(image, mnt, engine="kernel")
    except cimfs.CimError as e:
        assert "exists" in str(e)  # the planted name is refused, not written through
    else:
        try:
            assert (mnt / "f").read_bytes() == data
        finally:
            cmount.unmount(mnt)
    assert victim.read_bytes() == b"root's file" and stat.S_ISREG(os.lstat(victim).st_mode)
    assert not os.path.ismount(mnt) and cmount.mounts() == []


def test_publishing_helper_never_writes_through_a_planted_name(tmp_path, monkeypatch):
    import cimfs.atomic

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    import secrets  # cimfs.atomic imports it when it names a temporary file

    monkeypatch.setattr(secrets, "token_hex", lambda n: "planted")
    os.symlink(victim, tmp_path / ".out.planted.tmp")
    with cimfs.create(tmp_path, "g.cim") as w:
        w.add_file("f", b"x")
    with cimfs.open(tmp_path / "g.cim") as im, pytest.raises(FileExistsError):
        erofs.write_index(im, tmp_path / "out")
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError), cimfs.atomic.replacing("out", dir_fd=d) as tmp:
            cimfs.atomic.open_new(tmp, dir_fd=d)
    finally:
        os.close(d)
    assert victim.read_bytes() == b"untouched" and not (tmp_path / "out").exists()


@needs_kernel
@pytest.mark.parametrize("backing", ["file", "loop"])
def test_region_file_swapped_for_a_symlink_after_the_check(tmp_path, monkeypatch, backing):
    image, data, region, off = _trust_image(tmp_path / "img")
    # a file of root's shaped like the region file, holding other bytes where f's data is
    secret = tmp_path / "secret-region"
    with open(region, "rb") as f:
        raw = bytearray(f.read())
    raw[off:] = b"S" * (len(raw) - off)
    secret.write_bytes(raw)
    os.chmod(secret, 0o600)
    real_mount = _newmount.mount_fs
    swapped = []

    def swap(*_):
        os.rename(region, region + ".orig")
        os.symlink(secret, region)
        swapped.append(True)

    def racing_mount(*args, **kw):
        # the attacker wins the race: between cimfs's checks and the kernel opening the files
        swap()
        return real_mount(*args, **kw)

    if backing == "file":
        monkeypatch.setattr(_newmount, "mount_fs", racing_mount)
    else:  # before losetup opens the files
        monkeypatch.setenv("CIMFS_EROFS_LOOP", "1")
        monkeypatch.setattr(kernel, "_before_mount", swap)
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        cmount.mount(image, mnt, engine="kernel")
        try:
            assert swapped and (mnt / "f").read_bytes() == data  # the checked file's bytes, never the symlink's
        finally:
            cmount.unmount(mnt)
    finally:
        if os.path.islink(region):
            os.unlink(region)
            os.rename(region + ".orig", region)
    # a region file that is a symlink when cimfs looks: refused, one line
    monkeypatch.setattr(_newmount, "mount_fs", real_mount)
    monkeypatch.setattr(kernel, "_before_mount", None)
    os.rename(region, region + ".orig")
    os.symlink(region + ".orig", region)
    out = _cli_mount(image, mnt)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "symbolic link" in out.stderr and region in out.stderr
    assert not os.path.ismount(mnt) and cmount.mounts() == []


@needs_kernel
def test_region_rewritten_in_place_with_mtime_put_back_is_reindexed(tmp_path):
    image, data, region, off = _trust_image(tmp_path / "img")
    mnt = tmp_path / "m"
    mnt.mkdir()
    cmount.mount(image, mnt, engine="kernel")
    try:
        assert (mnt / "f").read_bytes() == data
    finally:
        cmount.unmount(mnt)
    new = random.Random(8).randbytes(len(data))
    st = os.stat(region)
    with open(region, "r+b") as f:
        f.seek(off)
        f.write(new)
    os.utime(region, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(region)
    assert (st2.st_ino, st2.st_size, st2.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert st2.st_ctime_ns != st.st_ctime_ns  # what gives the rewrite away
    assert kernel.ensure_index(str(image), kernel.Options())[2] is True  # a new index, not the cached one
    cmount.mount(image, mnt, engine="kernel")
    try:
        assert (mnt / "f").read_bytes() == new  # all of it: no chunk from the old index
    finally:
        cmount.unmount(mnt)


@needs_kernel
@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign-devices", "foreign-owner", "not-json", "symlink"])
def test_damaged_or_planted_cache_entry_is_rebuilt(tmp_path, damage):
    image, data, region, mnt, cache = _cached_trust_image(tmp_path)
    index = next(cache / n for n in os.listdir(cache) if n.endswith(".erofs"))
    meta = index.with_suffix(".json")
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * os.path.getsize(region))
    good = index.read_bytes()
    if damage == "truncated":
        os.truncate(index, 4096)
    elif damage == "flipped":  # the copied tail of f: the kernel would serve it without complaint
        raw = bytearray(good)
        at = raw.rfind(data[-1000:])
        assert at > 0
        raw[at] ^= 0xFF
        index.write_bytes(raw)
    elif damage == "foreign-devices":  # the entry points the kernel at a file of root's
        m = __import__("json").loads(meta.read_text())
        m["devices"] = m["paths"] = [str(secret)]
        m["regions"] = ["../secret"]
        meta.write_text(__import__("json").dumps(m))
    elif damage == "foreign-owner":
        os.chown(index, 12345, 12345)
    elif damage == "not-json":
        meta.write_text("[" * 100_000)
    elif damage == "symlink":
        index.unlink()
        os.symlink(tmp_path / "img" / "t.cim", index)
    cmount.mount(image, mnt, engine="kernel")
    try:
        assert (mnt / "f").read_bytes() == data
    finally:
        cmount.unmount(mnt)
    assert stat.S_ISREG(os.lstat(index).st_mode) and os.lstat(index).st_uid == 0
    assert len(index.read_bytes()) == len(good)
    assert kernel.ensure_index(str(image), kernel.Options())[2] is False  # the rebuilt entry checks out
