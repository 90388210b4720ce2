"""Windows container images in and out of the layer store (cimfs.oci), checked
with real clients: skopeo reads what we export and writes what we import, and
one test goes through a real registry (Debian's docker-registry)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import cimfs
from cimfs import oci, tools
from cimfs.errors import CimError

sys.path.insert(0, os.path.dirname(__file__))
from ocihelp import base_entries, layer_tar, sha, write_layout  # noqa: E402

SKOPEO = shutil.which("skopeo")
REGISTRY = shutil.which("docker-registry") or (
    "/usr/bin/docker-registry" if os.path.exists("/usr/bin/docker-registry") else None
)
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (scripts/install-system-deps.sh)")


def run(*args, input=None, check=True):
    p = subprocess.run([sys.executable, "-m", "cimfs.cli", *map(str, args)], input=input, capture_output=True)
    if check and p.returncode != 0:
        raise AssertionError(f"cimfs {args} failed: {p.stderr.decode()}")
    return p


def skopeo(*args):
    p = subprocess.run([SKOPEO, "--insecure-policy", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def snapshot(store) -> dict:
    """Every file of a store with its bytes' digest (the lock file's content aside)."""
    out = {}
    for root, _dirs, files in os.walk(store):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, store)] = hashlib.sha256(f.read()).hexdigest()
    return out


def layer_images(store, ref):
    refs = json.load(open(os.path.join(store, "refs.json")))
    rec = next(r for k, r in refs["images"].items() if ref in r["refs"] or k == ref)
    return [os.path.join(store, "layers", c[7:] + ".cim") for c in rec["layers"]]


def assert_same_layers(store_a, ref_a, store_b, ref_b):
    la, lb = layer_images(store_a, ref_a), layer_images(store_b, ref_b)
    assert len(la) == len(lb)
    for a, b in zip(la, lb):
        with cimfs.open(a) as ia, cimfs.open(b) as ib:
            assert tools.diff_images(ia, ib) == {"added": [], "removed": [], "changed": []}, (a, b)


def app_layers():
    l0 = layer_tar(
        base_entries(
            [
                ("dir", "Files/Program Files"),
                ("file", "Files/Program Files/old.txt", b"old"),
                ("dir", "Files/data"),
                ("file", "Files/data/a", b"a" * 5000),
                ("file", "Files/data/b", b"b"),
            ]
        )
    )
    l1 = layer_tar(
        [
            ("dir", "Files"),
            ("file", "Files/app.exe", b"MZ" + b"\0" * 70000),
            ("whiteout", "Files/Program Files/old.txt"),
            ("link", "Files/win-link.ini", "Files/Windows/win.ini"),
        ]
    )
    l2 = layer_tar(
        [
            ("dir", "Files/data"),
            ("opaque", "Files/data"),
            ("file", "Files/data/c", b"c" * 40000),
            ("file", "Files/app.cfg", b"key=value\r\n"),
        ]
    )
    return [l0, l1, l2]


@pytest.fixture
def app_layout(tmp_path):
    layout = tmp_path / "app-oci"
    mdigest, descs = write_layout(layout, app_layers(), compression=["gzip", "zstd", "none"], ref="app:1.0")
    return layout, mdigest, descs


# ------------------------------------------------------------------ import
def test_import_layers_of_each_compression_with_chain_ids(app_layout, tmp_path):
    layout, mdigest, descs = app_layout
    store = tmp_path / "store"
    report = json.loads(run("import-image", layout, store, "--json", "--jobs", "2").stdout)
    diff_ids = [sha(t) for t in app_layers()]
    chain = [diff_ids[0]]
    for d in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {d}".encode()).hexdigest())
    assert report["manifest_digest"] == mdigest and report["refs"] == ["app:1.0"]
    assert [x["chain_id"] for x in report["layers"]] == chain
    assert [x["diff_id"] for x in report["layers"]] == diff_ids
    assert [x["digest"] for x in report["layers"]] == [d["digest"] for d in descs]
    assert [x["uncompressed_bytes"] for x in report["layers"]] == [len(t) for t in app_layers()]
    assert [x["status"] for x in report["layers"]] == ["new"] * 3
    # One image per layer named by its chain ID, each a fork of the one below.
    names = sorted(n for n in os.listdir(store / "layers") if n.endswith(".cim"))
    assert names == sorted(c[7:] + ".cim" for c in chain)
    top = store / "layers" / (chain[2][7:] + ".cim")
    with cimfs.open(top) as img:
        parents = {p["id"] for p in img.info().get("parent_region_sets", [])}
        assert len(parents) == 2
        assert img.read_bytes("Files\\data\\c") == b"c" * 40000
        assert img.read_bytes("Files\\app.exe") == b"MZ" + b"\0" * 70000
        assert img.listdir("Files\\data") == ["c"]  # opaque: a and b gone
        assert not img.exists("Files\\Program Files\\old.txt")  # whiteout
        assert img.exists("Files\\Program Files")
        assert img.stat("Files\\win-link.ini").file_id == img.stat("Files\\Windows\\win.ini").file_id
    with cimfs.open(store / "layers" / (chain[0][7:] + ".cim")) as base:
        assert base.exists("Files\\data\\a") and not base.exists("Files\\app.exe")
    images = json.loads(run("images", store, "--json").stdout)
    assert [i["refs"] for i in images] == [["app:1.0"]] and images[0]["top"] == chain[2][7:] + ".cim"


def test_base_layer_hive_links_and_layout_file(app_layout, tmp_path):
    layout, _, _ = app_layout
    store = tmp_path / "store"
    report = oci.import_image(str(layout), store)
    base = report["layers"][0]
    expected_links = {
        "SYSTEM": "SYSTEM_BASE",
        "SOFTWARE": "SOFTWARE_BASE",
        "SAM": "SAM_BASE",
        "SECURITY": "SECURITY_BASE",
        "DEFAULT": "DEFAULTUSER_BASE",
    }
    assert sorted(base["base_processing"]) == sorted(
        ["Hives", "layout"] + [f"Hives\\{b}" for b in expected_links.values()]
    )
    for img_path in layer_images(store, "app:1.0"):  # the base's links are seen through every layer
        with cimfs.open(img_path) as img:
            for hive, link in expected_links.items():
                st = img.stat(f"Hives\\{link}")
                assert st.file_id == img.stat(f"Files\\Windows\\System32\\config\\{hive}").file_id
                assert st.nlink == 2
                assert img.read_bytes(f"Hives\\{link}") == f"hive {hive}".encode() * 50
            assert img.read_bytes("layout") == b"vhd-with-hives\n"
            assert img.stat("Hives").is_dir
            assert sorted(img.listdir("Hives")) == sorted(expected_links.values())
    # hcsshim stamps these with "now"; we use the config's created time (2024-05-01T12:00:00Z).
    with cimfs.open(layer_images(store, "app:1.0")[0]) as img:
        assert img.stat("layout").last_write_time == cimfs.filetime_from_ns(1714564800 * 10**9)


# ------------------------------------------------------------------ bad input leaves the store as it was
@pytest.fixture
def store_with_image(tmp_path):
    store = tmp_path / "store"
    write_layout(tmp_path / "first", [layer_tar(base_entries())], ref="first:1")
    oci.import_image(str(tmp_path / "first"), store)
    return store


def _blob(layout, digest):
    return os.path.join(layout, "blobs", "sha256", digest[7:])


def test_digest_mismatch_leaves_store_unchanged(store_with_image, app_layout):
    layout, _, descs = app_layout
    before = snapshot(store_with_image)
    p = _blob(layout, descs[2]["digest"])  # the plain layer: a changed byte still reads as a tar
    data = bytearray(open(p, "rb").read())
    data[600] ^= 0x01
    open(p, "wb").write(bytes(data))
    r = run("import-image", layout, store_with_image, check=False)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "mismatch" in err and descs[2]["digest"] in err
    assert snapshot(store_with_image) == before


def test_diff_id_mismatch_leaves_store_unchanged(store_with_image, tmp_path):
    layers = app_layers()
    wrong = [sha(layers[0]), sha(layers[1]), sha(b"not this layer")]
    write_layout(tmp_path / "bad", layers, diff_ids=wrong)
    before = snapshot(store_with_image)
    with pytest.raises(CimError) as e:
        oci.import_image(str(tmp_path / "bad"), store_with_image)
    assert "diff ID" in str(e.value) and wrong[2] in str(e.value)
    assert snapshot(store_with_image) == before


def test_missing_foreign_layer_names_url_and_layer(store_with_image, tmp_path):
    _, descs = write_layout(tmp_path / "foreign", app_layers(), foreign=1)
    before = snapshot(store_with_image)
    r = run("import-image", tmp_path / "foreign", store_with_image, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "foreign layer" in err and descs[1]["digest"] in err and descs[1]["urls"][0] in err
    assert snapshot(store_with_image) == before


@pytest.mark.parametrize("layer", [0, 1])
def test_truncated_blob_leaves_store_unchanged(store_with_image, app_layout, layer):
    layout, _, descs = app_layout
    p = _blob(layout, descs[layer]["digest"])
    size = os.path.getsize(p)
    os.truncate(p, size // 2)
    before = snapshot(store_with_image)
    with pytest.raises(CimError) as e:
        oci.import_image(str(layout), store_with_image, jobs=2)
    assert "truncated" in str(e.value)
    assert snapshot(store_with_image) == before


def test_not_windows_and_platform_choice(tmp_path):
    write_layout(tmp_path / "lay", [layer_tar(base_entries())])
    with pytest.raises(CimError) as e:
        oci.import_image(str(tmp_path / "lay"), tmp_path / "s", platform="linux/amd64")
    assert "no image for linux/amd64" in str(e.value) and "windows/amd64" in str(e.value)
    report = oci.import_image(str(tmp_path / "lay"), tmp_path / "s", platform="windows/amd64:10.0.20348")
    assert report["platform"] == "windows/amd64:10.0.20348.1"


# ------------------------------------------------------------------ sharing, rmi, concurrency, kill -9
def test_two_images_share_a_base_and_rmi(tmp_path):
    base = layer_tar(base_entries())
    write_layout(tmp_path / "a", [base, layer_tar([("dir", "Files"), ("file", "Files/a.txt", b"A")])], ref="a:1")
    write_layout(tmp_path / "b", [base, layer_tar([("dir", "Files"), ("file", "Files/b.txt", b"B")])], ref="b:1")
    store = tmp_path / "store"
    ra = oci.import_image(str(tmp_path / "a"), store)
    base_cim = store / "layers" / ra["layers"][0]["image"]
    st0 = os.stat(base_cim)
    rb = oci.import_image(str(tmp_path / "b"), store)
    assert [x["status"] for x in rb["layers"]] == ["reused", "new"]
    st1 = os.stat(base_cim)
    assert (st0.st_ino, st0.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns)  # nothing rewritten
    again = oci.import_image(str(tmp_path / "b"), store)
    assert [x["status"] for x in again["layers"]] == ["reused", "reused"]
    assert sorted(r for i in oci.list_images(store) for r in i["refs"]) == ["a:1", "b:1"]
    run("rmi", store, "a:1")
    cims = sorted(n for n in os.listdir(store / "layers") if n.endswith(".cim"))
    assert cims == sorted([rb["layers"][0]["image"], rb["layers"][1]["image"]])
    with cimfs.open(store / "layers" / rb["layers"][1]["image"]) as img:  # b still reads
        assert img.read_bytes("Files\\b.txt") == b"B" and img.read_bytes("Files\\Windows\\win.ini") == b"[fonts]\r\n"
    run("rmi", store, "b:1")
    assert [n for n in os.listdir(store / "layers")] == []
    assert oci.list_images(store) == []
    assert run("rmi", store, "b:1", check=False).returncode == 1


def test_concurrent_imports_into_one_store(tmp_path):
    base = layer_tar(base_entries([("file", "Files/big.bin", os.urandom(3 << 20))]))
    layouts = []
    for i in range(3):
        write_layout(
            tmp_path / f"l{i}",
            [base, layer_tar([("dir", "Files"), ("file", f"Files/{i}.txt", b"%d" % i)])],
            ref=f"img:{i}",
        )
        layouts.append(tmp_path / f"l{i}")
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cimfs.cli", "import-image", str(lay), str(store), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for lay in layouts
    ]
    reports = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err.decode()
        reports.append(json.loads(out))
    assert sorted(r["layers"][0]["status"] for r in reports) == ["new", "reused", "reused"]
    assert len([n for n in os.listdir(store / "layers") if n.endswith(".cim")]) == 4
    for i in range(3):
        with cimfs.open(layer_images(store, f"img:{i}")[1]) as img:
            assert img.read_bytes(f"Files\\{i}.txt") == b"%d" % i


def test_import_killed_then_retried(tmp_path):
    big = os.urandom(48 << 20)
    layers = [
        layer_tar(base_entries()),
        layer_tar([("dir", "Files"), ("file", "Files/big.bin", big)]),
        layer_tar([("dir", "Files"), ("file", "Files/top.txt", b"top")]),
    ]
    write_layout(tmp_path / "lay", layers, compression="none")
    store = tmp_path / "store"
    p = subprocess.Popen(
        [sys.executable, "-m", "cimfs.cli", "import-image", str(tmp_path / "lay"), str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_cim = store / "layers" / (sha(layers[0])[7:] + ".cim")
    try:
        while p.poll() is None and not base_cim.exists():
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL, "the import finished before it could be killed"
    assert not (store / "refs.json").exists() or oci.list_images(store) == []
    assert (store / "journal.json").exists() and base_cim.exists()
    report = oci.import_image(str(tmp_path / "lay"), store)
    # the killed import was rolled back when the store was opened again (its journal), then imported anew
    assert [x["status"] for x in report["layers"]] == ["new", "new", "new"]
    assert not (store / "journal.json").exists()
    assert tools.gc(str(store / "layers"), dry_run=True) == []  # the killed writer's region files are gone
    fresh = tmp_path / "fresh"
    oci.import_image(str(tmp_path / "lay"), fresh)
    assert_same_layers(store, "test:1.0", fresh, "test:1.0")
    with cimfs.open(layer_images(store, "test:1.0")[2]) as img:
        assert img.read_bytes("Files\\big.bin") == big
    assert tools.fsck(layer_images(store, "test:1.0")[2]) == []


# ------------------------------------------------------------------ export, skopeo, round trips
def test_export_is_deterministic_and_round_trips_through_skopeo(app_layout, tmp_path):
    layout, _, _ = app_layout
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    run("export-image", store, "app:1.0", tmp_path / "out1")
    run("export-image", store, "app:1.0", tmp_path / "out2")
    files1, files2 = snapshot(tmp_path / "out1"), snapshot(tmp_path / "out2")
    assert files1 == files2
    index = json.load(open(tmp_path / "out1" / "index.json"))
    manifest = json.load(open(_blob(tmp_path / "out1", index["manifests"][0]["digest"])))
    config = json.load(open(_blob(tmp_path / "out1", manifest["config"]["digest"])))
    assert config["os"] == "windows" and len(config["history"]) == 3
    # each blob's name is its digest; each layer's uncompressed bytes are its diff ID
    import gzip

    for d, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        data = open(_blob(tmp_path / "out1", d["digest"]), "rb").read()
        assert sha(data) == d["digest"] and len(data) == d["size"]
        assert sha(gzip.decompress(data)) == diff_id
    if SKOPEO is None:
        pytest.skip("skopeo is not installed")
    info = json.loads(skopeo("inspect", f"oci:{tmp_path / 'out1'}"))
    assert info["Os"] == "windows" and info["Layers"] == [d["digest"] for d in manifest["layers"]]
    skopeo("copy", f"oci:{tmp_path / 'out1'}", f"docker-archive:{tmp_path / 'x.tar'}")
    skopeo("copy", f"oci:{tmp_path / 'out1'}", f"oci:{tmp_path / 'by-skopeo'}:app")
    skopeo("copy", f"oci:{tmp_path / 'out1'}", f"oci-archive:{tmp_path / 'oa.tar'}")
    for i, src in enumerate([tmp_path / "x.tar", tmp_path / "by-skopeo", tmp_path / "out1", tmp_path / "oa.tar"]):
        s = tmp_path / f"re{i}"
        r = oci.import_image(str(src), s, reference="again")
        assert all(x["status"] == "new" for x in r["layers"])
        assert_same_layers(store, "app:1.0", s, "again")


@needs_skopeo
@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_export_compressions_and_docker_archive(app_layout, tmp_path, compress):
    layout, _, _ = app_layout
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    run("export-image", store, "app:1.0", tmp_path / "o", "--compress", compress)
    manifest_digest = json.load(open(tmp_path / "o" / "index.json"))["manifests"][0]["digest"]
    manifest = json.load(open(_blob(tmp_path / "o", manifest_digest)))
    assert {d["mediaType"] for d in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar" + ("+zstd" if compress == "zstd" else "")
    }
    json.loads(skopeo("inspect", f"oci:{tmp_path / 'o'}"))
    run("export-image", store, "app:1.0", tmp_path / "d.tar", "--format", "docker-archive", "--compress", compress)
    run("export-image", store, "app:1.0", tmp_path / "d2.tar", "--format", "docker-archive", "--compress", compress)
    assert open(tmp_path / "d.tar", "rb").read() == open(tmp_path / "d2.tar", "rb").read()
    info = json.loads(skopeo("inspect", f"docker-archive:{tmp_path / 'd.tar'}"))
    assert info["Os"] == "windows" and len(info["Layers"]) == 3
    for src, name in [(tmp_path / "o", "o"), (tmp_path / "d.tar", "d")]:
        run("import-image", src, tmp_path / f"s-{name}", "--ref", "again")
        assert_same_layers(store, "app:1.0", tmp_path / f"s-{name}", "again")
    # a docker archive on stdin
    with open(tmp_path / "d.tar", "rb") as f:
        run("import-image", "-", tmp_path / "s-stdin", "--ref", "again", input=f.read())
    assert_same_layers(store, "app:1.0", tmp_path / "s-stdin", "again")
    assert not [n for n in os.listdir(tmp_path / "s-stdin") if n.startswith(".spool")]


def test_hard_link_across_layers_survives_export(tmp_path):
    l0 = layer_tar(base_entries([("file", "Files/shared.dll", b"dll" * 1000)]))
    l1 = layer_tar(
        [
            ("dir", "Files"),
            ("link", "Files/alias.dll", "Files/shared.dll"),
            ("dir", "Files/sub"),
            ("link", "Files/sub/second.dll", "Files/shared.dll"),
        ]
    )
    write_layout(tmp_path / "lay", [l0, l1])
    store = tmp_path / "store"
    oci.import_image(str(tmp_path / "lay"), store)
    with cimfs.open(layer_images(store, "test:1.0")[1]) as img:
        fid = img.stat("Files\\shared.dll").file_id
        assert img.stat("Files\\alias.dll").file_id == fid == img.stat("Files\\sub\\second.dll").file_id
        assert img.stat("Files\\shared.dll").nlink == 3
    oci.export_image(str(store), "test:1.0", str(tmp_path / "out"))
    # the second layer's tar holds link entries, not a second copy of the data
    import gzip
    import io
    import tarfile

    index = json.load(open(tmp_path / "out" / "index.json"))
    manifest = json.load(open(_blob(tmp_path / "out", index["manifests"][0]["digest"])))
    with tarfile.open(
        fileobj=io.BytesIO(gzip.decompress(open(_blob(tmp_path / "out", manifest["layers"][1]["digest"]), "rb").read()))
    ) as tf:
        members = {m.name: m for m in tf}
    assert members["Files/alias.dll"].islnk() and members["Files/alias.dll"].linkname == "Files/shared.dll"
    assert "Files/shared.dll" not in members and "Files/Windows/win.ini" not in members
    oci.import_image(str(tmp_path / "out"), tmp_path / "again", reference="again")
    assert_same_layers(store, "test:1.0", tmp_path / "again", "again")


def test_whiteouts_and_opaque_directory_export_as_whiteouts(app_layout, tmp_path):
    layout, _, _ = app_layout
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    oci.export_image(str(store), "app:1.0", str(tmp_path / "out"), compress="none")
    import tarfile

    index = json.load(open(tmp_path / "out" / "index.json"))
    manifest = json.load(open(_blob(tmp_path / "out", index["manifests"][0]["digest"])))
    names = []
    for d in manifest["layers"]:
        with tarfile.open(_blob(tmp_path / "out", d["digest"])) as tf:
            names.append([m.name for m in tf])
    assert "Files/Program Files/.wh.old.txt" in names[1]
    assert {"Files/data/.wh.a", "Files/data/.wh.b", "Files/data/c"} <= set(names[2])
    assert "layout" not in names[0] and not any(n.startswith("Hives") for n in names[0])
    oci.import_image(str(tmp_path / "out"), tmp_path / "again", reference="again")
    assert_same_layers(store, "app:1.0", tmp_path / "again", "again")


# ------------------------------------------------------------------ a real registry
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    if REGISTRY is None or SKOPEO is None:
        pytest.skip("docker-registry or skopeo is not installed (scripts/install-system-deps.sh)")
    port = _free_port()
    storage = tmp_path / "registry-data"
    storage.mkdir()
    config = tmp_path / "registry.yml"
    config.write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
""")
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"docker-registry exited: {proc.stderr.read().decode()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("docker-registry did not answer")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_round_trip_through_a_registry(app_layout, tmp_path, registry):
    layout, _, _ = app_layout
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    run("export-image", store, "app:1.0", tmp_path / "out")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'out'}", f"docker://{registry}/win/app:1.0")
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry}/win/app:1.0", f"oci:{tmp_path / 'pulled'}:1.0")
    r = json.loads(run("import-image", tmp_path / "pulled", tmp_path / "store2", "--json").stdout)
    assert r["refs"] == ["1.0"] and [x["status"] for x in r["layers"]] == ["new"] * 3
    assert_same_layers(store, "app:1.0", tmp_path / "store2", "1.0")


