"""Write images with the Pythonic API and read every property back."""

import hashlib
import os
import random

import pytest

import cimfs
from cimfs import CimError, FileMetadata, errors
from cimfs import FileAttributes as A

SD = bytes.fromhex(
    "010004801400000024000000000000003000000001010000000000051200000001010000000000051200000002001c00"
    "0100000000001400ff011f00010100000000000512000000"
)
SD2 = SD[:-1] + b"\x20"
# An EA chain: "USER.COMMENT"="vector" then "$LXMOD"=0o100644 (FILE_FULL_EA_INFORMATION)
EA = bytes.fromhex("1c000000000c0600555345522e434f4d4d454e5400766563746f72000000000000060400244c584d4f4400a4810000")
SYMLINK = bytes.fromhex(
    "0c0000a030000000000012001200120001000000680065006c006c006f002e00740078007400680065006c006c006f002e00740078007400"
)


def build(tmp_path, name="t.cim", base=None, **kw):
    return cimfs.create(tmp_path, name, base=base, **kw)


def test_every_metadata_kind_round_trips(tmp_path):
    meta = FileMetadata(
        attributes=A.READONLY | A.HIDDEN | A.SYSTEM | A.ARCHIVE,
        creation_time=132000000000000001,
        last_write_time=132000000000000002,
        change_time=132000000000000003,
        last_access_time=132000000000000004,
        security_descriptor=SD,
        ea_buffer=EA,
    )
    with build(tmp_path) as w:
        w.mkdir("d", FileMetadata(attributes=A.DIRECTORY | A.HIDDEN, creation_time=9, security_descriptor=SD2))
        w.add_file("d/f.txt", b"payload", meta)
        w.add_file("link", b"", FileMetadata(attributes=A.ARCHIVE, reparse_data=SYMLINK))
        w.add_file("plain", b"x")
        w.add_stream("d/f.txt:Zone.Identifier", b"[ZoneTransfer]\r\nZoneId=3\r\n")
        w.add_stream("d/f.txt:empty", b"")
        w.add_stream("d:dirstream", b"on a directory")
    with cimfs.open(tmp_path / "t.cim") as im:
        st = im.stat("d\\f.txt")
        assert st.attributes == A.READONLY | A.HIDDEN | A.SYSTEM | A.ARCHIVE
        assert (st.creation_time, st.last_write_time, st.change_time, st.last_access_time) == (
            132000000000000001,
            132000000000000002,
            132000000000000003,
            132000000000000004,
        )
        assert st.security_descriptor == SD and st.ea_buffer == EA and st.size == 7
        assert im.read_bytes("/d/f.txt") == b"payload"
        assert im.streams("d/f.txt") == ["empty", "Zone.Identifier"]
        assert im.read_bytes("d/f.txt:Zone.Identifier") == b"[ZoneTransfer]\r\nZoneId=3\r\n"
        assert im.read_bytes("d/f.txt:zone.identifier") == b"[ZoneTransfer]\r\nZoneId=3\r\n"
        assert im.read_bytes("d/f.txt", stream="empty") == b""
        assert im.read_bytes("d:dirstream") == b"on a directory"
        d = im.stat("d")
        assert (
            d.is_dir
            and d.attributes == A.DIRECTORY | A.HIDDEN
            and d.security_descriptor == SD2
            and d.creation_time == 9
        )
        lk = im.stat("link")
        assert lk.reparse_tag == 0xA000000C and lk.reparse_data == SYMLINK
        assert lk.attributes == A.ARCHIVE | A.REPARSE_POINT
        assert im.stat("plain").attributes == A.NORMAL
        assert im.stat("").is_dir and im.stat("").attributes == A.DIRECTORY


def test_identical_contents_and_descriptors_stored_once(tmp_path):
    blob = os.urandom(200_000)
    small = b"small and repeated"
    with build(tmp_path) as w:
        for i in range(10):
            w.add_file(f"big{i}", blob, FileMetadata(security_descriptor=SD))
            w.add_file(f"small{i}", small, FileMetadata(security_descriptor=SD))
        w.add_stream("big0:copy", blob)
        stats = w.stats()
    total = sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n.startswith("region_"))
    assert total < len(blob) + 300_000  # one copy of the blob, plus upcase table and tables
    assert stats["bytes_logical"] >= 11 * len(blob)
    with cimfs.open(tmp_path / "t.cim") as im:
        ids = {im.record(im.lookup(f"big{i}")).stream.offset for i in range(10)}
        assert len(ids) == 1
        assert {im.record(im.lookup(f"small{i}")).security_descriptor_offset for i in range(10)} == {
            im.record(im.lookup("big0")).security_descriptor_offset
        }
        assert im.read_bytes("big7") == blob and im.read_bytes("big0:copy") == blob


