"""The reader never trusts its input: thousands of mutated images per run must
read fully or fail with CimFormatError, never another exception, a hang or a
huge allocation."""

import multiprocessing
import os
import pathlib
import random
import resource
import shutil
import signal
import struct
import traceback

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cimfs
from cimfs import CimError, CimFormatError, FileAttributes as A, FileMetadata
from cimfs import errors
from cimfs.layout import cim, ntfs
from cimfs.reader import find_region_file

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors"
SD = ntfs.sddl_to_sd("O:BAG:SYD:(A;;FA;;;SY)(A;OICI;FR;;;BU)")
LOOKUP_MISSES = (errors.ERROR_FILE_NOT_FOUND, errors.ERROR_PATH_NOT_FOUND)
CHUNK = 1 << 16


def build_seeds(root: pathlib.Path) -> list[pathlib.Path]:
    seeds = []
    d = root / "own"
    d.mkdir()
    with cimfs.create(d, "base.cim") as w:
        w.mkdir("dir/sub", parents=True)
        w.add_file("dir/a.txt", b"alpha" * 100, FileMetadata(attributes=A.ARCHIVE, security_descriptor=SD,
                                                            ea_buffer=ntfs.pack_eas(ntfs.lx_eas(mode=0o100644, uid=1))))
        w.add_file("dir/sub/big", os.urandom(70_000))
        w.add_file("link", b"", FileMetadata(reparse_data=ntfs.pack_symlink_reparse("dir\\a.txt")))
        w.add_stream("dir/a.txt:ads", b"stream")
        w.link("hard", "dir/a.txt")
        for i in range(30):
            w.add_file(f"dir/f{i:02}", bytes([i]) * i)
        w.create_file("sparse", FileMetadata(file_size=1 << 33)).close()
    with cimfs.create(d, "fork.cim", base="base.cim") as w:
        w.add_file("dir/new", b"new")
        w.delete("dir/f07")
    seeds += [d / "base.cim", d / "fork.cim"]
    for v in ("v2-basic", "v3-shaped"):
        if (VECTORS / v).is_dir():
            shutil.copytree(VECTORS / v, root / v)
            for p in (root / v).iterdir():
                p.chmod(0o644)
            seeds.append(root / v / "image.cim")
    return seeds


def full_read(cim_path: str) -> None:
    """Everything a user could ask of an image, in bounded reads."""
    try:
        with cimfs.open(cim_path) as im:
            im.check()
            for dirpath, dirs, files in im.walk():
                for name in dirs + files:
                    p = f"{dirpath}\\{name}" if dirpath else name
                    try:
                        st = im.stat(p)
                        im.exists(p.upper())
                        for s in ([] if st.is_dir else [None]) + im.streams(p):
                            with im.open(p, stream=s) as f:
                                for off in (0, f.size // 2, max(0, f.size - CHUNK)):
                                    f.seek(off)
                                    f.read(CHUNK)
                    except CimError as e:
                        if isinstance(e, CimFormatError) or e.hresult not in LOOKUP_MISSES:
                            raise
    except CimFormatError:
        pass


# ---------------------------------------------------------------- mutations
def targets(cim_path: pathlib.Path):
    """(file name, offset, width) of fields worth hitting, found with the reader."""
    out = []
    with cimfs.open(cim_path) as im:
        name = cim_path.name
        out += [(name, 12, 1), (name, 16, 4), (name, 48, 2), (name, 56, 8), (name, 70, 2)]

        def region_file(ro):
            on_disk = os.path.basename(find_region_file(str(cim_path.parent), im.region_names[ro >> 48][0]))
            return on_disk, ro & ((1 << 48) - 1)

        rf, off = region_file(im.header.filesystem_offset)
        out += [(rf, off + i, 8) for i in (0, 8)] + [(rf, off + 16, 4), (rf, off + 20, 4)]
        for t in im.file_tables:
            rf, off = region_file(t.offset)
            dir_rf, dir_off = region_file(im.filesystem.file_table_directory_offset)
            out += [(dir_rf, dir_off + i, w) for i, w in ((0, 8), (8, 2), (10, 2))]
            for slot in range(min(t.count, 64)):
                base = off + slot * t.entry_size
                out += [(rf, base + o, w) for o, w in ((2, 2), (4, 4), (40, 8), (48, 8), (54, 1), (55, 1), (56, 8),
                                                        (64, 8), (72, 8), (80, 8), (88, 4))]
                rec = im.record(1 + slot + im.file_tables.index(t) * 1024)
                if rec.is_dir and rec.stream.length:
                    lrf, loff = region_file(rec.stream.offset)
                    out += [(lrf, loff, 4), (lrf, loff + 4, 4), (lrf, loff + 8, 4), (lrf, loff + 8 + 4 * 1, 4)]
                if rec.stream.type == cim.STREAM_TYPE_PE_IMAGE:
                    prf, poff = region_file(rec.stream.offset)
                    out += [(prf, poff + o, w) for o, w in ((0, 8), (8, 8), (20, 2), (24, 4), (28, 4))]
                if rec.stream_table_offset:
                    srf, soff = region_file(rec.stream_table_offset)
                    out += [(srf, soff, 4), (srf, soff + 4, 4), (srf, soff + 8, 4), (srf, soff + 12, 8)]
                for ro in (rec.security_descriptor_offset, rec.reparse_offset):
                    if ro:
                        brf, boff = region_file(ro)
                        out.append((brf, boff, 2))
    return out


BOUNDARY = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, 1 << 47, (1 << 48) - 1, (1 << 63), (1 << 64) - 1]


