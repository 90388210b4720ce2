"""The layer store and its sources against hostile input (issue 22, items 5,
7, 8, 9, 12-16): an edited refs.json, hostile OCI layouts and docker archives,
stdin bombs, FIFOs, interrupted changes.  Every case is bounded (timeouts,
prlimit) and must end in one line naming the file, with nothing outside the
store touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

import cimfs
from cimfs import oci, tools
from cimfs.errors import CimError

sys.path.insert(0, os.path.dirname(__file__))
from ocihelp import base_entries, layer_tar, sha, write_layout

TIMEOUT = 60


def run(*args, input=None, timeout=TIMEOUT, memory=None):
    cmd = [sys.executable, "-m", "cimfs.cli", *map(str, args)]
    if memory:
        cmd = ["prlimit", f"--as={memory}", "--"] + cmd
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, check=False)


def one_line_error(p, *words):
    err = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("cimfs: "), err
    for w in words:
        assert w in err, (w, err)
    return err


def library_error(call, *words):
    """``call()`` raises one CimError whose message is one line holding ``words``."""
    with pytest.raises(CimError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def every_store_command(store, layout, out):
    """The commands that read a store's JSON, as library calls (the CLI prints their CimError as it is)."""
    return [
        lambda: oci.list_images(store),
        lambda: oci.remove_image(store, "app:1"),
        lambda: oci.export_image(store, "app:1", out),
        lambda: oci.import_image(str(layout), store),
        lambda: oci.prune(store),
    ]


def small_layers():
    return [layer_tar(base_entries()), layer_tar([("dir", "Files"), ("file", "Files/a.txt", b"a" * 3000)])]


@pytest.fixture
def layout(tmp_path):
    write_layout(tmp_path / "lay", small_layers(), ref="app:1")
    return tmp_path / "lay"


def refs_of(store):
    with open(os.path.join(store, "refs.json")) as f:
        return json.load(f)


def edit_refs(store, change):
    refs = refs_of(store)
    change(refs)
    with open(os.path.join(store, "refs.json"), "w") as f:
        json.dump(refs, f)


def the_record(refs):
    (rec,) = refs["images"].values()
    return rec


def cims(store):
    return sorted(n for n in os.listdir(os.path.join(store, "layers")) if n.endswith(".cim"))


# ------------------------------------------------------------------ 5: names in refs.json stay inside the store
@pytest.mark.parametrize("field", ["top", "independent_layers"])
def test_rmi_never_removes_outside_the_store(layout, tmp_path, field):
    store = tmp_path / "store"
    oci.import_image(str(layout), store, independent=True)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "precious.cim"
    top = os.path.join(store, "layers", the_record(refs_of(store))["top"])
    shutil.copy(top, victim)  # a real image: rm_image would remove it
    evil = "../../victim/precious.cim"
    if field == "top":
        edit_refs(store, lambda r: the_record(r).update(top=evil))
    else:
        edit_refs(store, lambda r: the_record(r)["independent_layers"].__setitem__(0, evil))
    one_line_error(run("rmi", store, "app:1"), "refs.json", "not a layer image name")
    for call in every_store_command(store, layout, tmp_path / "out"):
        library_error(call, "refs.json", "not a layer image name")
        assert victim.exists()
    assert not (tmp_path / "out").exists()


def test_a_journal_naming_files_outside_the_store_is_refused(layout, tmp_path):
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    victim = tmp_path / "precious.cim"
    shutil.copy(store / "layers" / the_record(refs_of(store))["top"], victim)
    (store / "journal.json").write_text(json.dumps({"images": ["../../precious.cim"], "blobs": []}))
    for call in (
        lambda: oci.remove_image(store, "app:1"),
        lambda: oci.import_image(str(layout), store),
        lambda: oci.prune(store),
    ):  # every change settles the journal first
        library_error(call, "journal.json", "not a layer image name")
    assert victim.exists() and oci.list_images(store)[0]["refs"] == ["app:1"]