# ------------------------------------------------------------------ malformed sources: a clear CimError, nothing stored
def _mangle_index(layout):
    (layout / "index.json").write_text("{not json")


def _drop_manifest(layout):
    index = json.load(open(layout / "index.json"))
    os.unlink(_blob(layout, index["manifests"][0]["digest"]))


def _config_mismatch(layout):
    index = json.load(open(layout / "index.json"))
    manifest = json.load(open(_blob(layout, index["manifests"][0]["digest"])))
    with open(_blob(layout, manifest["config"]["digest"]), "ab") as f:
        f.write(b" ")


def _linux_image(layout):
    index = json.load(open(layout / "index.json"))
    index["manifests"][0]["platform"]["os"] = "linux"
    (layout / "index.json").write_text(json.dumps(index))


def _traversal_digest(layout):
    index = json.load(open(layout / "index.json"))
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "mangle, message",
    [
        (_mangle_index, "not valid JSON"),
        (_drop_manifest, "not in the layout"),
        (_config_mismatch, "digest mismatch"),
        (_linux_image, "no image for any windows platform"),
        (_traversal_digest, "not a sha256/sha512 digest"),
    ],
)
def test_malformed_layouts_are_clear_errors(tmp_path, mangle, message):
    layout = tmp_path / "lay"
    write_layout(layout, [layer_tar(base_entries())])
    mangle(layout)
    r = run("import-image", layout, tmp_path / "store", check=False)
    assert r.returncode == 1 and r.stderr.decode().startswith("cimfs: ") and message in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()
    assert [n for n in os.listdir(tmp_path / "store" / "layers")] == []


