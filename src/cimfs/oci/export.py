"""A stored image out again: each layer's own changes as a Windows layer tar
(:func:`cimfs.winlayer.export_layer` with the parent layer: the fork's
difference, whiteouts included), a config with the new diff IDs, a manifest,
and an OCI image layout or a ``docker save`` archive around them.

Deterministic: tar entries come in image order with their own times, gzip
headers carry mtime 0 and no name, JSON is written with sorted keys, and the
archive's own entries have fixed times and owners; exporting twice gives the
same digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable

from .. import winlayer
from ..atomic import replacing, temp_name
from ..errors import E_INVALIDARG, ERROR_FILE_EXISTS, CimError
from ..progress import Progress
from . import blobs, checked
from .store import LayerStore, StoreLock, layer_image_name

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class _BlobWriter:
    """Compresses (gzip with a fixed header, zstd, or none) into a file while
    hashing the uncompressed stream (the diff ID) and the blob (its digest)."""

    def __init__(self, f, compression: str):
        self.f = f
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        self.compress: Callable[[bytes], bytes]
        self.flush_: Callable[[], bytes]
        if compression == "gzip":
            c = zlib.compressobj(6, zlib.DEFLATED, 31)  # zlib's gzip header: mtime 0, no name
            self.compress, self.flush_ = c.compress, c.flush
        elif compression == "zstd":
            try:
                import zstandard  # optional dependency (cimfs[oci])
            except ImportError:
                raise CimError(E_INVALIDARG, "zstd needs the 'zstandard' package (pip install cimfs[oci])") from None
            z = zstandard.ZstdCompressor(level=3).compressobj()
            self.compress, self.flush_ = z.compress, z.flush
        elif compression == "none":
            self.compress, self.flush_ = (lambda b: b), (lambda: b"")
        else:
            raise CimError(E_INVALIDARG, f"unknown compression {compression!r} (gzip, zstd or none)")

    def _out(self, b: bytes) -> None:
        if b:
            self.blob.update(b)
            self.size += len(b)
            self.f.write(b)

    def write(self, b) -> int:
        self.diff.update(b)
        self._out(self.compress(bytes(b)))
        return len(b)

    def close(self) -> None:
        self._out(self.flush_())

    def flush(self) -> None:
        pass


def _tag_of(ref: str) -> str:
    """The tag of ``name:tag`` (what OCI layouts put in ref.name), else the reference itself."""
    last = ref.rsplit("/", 1)[-1]
    if "@" not in ref and ":" in last:
        return last.rsplit(":", 1)[1]
    return ref


def export_image(
    store_dir: str, ref: str, out: str, *, fmt: str = "oci", compress: str | None = None, progress_stream=None
) -> dict:
    if fmt not in ("oci", "docker-archive"):
        raise CimError(E_INVALIDARG, f"unknown format {fmt!r} (oci or docker-archive)")
    if compress is None:
        compress = "gzip" if fmt == "oci" else "none"
    if compress not in blobs.OCI_LAYER:
        raise CimError(E_INVALIDARG, f"unknown compression {compress!r} (gzip, zstd or none)")
    store = LayerStore(store_dir)
    with StoreLock(store.path, shared=True):
        return _export(store, ref, out, fmt, compress, progress_stream)


def _export(store, ref, out, fmt, compress, progress_stream) -> dict:
    refs = store.load_refs()
    key, rec = store.find(refs, ref)
    config = checked.parse_json(
        store.read_blob(rec["config_digest"]), f"{store.path}: config {rec['config_digest']}", dict
    )
    out = os.path.abspath(out)
    if os.path.lexists(out) and not (fmt == "oci" and os.path.isdir(out) and not os.listdir(out)):
        raise CimError(ERROR_FILE_EXISTS, "the output exists (give a new path or an empty directory)", out)
    work = temp_name(out)
    os.makedirs(os.path.join(work, "blobs", "sha256"))
    try:
        layers = []
        chains = rec["layers"]
        independent = rec.get("mode") == "independent"
        for i, chain in enumerate(chains):
            if independent:
                name = rec["independent_layers"][i]
                info = store.layer_info_of(name)
                # an independent layer is its own changes; the base is written as it is
                how = {"independent": True} if i else {"exclude": info.get("base_processing") or ()}
            else:
                name = layer_image_name(chain)
                info = store.layer_info(chain)
                how = {
                    "parent": os.path.join(store.layers, layer_image_name(chains[i - 1])) if i else None,
                    "exclude": info.get("base_processing") or (),
                }
            image = os.path.join(store.layers, name)
            tmp = os.path.join(work, f"layer{i}.tmp")
            with (
                open(tmp, "wb") as f,
                Progress(0, f"export layer {i + 1}/{len(chains)}", stream=progress_stream) as bar,
            ):
                w = _BlobWriter(f, compress)
                winlayer.export_layer(image, w, progress=bar, **how)
                w.close()
            digest = "sha256:" + w.blob.hexdigest()
            diff_id = "sha256:" + w.diff.hexdigest()
            os.replace(tmp, os.path.join(work, "blobs", "sha256", digest[7:]))
            layers.append(
                {"mediaType": blobs.OCI_LAYER[compress], "digest": digest, "size": w.size, "diff_id": diff_id}
            )
        config = dict(config)
        config["os"] = "windows"
        config["rootfs"] = {"type": "layers", "diff_ids": [d["diff_id"] for d in layers]}
        cbytes = _canonical(config)
        cdigest = blobs.digest_bytes(cbytes)
        _put(work, cbytes, cdigest)
        manifest = {
            "schemaVersion": 2,
            "mediaType": blobs.OCI_MANIFEST,
            "config": {"mediaType": blobs.OCI_CONFIG, "digest": cdigest, "size": len(cbytes)},
            "layers": [{k: d[k] for k in ("mediaType", "digest", "size")} for d in layers],
        }
        mbytes = _canonical(manifest)
        mdigest = blobs.digest_bytes(mbytes)
        names = rec.get("refs") or []
        if fmt == "oci":
            _put(work, mbytes, mdigest)
            platform = {"os": "windows", "architecture": config.get("architecture", "amd64")}
            if config.get("os.version"):
                platform["os.version"] = config["os.version"]
            desc = {"mediaType": blobs.OCI_MANIFEST, "digest": mdigest, "size": len(mbytes), "platform": platform}
            wanted = ref if ref in names else (names[0] if names else None)
            if wanted:
                desc["annotations"] = {REF_NAME: _tag_of(wanted), CONTAINERD_NAME: wanted}
            index = {"schemaVersion": 2, "mediaType": blobs.OCI_INDEX, "manifests": [desc]}
            _write(os.path.join(work, "index.json"), _canonical(index))
            _write(os.path.join(work, blobs.OCI_LAYOUT_FILE), _canonical({"imageLayoutVersion": "1.0.0"}))
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(work, out)
        else:
            _docker_archive(work, out, cbytes, cdigest, layers, [n for n in names if ":" in n.rsplit("/", 1)[-1]])
            shutil.rmtree(work)
        return {
            "id": key,
            "format": fmt,
            "out": out,
            "manifest_digest": mdigest if fmt == "oci" else None,
            "config_digest": cdigest,
            "layers": [
                {"digest": d["digest"], "diff_id": d["diff_id"], "size": d["size"], "media_type": d["mediaType"]}
                for d in layers
            ],
        }
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _put(work: str, data: bytes, digest: str) -> None:
    _write(os.path.join(work, "blobs", "sha256", digest[7:]), data)


def _docker_archive(work: str, out: str, cbytes: bytes, cdigest: str, layers: list, tags: list) -> None:
    """``docker save`` layout: <config hex>.json, <diff ID hex>/layer.tar per layer, manifest.json."""

    def info(name: str, size: int, kind=tarfile.REGTYPE) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.type, ti.mtime = size, kind, 0
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    cname = f"{cdigest[7:]}.json"
    manifest = [
        {"Config": cname, "RepoTags": tags or None, "Layers": [f"{d['diff_id'][7:]}/layer.tar" for d in layers]}
    ]
    with replacing(out) as tmp:
        with open(tmp, "xb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                written = set()
                for d in layers:
                    hexd = d["diff_id"][7:]
                    if hexd in written:  # the same layer twice: one copy serves both
                        continue
                    written.add(hexd)
                    tf.addfile(info(hexd, 0, tarfile.DIRTYPE))
                    blob = os.path.join(work, "blobs", "sha256", d["digest"][7:])
                    with open(blob, "rb") as b:
                        tf.addfile(info(f"{hexd}/layer.tar", os.path.getsize(blob)), b)
                tf.addfile(info(cname, len(cbytes)), _BytesReader(cbytes))
                mbytes = _canonical(manifest)
                tf.addfile(info("manifest.json", len(mbytes)), _BytesReader(mbytes))
            f.flush()
            os.fsync(f.fileno())


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n=-1):
        if n is None or n < 0:
            n = len(self.data) - self.pos
        b = self.data[self.pos : self.pos + n]
        self.pos += len(b)
        return b