def mutate(files: dict, names: list, fields: list, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.randrange(6)
    if kind <= 2 and fields:
        name, off, width = rng.choice(fields)
        data = bytearray(files[name])
        if off + width > len(data):
            return name, bytes(data)
        value = rng.choice(BOUNDARY + [len(data), len(data) + 1, rng.randrange(1 << (8 * width))]) % (1 << (8 * width))
        if kind == 2:
            value = int.from_bytes(data[off:off + width], "little") + rng.choice((-1, 1, 8, -8, 4096))
            value %= 1 << (8 * width)
        data[off:off + width] = value.to_bytes(width, "little")
        return name, bytes(data)
    name = rng.choice(names)
    data = bytearray(files[name])
    if not data:
        return name, b""
    if kind == 3:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 4:  # truncation
        del data[rng.randrange(len(data)):]
    else:  # zeroed or 0xFF range
        i = rng.randrange(len(data))
        n = rng.randint(1, 256)
        data[i:i + n] = bytes([rng.choice((0, 0xFF))]) * len(data[i:i + n])
    return name, bytes(data)


def run_mutations(seed_path: str, seed: int, count: int, conn) -> None:
    """Child process: bounded address space, a watchdog per image."""
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    def on_alarm(*_):
        raise TimeoutError("reading a mutated image took over 20 s (a hang?)")

    signal.signal(signal.SIGALRM, on_alarm)
    failures = []
    try:
        seed_path = pathlib.Path(seed_path)
        d = seed_path.parent
        names = [p.name for p in d.iterdir() if p.is_file() and (p.name.endswith(".cim") or p.name.lower().startswith(("region_", "objectid_")))]
        files = {n: (d / n).read_bytes() for n in names}
        fields = targets(seed_path)
        rng = random.Random(seed)
        for i in range(count):
            name, data = mutate(files, names, fields, rng)
            (d / name).write_bytes(data)
            signal.alarm(20)
            try:
                full_read(str(seed_path))
            except BaseException as e:  # noqa: BLE001 - anything but CimFormatError is a finding
                failures.append(f"mutation {i} of {name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
            finally:
                signal.alarm(0)
                (d / name).write_bytes(files[name])
            if len(failures) >= 5:
                break
    except BaseException as e:  # noqa: BLE001
        failures.append(f"driver: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
    conn.send(failures)
    conn.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("index", range(4))
def test_mutated_images_only_raise_format_errors(seeds, index):
    if index >= len(seeds):
        pytest.skip("test vectors not present")
    full_read(str(seeds[index]))  # the unmutated seed reads cleanly
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=run_mutations, args=(str(seeds[index]), 1000 + index, 900, child))
    p.start()
    child.close()
    failures = parent.recv() if parent.poll(600) else ["no answer from the mutation process in 600 s"]
    p.join(30)
    assert p.exitcode == 0, f"mutation process died with exit code {p.exitcode}"
    assert not failures, "\n".join(failures)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_field_values(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("hyp")
    d = root / "img"
    d.mkdir()
    with cimfs.create(d, "x.cim") as w:
        w.mkdir("a")
        w.add_file("a/b", b"bee" * 50)
        w.add_stream("a/b:s", b"ess")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    name = data.draw(st.sampled_from(sorted(files)))
    blob = bytearray(files[name])
    off = data.draw(st.integers(0, max(0, len(blob) - 1)))
    width = data.draw(st.sampled_from([1, 2, 4, 8]))
    value = data.draw(st.integers(0, (1 << (8 * width)) - 1))
    blob[off:off + width] = value.to_bytes(width, "little")[: len(blob[off:off + width])]
    (d / name).write_bytes(bytes(blob))
    full_read(str(d / "x.cim"))


def test_cycles_are_reported_and_skipped(tmp_path):
    """A directory that lists its own parent: walk, nlink and check must stop
    there, report it, and serve the rest (class 3 and 7 of issue 17)."""
    with cimfs.create(tmp_path, "c.cim") as w:
        w.mkdir("a/b", parents=True)
        w.add_file("a/b/f", b"x")
        w.add_file("top", b"y")
    with cimfs.open(tmp_path / "c.cim") as im:
        b_id, root = im.lookup("a/b"), im.root_id
        rec = im.record(b_id)
        ri, off = rec.stream.offset >> 48, rec.stream.offset & ((1 << 48) - 1)
        region = tmp_path / im.region_names[ri][0]
        table = im._bytes(rec.stream.offset, rec.stream.length, "t")
    # b's only entry now points back at the root
    data = bytearray(region.read_bytes())
    data[off + 8: off + 12] = struct.pack("<I", root)
    region.write_bytes(bytes(data))
    with cimfs.open(tmp_path / "c.cim") as im:
        damage = []
        walked = list(im.walk(onerror=damage.append))
        # the loop is entered once, reported once, and the rest is served
        assert [d for d, _, _ in walked] == ["", "a", "a\\b"]
        assert len(damage) == 1 and isinstance(damage[0], CimFormatError) and "second name" in str(damage[0])
        assert any("second name" in f for f in im.check())
        assert im.stat("top").nlink == 1  # a file's link count walks the tree: the loop must not stop it
        assert im.read_bytes("top") == b"y"
        assert [p for p, _ in im.iter_file_ids()] == ["", "a", "top", "a\\b", "a\\b\\f"]  # "f" now names the root
    assert table


@pytest.mark.parametrize("path", ["a\0b", "a\x01", "..", "a/../b", "x" * 40000, "\ud800", "a:b:c:d", ":", "a|b", 42, b"bytes"])
def test_hostile_paths_are_cim_errors(tmp_path, path):
    with cimfs.create(tmp_path, "p.cim") as w:
        w.add_file("a", b"x")
        for op in (w.exists, w.delete, lambda p: w.add_file(p, b"1"), lambda p: w.link(p, "a")):
            try:
                op(path)
            except CimError:
                pass
    with cimfs.open(tmp_path / "p.cim") as im:
        for op in (im.stat, im.listdir, im.read_bytes, im.exists, im.streams):
            try:
                op(path)
            except CimError:
                pass


def test_stored_names_windows_forbids_can_be_looked_up(tmp_path):
    """A name another writer stored with a control or wildcard character is
    listed as it is, so stat/read by that path must find it (mutation 504 of a
    seed found the reader listing 'f1\\x19' and then refusing to stat it)."""
    with cimfs.create(tmp_path, "n.cim") as w:
        w.mkdir("dir")
        w.add_file("dir/fQ", b"payload")
    # patch the stored name "fQ" to "f\x19" in the region file holding the link table
    with cimfs.open(tmp_path / "n.cim") as im:
        rec = im.record(im.lookup("dir"))
        region = tmp_path / im.region_names[rec.stream.offset >> 48][0]
    data = region.read_bytes()
    needle = "fQ".encode("utf-16-le")
    assert data.count(needle) == 1
    region.write_bytes(data.replace(needle, "f\x19".encode("utf-16-le")))
    with cimfs.open(tmp_path / "n.cim") as im:
        assert im.listdir("dir") == ["f\x19"]
        assert im.read_bytes("dir/f\x19") == b"payload"
        assert im.exists("dir\\f\x19")
        with pytest.raises(CimError) as e:
            im.stat("dir/f\x00")
        assert e.value.hresult == errors.ERROR_INVALID_NAME