def test_docker_archive_without_manifest_and_garbage_on_stdin(tmp_path):
    import tarfile

    with tarfile.open(tmp_path / "empty.tar", "w") as tf:
        tf.addfile(tarfile.TarInfo("repositories"))
    r = run("import-image", tmp_path / "empty.tar", tmp_path / "store", check=False)
    assert r.returncode == 1 and "manifest.json" in r.stderr.decode()
    r = run("import-image", "-", tmp_path / "store", input=b"this is not a tar" * 100, check=False)
    assert r.returncode == 1 and "docker archive" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    assert not [n for n in os.listdir(tmp_path / "store") if n.startswith(".spool")]


def test_platform_from_a_nested_multi_platform_index(tmp_path):
    """An index whose manifest list holds a linux and two windows images (two os.versions)."""
    layout = tmp_path / "lay"
    m_win, _ = write_layout(layout, [layer_tar(base_entries())], ref="unused")
    index = json.load(open(layout / "index.json"))
    win = index["manifests"][0]
    del win["annotations"]

    def put(obj) -> dict:
        data = json.dumps(obj).encode()
        d = sha(data)
        (layout / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return {"digest": d, "size": len(data)}

    # a second windows image (another os.version) and a linux one, sharing nothing
    win2_layer = layer_tar(base_entries([("file", "Files/ltsc2019.txt", b"2019")]))
    (layout / "blobs" / "sha256" / sha(win2_layer)[7:]).write_bytes(win2_layer)
    cfg2 = put(
        {
            "os": "windows",
            "architecture": "amd64",
            "os.version": "10.0.17763.1",
            "rootfs": {"type": "layers", "diff_ids": [sha(win2_layer)]},
        }
    )
    man2 = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": dict(cfg2, mediaType="application/vnd.oci.image.config.v1+json"),
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(win2_layer),
                    "size": len(win2_layer),
                }
            ],
        }
    )
    lin = put({"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": []}})
    man_lin = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": dict(lin, mediaType="application/vnd.oci.image.config.v1+json"),
            "layers": [],
        }
    )
    inner = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                dict(
                    man_lin,
                    mediaType="application/vnd.oci.image.manifest.v1+json",
                    platform={"os": "linux", "architecture": "amd64"},
                ),
                dict(win, platform={"os": "windows", "architecture": "amd64", "os.version": "10.0.20348.1"}),
                dict(
                    man2,
                    mediaType="application/vnd.oci.image.manifest.v1+json",
                    platform={"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"},
                ),
            ],
        }
    )
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    dict(
                        inner,
                        mediaType="application/vnd.oci.image.index.v1+json",
                        annotations={"org.opencontainers.image.ref.name": "multi"},
                    )
                ],
            }
        )
    )
    r = run("import-image", layout, tmp_path / "s", check=False)
    assert r.returncode == 1 and "several images match" in r.stderr.decode() and "10.0.17763.1" in r.stderr.decode()
    r = json.loads(
        run("import-image", layout, tmp_path / "s", "--platform", "windows/amd64:10.0.17763", "--json").stdout
    )
    assert r["manifest_digest"] == man2["digest"] and r["refs"] == ["multi"]
    with cimfs.open(r["top"]) as img:
        assert img.read_bytes("Files\\ltsc2019.txt") == b"2019"
    r = json.loads(
        run("import-image", layout, tmp_path / "s2", "--platform", "windows/amd64:10.0.20348", "--json").stdout
    )
    assert r["manifest_digest"] == m_win