# ------------------------------------------------------------------ 16: refs.json of the wrong shape
MANGLED = {
    "images a list": lambda r: r.update(images=[]),
    "record a list": lambda r: r["images"].update({k: [] for k in r["images"]}),
    "refs a number": lambda r: the_record(r).update(refs=5),
    "refs of numbers": lambda r: the_record(r).update(refs=[1, 2]),
    "layers text": lambda r: the_record(r).update(layers="sha256:abc"),
    "layers of lists": lambda r: the_record(r).update(layers=[[1]]),
    "no config digest": lambda r: the_record(r).pop("config_digest"),
    "manifest digest a dict": lambda r: the_record(r).update(manifest_digest={"a": 1}),
    "platform a list": lambda r: the_record(r).update(platform=["x"]),
    "image id not a digest": lambda r: r.update(images={"x": the_record(r)}),
    "mode unknown": lambda r: the_record(r).update(mode="both"),
    "version text": lambda r: r.update(version="1"),
}


@pytest.mark.parametrize("mangle", sorted(MANGLED))
def test_refs_json_of_the_wrong_shape_is_one_line(layout, tmp_path, mangle):
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    edit_refs(store, MANGLED[mangle])
    before = sorted(os.listdir(store / "layers"))
    one_line_error(run("images", store), "refs.json")
    for call in every_store_command(store, layout, tmp_path / "out"):
        library_error(call, "refs.json")
    assert sorted(os.listdir(store / "layers")) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["refs.json", "layer record"])
def test_deeply_nested_store_json_is_one_line(layout, tmp_path, what):
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    deep = b"[" * 100_000 + b"]" * 100_000
    if what == "refs.json":
        (store / "refs.json").write_bytes(deep)
        one_line_error(run("images", store), "refs.json", "nested deeper")
        for call in every_store_command(store, layout, tmp_path / "out"):
            library_error(call, "refs.json", "nested deeper")
    else:
        top = the_record(refs_of(store))["top"]
        (store / "layers" / (top[:-4] + ".json")).write_bytes(deep)
        one_line_error(run("export-image", store, "app:1", tmp_path / "out"), top[:-4] + ".json", "nested deeper")
        assert not (tmp_path / "out").exists()


def test_store_fifo_as_refs_json_is_refused_not_waited_for(layout, tmp_path):
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    os.unlink(store / "refs.json")
    os.mkfifo(store / "refs.json")
    one_line_error(run("images", store, timeout=20), "refs.json", "not a regular file")


# ------------------------------------------------------------------ 14: what no reference reaches
def test_gc_of_a_store_lists_and_removes_unreferenced_layers_and_blobs(layout, tmp_path):
    other = [layer_tar(base_entries([("file", "Files/o.txt", b"o")]))]
    write_layout(tmp_path / "other", other, ref="other:1")
    store, stray = tmp_path / "store", tmp_path / "stray"
    oci.import_image(str(layout), store)
    oci.import_image(str(tmp_path / "other"), stray)
    kept = cims(store)
    # what a killed run of an older cimfs (no journal) or a hand copy leaves: images and blobs no reference reaches
    for n in os.listdir(stray / "layers"):
        shutil.copy(stray / "layers" / n, store / "layers" / n)
    for n in os.listdir(stray / "blobs" / "sha256"):
        shutil.copy(stray / "blobs" / "sha256" / n, store / "blobs" / "sha256" / n)
    orphans = sorted(set(cims(store)) - set(kept))
    assert orphans == cims(stray)
    listed = run("gc", store, "-n")
    assert listed.returncode == 0, listed.stderr
    names = {os.path.basename(p) for p in listed.stdout.decode().split()}
    assert set(orphans) <= names and set(os.listdir(stray / "blobs" / "sha256")) <= names
    assert not names & set(kept)
    assert cims(store) == sorted(kept + orphans)  # a dry run removes nothing
    assert run("gc", store).returncode == 0
    assert cims(store) == kept
    assert sorted(os.listdir(store / "blobs" / "sha256")) == sorted(
        d.split(":")[1]
        for d in (the_record(refs_of(store))["manifest_digest"], the_record(refs_of(store))["config_digest"])
    )
    assert tools.gc(str(store / "layers"), dry_run=True) == []
    for n in kept:
        assert tools.fsck(str(store / "layers" / n)) == []
    with cimfs.open(store / "layers" / the_record(refs_of(store))["top"]) as img:
        assert img.read_bytes("Files\\a.txt") == b"a" * 3000