def test_partly_written_empty_and_sparse_files(tmp_path):
    with build(tmp_path) as w:
        w.add_file("empty", b"")
        with w.create_file("partial-small", FileMetadata(file_size=1000)) as s:
            s.write(b"abc")
        with w.create_file("partial-big", FileMetadata(file_size=3_000_000)) as s:
            s.write(b"A" * 100_000)
            s.write(bytes(1_000_000))  # a zero run: kept as a hole in the region file
            s.write(b"B" * 10)
        w.create_file("sparse5g", FileMetadata(file_size=5 << 30, attributes=A.SPARSE_FILE)).close()
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.read_bytes("empty") == b"" and im.stat("empty").size == 0
        assert im.read_bytes("partial-small") == b"abc" + bytes(997)
        data = im.read_bytes("partial-big")
        assert len(data) == 3_000_000
        assert data == b"A" * 100_000 + bytes(1_000_000) + b"B" * 10 + bytes(3_000_000 - 1_100_010)
        st = im.stat("sparse5g")
        assert st.size == 5 << 30 and st.is_sparse and st.attributes & A.SPARSE_FILE
        with im.open("sparse5g") as f:
            f.seek((5 << 30) - 10)
            assert f.read() == bytes(10)
            f.seek(1 << 32)
            assert f.read(4096) == bytes(4096)
    # the zero run and the 5 GiB of zeros take no space on disk
    used = sum(os.stat(tmp_path / n).st_blocks * 512 for n in os.listdir(tmp_path))
    assert used < 4_000_000


def test_writes_past_the_size_fail(tmp_path):
    with build(tmp_path) as w:
        with w.create_file("f", FileMetadata(file_size=4)) as s:
            s.write(b"abcd")
            with pytest.raises(CimError) as e:
                s.write(b"e")
            assert e.value.hresult == errors.E_INVALIDARG
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.read_bytes("f") == b"abcd"


def test_non_bmp_names_and_case_insensitive_collisions(tmp_path):
    names = ["Ünïcödé 日本 😀.txt", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "straße", "ΣΊΣΥΦΟΣ", "a"]
    with build(tmp_path) as w:
        for n in names:
            w.add_file(n, n.encode())
        w.add_file("README", b"first")
        w.add_file("readme", b"second")  # same name case-insensitively: overwrites
        w.add_file("ünïcödé 日本 😀.TXT", b"replaced")
    with cimfs.open(tmp_path / "t.cim") as im:
        listing = im.listdir()
        assert len(listing) == len(names) + 1
        assert "readme" in listing and "README" not in listing
        assert im.read_bytes("README") == b"second"
        assert im.read_bytes("ÜNÏCÖDÉ 日本 😀.txt") == b"replaced"
        assert im.read_bytes("𝔘𝔫𝔦𝔠𝔬𝔡𝔢") == "𝔘𝔫𝔦𝔠𝔬𝔡𝔢".encode()
        assert im.read_bytes("σίσυφος".upper()) == "ΣΊΣΥΦΟΣ".encode()
        # stored in the image's case-insensitive order
        keys = [im.fold(n) for n in listing]
        assert keys == sorted(keys)


def test_directory_of_ten_thousand_entries(tmp_path):
    rng = random.Random(7)
    names = [f"file-{i:05d}-{rng.randrange(10**6)}" for i in range(10_000)]
    with build(tmp_path) as w:
        w.mkdir("big")
        for n in names:
            w.add_file(f"big/{n}", n.encode())
    with cimfs.open(tmp_path / "t.cim") as im:
        assert sorted(im.listdir("big")) == sorted(names)
        for n in rng.sample(names, 200):
            assert im.read_bytes(f"BIG\\{n.upper()}") == n.encode()
        assert len(im.file_tables) == 10  # 10 002 records over 1024-record tables


def test_hard_links(tmp_path):
    with build(tmp_path) as w:
        w.mkdir("a")
        w.mkdir("b")
        w.add_file("a/f", b"shared", FileMetadata(security_descriptor=SD, ea_buffer=EA))
        w.link("b/g", "a/f")
        w.link("h", "a/f")
        w.link("x", "a/f")
        w.delete("x")  # removes one link only
        with pytest.raises(CimError) as e:
            w.link("h", "plain-missing")
        assert e.value.hresult == errors.ERROR_FILE_NOT_FOUND
        with pytest.raises(CimError) as e:
            w.link("a/f", "h")  # same file: nothing to do
            w.link("b", "h")
        assert e.value.hresult == errors.ERROR_ALREADY_EXISTS
        with pytest.raises(CimError) as e:
            w.link("y", "a")
        assert e.value.hresult == errors.E_ACCESSDENIED
    with cimfs.open(tmp_path / "t.cim") as im:
        ids = {im.stat(p).file_id for p in ("a/f", "b/g", "h")}
        assert len(ids) == 1
        assert im.stat("h").nlink == 3 and im.read_bytes("b/g") == b"shared"
        assert im.nlink("h") == 3 and im.nlink(im.lookup("b/g")) == 3 and im.nlink("b") == 1 and im.nlink("") == 1
        assert not im.exists("x")
    with cimfs.open(tmp_path / "t.cim") as im:  # links=False: the rest of the stat, no count (and no walk)
        quick = im.stat("h", links=False)
        assert quick.nlink == 0 and im._nlinks is None
        assert quick._replace(nlink=3) == im.stat("h")
        assert im.ea_buffer("h") == EA and im.ea_buffer("b") == b""
        ids = [e.file_id for e in im.scandir("")] + [im.lookup("a/f")]
        assert im.records(ids) == [im.record(i) for i in ids]
        for bad in (0, -5, im.max_file_id() + 1, 1 << 40, "7"):
            with pytest.raises(errors.CimFormatError):
                im.records(ids + [bad])


