"""The reader against images written by an independent writer (shared/vectors)."""

import hashlib
import json
import pathlib

import pytest

import cimfs

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors"
if not VECTORS.is_dir():  # CI clones the repo with shared/ beside it
    VECTORS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
NAMES = sorted(p.name for p in VECTORS.iterdir() if (p / "expected.json").exists()) if VECTORS.is_dir() else []

pytestmark = pytest.mark.skipif(not NAMES, reason=f"test vectors not found at {VECTORS}")


@pytest.fixture(params=NAMES)
def vector(request):
    d = VECTORS / request.param
    expected = json.loads((d / "expected.json").read_text())
    with cimfs.open(d / expected["image"]) as image:
        yield image, expected


def sha256_of(image, path):
    h = hashlib.sha256()
    with image.open(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_contents(vector):
    image, exp = vector
    for path, digest in exp["contents_sha256"].items():
        assert sha256_of(image, path) == digest, path


def test_sizes_and_sparse(vector):
    image, exp = vector
    for path, size in exp["sizes"].items():
        assert image.stat(path).size == size
    for path in exp["sparse_all_zero"]:
        with image.open(path) as f:
            total = 0
            while chunk := f.read(1 << 24):
                assert chunk.count(0) == len(chunk)
                total += len(chunk)
        assert total == image.stat(path).size


def test_metadata(vector):
    image, exp = vector
    for path, attrs in exp["attributes"].items():
        assert image.stat(path).attributes == attrs, path
    for path, sd in exp["security_descriptor_hex"].items():
        assert image.stat(path).security_descriptor.hex() == sd, path
    for path, ea in exp["ea_buffer_hex"].items():
        assert image.stat(path).ea_buffer.hex() == ea, path
    for path, rp in exp["reparse"].items():
        st = image.stat(path)
        assert st.reparse_tag == rp["tag"]
        assert st.reparse_data.hex() == rp["data_hex"]
    for path, times in exp["times_filetime"].items():
        st = image.stat(path)
        assert [st.creation_time, st.last_write_time, st.change_time, st.last_access_time] == times


def test_links_streams_and_listing(vector):
    image, exp = vector
    for group in exp["hard_links"]:
        ids = {image.stat(p).file_id for p in group}
        assert len(ids) == 1
        assert all(image.stat(p).nlink == len(group) for p in group)
    for path, names in exp["streams"].items():
        assert image.streams(path) == names
    for path, count in exp["entry_counts"].items():
        assert len(image.listdir(path)) == count
    for query, stored in exp["case_insensitive_lookups"].items():
        assert image.lookup(query) == image.lookup(stored)
        assert image.read_bytes(query) == image.read_bytes(stored)


def test_pe_image_stream_random_access(vector):
    image, exp = vector
    path = exp["writer"]["pe_image_stream"]
    whole = image.read_bytes(path)
    assert hashlib.sha256(whole).hexdigest() == exp["contents_sha256"][path]
    with image.open(path) as f:
        for off in (0, 1, 511, 4095, 4096, 12345, len(whole) - 7):
            f.seek(off)
            assert f.read(100) == whole[off : off + 100]
            assert image.read_at(path, off, 100) == whole[off : off + 100]


def test_walk_reaches_every_entry(vector):
    image, exp = vector
    seen = set()
    for dirpath, dirs, files in image.walk():
        for n in dirs + files:
            seen.add(f"{dirpath}\\{n}" if dirpath else n)
    for path in exp["contents_sha256"]:
        if ":" not in path:
            assert path in seen


def test_version_and_record_size(vector):
    image, exp = vector
    assert image.version[0] == exp["writer"]["version_major"]
    assert {t.entry_size for t in image.file_tables} == {exp["writer"]["file_record_size"]}
