"""Builders of Windows container images for the tests: layer tars with
hcsshim's PAX records, OCI image layouts and docker archives, by hand
(json + hashlib), independent of the code under test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

FILE_ATTRIBUTE_ARCHIVE = 0x20
FILE_ATTRIBUTE_DIRECTORY = 0x10
HIVE_NAMES = ("SYSTEM", "SOFTWARE", "SAM", "SECURITY", "DEFAULT")


def layer_tar(entries) -> bytes:
    """entries: ("dir", path) | ("file", path, bytes) | ("link", path, target) | ("whiteout", path) | ("opaque", dir)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            kind, path = e[0], e[1]
            if kind == "whiteout":
                d, _, base = path.rpartition("/")
                ti = tarfile.TarInfo(f"{d}/.wh.{base}" if d else f".wh.{base}")
                tf.addfile(ti)
                continue
            if kind == "opaque":
                tf.addfile(tarfile.TarInfo(f"{path}/.wh..wh..opq"))
                continue
            ti = tarfile.TarInfo(path)
            ti.mtime = 1_700_000_000
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.pax_headers = {"MSWINDOWS.fileattr": str(FILE_ATTRIBUTE_DIRECTORY), "mtime": "1700000000.25"}
                tf.addfile(ti)
            elif kind == "file":
                ti.size = len(e[2])
                ti.pax_headers = {
                    "MSWINDOWS.fileattr": str(FILE_ATTRIBUTE_ARCHIVE),
                    "mtime": "1700000001.5",
                    "LIBARCHIVE.creationtime": "1600000000",
                }
                tf.addfile(ti, io.BytesIO(e[2]))
            elif kind == "link":
                ti.type = tarfile.LNKTYPE
                ti.linkname = e[2]
                tf.addfile(ti)
            else:
                raise ValueError(kind)
    return buf.getvalue()


def base_entries(extra=()):
    """A small Windows base layer with the five registry hives."""
    entries = [
        ("dir", "Files"),
        ("dir", "Files/Windows"),
        ("dir", "Files/Windows/System32"),
        ("dir", "Files/Windows/System32/config"),
    ]
    entries += [("file", f"Files/Windows/System32/config/{h}", f"hive {h}".encode() * 50) for h in HIVE_NAMES]
    entries += [("file", "Files/Windows/win.ini", b"[fonts]\r\n")]
    return entries + list(extra)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def write_layout(
    path,
    layer_tars,
    *,
    compression="gzip",
    ref="test:1.0",
    created="2024-05-01T12:00:00Z",
    skip_blob=None,
    foreign=None,
    diff_ids=None,
):
    """An OCI image layout of one windows/amd64 image; returns (manifest digest, layer descriptors)."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    comps = compression if isinstance(compression, (list, tuple)) else [compression] * len(layer_tars)

    def put(data: bytes) -> str:
        d = sha(data)
        with open(os.path.join(blobs, d[7:]), "wb") as f:
            f.write(data)
        return d

    descs = []
    for i, (t, c) in enumerate(zip(layer_tars, comps)):
        blob = compress(t, c)
        d = sha(blob)
        desc = {"mediaType": MEDIA[c], "digest": d, "size": len(blob)}
        if foreign is not None and i == foreign:
            desc["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
            desc["urls"] = ["https://mcr.example/blob/" + d]
        if skip_blob != i and not (foreign is not None and i == foreign):
            put(blob)
        descs.append(desc)
    config = {
        "architecture": "amd64",
        "os": "windows",
        "os.version": "10.0.20348.1",
        "created": created,
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in layer_tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layer_tars))],
        "config": {"Cmd": ["cmd"]},
    }
    cbytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cbytes), "size": len(cbytes)},
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    mdigest = put(mbytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": len(mbytes),
                "platform": {"os": "windows", "architecture": "amd64"},
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return mdigest, descs