def test_walk_like_os_walk(tmp_path):
    src = {"a/b/c.txt": b"1", "a/d.txt": b"2", "e.txt": b"3", "a/b/f/g.txt": b"4"}
    with build(tmp_path) as w:
        for p, data in src.items():
            w.mkdir(os.path.dirname(p), parents=True, exist_ok=True)
            w.add_file(p, data)
        w.mkdir("empty")
    with cimfs.open(tmp_path / "t.cim") as im:
        got = {(d, tuple(ds), tuple(fs)) for d, ds, fs in im.walk()}
        assert got == {
            ("", ("a", "empty"), ("e.txt",)),
            ("a", ("b",), ("d.txt",)),
            ("a\\b", ("f",), ("c.txt",)),
            ("a\\b\\f", (), ("g.txt",)),
            ("empty", (), ()),
        }
        assert [d for d, _, _ in im.walk("a/b")] == ["a\\b", "a\\b\\f"]


def test_file_objects_seek_and_read(tmp_path):
    data = os.urandom(100_000)
    with build(tmp_path) as w:
        w.add_file("f", data)
    with cimfs.open(tmp_path / "t.cim") as im:
        with im.open("f") as f:
            assert f.seekable() and f.readable()
            f.seek(-10, os.SEEK_END)
            assert f.read() == data[-10:]
            f.seek(500)
            buf = bytearray(1000)
            assert f.readinto(buf) == 1000 and bytes(buf) == data[500:1500]
            assert f.tell() == 1500
        import io

        assert io.BufferedReader(im.open("f")).read() == data


def test_add_file_from_file_object(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    with build(tmp_path, "x.cim") as w:
        with open(src, "rb") as f:
            w.add_file("copy", f)
        import io

        w.add_file("from-bytesio", io.BytesIO(b"hello"))
    with cimfs.open(tmp_path / "x.cim") as im:
        assert hashlib.sha256(im.read_bytes("copy")).digest() == hashlib.sha256(data).digest()
        assert im.read_bytes("from-bytesio") == b"hello"


def test_exception_discards_everything(tmp_path):
    with pytest.raises(RuntimeError):
        with build(tmp_path) as w:
            w.add_file("f", os.urandom(100_000))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_overwrite_rules(tmp_path):
    with build(tmp_path) as w:
        w.mkdir("d")
        w.add_file("d/x", b"1")
        w.add_file("f", b"old")
        w.add_file("f", b"new")  # an existing path is overwritten
        with pytest.raises(CimError) as e:
            w.add_file("d", b"file over non-empty dir")
        assert e.value.hresult == errors.ERROR_DIR_NOT_EMPTY
        w.mkdir("e")
        w.add_file("e", b"file over empty dir")
        w.create_file("d", FileMetadata(attributes=A.DIRECTORY, creation_time=42)).close()  # keeps children
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.read_bytes("f") == b"new"
        assert im.read_bytes("e") == b"file over empty dir"
        assert im.stat("d").creation_time == 42 and im.listdir("d") == ["x"]


def test_delete_rules(tmp_path):
    with build(tmp_path) as w:
        w.mkdir("d/e", parents=True)
        w.add_file("d/e/f", b"1")
        w.add_file("g", b"2")
        w.add_stream("g:s", b"3")
        w.delete("d")  # with its contents
        w.delete("g:s")
        for bad, code in (
            ("missing", errors.ERROR_FILE_NOT_FOUND),
            ("g:nostream", errors.ERROR_FILE_NOT_FOUND),
            ("d/e/f", errors.ERROR_PATH_NOT_FOUND),
            ("", errors.E_INVALIDARG),
        ):
            with pytest.raises(CimError) as e:
                w.delete(bad)
            assert e.value.hresult == code, bad
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.listdir() == ["g"] and im.streams("g") == []


@pytest.mark.parametrize(
    "bad", ["a/../b", ".", "x/./y", "a\0b", "a\x1fb", "a*b", "a?b", 'a"b', "a<b", "a>b", "a|b", "n" * 256, "a:b"]
)
def test_invalid_names(tmp_path, bad):
    with build(tmp_path) as w:
        with pytest.raises(CimError) as e:
            w.add_file(bad, b"x")
        assert e.value.hresult == errors.ERROR_INVALID_NAME
        assert bad[:20] in str(e.value) or "path" in str(e.value)


def test_long_names_and_paths(tmp_path):
    n255 = "n" * 255
    with build(tmp_path) as w:
        w.add_file(n255, b"ok")
        w.add_file("😀" * 127, b"254 units")
        with pytest.raises(CimError):
            w.add_file("😀" * 128, b"256 units")
        with pytest.raises(CimError) as e:
            w.add_file("/".join(["d" * 200] * 170), b"")
        assert e.value.hresult == errors.ERROR_INVALID_NAME
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.read_bytes(n255.upper()) == b"ok"


def test_lookup_errors(tmp_path):
    with build(tmp_path) as w:
        w.add_file("f", b"x")
    with cimfs.open(tmp_path / "t.cim") as im:
        with pytest.raises(CimError) as e:
            im.stat("nope")
        assert e.value.hresult == errors.ERROR_FILE_NOT_FOUND and "nope" in str(e.value)
        with pytest.raises(CimError) as e:
            im.stat("nope/deeper")
        assert e.value.hresult == errors.ERROR_PATH_NOT_FOUND
        with pytest.raises(CimError) as e:
            im.listdir("f")
        assert e.value.hresult == errors.ERROR_PATH_NOT_FOUND
        assert not im.exists("f:stream") and im.exists("F") and not im.exists("f/x")
    with pytest.raises(CimError) as e:
        cimfs.open(tmp_path / "missing.cim")
    assert e.value.hresult == errors.ERROR_FILE_NOT_FOUND


def test_check_reports_structural_damage(tmp_path):
    with build(tmp_path) as w:
        w.mkdir("d")
        for i in range(50):
            w.add_file(f"d/f{i}", os.urandom(100 + i))
    with cimfs.open(tmp_path / "t.cim") as im:
        assert im.check() == []
        oid_name = im.region_names[-1][0].replace("region", "objectid")
    # push the last object ID entry's offset past its region file
    p = tmp_path / oid_name
    data = bytearray(p.read_bytes())
    data[-8:] = (1 << 40).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    with cimfs.open(tmp_path / "t.cim") as im:
        findings = im.check()
        assert any("lies outside" in f for f in findings), findings


def test_large_files_from_real_files_copied_in_background(tmp_path):
    """add_file() of regular files goes through the writer's data thread: the
    contents, dedup and errors must be exactly as for the synchronous path."""
    srcs = []
    blobs = [os.urandom(100_000 + i * 5000) for i in range(6)] + [bytes(1 << 20)]
    for i, b in enumerate(blobs + blobs[:2]):  # the last two duplicate the first two
        p = tmp_path / f"src{i}"
        p.write_bytes(b)
        srcs.append(p)
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "t.cim") as w:
        for i, p in enumerate(srcs):
            with open(p, "rb") as f:
                w.add_file(f"f{i}", f)
        with w.create_file("sync", FileMetadata(file_size=200_000)) as s:  # a synchronous large write in between
            s.write(blobs[3][:200_000] if len(blobs[3]) >= 200_000 else blobs[3] + bytes(200_000 - len(blobs[3])))
    with cimfs.open(tmp_path / "img" / "t.cim") as im:
        for i, p in enumerate(srcs):
            assert im.read_bytes(f"f{i}") == p.read_bytes()
        assert im.record(im.lookup("f7")).stream.offset == im.record(im.lookup("f0")).stream.offset
    stored = sum(os.path.getsize(tmp_path / "img" / n) for n in os.listdir(tmp_path / "img") if n.startswith("region_"))
    assert stored < sum(len(b) for b in blobs) + 600_000
    # a source that shrinks under the writer fails the image, and nothing is left
    (tmp_path / "img2").mkdir()
    shrinking = tmp_path / "shrinking"
    shrinking.write_bytes(os.urandom(500_000))
    with pytest.raises(CimError) as e:
        with cimfs.create(tmp_path / "img2", "t.cim") as w:
            with open(shrinking, "rb") as f:
                w.add_file("f", f, FileMetadata(file_size=600_000))
    assert "shrink" in str(e.value) or "ended" in str(e.value)
    assert os.listdir(tmp_path / "img2") == []