def test_killed_rmi_is_finished_at_the_next_open(layout, tmp_path):
    """The state an rmi killed after writing refs.json leaves: its journal, the layers still there."""
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    rec = the_record(refs_of(store))
    names = [rec["top"]] + [c[7:] + ".cim" for c in reversed(rec["layers"])]
    with open(store / "journal.json", "w") as f:
        json.dump({"images": list(dict.fromkeys(names)), "blobs": [rec["manifest_digest"], rec["config_digest"]]}, f)
    edit_refs(store, lambda r: r["images"].clear())
    assert oci.list_images(store) == [] and cims(store)
    write_layout(tmp_path / "other", [layer_tar(base_entries([("file", "Files/o.txt", b"o")]))], ref="o:1")
    oci.import_image(str(tmp_path / "other"), store)  # any change opens the store: the rmi is finished first
    assert not (store / "journal.json").exists()
    assert cims(store) == [the_record(refs_of(store))["top"]]
    assert len(os.listdir(store / "blobs" / "sha256")) == 2
    assert oci.prune(store, dry_run=True) == []


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_killed_import_is_rolled_back_at_the_next_open(tmp_path, jobs):
    """With --jobs 2 the reader process, left alone, ends (it would hold the store's lock otherwise)."""
    big = os.urandom(24 << 20)
    layers = [layer_tar(base_entries()), layer_tar([("dir", "Files"), ("file", "Files/big.bin", big)])]
    write_layout(tmp_path / "lay", layers, compression="none")
    store = tmp_path / "store"
    p = subprocess.Popen(
        [sys.executable, "-m", "cimfs.cli", "import-image", str(tmp_path / "lay"), str(store), "--jobs", jobs],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_cim = store / "layers" / (sha(layers[0])[7:] + ".cim")
    deadline = time.monotonic() + TIMEOUT
    try:
        while p.poll() is None and not base_cim.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL, "the import finished before it could be killed"
    assert base_cim.exists() and oci.list_images(store) == []
    removed = oci.prune(store)  # opening the store rolls the import back; nothing else is left
    assert os.listdir(store / "layers") == [] and os.listdir(store / "blobs" / "sha256") == []
    assert not (store / "journal.json").exists()
    assert removed == []  # the rollback, not the prune, removed the layer: nothing was left for it


def test_reimport_in_the_other_mode_frees_the_old_layers(layout, tmp_path):
    store = tmp_path / "store"
    chain = oci.import_image(str(layout), store)
    chain_images = [x["image"] for x in chain["layers"]]
    ind = oci.import_image(str(layout), store, independent=True)
    assert sorted(cims(store)) == sorted([x["image"] for x in ind["layers"]] + [os.path.basename(ind["top"])])
    assert not set(chain_images) & set(cims(store))
    assert oci.prune(store, dry_run=True) == []
    back = oci.import_image(str(layout), store)
    assert cims(store) == sorted(x["image"] for x in back["layers"]) == sorted(chain_images)
    oci.remove_image(store, "app:1")
    assert os.listdir(store / "layers") == [] and os.listdir(store / "blobs" / "sha256") == []


# ------------------------------------------------------------------ 15: --independent with a repeated layer
def test_independent_import_of_a_repeated_layer_matches_the_fork_chain(tmp_path):
    l1 = layer_tar([("dir", "Files"), ("dir", "Files/d"), ("file", "Files/d/x", b"x1"), ("file", "Files/a.txt", b"a")])
    l2 = layer_tar(
        [
            ("dir", "Files"),
            ("whiteout", "Files/a.txt"),
            ("opaque", "Files/d"),
            ("dir", "Files/d"),
            ("file", "Files/d/y", b"y"),
            ("file", "Files/b.txt", b"b"),
        ]
    )
    write_layout(tmp_path / "lay", [layer_tar(base_entries()), l1, l2, l1], ref="rep:1")
    chain = oci.import_image(str(tmp_path / "lay"), tmp_path / "chain")
    store = tmp_path / "store"
    r = json.loads(run("import-image", tmp_path / "lay", store, "--independent", "--json").stdout)
    assert [x["status"] for x in r["layers"]] == ["new", "new", "new", "reused"]
    assert r["layers"][1]["image"] == r["layers"][3]["image"]
    with cimfs.open(r["top"]) as merged, cimfs.open(chain["top"]) as top:
        assert tools.diff_images(top, merged) == {"added": [], "removed": [], "changed": []}
        assert merged.read_bytes("Files\\a.txt") == b"a" and merged.read_bytes("Files\\d\\x") == b"x1"
        assert merged.read_bytes("Files\\d\\y") == b"y"
    assert run("export-image", store, "rep:1", tmp_path / "out").returncode == 0
    again = oci.import_image(str(tmp_path / "out"), tmp_path / "again")
    with cimfs.open(again["top"]) as a, cimfs.open(chain["top"]) as top:
        assert tools.diff_images(top, a) == {"added": [], "removed": [], "changed": []}
    assert run("rmi", store, "rep:1").returncode == 0
    assert os.listdir(store / "layers") == []


# ------------------------------------------------------------------ sources: builders
def docker_archive(layer_tars, repo_tags, *, manifest_bytes=None, config_bytes=None) -> bytes:
    """A ``docker save`` archive of one windows image, by hand."""
    config = {
        "architecture": "amd64",
        "os": "windows",
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layer_tars]},
    }
    cbytes = config_bytes if config_bytes is not None else json.dumps(config).encode()
    cname = hashlib.sha256(cbytes).hexdigest() + ".json"
    manifest = [{"Config": cname, "RepoTags": repo_tags, "Layers": [sha(t)[7:] + "/layer.tar" for t in layer_tars]}]
    mbytes = manifest_bytes if manifest_bytes is not None else json.dumps(manifest).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:

        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        for t in layer_tars:
            add(sha(t)[7:] + "/layer.tar", t)
        add(cname, cbytes)
        add("manifest.json", mbytes)
    return buf.getvalue()