def test_foreign_layer_present_in_the_layout_is_imported(tmp_path):
    layers = app_layers()
    _, descs = write_layout(tmp_path / "lay", layers, foreign=0)
    blob = os.path.join(tmp_path / "lay", "blobs", "sha256", descs[0]["digest"][7:])
    import gzip

    with open(blob, "wb") as f:  # what skopeo --preserve-digests / a pull of non-distributable layers puts there
        f.write(gzip.compress(layers[0], mtime=0))
    assert sha(open(blob, "rb").read()) == descs[0]["digest"]
    r = oci.import_image(str(tmp_path / "lay"), tmp_path / "s")
    assert [x["status"] for x in r["layers"]] == ["new"] * 3
    assert r["layers"][0]["media_type"] == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def test_compressed_docker_archive_file_and_stdin(app_layout, tmp_path):
    import gzip

    layout, _, _ = app_layout
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    oci.export_image(str(store), "app:1.0", str(tmp_path / "d.tar"), fmt="docker-archive")
    packed = gzip.compress((tmp_path / "d.tar").read_bytes())
    (tmp_path / "d.tar.gz").write_bytes(packed)
    run("import-image", tmp_path / "d.tar.gz", tmp_path / "s1", "--ref", "again")
    assert_same_layers(store, "app:1.0", tmp_path / "s1", "again")
    run("import-image", "-", tmp_path / "s2", "--ref", "again", input=packed)
    assert_same_layers(store, "app:1.0", tmp_path / "s2", "again")
    r = run("import-image", "-", tmp_path / "s3", input=packed[: len(packed) // 2], check=False)
    assert r.returncode == 1 and "truncated" in r.stderr.decode()
    assert sorted(os.listdir(tmp_path / "s3")) == ["blobs", "layers", "lock"]
    assert os.listdir(tmp_path / "s3" / "layers") == []


def test_two_stores_get_byte_identical_layer_images(app_layout, tmp_path):
    layout, _, _ = app_layout
    oci.import_image(str(layout), tmp_path / "s1")
    oci.import_image(str(layout), tmp_path / "s2", jobs=2)
    a, b = snapshot(tmp_path / "s1" / "layers"), snapshot(tmp_path / "s2" / "layers")
    assert a == b and len([n for n in a if n.endswith(".cim")]) == 3


def test_images_listing_and_rmi_by_digest_prefix(tmp_path):
    write_layout(tmp_path / "lay", [layer_tar(base_entries())], ref="one:1")
    store = tmp_path / "store"
    r = oci.import_image(str(tmp_path / "lay"), store, reference="other:2")
    assert r["refs"] == ["one:1", "other:2"]
    text = run("images", store).stdout.decode()
    assert r["id"][:19] in text and "one:1,other:2" in text and "windows/amd64" in text
    run("rmi", store, "one:1")  # one name of two: the image stays
    assert [i["refs"] for i in oci.list_images(store)] == [["other:2"]]
    assert run("rmi", store, "sha256:", check=False).returncode == 1  # too short a prefix to name anything
    out = run("rmi", store, r["id"].split(":")[1][:12], "-v").stdout.decode().split()
    assert out == [r["layers"][0]["chain_id"]]
    assert oci.list_images(store) == [] and os.listdir(store / "layers") == []
    assert os.listdir(store / "blobs" / "sha256") == []


def test_independent_layers_share_across_images_and_merge_to_the_fork_chain(app_layout, tmp_path):
    layout, _, _ = app_layout
    chain_store, store = tmp_path / "chain", tmp_path / "store"
    oci.import_image(str(layout), chain_store)
    r = json.loads(run("import-image", layout, store, "--independent", "--json").stdout)
    diff_ids = [sha(t) for t in app_layers()]
    assert r["mode"] == "independent" and r["merged"] == "new"
    assert [x["image"] for x in r["layers"]] == ["base-" + diff_ids[0][7:] + ".cim"] + [
        "ind-" + d[7:] + ".cim" for d in diff_ids[1:]
    ]
    with cimfs.open(r["top"]) as merged, cimfs.open(layer_images(chain_store, "app:1.0")[-1]) as top:
        assert tools.diff_images(top, merged) == {"added": [], "removed": [], "changed": []}
        assert merged.read_bytes("layout") == b"vhd-with-hives\n"
        assert merged.stat("Hives\\SAM_BASE").file_id == merged.stat("Files\\Windows\\System32\\config\\SAM").file_id
    with cimfs.open(store / "layers" / r["layers"][2]["image"]) as third:  # converted on its own: no parent
        assert not third.info().get("parent_region_sets") and not third.exists("Files\\Windows")
    # another image with the same upper layer on another base shares that layer's image
    other = [layer_tar(base_entries([("file", "Files/other.txt", b"o")]))] + app_layers()[1:]
    write_layout(tmp_path / "other", other, ref="other:1")
    r2 = oci.import_image(str(tmp_path / "other"), store, independent=True)
    assert [x["status"] for x in r2["layers"]] == ["new", "reused", "reused"] and r2["merged"] == "new"
    with cimfs.open(r2["top"]) as merged:
        assert merged.read_bytes("Files\\other.txt") == b"o" and merged.read_bytes("Files\\data\\c") == b"c" * 40000
    # exported (tombstones as whiteouts, merge links as hard links) and imported as a fork chain: the same layers
    run("export-image", store, "app:1.0", tmp_path / "x")
    oci.import_image(str(tmp_path / "x"), tmp_path / "again", reference="again")
    assert_same_layers(chain_store, "app:1.0", tmp_path / "again", "again")
    run("rmi", store, "app:1.0")
    left = sorted(n for n in os.listdir(store / "layers") if n.endswith(".cim"))
    assert left == sorted([x["image"] for x in r2["layers"]] + [os.path.basename(r2["top"])])
    with cimfs.open(r2["top"]) as merged:
        assert merged.read_bytes("Files\\app.exe")[:2] == b"MZ"
    run("rmi", store, "other:1")
    assert os.listdir(store / "layers") == []