@pytest.mark.parametrize("data_process", [True, False])
def test_local_files_added_by_path(tmp_path, data_process):
    """add_file(path, os.PathLike): copied by the forked data process (or in
    this process): same contents, dedup across small and large files and with
    contents added from bytes, sparse large files stay holes."""
    import multiprocessing
    import pathlib

    src = tmp_path / "src"
    src.mkdir()
    blobs = {f"s{i}": os.urandom(i * 1500) for i in range(1, 30)}
    blobs |= {f"L{i}": os.urandom(40_000 + i * 70_000) for i in range(5)}
    blobs["zeros"] = bytes(3 << 20)
    blobs["huge"] = os.urandom(2_500_000)  # copied in pieces, hashed as it goes
    blobs["dup-small"], blobs["dup-large"], blobs["dup-huge"] = blobs["s7"], blobs["L3"], blobs["huge"]
    for name, b in blobs.items():
        (src / name).write_bytes(b)
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "t.cim", data_process=data_process) as w:
        w.add_file("from-bytes", blobs["s5"])
        w.mkdir("d")
        for name in blobs:
            w.add_file(f"d/{name}" if name.startswith("L") else name, src / name)
        w.add_file("sized", pathlib.Path(src / "L1"), FileMetadata(file_size=1000))  # the first 1000 bytes
        if data_process:
            assert multiprocessing.active_children(), "the data process should be running"
    assert not multiprocessing.active_children()
    with cimfs.open(tmp_path / "img" / "t.cim") as im:
        for name, b in blobs.items():
            assert im.read_bytes(f"d/{name}" if name.startswith("L") else name) == b, name
        assert im.read_bytes("sized") == blobs["L1"][:1000]
        offset = lambda p: im.record(im.lookup(p)).stream.offset
        assert offset("dup-small") == offset("s7") and offset("dup-large") == offset("d/L3")
        assert offset("dup-huge") == offset("huge")
        assert im.check() == []
    from cimfs.layout import cim

    names = os.listdir(tmp_path / "img")
    contents = [
        tmp_path / "img" / n
        for n in names
        if n.startswith("region_")
        and cim.unpack_region_header((tmp_path / "img" / n).read_bytes()[:64], n)[1] != cim.REGION_METADATA
    ]
    stored = sum(os.path.getsize(p) for p in contents)
    blocks = sum(os.stat(p).st_blocks * 512 for p in contents)
    unique = sum(len(b) for k, b in blobs.items() if not k.startswith("dup")) + 1000
    slack = 4096 * (len(blobs) + 2)  # 4 KiB alignment of data-region objects, region headers
    assert unique <= stored < unique + slack  # each content once (from bytes, small, large)
    assert blocks < unique - (2 << 20)  # the zeros are holes
    assert sum(n.startswith("objectid_") for n in names) == sum(n.startswith("region_") for n in names)