def zstd_stream(*parts, zeros=0) -> bytes:
    """zstd of ``parts`` then ``zeros`` zero bytes (compressed as they come: a bomb of a few KB)."""
    import zstandard

    c = zstandard.ZstdCompressor(level=3).compressobj()
    out = [c.compress(p) for p in parts]
    chunk = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(chunk))
    out.append(c.flush())
    return b"".join(out)


# ------------------------------------------------------------------ 7: RepoTags as text
def test_repo_tags_as_text_is_refused_and_takes_no_reference(layout, tmp_path):
    store = tmp_path / "store"
    oci.import_image(str(layout), store, reference="a")
    arc = tmp_path / "app.tar"
    arc.write_bytes(docker_archive(small_layers()[:1], "ab:1"))
    one_line_error(run("import-image", arc, store), "RepoTags", "not a list")
    assert [r["refs"] for r in oci.list_images(store)] == [["a", "app:1"]]
    arc.write_bytes(docker_archive(small_layers()[:1], None))  # null: no tags, as docker writes it
    r = oci.import_image(str(arc), store)
    assert r["refs"] == [] and len(oci.list_images(store)) == 2
    arc.write_bytes(docker_archive(small_layers()[:1], ["x:1", 5]))
    one_line_error(run("import-image", arc, store), "RepoTags[1]")


# ------------------------------------------------------------------ 8, 9: index fan-out
def _index_desc(digest, size, mt="application/vnd.oci.image.index.v1+json", name=None):
    d = {"mediaType": mt, "digest": digest, "size": size}
    if name is not None:
        d["annotations"] = {"org.opencontainers.image.ref.name": name}
    return d


def nested_layout(path, depth, fanout, top_names=None):
    """An image whose index.json reaches its manifest through ``depth`` nested
    indexes, each listing the next ``fanout`` times."""
    mdigest, _ = write_layout(path, small_layers()[:1], ref="inner")
    msize = os.path.getsize(os.path.join(path, "blobs", "sha256", mdigest[7:]))
    desc = _index_desc(mdigest, msize, "application/vnd.oci.image.manifest.v1+json")
    for _ in range(depth):
        data = json.dumps({"schemaVersion": 2, "manifests": [desc] * fanout}).encode()
        with open(os.path.join(path, "blobs", "sha256", sha(data)[7:]), "wb") as f:
            f.write(data)
        desc = _index_desc(sha(data), len(data))
    names = top_names or [None] * fanout
    index = {
        "schemaVersion": 2,
        "manifests": [dict(desc, annotations={"org.opencontainers.image.ref.name": n}) if n else desc for n in names],
    }
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


def test_nested_index_bomb_is_refused_at_once(tmp_path):
    nested_layout(tmp_path / "bomb", 8, 10)
    assert sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tmp_path / "bomb") for n in ns) < 200_000
    p = run("import-image", tmp_path / "bomb", tmp_path / "store", timeout=30, memory=1 << 30)
    one_line_error(p, "more than 10000 manifests")


