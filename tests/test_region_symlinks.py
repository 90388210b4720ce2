"""A region file that is a symbolic link is refused, never followed (issue 22):
whoever can write an image's directory must not make the reader -- `cimfs
cat`/`ls`/`extract`, a FUSE mount -- serve a file only the caller may read as
the image's data.  The ``.cim`` the caller names may be a link; cimfs's own
merged view follows only links in its private directory."""

import os
import shutil
import subprocess
import sys

import pytest

import cimfs
from cimfs import CimError, CimFormatError

PUBLIC = b"public-data-" * 40
SECRET = b"SECRET-DATA-" * 40


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, timeout=120, env=os.environ
    )


@pytest.fixture
def planted(tmp_path):
    """(image whose region files are links to a private copy holding SECRET
    where the image holds PUBLIC, the directory of that copy)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a directory another user can write
    with cimfs.create(shared, "img.cim") as w:
        w.add_file("data.txt", PUBLIC)
        w.mkdir("dir")
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    with cimfs.open(shared / "img.cim") as img:
        regions = [name for name, _ in img.region_names]
    replaced = 0
    for name in regions:
        data = (shared / name).read_bytes()
        if PUBLIC in data:
            replaced += 1
        target = secret / name
        target.write_bytes(data.replace(PUBLIC, SECRET))
        target.chmod(0o600)  # root-only when the test runs as root
        (shared / name).unlink()
        (shared / name).symlink_to(target)
    assert replaced == 1
    return shared / "img.cim", secret


def test_followed_links_would_serve_the_secret(planted, tmp_path):
    """The attack is real: the planted bytes, were they the region files, are
    read as the image's data (so the refusals below are what stops it)."""
    img, secret = planted
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(img, copy)
    for f in secret.iterdir():
        shutil.copy(f, copy)
    p = cli("cat", copy / "img.cim", "data.txt")
    assert p.returncode == 0 and p.stdout == SECRET


@pytest.mark.parametrize("args", [("cat", "{img}", "data.txt"), ("ls", "-R", "{img}"), ("extract", "{img}", "{out}")])
def test_cli_refuses_a_symlinked_region_file(planted, tmp_path, args):
    img, _ = planted
    out = tmp_path / "out"
    p = cli(*[a.format(img=img, out=out) for a in args])
    err = p.stderr.decode()
    assert p.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "is a symbolic link" in err and "region_" in err and "Traceback" not in err
    assert b"SECRET" not in p.stdout + p.stderr
    if out.exists():
        for root, _, files in os.walk(out):
            for f in files:
                assert b"SECRET" not in open(os.path.join(root, f), "rb").read()


def test_api_refuses_a_symlinked_region_file(planted):
    img, _ = planted
    with pytest.raises(CimFormatError) as e:
        with cimfs.open(img) as image:
            image.listdir("")
    assert "is a symbolic link" in e.value.strerror
    assert os.path.dirname(e.value.filename) == str(img.parent) and os.path.islink(e.value.filename)


def test_private_links_only_in_a_directory_of_the_callers_alone(planted):
    """The merged view's way in (follow links one level) refuses a directory others can write."""
    img, _ = planted
    with pytest.raises(CimFormatError) as e:
        with cimfs.reader.Image(img, private_links=True) as image:
            image.listdir("")
    assert "not followed: its directory is writable by others" in e.value.strerror


def test_private_links_follow_one_level_only(tmp_path):
    """In a private directory a link is followed once; a link it points to is refused."""
    real = tmp_path / "real"
    real.mkdir()
    with cimfs.create(real, "img.cim") as w:
        w.add_file("data.txt", PUBLIC)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copy(real / "img.cim", private)
    with cimfs.open(real / "img.cim") as img:
        regions = [name for name, _ in img.region_names]
    for name in regions:
        (private / name).symlink_to(real / name)
    with cimfs.reader.Image(private / "img.cim", private_links=True) as image:
        assert image.listdir("") == ["data.txt"]
    # Without the flag the same links are refused.
    with pytest.raises(CimFormatError, match="is a symbolic link"):
        with cimfs.open(private / "img.cim") as image:
            image.listdir("")
    # One hop more: the link's target is itself a link.
    hop = tmp_path / "hop"
    hop.mkdir()
    for name in regions:
        (hop / name).symlink_to(real / name)
        (private / name).unlink()
        (private / name).symlink_to(hop / name)
    with pytest.raises(CimFormatError, match="is a symbolic link"):
        with cimfs.reader.Image(private / "img.cim", private_links=True) as image:
            image.listdir("")


def test_a_cim_named_through_the_users_symlink_works(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with cimfs.create(data, "img.cim") as w:
        w.add_file("data.txt", PUBLIC)
    home = tmp_path / "home"
    home.mkdir()
    (home / "img.cim").symlink_to(data / "img.cim")
    (home / "again.cim").symlink_to(home / "img.cim")  # a chain of the user's links
    for named in (home / "img.cim", home / "again.cim"):
        p = cli("cat", named, "data.txt")
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout == PUBLIC
        with cimfs.open(named) as image:
            assert image.path == str(named)  # named as the user named it
            assert image.directory == str(data)  # region files are looked up beside the real .cim


def test_fuse_mount_refuses_a_symlinked_region_file(planted, tmp_path, monkeypatch):
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("no /dev/fuse or fusermount3 on this machine")
    from cimfs import mount as cmount

    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(tmp_path / "registry"))
    img, _ = planted
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with pytest.raises(CimError) as e:
            cmount.mount(img, mnt, engine="fuse")
        assert "is a symbolic link" in str(e.value) and "\n" not in str(e.value)
        assert "SECRET" not in str(e.value)
    finally:
        if cmount.is_cimfs_mount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []
    assert cmount.mounts() == []


def test_merged_mount_refuses_a_sources_symlinked_region_file(planted, tmp_path, monkeypatch):
    """A merged view links to the sources' region files in its private
    directory; a source's own region file that is a link is still refused,
    named in the user's terms (the source's path, not the private view's)."""
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("no /dev/fuse or fusermount3 on this machine")
    from cimfs import mount as cmount

    registry = tmp_path / "registry"
    monkeypatch.setenv("CIMFS_RUNTIME_DIR", str(registry))
    img, _ = planted
    top = tmp_path / "top"
    top.mkdir()
    with cimfs.create(top, "top.cim") as w:
        w.add_file("top.txt", b"top")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with pytest.raises(CimError) as e:
            cmount.mount_merged([top / "top.cim", img], mnt, engine="fuse")
        assert "is a symbolic link" in str(e.value) and "\n" not in str(e.value)
        assert str(img.parent) in str(e.value) and "merged-" not in str(e.value)
    finally:
        if cmount.is_cimfs_mount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []
    assert cmount.mounts() == [] and not [p for p in registry.iterdir() if p.name.startswith("merged-")]