@pytest.mark.parametrize(
    "size", [3_000_000, 200_000, 2_000]
)  # a large file copied in pieces, one read whole, a small one
@pytest.mark.parametrize("data_process", [True, False])
def test_local_file_that_changes_fails_the_image(tmp_path, data_process, size):
    """A source that vanishes, shrinks or becomes a FIFO before it is copied:
    a CimError naming the image path, no hang, and nothing left behind."""
    import multiprocessing

    if not data_process and size <= 32 * 1024:
        pytest.skip("without a data process a small file is read during add_file, before it changes")
    (tmp_path / "img").mkdir()
    for trouble in ("vanish", "shrink", "fifo"):
        victim = tmp_path / f"victim-{trouble}"
        victim.write_bytes(os.urandom(size))
        with pytest.raises(CimError) as e:
            with cimfs.create(tmp_path / "img", "t.cim", data_process=data_process) as w:
                w.mkdir("dir")
                w.add_file("dir/victim", victim)
                victim.unlink()
                if trouble == "shrink":
                    victim.write_bytes(b"short")
                elif trouble == "fifo":
                    os.mkfifo(victim)
                w.add_file("after", b"x")
        assert "dir/victim" in str(e.value) or "dir\\victim" in str(e.value), str(e.value)
        assert os.listdir(tmp_path / "img") == [], trouble
        assert not multiprocessing.active_children()
        victim.unlink(missing_ok=True)


def test_data_process_dedups_against_the_parent_and_is_killed_on_error(tmp_path):
    import multiprocessing

    src = tmp_path / "f"
    src.write_bytes(os.urandom(300_000))
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "base.cim") as w:
        w.add_file("f", src.read_bytes())
    before = set(os.listdir(tmp_path / "img"))
    with cimfs.create(tmp_path / "img", "fork.cim", base="base.cim") as w:
        w.add_file("g", src)
    new = set(os.listdir(tmp_path / "img")) - before - {"fork.cim"}
    assert sum(os.path.getsize(tmp_path / "img" / n) for n in new if n.startswith("region_")) < 100_000
    with cimfs.open(tmp_path / "img" / "fork.cim") as im:
        assert im.read_bytes("g") == src.read_bytes()
        assert im.record(im.lookup("g")).stream.offset == im.record(im.lookup("f")).stream.offset
    with pytest.raises(RuntimeError):
        with cimfs.create(tmp_path / "img", "gone.cim") as w:
            w.add_file("g", src)
            raise RuntimeError("the caller fails")
    assert set(os.listdir(tmp_path / "img")) == before | {"fork.cim"} | new
    assert not multiprocessing.active_children()


def test_copy_stream_to_file_and_pipe(tmp_path):
    data = os.urandom(3_000_001)
    with build(tmp_path) as w:
        w.add_file("f", data)
        w.add_stream("f:ads", b"side" * 1000)
        w.add_file("empty", b"")
        w.create_file("sparse", FileMetadata(file_size=10 << 20, attributes=A.SPARSE_FILE)).close()
    with cimfs.open(tmp_path / "t.cim") as im:
        out = tmp_path / "out.bin"
        for path, stream, expect in [
            ("f", None, data),
            ("f", "ads", b"side" * 1000),
            ("empty", None, b""),
            ("sparse", None, bytes(10 << 20)),
        ]:
            seen = []
            with open(out, "wb") as f:
                f.write(b"head")  # copies land at the current position
                f.flush()
                assert im.copy_stream(path, f.fileno(), stream, progress=seen.append) == len(expect)
            assert out.read_bytes() == b"head" + expect
            assert sum(seen) == len(expect)
        # copy_file_range refuses an O_APPEND target and a pipe: both fall back to read/write
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_TRUNC)
        try:
            assert im.copy_stream("f", fd) == len(data)
        finally:
            os.close(fd)
        assert out.read_bytes() == data
        r, wfd = os.pipe()
        got = bytearray()
        import threading

        t = threading.Thread(target=lambda: got.extend(b"".join(iter(lambda: os.read(r, 1 << 16), b""))))
        t.start()
        try:
            assert im.copy_stream("f:ads", wfd) == 4000
        finally:
            os.close(wfd)
        t.join()
        os.close(r)
        assert bytes(got) == b"side" * 1000
        with pytest.raises(CimError) as e:
            im.copy_stream("missing", fd)
        assert e.value.hresult == errors.ERROR_FILE_NOT_FOUND


