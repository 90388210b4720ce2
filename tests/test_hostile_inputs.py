"""Issue 17, writer and input side: hostile tars, self-referencing sources,
CLI arguments.  Every failure is a CimError from the API and one line with
exit status 1 from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cimfs
from cimfs.errors import CimError


def cli(*args, check=True, input=None):
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], capture_output=True, input=input)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p) -> str:
    err = p.stderr.decode("utf-8", "replace").strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("where", [".", "sub", "sub/deeper"])
def test_create_refuses_an_image_inside_its_source(tmp_path, where):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "file").write_bytes(b"x" * 100000)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    p = cli("create", src, src / where / "x.cim", check=False)
    assert "inside the source directory" in one_line_error(p)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    # through a symlink to the source too
    os.symlink(src, tmp_path / "alias")
    p = cli("create", tmp_path / "alias", src / where / "y.cim", check=False)
    assert "inside the source directory" in one_line_error(p)
    # beside it is fine, and a sibling whose name starts like SRC's is not inside
    (tmp_path / "src2").mkdir()
    cli("create", src, tmp_path / "src2" / "ok.cim")
    with cimfs.open(tmp_path / "src2" / "ok.cim") as img:
        assert sorted(e.name for e in img.scandir(img.root_id)) == ["file", "sub"]
    # the API refuses it too, before anything is read
    from cimfs import posix

    with cimfs.create(str(src / where), "z.cim") as w:
        with pytest.raises(CimError, match="inside the source directory"):
            posix.DirectoryImporter(w, str(src))
        w.add_file("marker", b"")


# ------------------------------------------------------------------ tar headers
import io  # noqa: E402
import tarfile  # noqa: E402

from cimfs import tarbounds, winlayer  # noqa: E402


class EndlessTar(io.RawIOBase):
    """``head`` and then zeros forever; counts what was read."""

    def __init__(self, head: bytes):
        self.head = head
        self.consumed = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = len(b)
        chunk = self.head[self.consumed : self.consumed + n]
        b[:n] = chunk + bytes(n - len(chunk))
        self.consumed += n
        return n


def header(name, type_, size, **pax) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def pax_record(key: str, value: bytes) -> bytes:
    body = f" {key}=".encode() + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax_member(records: bytes, type_=tarfile.XHDTYPE) -> bytes:
    pad = -len(records) % 512
    return header("././@PaxHeader", type_, len(records)) + records + bytes(pad)


@pytest.mark.parametrize(
    "type_",
    [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.SOLARIS_XHDTYPE],
)
def test_a_huge_extension_header_is_refused_before_it_is_read(type_):
    src = EndlessTar(header("././@LongLink", type_, 1 << 30))
    with pytest.raises(tarfile.ReadError, match="limit is 1048576"):
        with tarfile.open(fileobj=io.BufferedReader(src), mode="r|", tarinfo=tarbounds.BoundedTarInfo) as tf:
            tf.next()
    assert src.consumed < 1 << 20  # the gigabyte was never read


def test_header_limits_hold_for_chains_globals_and_sparse_maps():
    def read_all(data):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", tarinfo=tarbounds.BoundedTarInfo) as tf:
            return tf.getmembers()

    member = header("f", tarfile.REGTYPE, 0)
    long_name = header("././@LongLink", tarfile.GNUTYPE_LONGNAME, 512) + b"n" * 512
    # 16 extension headers in a row are allowed, 17 are not (tarfile recurses once per header)
    assert [m.name for m in read_all(long_name * 16 + member + bytes(1024))] == ["n" * 512]
    with pytest.raises(tarfile.ReadError, match="extension headers in a row"):
        read_all(long_name * 17 + member + bytes(1024))
    # global headers add up over the archive
    g = pax_member(pax_record("comment", b"c" * 600_000), tarfile.XGLTYPE)
    read_all(g + member + bytes(1024))
    with pytest.raises(tarfile.ReadError, match="global PAX headers exceed"):
        read_all(g + member + g + member + bytes(1024))
    # a GNU 1.0 sparse map is read through the budget
    sparse10 = pax_member(
        pax_record("GNU.sparse.major", b"1")
        + pax_record("GNU.sparse.minor", b"0")
        + pax_record("GNU.sparse.name", b"s")
        + pax_record("GNU.sparse.realsize", b"10")
    )
    endless_map = b"9999999999\n" + b"1\n" * (600_000)
    with pytest.raises(tarfile.ReadError, match="GNU sparse map"):
        read_all(sparse10 + header("s", tarfile.REGTYPE, len(endless_map)) + endless_map + bytes(1024))


@pytest.mark.parametrize("sparse_map", [b"x\n", b"2\n1\n", b"1\n", b""])
def test_a_broken_gnu_sparse_map_is_a_read_error(sparse_map):
    pax = pax_member(
        pax_record("GNU.sparse.major", b"1")
        + pax_record("GNU.sparse.minor", b"0")
        + pax_record("GNU.sparse.name", b"s")
        + pax_record("GNU.sparse.realsize", b"10")
    )
    data = pax + header("s", tarfile.REGTYPE, 512) + sparse_map + bytes(512 - len(sparse_map))
    for tail in (bytes(1024), b""):
        with pytest.raises(tarfile.ReadError, match="malformed header at byte 0"):
            with tarfile.open(fileobj=io.BytesIO(data + tail), mode="r:", tarinfo=tarbounds.BoundedTarInfo) as tf:
                tf.getmembers()
    # the 0.1 map (in the PAX header) too
    pax01 = pax_member(
        pax_record("GNU.sparse.major", b"0")
        + pax_record("GNU.sparse.minor", b"1")
        + pax_record("GNU.sparse.map", b"1,x,2")
        + pax_record("GNU.sparse.name", b"s")
    )
    with pytest.raises(tarfile.ReadError, match="malformed header"):
        with tarfile.open(
            fileobj=io.BytesIO(pax01 + header("s", tarfile.REGTYPE, 0) + bytes(1024)),
            mode="r:",
            tarinfo=tarbounds.BoundedTarInfo,
        ) as tf:
            tf.getmembers()


# ------------------------------------------------------------------ Windows layers
def _layer(symlink_target: str) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("Files", "Hives"):
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE
            ti.pax_headers = {"MSWINDOWS.fileattr": "16"}
            tf.addfile(ti)
        ti = tarfile.TarInfo("Files/link")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "placeholder"
        ti.pax_headers = {"MSWINDOWS.fileattr": "32", "linkpath": symlink_target}
        tf.addfile(ti)
    return b.getvalue()


@pytest.mark.parametrize(
    "target,reason",
    [
        ("a" * 40000, "too long for a reparse buffer"),
        ("C:\\" + "b\\" * 20000, "too long for a reparse buffer"),
        ("C:\\x\0y", "contains a NUL character"),
        ("\0", "contains a NUL character"),
    ],
)
def test_windows_layer_bad_symlink_targets_name_the_entry(tmp_path, target, reason):
    with pytest.raises(CimError, match=reason) as e:
        winlayer.import_layer(io.BytesIO(_layer(target)), str(tmp_path), "l.cim")
    assert "Files/link" in str(e.value) and len(str(e.value)) < 400
    assert os.listdir(tmp_path) == []
    (tmp_path / "layer.tar").write_bytes(_layer(target))
    p = cli("create", tmp_path / "layer.tar", tmp_path / "l.cim", "--format", "windows-layer", check=False)
    assert reason in one_line_error(p)
    assert os.listdir(tmp_path) == ["layer.tar"]


def test_windows_layer_with_a_huge_pax_header_is_refused_early(tmp_path):
    import gzip

    # 64 MiB of PAX header compress to ~64 KiB; the limit stops it at the header
    records = pax_record("MSWINDOWS.rawsd", b"A" * (64 << 20))
    body = header("././@PaxHeader", tarfile.XHDTYPE, len(records)) + records
    path = tmp_path / "layer.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(body)
    p = cli("create", path, tmp_path / "l.cim", "--format", "windows-layer", check=False)
    assert "limit is 1048576" in one_line_error(p)
    src = EndlessTar(body[:512])
    with pytest.raises(CimError, match="limit is 1048576"):
        winlayer.import_layer(io.BufferedReader(src), str(tmp_path), "l.cim")
    assert src.consumed < 1 << 20
    assert sorted(os.listdir(tmp_path)) == ["layer.tar.gz"]


# ------------------------------------------------------------------ POSIX tars
def _posix_tar(path, body: bytes, compress=False):
    import gzip

    data = body + bytes(1024)
    if compress:
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_posix_tar_with_a_huge_pax_header_is_refused_early(tmp_path):
    records = pax_record("comment", b"A" * (64 << 20))
    _posix_tar(tmp_path / "t.tar.gz", header("././@PaxHeader", tarfile.XHDTYPE, len(records)) + records, True)
    p = cli("create", tmp_path / "t.tar.gz", tmp_path / "i.cim", check=False)
    assert "limit is 1048576" in one_line_error(p)
    assert sorted(os.listdir(tmp_path)) == ["t.tar.gz"]
    from cimfs import posix

    with pytest.raises(CimError, match="limit is 1048576"):
        posix.open_tar(str(tmp_path / "t.tar.gz"))


@pytest.mark.parametrize("sparse_map", [b"x\n", b"2\n1\n", b""])
def test_posix_tar_with_a_broken_sparse_map_is_one_line(tmp_path, sparse_map):
    pax = pax_member(
        pax_record("GNU.sparse.major", b"1")
        + pax_record("GNU.sparse.minor", b"0")
        + pax_record("GNU.sparse.name", b"s")
        + pax_record("GNU.sparse.realsize", b"10")
    )
    _posix_tar(tmp_path / "t.tar", pax + header("s", tarfile.REGTYPE, 512) + sparse_map + bytes(512 - len(sparse_map)))
    p = cli("create", tmp_path / "t.tar", tmp_path / "i.cim", check=False)
    assert "malformed header" in one_line_error(p)
    assert sorted(os.listdir(tmp_path)) == ["t.tar"]
    # also when the broken member is not the first one
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("first"))
    good = b.getvalue()[:512]
    _posix_tar(
        tmp_path / "t.tar", good + pax + header("s", tarfile.REGTYPE, 512) + sparse_map + bytes(512 - len(sparse_map))
    )
    p = cli("create", tmp_path / "t.tar", tmp_path / "i.cim", check=False)
    assert "malformed" in one_line_error(p)


def test_posix_tar_symlink_target_with_nul_names_the_member(tmp_path):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("dir/evil")
        ti.type = tarfile.SYMTYPE
        ti.pax_headers = {"linkpath": "target\0../../etc"}
        tf.addfile(ti)
    (tmp_path / "t.tar").write_bytes(b.getvalue())
    p = cli("create", tmp_path / "t.tar", tmp_path / "i.cim", check=False)
    err = one_line_error(p)
    assert "NUL" in err and "dir/evil" in err
    assert sorted(os.listdir(tmp_path)) == ["t.tar"]


# ------------------------------------------------------------------ fork --add over another kind
@pytest.fixture
def base_image(tmp_path):
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"file f")
    (src / "d" / "sub" / "keep").write_bytes(b"keep")
    cli("create", src, tmp_path / "b.cim")
    (tmp_path / "g").write_bytes(b"g data")
    (tmp_path / "adddir" / "f").mkdir(parents=True)  # adddir/f is a directory, d/f a file
    (tmp_path / "adddir" / "f" / "x").write_bytes(b"x")
    return tmp_path


def _tree(path) -> dict:
    with cimfs.open(path) as img:
        out = {}
        for dirpath, dirs, files in img.walk():
            dirpath = dirpath.replace("\\", "/")
            for n in dirs:
                out[f"{dirpath}/{n}".strip("/")] = "dir"
            for n in files:
                out[f"{dirpath}/{n}".strip("/")] = img.read_bytes(f"{dirpath}/{n}")
        return out


@pytest.mark.parametrize("spec", ["g:/d/f/g", "g:/d/f/deeper/g", "g:/d/sub", "adddir:/d"])
def test_fork_add_never_changes_an_entrys_kind_unless_asked(base_image, spec):
    d = base_image
    src, _, dest = spec.partition(":")
    p = cli("fork", d / "b.cim", d / "c.cim", "--add", f"{d / src}:{dest}", check=False)
    err = one_line_error(p)
    assert "--replace" in err and ("d/f" in err or "d/sub" in err)
    assert not (d / "c.cim").exists()
    before = _tree(d / "b.cim")
    cli("fork", d / "b.cim", d / "c.cim", "--add", f"{d / src}:{dest}", "--replace")
    after = _tree(d / "c.cim")
    assert after != before
    if spec.startswith("g:/d/f"):
        assert after[dest.lstrip("/")] == b"g data" and after["d/f"] == "dir"
    elif spec == "g:/d/sub":
        assert after["d/sub"] == b"g data" and "d/sub/keep" not in after
    else:
        assert after["d/f"] == "dir" and after["d/f/x"] == b"x" and after["d/sub/keep"] == b"keep"


def test_fork_add_same_kind_replaces_without_asking(base_image):
    d = base_image
    cli("fork", d / "b.cim", d / "c.cim", "--add", f"{d / 'g'}:/d/f")
    assert _tree(d / "c.cim")["d/f"] == b"g data"
    # and deleting first makes room for another kind
    cli("fork", d / "b.cim", d / "e.cim", "--delete", "/d/f", "--add", f"{d / 'g'}:/d/f/g")
    assert _tree(d / "e.cim")["d/f/g"] == b"g data"


def test_docker_archive_headers_are_bounded_too(tmp_path):
    from cimfs.oci.sources import DockerArchive

    records = pax_record("comment", b"A" * (2 << 20))
    (tmp_path / "a.tar").write_bytes(
        header("././@PaxHeader", tarfile.XHDTYPE, len(records))
        + records
        + bytes(-len(records) % 512)
        + header("manifest.json", tarfile.REGTYPE, 0)
        + bytes(1024)
    )
    with pytest.raises(CimError, match="limit is 1048576"):
        DockerArchive(str(tmp_path / "a.tar"))
    pax = pax_member(
        pax_record("GNU.sparse.major", b"1")
        + pax_record("GNU.sparse.minor", b"0")
        + pax_record("GNU.sparse.name", b"s")
        + pax_record("GNU.sparse.realsize", b"10")
    )
    (tmp_path / "b.tar").write_bytes(pax + header("s", tarfile.REGTYPE, 512) + b"x\n" + bytes(510) + bytes(1024))
    with pytest.raises(CimError, match="malformed header"):
        DockerArchive(str(tmp_path / "b.tar"))
