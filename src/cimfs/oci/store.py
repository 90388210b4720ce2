"""A content-addressed layer store of Windows container images.

Layout of ``STORE_DIR``::

    lock                     flock'ed by every change (imports, rmi)
    refs.json                images: references, manifest/config digests, layer chain
    blobs/sha256/<hex>       each image's config and manifest, as imported
    layers/<chain hex>.cim   one image per layer, named by its chain ID, each a
                             fork of the layer below; with its region files
    layers/<chain hex>.json  what the store knows of that layer (diff ID, blob,
                             paths the base-layer processing added, base hives
                             merged from a non-base layer's deltas); written
                             before the .cim is committed

    journal.json             present while an import or rmi runs: the layer
                             images and blobs it may create or leave unreferenced

A layer ``.cim`` is committed only after its blob digest and diff ID were
checked, so a ``.cim`` that exists is a complete, verified layer.  Every
change first writes the journal, then the layer images, then refs.json; the
next open under the lock (import, rmi, prune) replays a journal left by a
killed run: what it names that refs.json does not reach is removed (an
import is rolled back, an rmi finished).  :meth:`LayerStore.prune` removes
everything else no reference reaches.  Everything read back from refs.json
and the layer records is checked first (:mod:`.checked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from typing import Any

from .. import tools, winlayer
from ..atomic import fsync_dir, remove_quietly, replacing
from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from ..progress import Progress
from ..winlayer import hives
from . import blobs, checked
from .sources import open_source
from .storefiles import JOURNAL_FILE, LAYERS_DIR, LOCK_FILE, REFS_FILE, STORE_VERSION, is_store


# ---------------------------------------------------------------- small file helpers
def _write_atomic(path: str, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def layer_image_name(chain_id: str) -> str:
    return blobs.parse_digest(chain_id, "chain ID")[1] + ".cim"


def independent_image_name(diff_id: str, base: bool) -> str:
    """An independent layer depends on its own bytes only: named by diff ID
    (a base layer, which gets the hive processing, apart from the same layer
    higher up)."""
    return ("base-" if base else "ind-") + blobs.parse_digest(diff_id, "diff ID")[1] + ".cim"


def merged_image_name(top_chain_id: str) -> str:
    return "merged-" + blobs.parse_digest(top_chain_id, "chain ID")[1] + ".cim"


class StoreLock:
    """A ``flock`` on STORE_DIR/lock, waited for: exclusive for what changes the
    store (import, rmi: they queue up), shared for export (no rmi meanwhile)."""

    def __init__(self, store: str, *, shared: bool = False):
        path = os.path.join(store, LOCK_FILE)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise CimError(E_INVALIDARG, f"cannot open the store's lock file: {e.strerror or e}", path) from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise CimError(E_INVALIDARG, "the store's lock file is not a regular file", path)
            fcntl.flock(self.fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class LayerStore:
    def __init__(self, path: str, *, create: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.layers = os.path.join(self.path, LAYERS_DIR)
        if create:
            os.makedirs(self.layers, exist_ok=True)
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
        elif not is_store(self.path):
            raise CimError(ERROR_FILE_NOT_FOUND, "not an image store (no refs.json)", self.path)

    # ------------------------------------------------------------ refs
    def load_refs(self) -> dict:
        p = os.path.join(self.path, REFS_FILE)
        if not os.path.lexists(p):
            return {"version": STORE_VERSION, "images": {}}
        return checked.check_refs(checked.load_json(p, "the store's refs file"), p)

    def save_refs(self, refs: dict) -> None:
        _write_atomic(os.path.join(self.path, REFS_FILE), _dump(refs))

    def find(self, refs: dict, ref: str) -> tuple[str, dict]:
        """(image id, record) for a reference, an image/manifest/config digest or a unique digest prefix."""
        images = refs["images"]
        for key, rec in images.items():
            if ref in rec.get("refs", []):
                return key, rec
        hits = [
            (k, r)
            for k, r in images.items()
            if any(
                isinstance(d, str)
                and (d == ref or (len(ref) >= 8 and (d.startswith(ref) or d.split(":", 1)[-1].startswith(ref))))
                for d in (k, r.get("manifest_digest"), r.get("config_digest"))
            )
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise CimError(E_INVALIDARG, "the digest prefix names several images", ref)
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image in the store", ref)

    def layer_info(self, chain_id: str) -> dict:
        return self.layer_info_of(layer_image_name(chain_id))

    def layer_info_of(self, image_name: str) -> dict:
        p = os.path.join(self.layers, checked.image_name(image_name, self.layers, "layer image")[:-4] + ".json")
        return checked.check_layer_record(checked.load_json(p, "the layer's record"), p)

    def read_blob(self, digest: str) -> bytes:
        alg, hexd = blobs.parse_digest(digest)
        p = os.path.join(self.path, "blobs", alg, hexd)
        data = checked.read_regular(p, "a stored blob")
        if blobs.digest_bytes(data, alg) != digest:
            raise CimError(E_INVALIDARG, "stored blob does not match its digest", p)
        return data

    def _blob_path(self, digest: str) -> str:
        alg, hexd = blobs.parse_digest(digest)
        return os.path.join(self.path, "blobs", alg, hexd)

    def _put_blob(self, data: bytes, digest: str) -> None:
        p = self._blob_path(digest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if not os.path.exists(p):
            _write_atomic(p, data)

    def images(self) -> list[dict]:
        refs = self.load_refs()
        return [dict(rec, id=key) for key, rec in sorted(refs["images"].items())]

    # ------------------------------------------------------------ import
    def import_image(
        self,
        src,
        *,
        platform: str | None = None,
        jobs: int = 1,
        warn=None,
        progress_stream=None,
        reference: str | None = None,
        independent: bool = False,
    ) -> dict:
        warn = warn or (lambda m: None)
        jobs = max(1, int(jobs))
        if reference is not None:
            checked.ref_name(reference, "--ref", "the reference")
        with StoreLock(self.path):
            self._recover(warn)
            source = open_source(src, spool_dir=self.path)
            try:
                spec = source.resolve(platform)
                return self._import(spec, jobs, warn, progress_stream, reference, independent)
            finally:
                source.close()

    # ------------------------------------------------------------ journal, recovery, prune
    def reached(self, refs: dict) -> tuple[set, set]:
        """(layer image names, blob digests) the images of ``refs`` use."""
        images: set[str] = set()
        digests: set[str] = set()
        for rec in refs["images"].values():
            if rec.get("mode") == "independent":
                images.update(rec["independent_layers"])
            else:
                images.update(layer_image_name(c) for c in rec["layers"])
            if rec.get("top"):
                images.add(rec["top"])
            digests.update(d for d in (rec.get("manifest_digest"), rec.get("config_digest")) if d)
        return images, digests

    def _write_journal(self, images: list, digests: list) -> None:
        """Before a change: what it may create or leave unreferenced, in the order to remove it."""
        _write_atomic(os.path.join(self.path, JOURNAL_FILE), _dump({"images": images, "blobs": digests}))

    def _read_journal(self) -> tuple[list, list] | None:
        p = os.path.join(self.path, JOURNAL_FILE)
        if not os.path.lexists(p):
            return None
        j = checked.load_json(p, "the store's journal")
        images = j.get("images", [])
        digests = j.get("blobs", [])
        if not isinstance(images, list) or not isinstance(digests, list):
            raise CimError(E_INVALIDARG, "the store's journal lists no images and blobs", p)
        return (
            [checked.image_name(n, p, f"images[{i}]") for i, n in enumerate(images)],
            [checked.digest(d, p, f"blobs[{i}]") for i, d in enumerate(digests)],
        )

    def _settle(self, warn=None) -> list[str]:
        """Ends the change the journal names: each of its layer images and
        blobs that refs.json does not reach is removed, then the journal.
        Run at the end of every change and, for a killed one, at the next open."""
        journal = self._read_journal()
        if journal is None:
            return []
        images, digests = journal
        used_images, used_blobs = self.reached(self.load_refs())
        removed = []
        for name in dict.fromkeys(images):
            if name not in used_images and (
                os.path.lexists(os.path.join(self.layers, name))
                or os.path.lexists(os.path.join(self.layers, name[:-4] + ".json"))
            ):
                self._remove_layer(name, warn)
                removed.append(name)
        for d in digests:
            if d not in used_blobs:
                alg, hexd = blobs.parse_digest(d)
                remove_quietly(os.path.join(self.path, "blobs", alg, hexd))
        os.unlink(os.path.join(self.path, JOURNAL_FILE))
        fsync_dir(self.path)
        return removed

    def _recover(self, warn) -> None:
        """At each open under the exclusive lock: a killed change is ended
        (:meth:`_settle`), then what a killed writer left is swept: region
        files no .cim needs, layer records without a .cim, spool files."""
        warn = warn or (lambda m: None)
        self._settle(warn)
        try:
            tools.gc(self.layers, warn=warn)
        except CimError as e:
            warn(f"{self.layers}: {e.strerror}; unreferenced region files kept")
        for n in os.listdir(self.layers):
            if n.endswith(".json") and not os.path.exists(os.path.join(self.layers, n[:-5] + ".cim")):
                os.unlink(os.path.join(self.layers, n))
        for n in os.listdir(self.path):
            if n.startswith(".spool-"):
                os.unlink(os.path.join(self.path, n))

    def unreferenced(self, refs: dict) -> tuple[list, list]:
        """(layer image names, blob paths) in the store that no image reaches."""
        used_images, used_blobs = self.reached(refs)
        images = sorted(
            (n for n in os.listdir(self.layers) if n.endswith(".cim") and n not in used_images),
            key=lambda n: (not n.startswith("merged-"), n),
        )  # a merged image uses the others' regions
        stray = []
        for alg in ("sha256", "sha512"):
            d = os.path.join(self.path, "blobs", alg)
            if os.path.isdir(d):
                stray += [os.path.join(d, n) for n in sorted(os.listdir(d)) if f"{alg}:{n}" not in used_blobs]
        return images, stray

    def prune(self, *, dry_run: bool = False, warn=None) -> list[tuple[str, int]]:
        """Removes every layer image and blob no image of refs.json reaches (after
        ending a killed change), then the region files no layer image needs.
        Returns the files removed (or that would be), with their sizes."""
        warn = warn or (lambda m: None)
        with StoreLock(self.path):
            if not dry_run:
                self._recover(warn)
            images, stray = self.unreferenced(self.load_refs())
            removed: list[tuple[str, int]] = []
            for name in images:
                p = os.path.join(self.layers, name)
                if dry_run:
                    removed.append((p, os.path.getsize(p)))
                    continue
                try:
                    removed += tools.rm_image(p, warn=warn)
                except CimError as e:
                    warn(f"{p}: {e.strerror}")
                rec = os.path.join(self.layers, name[:-4] + ".json")
                if os.path.lexists(rec):
                    removed.append((rec, os.lstat(rec).st_size))
                    os.unlink(rec)
            for p in stray:
                removed.append((p, os.lstat(p).st_size))
                if not dry_run:
                    os.unlink(p)
            removed += tools.gc(self.layers, dry_run=dry_run, warn=warn)
            return removed

    def _import(self, spec, jobs, warn, progress_stream, reference, independent=False) -> dict:
        config = spec.config
        if config.get("os") not in (None, "windows"):
            raise CimError(E_INVALIDARG, f"the image is for os {config.get('os')!r}, not windows", spec.source)
        diff_ids = [layer.diff_id for layer in spec.layers]
        chains = blobs.chain_ids(diff_ids)
        created_at = hives.created_filetime(config)
        report_layers = []
        warnings: list[str] = []
        refs = self.load_refs()
        image_id = spec.manifest_digest or spec.config_digest
        # independent mode: one image per distinct layer (a repeated diff ID shares it), bottom first
        own_layers = [
            independent_image_name(layer.diff_id, layer.index == 0) if independent else layer_image_name(chain)
            for layer, chain in zip(spec.layers, chains)
        ]
        top = (merged_image_name(chains[-1]) if independent else own_layers[-1]) if chains else None
        planned = ([top] if independent and top else []) + list(reversed(own_layers))
        digests = [d for d in (spec.manifest_digest, spec.config_digest) if d]
        old = refs["images"].get(image_id)
        if old is not None:  # imported again (perhaps in the other mode): the old record's layers may go
            old_images = [old["top"]] if old.get("top") else []
            old_images += reversed(
                old["independent_layers"]
                if old.get("mode") == "independent"
                else [layer_image_name(c) for c in old["layers"]]
            )
        else:
            old_images = []
        self._write_journal(
            [
                n
                for n in dict.fromkeys(planned + old_images)
                if n in old_images or not os.path.exists(os.path.join(self.layers, n))
            ],
            [d for d in digests if not os.path.exists(self._blob_path(d))],
        )
        parent = None
        feed = None
        try:
            feed = self._read_ahead(spec, own_layers, jobs)
            for position, (layer, chain, name) in enumerate(zip(spec.layers, chains, own_layers)):
                entry = {
                    "index": layer.index,
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "diff_id": layer.diff_id,
                    "chain_id": chain,
                    "image": name,
                }
                if os.path.exists(os.path.join(self.layers, name)):
                    entry["status"] = "reused"
                    info = self._layer_record(name)
                    entry["warnings"] = info.get("warnings", [])
                    if info.get("hive_bases"):
                        entry["hive_bases"] = info["hive_bases"]
                else:
                    t0 = time.monotonic()
                    info = self._import_layer(
                        spec,
                        layer,
                        chain,
                        name,
                        None if independent else parent,
                        jobs,
                        created_at,
                        warn,
                        progress_stream,
                        len(spec.layers),
                        independent=independent,
                        below=own_layers[:position][::-1],
                        feed=feed,
                    )
                    entry.update(
                        status="new",
                        uncompressed_bytes=info["uncompressed_bytes"],
                        seconds=round(time.monotonic() - t0, 3),
                        warnings=info["warnings"],
                    )
                    if info["base_processing"]:
                        entry["base_processing"] = info["base_processing"]
                    if info["hive_bases"]:
                        entry["hive_bases"] = info["hive_bases"]
                for w in entry["warnings"]:
                    if entry["status"] == "new":
                        warn(w)
                    warnings.append(w)
                report_layers.append(entry)
                parent = name
            if feed is not None:
                feed.close()
                feed = None
            merged_status = None
            if independent and top:
                merged_status = "reused"
                if not os.path.exists(os.path.join(self.layers, top)):
                    import cimfs  # start-up time: the public API, only for the merged top of independent layers

                    # A layer listed twice is merged once, at its topmost place: applying a layer
                    # again above others gives what applying it only there gives (each path's last
                    # writer wins, whiteouts and opaque directories included).
                    cimfs.merge(self.layers, top, list(dict.fromkeys(reversed(own_layers))))
                    merged_status = "new"
            self._put_blob(spec.config_bytes, spec.config_digest)
            if spec.manifest_bytes is not None:
                self._put_blob(spec.manifest_bytes, spec.manifest_digest)
            names: dict[str, None] = {}
            for n in list(spec.refs) + ([reference] if reference else []):
                names[n] = None
            for key, rec in refs["images"].items():  # a reference names one image: it moves to this one
                if key != image_id:
                    rec["refs"] = [r for r in rec.get("refs", []) if r not in names]
            refs["images"][image_id] = {
                "manifest_digest": spec.manifest_digest,
                "config_digest": spec.config_digest,
                "refs": sorted(set(old.get("refs", []) if old else []) | set(names)),
                "platform": spec.platform,
                "layers": chains,
                "top": top,
            }
            if independent:
                refs["images"][image_id]["mode"] = "independent"
                refs["images"][image_id]["independent_layers"] = own_layers
            refs["version"] = STORE_VERSION
            self.save_refs(refs)
        except BaseException:
            if feed is not None:
                feed.close()  # the reader process is killed: it only reads, nothing of it to remove
            with contextlib.suppress(Exception):  # the first error is the one to report
                self._settle(warn)  # everything new goes; if this fails too, the next open does it
            raise
        self._settle(warn)  # the old record's layers that no image uses any more
        report = {
            "id": image_id,
            "refs": refs["images"][image_id]["refs"],
            "manifest_digest": spec.manifest_digest,
            "config_digest": spec.config_digest,
            "platform": spec.platform,
            "top": os.path.join(self.layers, top) if top else None,
            "layers": report_layers,
            "warnings": warnings,
        }
        if independent:
            report["mode"] = "independent"
            report["merged"] = merged_status
        return report

    @staticmethod
    def _label(layer, count: int) -> str:
        return f"layer {layer.index + 1}/{count} {layer.digest or layer.diff_id}"

    def _read_ahead(self, spec, own_layers: list, jobs: int):
        """--jobs 2 or more: a :class:`.readahead.LayerFeed` reading the layers
        this import will make, in order, ahead of their import (None with
        --jobs 1, nothing to read, or no process to fork).  The list stops
        at the first layer whose blob is not in the source: the import
        stops there too."""
        if jobs < 2:
            return None
        from . import readahead  # start-up time: only --jobs 2 reads ahead

        if not readahead.available():
            return None
        todo, seen = [], set()
        for layer, name in zip(spec.layers, own_layers):
            if name in seen or os.path.exists(os.path.join(self.layers, name)):
                continue  # reused (a repeated independent layer: made once, by its first place)
            seen.add(name)
            if layer.opener is None:
                break
            todo.append(
                (
                    layer.opener,
                    layer.compression,
                    layer.digest,
                    layer.size,
                    layer.diff_id,
                    self._label(layer, len(spec.layers)),
                    spec.source,
                )
            )
        if not todo:
            return None
        try:
            return readahead.LayerFeed(todo)
        except OSError:  # no process to be had (EAGAIN): read in this one
            return None

    def _layer_record(self, name: str) -> dict:
        try:
            return self.layer_info_of(name)
        except CimError:
            return {}

    def _import_layer(
        self,
        spec,
        layer,
        chain,
        name,
        parent,
        jobs,
        created_at,
        warn,
        progress_stream,
        count,
        independent=False,
        below=(),
        feed=None,
    ) -> dict:
        """One layer into the store.  ``below``: independent mode, the layer
        images under this one, nearest first (where its parent's base hives are).
        ``feed``: the layer is read by that :class:`.readahead.LayerFeed`."""
        label = self._label(layer, count)
        if layer.opener is None:
            where = ", ".join(layer.urls) if layer.urls else "no URL given"
            kind = "foreign layer" if layer.foreign else "layer"
            raise CimError(
                ERROR_FILE_NOT_FOUND,
                f"{kind} {layer.digest or layer.diff_id} (layer {layer.index + 1} of {count}) is not in the "
                f"source: its blob must be fetched first, from {where}",
                spec.source,
            )
        raw = None
        if feed is None:
            try:
                raw = layer.opener()
            except OSError as e:
                raise CimError(ERROR_FILE_NOT_FOUND, f"cannot open {label}: {e.strerror or e}", spec.source) from None
            compression = layer.compression
            if compression == "detect":
                raw, compression = blobs.sniff_compression(raw, close_source=True)
        delta_members: list[str] = []
        base_added: list[str] = []
        hive_bases: list[str] = []  # a non-base layer: the Hives\<X>_BASE merged from its deltas
        warnings: list[str] = []
        total = layer.size or 0
        short = (layer.digest or layer.diff_id).split(":", 1)[-1][:12]
        with Progress(total, f"layer {layer.index + 1}/{count} {short}", stream=progress_stream) as bar:
            if feed is not None:  # read, decompressed and checked in the reader process
                stream = reader = feed.layer(bar)
            else:
                stream = blobs.LayerStream(raw, compression, layer.digest, layer.size, layer.diff_id, label, bar)
                reader = blobs.Prefetch(stream) if jobs > 1 else stream

            def on_member(n, member):
                if member[:5].casefold() == "hives" and hives.is_delta_hive(member) and member not in delta_members:
                    delta_members.append(member)

            def before_commit(w):
                reader.finish()
                if layer.index == 0:
                    added, missing = hives.process_base_layer(w, created_at)
                    base_added.extend(added)
                    if not added and missing:
                        warnings.append(
                            f"{label}: base layer without registry hives under "
                            f"{hives.REG_FILES_PATH}: no Hives links or layout file made"
                        )
                record = {
                    "chain_id": None if independent else chain,
                    "independent": independent,
                    "diff_id": layer.diff_id,
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size": layer.size,
                    "parent": parent,
                    "uncompressed_bytes": reader.uncompressed_bytes,
                    "base_processing": base_added,
                    "hive_deltas": sorted(set(delta_members)),
                    "hive_bases": hive_bases,
                    "warnings": warnings,
                }
                _write_atomic(os.path.join(self.layers, name[:-4] + ".json"), _dump(record))

            try:
                # consistent: the same layer on the same parent gives the same files, on any machine
                extra: dict[str, Any] = {"independent": True} if independent else {}
                if independent and layer.index > 0:
                    extra["hive_parents"] = [os.path.join(self.layers, n) for n in below]
                winlayer.import_layer(
                    reader,
                    self.layers,
                    name,
                    parent=parent,
                    progress=on_member,
                    before_commit=before_commit,
                    consistent=True,
                    hive_time=created_at,
                    label=label,
                    on_hive_bases=hive_bases.extend,
                    **extra,
                )
            except BaseException:
                remove_quietly(os.path.join(self.layers, name[:-4] + ".json"))
                raise
            finally:
                if reader is not stream:
                    reader.close()
                try:
                    if raw is not None:
                        raw.close()
                except Exception:  # noqa: BLE001
                    pass
        return {
            "uncompressed_bytes": stream.uncompressed_bytes,
            "warnings": warnings,
            "base_processing": base_added,
            "hive_bases": hive_bases,
        }

    def _remove_layer(self, name: str, warn=None) -> None:
        p = os.path.join(self.layers, name)
        if os.path.lexists(p):
            try:
                tools.rm_image(p, warn=warn or (lambda m: None))
            except CimError as e:
                if warn:
                    warn(f"{p}: {e.strerror}")
        remove_quietly(os.path.join(self.layers, name[:-4] + ".json"))

    # ------------------------------------------------------------ rmi
    def remove(self, ref: str, warn=None) -> dict:
        with StoreLock(self.path):
            self._recover(warn)
            refs = self.load_refs()
            key, rec = self.find(refs, ref)
            if ref in rec.get("refs", []) and len(rec["refs"]) > 1:
                rec["refs"] = [r for r in rec["refs"] if r != ref]
                self.save_refs(refs)
                return {"untagged": [ref], "removed_image": None, "removed_layers": []}
            del refs["images"][key]
            independent = rec.get("mode") == "independent"
            # the merged image first: it lists the layers' region files as its own parents
            own = list(
                reversed(rec["independent_layers"] if independent else [layer_image_name(c) for c in rec["layers"]])
            )
            names = ([rec["top"]] if rec.get("top") else []) + own
            self._write_journal(
                list(dict.fromkeys(names)), [d for d in (rec.get("manifest_digest"), rec.get("config_digest")) if d]
            )
            # Write the refs first: a store never names a layer that is gone.
            self.save_refs(refs)
            removed = set(self._settle(warn))
            if independent:
                removed_layers = [n for n in dict.fromkeys(names) if n in removed]
            else:
                removed_layers = [c for c in reversed(rec["layers"]) if layer_image_name(c) in removed]
            return {
                "untagged": rec.get("refs", []),
                "removed_image": key,
                "removed_layers": list(dict.fromkeys(removed_layers)),
            }