def test_readinto_at_fills_buffers_from_cache_or_disk(tmp_path):
    data = os.urandom(2_000_000)
    with build(tmp_path) as w:
        w.add_file("f", data)
        w.create_file("sparse", FileMetadata(file_size=1 << 20, attributes=A.SPARSE_FILE)).close()
    with cimfs.open(tmp_path / "t.cim") as im:
        buf = bytearray(100_000)
        assert im.readinto_at("f", 5, buf) == len(buf) and bytes(buf) == data[5:100_005]
        assert im.readinto_at("f", len(data) - 10, buf) == 10 and bytes(buf[:10]) == data[-10:]
        assert im.readinto_at("f", len(data), buf) == 0
        buf[:] = b"x" * len(buf)
        assert im.readinto_at("sparse", 7, buf) == len(buf) and bytes(buf) == bytes(len(buf))
        # evicted from the page cache, a no-wait read returns what is cached (maybe nothing)
        for name in os.listdir(tmp_path):
            if name.startswith("region_"):
                fd = os.open(tmp_path / name, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        n = im.readinto_at("f", 1_000_000, buf, nowait=True)
        assert 0 <= n <= len(buf) and bytes(buf[:n]) == data[1_000_000 : 1_000_000 + n]
        assert im.readinto_at("f", 1_000_000, buf) == len(buf) and bytes(buf) == data[1_000_000:1_100_000]
        assert im.readinto_at("f", 1_000_000, buf, nowait=True) == len(buf)  # now cached


def test_regions_written_back_early_read_back_exactly(tmp_path):
    """Past 8 MiB a region starts its writeback while it grows (the final
    fsync then waits for less); contents must be untouched by it, also when
    a duplicate gives back the tail it had reserved."""
    from cimfs import store

    assert store.writeback_starter() is not None  # Linux: sync_file_range is there
    big = os.urandom(9 << 20)
    src = tmp_path / "big"
    src.write_bytes(big)
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "t.cim") as w:
        w.add_file("a", src)
        w.add_file("b", big)  # a duplicate, from bytes: reserved, written, given back
        w.add_file("c", big[::-1])
        smalls = [os.urandom(30_000) for _ in range(300)]  # a small-data region past the step
        for i, b in enumerate(smalls):
            w.add_file(f"s{i}", b)
    with cimfs.open(tmp_path / "img" / "t.cim") as im:
        assert im.read_bytes("a") == big == im.read_bytes("b")
        assert im.read_bytes("c") == big[::-1]
        assert all(im.read_bytes(f"s{i}") == b for i, b in enumerate(smalls))


def test_a_data_process_killed_fails_the_image_cleanly(tmp_path):
    """A data process that dies (the OOM killer, a signal) fails the image
    with a CimError naming what happened; nothing is left in the directory."""
    import multiprocessing
    import signal as sig

    src = tmp_path / "f"
    src.write_bytes(os.urandom(100_000))
    (tmp_path / "img").mkdir()
    with pytest.raises(CimError) as e:
        with cimfs.create(tmp_path / "img", "t.cim") as w:
            w.add_file("a", src)
            worker = w._process._workers[-1]  # white box: the worker large files go to
            os.kill(worker.proc.pid, sig.SIGKILL)
            worker.proc.join()
            for i in range(600):  # more files after the death: hand-overs must not raise a bare OSError
                w.add_file(f"b{i}", src)
    assert "data process" in str(e.value) and "-9" in str(e.value)
    assert os.listdir(tmp_path / "img") == []
    assert not multiprocessing.active_children()


