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

A layer ``.cim`` is committed only after its blob digest and diff ID were
checked, so a ``.cim`` that exists is a complete, verified layer: an import
killed at any point is simply run again (it reuses what was committed and
``gc`` removes the region files the killed writer left).
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from .. import tools, winlayer
from ..atomic import fsync_dir, remove_quietly, replacing
from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from ..progress import Progress
from ..winlayer import hives
from . import blobs
from .sources import open_source

REFS_FILE = "refs.json"
LAYERS_DIR = "layers"
LOCK_FILE = "lock"
STORE_VERSION = 1


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
        self.fd = os.open(os.path.join(store, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
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
        elif not os.path.isfile(os.path.join(self.path, REFS_FILE)):
            raise CimError(ERROR_FILE_NOT_FOUND, "not an image store (no refs.json)", self.path)

    # ------------------------------------------------------------ refs
    def load_refs(self) -> dict:
        p = os.path.join(self.path, REFS_FILE)
        try:
            with open(p, "rb") as f:
                refs = json.loads(f.read())
        except FileNotFoundError:
            return {"version": STORE_VERSION, "images": {}}
        except (OSError, ValueError) as e:
            raise CimError(E_INVALIDARG, f"cannot read the store's refs file ({e})", p) from None
        if not isinstance(refs, dict) or not isinstance(refs.get("images"), dict):
            raise CimError(E_INVALIDARG, "the store's refs file has no images", p)
        return refs

    def save_refs(self, refs: dict) -> None:
        _write_atomic(os.path.join(self.path, REFS_FILE), _dump(refs))

    def find(self, refs: dict, ref: str) -> tuple[str, dict]:
        """(image id, record) for a reference, an image/manifest/config digest or a unique digest prefix."""
        images = refs["images"]
        for key, rec in images.items():
            if ref in rec.get("refs", []):
                return key, rec
        hits = [(k, r) for k, r in images.items()
                if any(isinstance(d, str) and (d == ref or (len(ref) >= 8 and (d.startswith(ref) or
                       d.split(":", 1)[-1].startswith(ref))))
                       for d in (k, r.get("manifest_digest"), r.get("config_digest")))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise CimError(E_INVALIDARG, "the digest prefix names several images", ref)
        raise CimError(ERROR_FILE_NOT_FOUND, "no such image in the store", ref)

    def layer_info(self, chain_id: str) -> dict:
        return self.layer_info_of(layer_image_name(chain_id))

    def layer_info_of(self, image_name: str) -> dict:
        p = os.path.join(self.layers, image_name[:-4] + ".json")
        try:
            with open(p, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError) as e:
            raise CimError(E_INVALIDARG, f"cannot read the layer's record ({e})", p) from None

    def read_blob(self, digest: str) -> bytes:
        alg, hexd = blobs.parse_digest(digest)
        p = os.path.join(self.path, "blobs", alg, hexd)
        with open(p, "rb") as f:
            data = f.read()
        if blobs.digest_bytes(data, alg) != digest:
            raise CimError(E_INVALIDARG, "stored blob does not match its digest", p)
        return data

    def _put_blob(self, data: bytes, digest: str, written: list) -> None:
        alg, hexd = blobs.parse_digest(digest)
        d = os.path.join(self.path, "blobs", alg)
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, hexd)
        if not os.path.exists(p):
            written.append(p)
            _write_atomic(p, data)

    def images(self) -> list[dict]:
        refs = self.load_refs()
        return [dict(rec, id=key) for key, rec in sorted(refs["images"].items())]

    # ------------------------------------------------------------ import
    def import_image(self, src, *, platform: str | None = None, jobs: int = 1, warn=None,
                     progress_stream=None, reference: str | None = None, independent: bool = False) -> dict:
        warn = warn or (lambda m: None)
        jobs = max(1, int(jobs))
        with StoreLock(self.path):
            self._sweep(warn)
            source = open_source(src, spool_dir=self.path)
            try:
                spec = source.resolve(platform)
                return self._import(spec, jobs, warn, progress_stream, reference, independent)
            finally:
                source.close()

    def _sweep(self, warn) -> None:
        """Leftovers of a killed import: region files no .cim needs, layer records without a .cim."""
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

    def _import(self, spec, jobs, warn, progress_stream, reference, independent=False) -> dict:
        config = spec.config
        if config.get("os") not in (None, "windows"):
            raise CimError(E_INVALIDARG, f"the image is for os {config.get('os')!r}, not windows", spec.source)
        diff_ids = [layer.diff_id for layer in spec.layers]
        chains = blobs.chain_ids(diff_ids)
        created_at = hives.created_filetime(config)
        report_layers = []
        warnings: list[str] = []
        committed: list[str] = []
        new_blobs: list[str] = []
        refs = self.load_refs()
        parent = None
        own_layers: list[str] = []  # independent mode: the layer images, bottom first
        try:
            for layer, chain in zip(spec.layers, chains):
                name = independent_image_name(layer.diff_id, layer.index == 0) if independent \
                    else layer_image_name(chain)
                own_layers.append(name)
                entry = {"index": layer.index, "digest": layer.digest, "media_type": layer.media_type,
                         "size": layer.size, "diff_id": layer.diff_id, "chain_id": chain, "image": name}
                if os.path.exists(os.path.join(self.layers, name)):
                    entry["status"] = "reused"
                    info = self._layer_record(chain)
                    entry["warnings"] = info.get("warnings", [])
                    if info.get("hive_bases"):
                        entry["hive_bases"] = info["hive_bases"]
                else:
                    t0 = time.monotonic()
                    info = self._import_layer(spec, layer, chain, name, None if independent else parent, jobs,
                                              created_at, warn, progress_stream, len(spec.layers),
                                              independent=independent, below=own_layers[-2::-1])
                    committed.append(name)
                    entry.update(status="new", uncompressed_bytes=info["uncompressed_bytes"],
                                 seconds=round(time.monotonic() - t0, 3), warnings=info["warnings"])
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
            merged_status = None
            if independent and own_layers:
                parent = merged_image_name(chains[-1])
                merged_status = "reused"
                if not os.path.exists(os.path.join(self.layers, parent)):
                    import cimfs

                    cimfs.merge(self.layers, parent, list(reversed(own_layers)))
                    committed.append(parent)
                    merged_status = "new"
            image_id = spec.manifest_digest or spec.config_digest
            self._put_blob(spec.config_bytes, spec.config_digest, new_blobs)
            if spec.manifest_bytes is not None:
                self._put_blob(spec.manifest_bytes, spec.manifest_digest, new_blobs)
            names = list(spec.refs)
            if reference:
                names.append(reference)
            for key, rec in refs["images"].items():  # a reference names one image: it moves to this one
                if key != image_id:
                    rec["refs"] = [r for r in rec.get("refs", []) if r not in names]
            old = refs["images"].get(image_id, {})
            refs["images"][image_id] = {
                "manifest_digest": spec.manifest_digest,
                "config_digest": spec.config_digest,
                "refs": sorted(set(old.get("refs", [])) | set(names)),
                "platform": spec.platform,
                "layers": chains,
                "top": parent,
            }
            if independent:
                refs["images"][image_id]["mode"] = "independent"
                refs["images"][image_id]["independent_layers"] = own_layers
            refs["version"] = STORE_VERSION
            self.save_refs(refs)
        except BaseException:
            for name in reversed(committed):
                self._remove_layer(name)
            for p in new_blobs:
                remove_quietly(p)
            raise
        report = {"id": image_id, "refs": refs["images"][image_id]["refs"], "manifest_digest": spec.manifest_digest,
                  "config_digest": spec.config_digest, "platform": spec.platform,
                  "top": os.path.join(self.layers, parent) if parent else None,
                  "layers": report_layers, "warnings": warnings}
        if independent:
            report["mode"] = "independent"
            report["merged"] = merged_status
        return report

    def _layer_record(self, chain: str) -> dict:
        try:
            return self.layer_info(chain)
        except CimError:
            return {}

    def _import_layer(self, spec, layer, chain, name, parent, jobs, created_at, warn, progress_stream,
                      count, independent=False, below=()) -> dict:
        """One layer into the store.  ``below``: independent mode, the layer
        images under this one, nearest first (where its parent's base hives are)."""
        label = f"layer {layer.index + 1}/{count} {layer.digest or layer.diff_id}"
        if layer.opener is None:
            where = ", ".join(layer.urls) if layer.urls else "no URL given"
            kind = "foreign layer" if layer.foreign else "layer"
            raise CimError(ERROR_FILE_NOT_FOUND,
                           f"{kind} {layer.digest or layer.diff_id} (layer {layer.index + 1} of {count}) is not in the "
                           f"source: its blob must be fetched first, from {where}", spec.source)
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
                        warnings.append(f"{label}: base layer without registry hives under "
                                        f"{hives.REG_FILES_PATH}: no Hives links or layout file made")
                record = {"chain_id": None if independent else chain, "independent": independent,
                          "diff_id": layer.diff_id, "digest": layer.digest,
                          "media_type": layer.media_type, "size": layer.size, "parent": parent,
                          "uncompressed_bytes": reader.uncompressed_bytes, "base_processing": base_added,
                          "hive_deltas": sorted(set(delta_members)), "hive_bases": hive_bases,
                          "warnings": warnings}
                _write_atomic(os.path.join(self.layers, name[:-4] + ".json"), _dump(record))

            try:
                # consistent: the same layer on the same parent gives the same files, on any machine
                extra = {"independent": True} if independent else {}
                if independent and layer.index > 0:
                    extra["hive_parents"] = [os.path.join(self.layers, n) for n in below]
                winlayer.import_layer(reader, self.layers, name, parent=parent, progress=on_member,
                                      before_commit=before_commit, consistent=True, hive_time=created_at,
                                      label=label, on_hive_bases=hive_bases.extend, **extra)
            except BaseException:
                remove_quietly(os.path.join(self.layers, name[:-4] + ".json"))
                raise
            finally:
                if reader is not stream:
                    reader.close()
                try:
                    raw.close()
                except Exception:  # noqa: BLE001
                    pass
        return {"uncompressed_bytes": stream.uncompressed_bytes, "warnings": warnings,
                "base_processing": base_added, "hive_bases": hive_bases}

    def _remove_layer(self, name: str) -> None:
        try:
            tools.rm_image(os.path.join(self.layers, name))
        except CimError:
            pass
        remove_quietly(os.path.join(self.layers, name[:-4] + ".json"))

    # ------------------------------------------------------------ rmi
    def remove(self, ref: str) -> dict:
        with StoreLock(self.path):
            refs = self.load_refs()
            key, rec = self.find(refs, ref)
            removed_layers: list[str] = []
            if ref in rec.get("refs", []) and len(rec["refs"]) > 1:
                rec["refs"] = [r for r in rec["refs"] if r != ref]
                self.save_refs(refs)
                return {"untagged": [ref], "removed_image": None, "removed_layers": []}
            del refs["images"][key]
            needed = {c for r in refs["images"].values() if r.get("mode") != "independent" for c in r.get("layers", [])}
            needed_images = {n for r in refs["images"].values() if r.get("mode") == "independent"
                             for n in r.get("independent_layers", []) + [r.get("top")]}
            blobs_needed = {d for r in refs["images"].values() for d in (r.get("manifest_digest"), r.get("config_digest"))}
            # Write the refs first: a store never names a layer that is gone.
            self.save_refs(refs)
            if rec.get("mode") == "independent":
                # the merged image first: it lists the layers' region files as its own parents
                for name in [rec.get("top")] + list(reversed(rec.get("independent_layers", []))):
                    if name and name not in needed_images:
                        self._remove_layer(name)
                        removed_layers.append(name)
            else:
                for chain in reversed(rec.get("layers", [])):
                    if chain not in needed:
                        self._remove_layer(layer_image_name(chain))
                        removed_layers.append(chain)
            for d in (rec.get("manifest_digest"), rec.get("config_digest")):
                if d and d not in blobs_needed:
                    alg, hexd = blobs.parse_digest(d)
                    remove_quietly(os.path.join(self.path, "blobs", alg, hexd))
            return {"untagged": rec.get("refs", []), "removed_image": key, "removed_layers": removed_layers}