def test_nested_indexes_within_the_bounds_resolve_each_blob_once(tmp_path):
    nested_layout(tmp_path / "ok", 3, 9, top_names=["one", "two"])  # 2 + 18 + 162 + 1458 descriptors
    r = oci.import_image(str(tmp_path / "ok"), tmp_path / "store")
    assert r["refs"] == ["one", "two"] and len(r["layers"]) == 1
    nested_layout(tmp_path / "deep", 9, 1)
    one_line_error(run("import-image", tmp_path / "deep", tmp_path / "store"), "nested more than 8 deep")


@pytest.mark.parametrize("count", [5_000, 150_000])
def test_one_manifest_listed_many_times(tmp_path, count):
    mdigest, _ = write_layout(tmp_path / "lay", small_layers()[:1], ref="first")
    msize = os.path.getsize(tmp_path / "lay" / "blobs" / "sha256" / mdigest[7:])
    index = {
        "schemaVersion": 2,
        "manifests": [
            _index_desc(mdigest, msize, "application/vnd.oci.image.manifest.v1+json", f"t{i}") for i in range(count)
        ],
    }
    with open(tmp_path / "lay" / "index.json", "w") as f:
        json.dump(index, f)
    p = run("import-image", tmp_path / "lay", tmp_path / "store", "--json", timeout=30, memory=2 << 30)
    if count > 10_000:
        one_line_error(p, "more than 10000 manifests")
    else:
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["refs"] == sorted(f"t{i}" for i in range(count))


# ------------------------------------------------------------------ 12: spooling stdin
def test_stdin_zstd_bomb_after_the_archive_end_is_not_spooled(tmp_path):
    layers = small_layers()
    bomb = zstd_stream(docker_archive(layers, ["app:1"]), zeros=256 << 20)
    assert len(bomb) < 100_000
    store = tmp_path / "store"
    cmd = [
        "prlimit",
        "--fsize=67108864",
        "--",
        sys.executable,
        "-m",
        "cimfs.cli",
        "import-image",
        "-",
        str(store),
        "--json",
    ]
    p = subprocess.run(cmd, input=bomb, capture_output=True, timeout=TIMEOUT, check=False)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert json.loads(p.stdout)["refs"] == ["app:1"]
    assert not [n for n in os.listdir(store) if n.startswith(".spool-")]


def test_stdin_member_larger_than_the_free_space_is_refused(tmp_path):
    huge = tarfile.TarInfo("abc/layer.tar")
    huge.size = 1 << 50  # 1 PiB: more than any test machine has free
    bomb = zstd_stream(huge.tobuf(format=tarfile.GNU_FORMAT), zeros=256 << 20)
    store = tmp_path / "store"
    cmd = ["prlimit", "--fsize=67108864", "--", sys.executable, "-m", "cimfs.cli", "import-image", "-", str(store)]
    p = subprocess.run(cmd, input=bomb, capture_output=True, timeout=TIMEOUT, check=False)
    one_line_error(p, "<stdin>", "declares 1125899906842624 bytes", "free")
    assert not [n for n in os.listdir(store) if n.startswith(".spool-")]


# ------------------------------------------------------------------ 13: FIFOs
@pytest.mark.parametrize("which", ["index.json", "oci-layout", "manifest", "config", "layer"])
def test_fifo_in_a_layout_is_refused_not_waited_for(tmp_path, which):
    mdigest, descs = write_layout(tmp_path / "lay", small_layers()[:1])
    manifest = json.loads((tmp_path / "lay" / "blobs" / "sha256" / mdigest[7:]).read_bytes())
    path = {
        "index.json": tmp_path / "lay" / "index.json",
        "oci-layout": tmp_path / "lay" / "oci-layout",
        "manifest": tmp_path / "lay" / "blobs" / "sha256" / mdigest[7:],
        "config": tmp_path / "lay" / "blobs" / "sha256" / manifest["config"]["digest"][7:],
        "layer": tmp_path / "lay" / "blobs" / "sha256" / descs[0]["digest"][7:],
    }[which]
    os.unlink(path)
    os.mkfifo(path)
    store = tmp_path / "store"
    one_line_error(run("import-image", tmp_path / "lay", store, timeout=20), "not a regular file")
    assert not (store / "refs.json").exists() and os.listdir(store / "layers") == []