def test_relative_source_paths_survive_a_chdir(tmp_path, monkeypatch):
    """A relative path is the caller's current directory's at add_file time,
    even though the data process opens it later."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"from a" * 10_000)
    (tmp_path / "b" / "f").write_bytes(b"from b" * 10_000)
    (tmp_path / "img").mkdir()
    import pathlib

    monkeypatch.chdir(tmp_path / "a")
    with cimfs.create(tmp_path / "img", "t.cim") as w:
        w.add_file("x", pathlib.Path("f"))
        w.add_file("y", pathlib.Path("f"))  # after the data process started
        os.chdir(tmp_path / "b")
        w.add_file("z", pathlib.Path("f"))
    with cimfs.open(tmp_path / "img" / "t.cim") as im:
        assert im.read_bytes("x") == im.read_bytes("y") == b"from a" * 10_000
        assert im.read_bytes("z") == b"from b" * 10_000


@pytest.mark.parametrize("data_process", [True, False])
def test_add_local_files_is_add_file_for_a_whole_directory(tmp_path, monkeypatch, data_process):
    """add_local_files(dir, [(name, source, metadata)]) gives what add_file
    per file gives: contents, metadata, replacement of an existing name,
    a relative source taken from the cwd of the call, errors naming the path."""
    src = tmp_path / "src"
    src.mkdir()
    blobs = {"a.txt": b"alpha", "big.bin": os.urandom(100_000), "same.bin": b"alpha", "rel": b"relative"}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    meta = {n: FileMetadata(file_size=len(d), last_write_time=10**17 + i) for i, (n, d) in enumerate(blobs.items())}
    (tmp_path / "img").mkdir()
    monkeypatch.chdir(src)
    with cimfs.create(tmp_path / "img", "t.cim", data_process=data_process) as w:
        w.mkdir("d")
        w.add_file("d\\A.TXT", b"to be replaced")
        w.add_local_files("d", [(n, str(src / n) if n != "rel" else "rel", meta[n]) for n in blobs])
        w.add_local_files("d", [])
        assert (w._process is not None) == data_process  # the short path (data process) or the checked one
        monkeypatch.chdir(tmp_path)  # the relative source was resolved at the call
        with pytest.raises(CimError) as e:
            w.add_local_files("nowhere", [("x", str(src / "a.txt"), meta["a.txt"])])
        assert e.value.hresult == errors.ERROR_PATH_NOT_FOUND
        with pytest.raises(CimError) as e:
            w.add_local_files("d", [("bad:name", str(src / "a.txt"), meta["a.txt"])])
        assert e.value.hresult == errors.ERROR_INVALID_NAME and "bad:name" in str(e.value)
    with cimfs.open(tmp_path / "img" / "t.cim") as im:
        assert sorted(e.name for e in im.scandir("d")) == sorted(blobs)  # "A.TXT" replaced by "a.txt"
        for name, data in blobs.items():
            assert im.read_bytes(f"d\\{name}") == data
            assert im.stat(f"d\\{name}").last_write_time == meta[name].last_write_time
        assert im.record(im.lookup("d\\a.txt")).stream.offset == im.record(im.lookup("d\\same.bin")).stream.offset


@pytest.mark.parametrize("data_process", [True, False])
def test_add_scanned_files_is_add_local_files(tmp_path, monkeypatch, data_process):
    """add_scanned_files(dir, [(name, key, source, size, write, change,
    access time, EA)]) gives the image add_local_files gives for the same
    files: contents, times (creation = last write), the EA, an empty file,
    a name already there replaced, a relative source taken at the call, and
    a time out of range refused naming the image path."""
    from cimfs.names import fold_name
    from cimfs.posix.lx import _lx_ea_buffer

    src = tmp_path / "src"
    src.mkdir()
    blobs = {"a.txt": b"alpha", "big.bin": os.urandom(100_000), "same.bin": b"alpha", "empty": b"", "rel": b"rel"}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    ea = _lx_ea_buffer(0o100640, 1000, 1000, None)  # WSL's $LX* EAs of a plain file

    def entry(i, n):
        return (
            n,
            fold_name(n),
            str(src / n) if n != "rel" else "rel",
            len(blobs[n]),
            10**17 + i,
            10**17 + 100 + i,
            10**17 + 200 + i,
            ea,
        )

    entries = [entry(i, n) for i, n in enumerate(blobs)]
    (tmp_path / "img").mkdir()
    monkeypatch.chdir(src)
    for image, scanned in (("scanned.cim", True), ("local.cim", False)):
        with cimfs.create(tmp_path / "img", image, data_process=data_process) as w:
            w.mkdir("d")
            w.add_file("d\\A.TXT", b"to be replaced")
            if scanned:
                w.add_scanned_files("d", entries)
                w.add_scanned_files("d", [])
                monkeypatch.chdir(tmp_path)  # the relative source was resolved at the call
                with pytest.raises(CimError) as e:
                    w.add_scanned_files("d", [("neg", fold_name("neg"), str(src / "a.txt"), 5, -1, 0, 0, ea)])
                assert e.value.hresult == errors.E_INVALIDARG and "neg" in str(e.value)
                monkeypatch.chdir(src)
            else:
                w.add_local_files(
                    "d",
                    [
                        (n, p, FileMetadata(0, size, wt, wt, ct, at, b"", b"", e))
                        for n, _, p, size, wt, ct, at, e in entries
                    ],
                )
    with cimfs.open(tmp_path / "img" / "scanned.cim") as im, cimfs.open(tmp_path / "img" / "local.cim") as ref:
        assert sorted(e.name for e in im.scandir("d")) == sorted(blobs)  # "A.TXT" replaced by "a.txt"
        for i, (name, data) in enumerate(blobs.items()):
            assert im.read_bytes(f"d\\{name}") == data
            got, want = im.stat(f"d\\{name}"), ref.stat(f"d\\{name}")
            assert (got.creation_time, got.last_write_time, got.change_time, got.last_access_time) == (
                10**17 + i,
                10**17 + i,
                10**17 + 100 + i,
                10**17 + 200 + i,
            )
            assert got == want
        assert im.record(im.lookup("d\\a.txt")).stream.offset == im.record(im.lookup("d\\same.bin")).stream.offset


def test_small_source_read_checks_the_file_type_only_when_needed(tmp_path):
    """The data process reads a small file with one read of size + 1 bytes
    and no fstat; anything but a regular file of at least the scanned size
    still fails with the file-type error (a device reads too long, a FIFO
    short, a directory not at all)."""
    from cimfs.store import open_source, read_small_source

    grown = tmp_path / "grown"
    grown.write_bytes(b"0123456789")
    fd = open_source(str(grown), "img\\grown", checked=False)
    try:
        assert read_small_source(fd, 4, str(grown), "img\\grown") == b"0123"  # the scanned size, as for large files
    finally:
        os.close(fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source in ("/dev/zero", str(fifo), str(tmp_path)):
        fd = open_source(source, "img\\x", checked=False)
        try:
            with pytest.raises(CimError) as e:
                read_small_source(fd, 100, source, "img\\x")
            assert "no longer a regular file" in str(e.value) and "img\\x" in str(e.value)
        finally:
            os.close(fd)


def test_closing_frees_the_tree_but_keeps_the_statistics(tmp_path):
    """A caller may keep the handle after the commit; the 5 000 loaded nodes
    must not stay with it."""
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        w = build(tmp_path)
        for d in range(10):
            w.mkdir(f"d{d}")
        for i in range(5000):
            w.add_file(f"d{i % 10}/f{i}", str(i).encode())
        w.commit()
        stats = w.stats()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        w.close()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert before - after > 5000 * 100, (before, after)  # records alone are larger than that
    assert w.stats() == stats and stats["bytes_logical"] >= sum(len(str(i)) for i in range(5000))
    with pytest.raises(CimError) as e:
        w.add_file("late", b"x")
    assert e.value.hresult == errors.E_HANDLE
    with cimfs.open(tmp_path / "t.cim") as img:
        assert img.read_bytes("d3/f4993") == b"4993"


@pytest.mark.parametrize("data_process", [True, False])
def test_a_failed_commit_cannot_be_retried_into_a_broken_image(tmp_path, data_process):
    """After a source vanished the other files' contents may never have been
    written: a second commit must refuse, not publish records without them."""
    (tmp_path / "img").mkdir()
    sources = []
    for i in range(3):
        sources.append(tmp_path / f"f{i}")
        sources[-1].write_bytes(os.urandom(100_000 + i))
    w = cimfs.create(tmp_path / "img", "t.cim", data_process=data_process)
    for i, src in enumerate(sources):
        w.add_file(f"f{i}", src)
    sources[1].unlink()
    with pytest.raises(CimError) as first:
        w.commit()
    assert "f1" in str(first.value)
    for retry in (w.commit, lambda: w.add_file("late", b"x")):
        with pytest.raises(CimError) as again:
            retry()
        assert again.value.hresult == errors.E_FAIL
        assert "earlier commit failed" in str(again.value) and "f1" in str(again.value)
    w.close()
    assert os.listdir(tmp_path / "img") == []


@pytest.mark.parametrize("data_process", [True, False])
def test_a_copied_file_deleted_or_replaced_before_the_commit(tmp_path, data_process):
    """Contents still being copied for a file that is gone by the commit go
    nowhere; its replacement and the files around it read back exactly."""
    (tmp_path / "img").mkdir()
    blobs = {name: os.urandom(n) for name, n in (("big", 300_000), ("small", 3_000), ("keep", 200_001), ("new", 5))}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    with cimfs.create(tmp_path / "img", "t.cim", data_process=data_process) as w:
        w.mkdir("d")
        for name in ("big", "small", "keep"):
            w.add_file(f"d/{name}", tmp_path / name)
        w.delete("d/big")
        w.delete("d/small")
        w.add_file("d/small", tmp_path / "new")
    with cimfs.open(tmp_path / "img" / "t.cim") as img:
        assert sorted(img.listdir("d")) == ["keep", "small"]
        assert img.read_bytes("d/keep") == blobs["keep"]
        assert img.read_bytes("d/small") == blobs["new"]


def test_directories_with_the_same_names_in_different_places(tmp_path):
    """Paths are looked up through a cache of directories: equal names under
    different parents, different spellings of one path, and a directory
    deleted and made again must each land where the path says."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one", "two", "three"):
        (src / name).write_bytes(name.encode() * 20)
    (tmp_path / "img").mkdir()
    with cimfs.create(tmp_path / "img", "t.cim") as w:
        for top in ("a", "b"):
            w.mkdir(top)
            w.mkdir(f"{top}/x")
            w.mkdir(f"{top}\\x\\y")
        w.add_local_files("b/x", [("f", src / "one", FileMetadata(file_size=60))])
        w.add_local_files("a\\x", [("f", src / "two", FileMetadata(file_size=60))])
        w.add_file("A/X/y/g", b"g in a/x/y")
        w.add_file("/b/x/y/g", b"g in b/x/y")
        with pytest.raises(CimError) as e:
            w.add_file("x/nowhere", b"")  # no "x" at the top yet
        assert e.value.hresult == errors.ERROR_PATH_NOT_FOUND
        w.mkdir("x")  # the name of the directories above, at the top
        w.mkdir("x/y")
        w.add_file("x/y/top", b"top")
        w.delete("a/x")
        w.mkdir("a/x")
        w.add_local_files("a/x", [("h", src / "three", FileMetadata(file_size=100))])
        w.add_file("a/x/i", b"i")
    with cimfs.open(tmp_path / "img" / "t.cim") as img:
        files = {}
        for dirpath, _, filenames in img.walk():
            for f in filenames:
                path = f"{dirpath}/{f}".replace("\\", "/").lstrip("/")
                files[path] = img.read_bytes(path)
    assert files == {
        "b/x/f": b"one" * 20,
        "b/x/y/g": b"g in b/x/y",
        "a/x/h": b"three" * 20,
        "a/x/i": b"i",
        "x/y/top": b"top",
    }
