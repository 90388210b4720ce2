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
from ocihelp import base_entries, layer_tar, sha, write_layout  # noqa: E402

TIMEOUT = 60


def run(*args, input=None, timeout=TIMEOUT, memory=None):
    cmd = [sys.executable, "-m", "cimfs.cli", *map(str, args)]
    if memory:
        cmd = ["prlimit", f"--as={memory}", "--"] + cmd
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)


def one_line_error(p, *words):
    err = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("cimfs: "), err
    for w in words:
        assert w in err, (w, err)
    return err


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
    for args in (("rmi", store, "app:1"), ("images", store), ("export-image", store, "app:1", tmp_path / "out"),
                 ("import-image", layout, store), ("gc", store)):
        one_line_error(run(*args), "refs.json", "not a layer image name")
        assert victim.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(CimError, match="not a layer image name"):
        oci.remove_image(store, "app:1")
    assert victim.exists()


# ------------------------------------------------------------------ 16: refs.json of the wrong shape
def _deep(refs):
    refs["images"][next(iter(refs["images"]))]["platform"] = "X"  # replaced as text below


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
    for args in (("images", store), ("rmi", store, "app:1"), ("export-image", store, "app:1", tmp_path / "out"),
                 ("import-image", layout, store), ("gc", store)):
        one_line_error(run(*args), "refs.json")
    assert sorted(os.listdir(store / "layers")) == before


@pytest.mark.parametrize("what", ["refs.json", "layer record"])
def test_deeply_nested_store_json_is_one_line(layout, tmp_path, what):
    store = tmp_path / "store"
    oci.import_image(str(layout), store)
    deep = b"[" * 100_000 + b"]" * 100_000
    if what == "refs.json":
        (store / "refs.json").write_bytes(deep)
        for args in (("images", store), ("rmi", store, "app:1"), ("import-image", layout, store)):
            one_line_error(run(*args), "refs.json", "nested deeper")
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
        d.split(":")[1] for d in (the_record(refs_of(store))["manifest_digest"],
                                  the_record(refs_of(store))["config_digest"]))
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


def test_killed_import_is_rolled_back_at_the_next_open(tmp_path):
    big = os.urandom(24 << 20)
    layers = [layer_tar(base_entries()), layer_tar([("dir", "Files"), ("file", "Files/big.bin", big)])]
    write_layout(tmp_path / "lay", layers, compression="none")
    store = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-m", "cimfs.cli", "import-image", str(tmp_path / "lay"), str(store)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    l2 = layer_tar([("dir", "Files"), ("whiteout", "Files/a.txt"), ("opaque", "Files/d"), ("dir", "Files/d"),
                    ("file", "Files/d/y", b"y"), ("file", "Files/b.txt", b"b")])
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