def test_archive_given_as_a_fifo_is_read_as_a_stream(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = docker_archive(small_layers(), ["app:1"])
    p = subprocess.Popen(
        [sys.executable, "-m", "cimfs.cli", "import-image", str(fifo), str(tmp_path / "store"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with open(fifo, "wb") as w:
        w.write(data)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err
    assert json.loads(out)["refs"] == ["app:1"]


# ------------------------------------------------------------------ 16: a source's JSON
DEEP = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


def _layout_file(lay, which):
    index = json.loads((lay / "index.json").read_bytes())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((lay / "blobs" / "sha256" / mdigest[7:]).read_bytes())
    return {
        "index": lay / "index.json",
        "manifest": lay / "blobs" / "sha256" / mdigest[7:],
        "config": lay / "blobs" / "sha256" / manifest["config"]["digest"][7:],
    }[which]


def _replace_blob(lay, which, data):
    """Put ``data`` in place of a blob and fix every digest that names it up to index.json."""
    index = json.loads((lay / "index.json").read_bytes())
    mpath = _layout_file(lay, "manifest")
    manifest = json.loads(mpath.read_bytes())
    if which == "config":
        (lay / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
        manifest["config"].update(digest=sha(data), size=len(data))
        data = json.dumps(manifest).encode()
    (lay / "blobs" / "sha256" / sha(data)[7:]).write_bytes(data)
    index["manifests"][0].update(digest=sha(data), size=len(data))
    (lay / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("which", ["index", "manifest", "config"])
def test_deeply_nested_source_json_is_one_line(tmp_path, which):
    lay = tmp_path / "lay"
    write_layout(lay, small_layers()[:1])
    if which == "index":
        (lay / "index.json").write_bytes(DEEP)
    else:
        _replace_blob(lay, which, DEEP)
    one_line_error(run("import-image", lay, tmp_path / "store"), "nested deeper", which)


MANGLED_SOURCE = {
    "platform text": ("index", lambda j: j["manifests"][0].update(platform="windows")),
    "platform a number": ("index", lambda j: j["manifests"][0].update(platform=5)),
    "annotations ref a list": (
        "index",
        lambda j: j["manifests"][0].update(annotations={"org.opencontainers.image.ref.name": ["x"]}),
    ),
    "layer media type a list": ("manifest", lambda j: j["layers"][0].update(mediaType=["x"])),
    "config a list": ("config", lambda j: [j]),
    "manifest a list": ("manifest", lambda j: [j]),
}


@pytest.mark.parametrize("mangle", sorted(MANGLED_SOURCE))
def test_source_json_of_the_wrong_shape_is_one_line_or_ignored(tmp_path, mangle):
    lay = tmp_path / "lay"
    write_layout(lay, small_layers()[:1])
    which, change = MANGLED_SOURCE[mangle]
    path = _layout_file(lay, which)
    j = json.loads(path.read_bytes())
    j = change(j) or j
    if which == "index":
        path.write_text(json.dumps(j))
    else:
        _replace_blob(lay, which, json.dumps(j).encode())
    p = run("import-image", lay, tmp_path / "store")
    if mangle.startswith("platform"):  # a descriptor's platform that is not an object is ignored: the config says it
        assert p.returncode == 0, p.stderr
    else:
        one_line_error(p)


@pytest.mark.parametrize("what", ["manifest.json", "config"])
def test_docker_archive_json_nested_or_of_the_wrong_shape(tmp_path, what):
    arc = tmp_path / "a.tar"
    for bad in (DEEP, b"[" * 50_000 + b"]" * 50_000, b'{"x": 1}' if what == "manifest.json" else b"[1]"):
        kw = {"manifest_bytes": bad} if what == "manifest.json" else {"config_bytes": bad}
        arc.write_bytes(docker_archive(small_layers()[:1], ["a:1"], **kw))
        library_error(lambda: oci.import_image(str(arc), tmp_path / "store"), what)
        library_error(lambda: oci.import_image(io.BytesIO(arc.read_bytes()), tmp_path / "store"), "<stdin>", what)
    one_line_error(run("import-image", "-", tmp_path / "store", input=arc.read_bytes()), "<stdin>", what)
