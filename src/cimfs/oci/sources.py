"""Where images come from: an OCI image layout directory or a ``docker save``
archive (a file, or a stream spooled once).  Both give :class:`ImageSpec`:
the manifest, the config (verified) and the layers with a way to open each
blob.  Only JSON and file names are handled here; the layer bytes are read by
the store through :mod:`.blobs`.  A source is not trusted: its files must be
regular, its JSON is checked (:mod:`.checked`), resolving is bounded (index
depth, descriptors visited, JSON read) and a spooled stream holds only what its
tar headers declare, within the free space.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import E_INVALIDARG, ERROR_DISK_FULL, ERROR_FILE_NOT_FOUND, CimError
from ..tarbounds import BoundedTarInfo
from . import blobs, checked

MAX_JSON = checked.MAX_JSON  # an index, manifest or config larger than this is not read
REF_NAME = "org.opencontainers.image.ref.name"
# [choice] Bounds on resolving an image (docs/CLI.md, "Trust"): real layouts hold a few indexes and at most
# hundreds of tags; a hostile one can list one index from another many times over.
MAX_INDEX_DEPTH = 8  # image indexes nested in index.json
MAX_DESCRIPTORS = 10_000  # manifest and index descriptors visited, each listing counted
MAX_RESOLVE_BYTES = 256 << 20  # index, manifest and config JSON read in all (each blob read once)
MAX_MEMBERS = 65_536  # members of a docker or OCI archive
SPOOL_RESERVE = 64 << 20  # free space a spool leaves on its file system


@dataclass
class LayerSpec:
    index: int
    media_type: str
    compression: str  # "gzip" | "zstd" | "none" | "detect"
    digest: str | None  # the blob digest, when the source names one
    size: int | None
    diff_id: str
    urls: list = field(default_factory=list)
    foreign: bool = False
    opener: object = None  # () -> binary file object, or None if the blob is not present


@dataclass
class ImageSpec:
    source: str
    manifest_digest: str | None
    manifest: dict | None
    manifest_bytes: bytes | None
    config_digest: str
    config: dict
    config_bytes: bytes
    layers: list
    refs: list
    platform: str


def _json(data: bytes, what: str, kind=dict):
    return checked.parse_json(data, what, kind)


def _check_digest(data: bytes, digest: str, what: str) -> None:
    alg, hexd = blobs.parse_digest(digest, f"{what}: digest")
    got = blobs.digest_bytes(data, alg)
    if got != digest:
        raise CimError(E_INVALIDARG, f"digest mismatch: expected {digest}, read {got}", what)


def platform_of(config: dict, descriptor_platform: dict | None = None) -> dict:
    """The platform an image is for: the descriptor's text fields, else the config's."""
    given = descriptor_platform if isinstance(descriptor_platform, dict) else {}
    p = {k: v for k, v in given.items() if isinstance(v, str)}
    for k in ("os", "architecture", "variant", "os.version"):
        if k not in p and isinstance(config.get(k), str):
            p[k] = config[k]
    return p


def platform_text(p: dict) -> str:
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += "/" + p["variant"]
    if p.get("os.version"):
        s += ":" + p["os.version"]
    return s


def platform_matches(p: dict, want: str | None) -> bool:
    """``want`` is ``os[/arch[/variant]][:os.version prefix]``; None means any Windows."""
    if want is None:
        return p.get("os", "windows") == "windows"
    spec, _, version = want.partition(":")
    parts = spec.split("/")
    keys = ("os", "architecture", "variant")
    for k, v in zip(keys, parts):
        if v and p.get(k, "") != v:
            return False
    return not version or str(p.get("os.version", "")).startswith(version)


def _layers_from_manifest(manifest: dict, config: dict, what: str, opener_for) -> list[LayerSpec]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise CimError(E_INVALIDARG, "manifest has no layers list", what)
    diff_ids = _diff_ids(config, what)
    if len(diff_ids) != len(layers):
        raise CimError(
            E_INVALIDARG, f"manifest lists {len(layers)} layers but the config has {len(diff_ids)} diff_ids", what
        )
    out = []
    for i, (d, diff_id) in enumerate(zip(layers, diff_ids)):
        if not isinstance(d, dict):
            raise CimError(E_INVALIDARG, f"layer {i}: not a descriptor", what)
        mt = d.get("mediaType", "")
        if not isinstance(mt, str) or mt not in blobs.LAYER_TYPES:
            raise CimError(E_INVALIDARG, f"layer {i} ({d.get('digest')}): unsupported media type {mt!r}", what)
        compression, foreign = blobs.LAYER_TYPES[mt]
        digest = d.get("digest")
        blobs.parse_digest(digest, f"{what}: layer {i} digest")
        size = d.get("size")
        if not isinstance(size, int) or size < 0:
            raise CimError(E_INVALIDARG, f"layer {i} ({digest}): bad size {size!r}", what)
        urls = d.get("urls")
        urls = [u for u in urls if isinstance(u, str)] if isinstance(urls, list) else []
        out.append(LayerSpec(i, mt, compression, digest, size, diff_id, urls, foreign, opener_for(digest)))
    return out


def _diff_ids(config: dict, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise CimError(E_INVALIDARG, "config has no rootfs of type 'layers' with diff_ids", what)
    ids = rootfs["diff_ids"]
    for d in ids:
        blobs.parse_digest(d, f"{what}: diff_id")
    return ids


# ---------------------------------------------------------------- OCI layout
class OciLayout:
    def __init__(self, path: str):
        self.path = path
        layout = os.path.join(path, blobs.OCI_LAYOUT_FILE)
        if not os.path.lexists(layout):
            raise CimError(ERROR_FILE_NOT_FOUND, "not an OCI image layout (no oci-layout file)", path)
        info = _json(self._read_file(layout, "oci-layout"), layout)
        if not isinstance(info, dict) or not str(info.get("imageLayoutVersion", "")).startswith("1."):
            raise CimError(E_INVALIDARG, f"unsupported imageLayoutVersion {info.get('imageLayoutVersion')!r}", layout)

    def _read_file(self, path: str, what: str) -> bytes:
        return checked.read_regular(path, what, MAX_JSON)

    def blob_path(self, digest: str) -> str:
        alg, hexd = blobs.parse_digest(digest)
        return os.path.join(self.path, "blobs", alg, hexd)

    def read_blob(self, digest: str, what: str) -> bytes:
        p = self.blob_path(digest)
        if not os.path.lexists(p):
            raise CimError(ERROR_FILE_NOT_FOUND, f"{what} blob {digest} is not in the layout", p)
        data = self._read_file(p, what)
        _check_digest(data, digest, f"{what} {p}")
        return data

    def opener(self, digest: str):
        p = self.blob_path(digest)
        if not os.path.lexists(p):
            return None
        return lambda: checked.open_regular(p, "a layer blob")

    def read_index(self) -> tuple[dict, str]:
        index_path = os.path.join(self.path, "index.json")
        return _json(self._read_file(index_path, "index.json"), index_path), index_path

    def _read_json_blob(self, digest, what: str) -> tuple[bytes, dict]:
        """A blob's bytes and JSON object, read and checked once per resolve
        (a hostile layout lists one index from another many times over)."""
        hit = self._blobs_read.get(digest) if isinstance(digest, str) else None
        if hit is not None:
            return hit
        data = self.read_blob(digest, what)
        self._bytes_left -= len(data)
        if self._bytes_left < 0:
            raise CimError(
                E_INVALIDARG,
                f"the image's indexes, manifests and configs hold more than "
                f"{MAX_RESOLVE_BYTES} bytes of JSON (the limit)",
                self.path,
            )
        hit = (data, _json(data, f"{what} {digest}"))
        self._blobs_read[digest] = hit
        return hit

    def resolve(self, platform: str | None) -> ImageSpec:
        index, where = self.read_index()
        self._blobs_read: dict = {}
        self._bytes_left = MAX_RESOLVE_BYTES
        self._visits = 0
        candidates: dict = {}  # manifest digest -> (first descriptor, {ref name: None} in order)
        self._collect(index, (), candidates, where, 0)
        return self._choose(candidates, platform)

    def _collect(self, index, refs, out, what, depth) -> None:
        if depth > MAX_INDEX_DEPTH:
            raise CimError(E_INVALIDARG, f"image indexes nested more than {MAX_INDEX_DEPTH} deep", what)
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise CimError(E_INVALIDARG, "index has no manifests list", what)
        for d in manifests:
            if not isinstance(d, dict):
                continue
            self._visits += 1
            if self._visits > MAX_DESCRIPTORS:
                raise CimError(
                    E_INVALIDARG,
                    f"the indexes list more than {MAX_DESCRIPTORS} manifests and indexes, "
                    f"each listing counted (the limit)",
                    self.path,
                )
            names = refs
            ann = d.get("annotations") or {}
            if isinstance(ann, dict) and ann.get(REF_NAME) is not None:
                names = refs + (checked.ref_name(ann[REF_NAME], what, f"the {REF_NAME} annotation"),)
            mt = d.get("mediaType")
            if mt in blobs.INDEX_TYPES:
                _, sub = self._read_json_blob(d.get("digest"), "index")
                self._collect(sub, names, out, f"index {d.get('digest')}", depth + 1)
            elif mt in blobs.MANIFEST_TYPES:
                digest = d.get("digest")
                blobs.parse_digest(digest, f"{what}: manifest digest")
                out.setdefault(digest, (d, {}))[1].update(dict.fromkeys(names))

    def _choose(self, candidates, platform) -> ImageSpec:
        found = []
        for digest, (d, names) in candidates.items():
            mbytes, manifest = self._read_json_blob(digest, "manifest")
            names = list(names)
            cdesc = manifest.get("config") if isinstance(manifest, dict) else None
            if not isinstance(cdesc, dict):
                raise CimError(E_INVALIDARG, "manifest has no config descriptor", f"manifest {digest}")
            cbytes, config = self._read_json_blob(cdesc.get("digest"), "config")
            p = platform_of(config, d.get("platform"))
            found.append((p, digest, mbytes, manifest, cdesc["digest"], cbytes, config, names))
        matching = [f for f in found if platform_matches(f[0], platform)]
        if not matching:
            have = ", ".join(platform_text(f[0]) for f in found) or "none"
            want = platform or "any windows platform"
            raise CimError(E_INVALIDARG, f"no image for {want} (the layout has: {have})", self.path)
        if len(matching) > 1:
            have = ", ".join(platform_text(f[0]) + f" {f[1]}" for f in matching)
            raise CimError(
                E_INVALIDARG,
                f"several images match; choose one with --platform os/arch[:os.version] ({have})",
                self.path,
            )
        p, digest, mbytes, manifest, cdigest, cbytes, config, names = matching[0]
        layers = _layers_from_manifest(manifest, config, f"manifest {digest}", self.opener)
        return ImageSpec(self.path, digest, manifest, mbytes, cdigest, config, cbytes, layers, names, platform_text(p))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- docker save archive
class DockerArchive:
    """A ``docker save`` / ``skopeo copy ... docker-archive:`` tar: manifest.json,
    a config per image and one tar (or blob) per layer.  Read in place from a
    file (each layer is a region of the archive); a stream is first spooled to
    ``spool_dir`` because the archive names its manifest last."""

    def __init__(self, src, spool_dir: str | None = None):
        self._spooled: str | None = None
        self._file = None
        self.tf: tarfile.TarFile | None = None
        self.label = src if isinstance(src, str) else "<stdin>"
        try:
            stream = src
            if isinstance(src, str):
                self._file = stream = _open_archive(src)
                if (
                    stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)
                    and blobs.compression_of(os.pread(self._file.fileno(), 4, 0)) == "none"
                ):
                    stream = None  # read in place
            if stream is not None:
                # A stream, a FIFO, or a compressed archive (docker save | gzip): spooled once,
                # decompressed, so that its members can be read in any order.
                spool = self._spool(stream, spool_dir)
                if self._file is not None:
                    self._file.close()
                self._file = spool
            self.tf = tarfile.open(fileobj=self._file, mode="r:", tarinfo=BoundedTarInfo)  # noqa: SIM115
        except CimError:
            self.close()
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            self.close()
            raise CimError(
                E_INVALIDARG, f"not an OCI layout directory or an uncompressed docker archive ({e})", self.label
            ) from None
        except BaseException:
            self.close()
            raise
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for m in self.tf:
                if len(self.members) >= MAX_MEMBERS:
                    raise CimError(
                        E_INVALIDARG, f"the archive has more than {MAX_MEMBERS} members (the limit)", self.label
                    )
                name = m.name
                while name.startswith("./"):
                    name = name[2:]
                self.members[name] = m
        except CimError:
            self.close()
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            self.close()
            raise CimError(E_INVALIDARG, f"truncated or corrupt archive ({e})", self.label) from None

    def _spool(self, raw, spool_dir: str | None):
        """The archive read from ``raw`` (decompressed) into an uncompressed tar
        in ``spool_dir``, member by member: reading stops at the end-of-archive
        marker, each member takes the size its header declares, and a member
        that would leave less than SPOOL_RESERVE free is refused before it is
        copied (the free space is checked again as it is copied)."""
        where = spool_dir or tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix=".spool-", suffix=".tar", dir=spool_dir)
        self._spooled = path
        sniffed, compressed = blobs.sniff_compression(raw, close_source=False)
        reader: io.BufferedReader[Any] | blobs._GzipReader | blobs._ZstdStream = sniffed
        if compressed == "gzip":
            reader = blobs._GzipReader(sniffed, self.label)
        elif compressed == "zstd":
            reader = blobs._ZstdStream(sniffed, self.label)
        with os.fdopen(fd, "w+b") as out:
            try:
                # Ignored below: a stream ("r|") tar only calls read() and close(); typeshed's
                # _Fileobj asks for write/seek/tell too, which the decompressing readers do not have.
                tin = tarfile.open(fileobj=reader, mode="r|", tarinfo=BoundedTarInfo)  # type: ignore[call-overload]  # noqa: SIM115
                with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tout:
                    tout.copybufsize = blobs.CHUNK  # type: ignore[attr-defined]  # set by TarFile.__init__; typeshed leaves it out
                    for n, m in enumerate(tin):
                        if n >= MAX_MEMBERS:
                            raise CimError(
                                E_INVALIDARG, f"the archive has more than {MAX_MEMBERS} members (the limit)", self.label
                            )
                        if not m.isreg():
                            m.size = 0
                            tout.addfile(m)
                            continue
                        if m.issparse():  # written out whole: the spool is read by offsets
                            m.type, m.sparse = tarfile.REGTYPE, None
                            m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith("GNU.sparse")}
                        self._room_for(where, m.size, m.name)
                        tout.addfile(
                            m,
                            _SpaceChecked(
                                tin.extractfile(m), m.size, lambda left, name=m.name: self._room_for(where, left, name)
                            ),
                        )
            except OSError as e:
                if isinstance(e, CimError):
                    raise
                raise CimError(
                    ERROR_DISK_FULL if e.errno == errno.ENOSPC else E_INVALIDARG,
                    f"cannot spool the archive to {where}: {e.strerror or e}",
                    self.label,
                ) from None
            except (tarfile.TarError, EOFError) as e:
                raise CimError(E_INVALIDARG, f"not a docker archive, or a truncated one ({e})", self.label) from None
            out.flush()
            spool = open(path, "rb")  # noqa: SIM115 - the caller's
        os.unlink(path)  # open, nothing left to remove
        self._spooled = None
        return spool

    def _room_for(self, where: str, size: int, name: str) -> None:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if size + SPOOL_RESERVE > free:
            raise CimError(
                ERROR_DISK_FULL,
                f"cannot spool the archive: member {name!r} declares {size} bytes and "
                f"{where} has {free} bytes free (a spool leaves {SPOOL_RESERVE})",
                self.label,
            )

    def _member(self, name: str, what: str) -> tarfile.TarInfo | None:
        m = self.members.get(name)
        for _ in range(16):  # docker save links a layer shared by two images
            if m is None or not (m.issym() or m.islnk()):
                break
            target = m.linkname if m.islnk() else os.path.normpath(os.path.join(os.path.dirname(name), m.linkname))
            m, name = self.members.get(target), target
        if m is None or not m.isfile():
            return None
        return m

    def _extract(self, m: tarfile.TarInfo) -> IO[bytes]:
        assert self.tf is not None  # open from __init__ to close()
        f = self.tf.extractfile(m)
        assert f is not None  # _member hands out regular files only
        return f

    def _read(self, name: str, what: str) -> bytes:
        m = self._member(name, what)
        if m is None:
            raise CimError(ERROR_FILE_NOT_FOUND, f"{what} {name!r} is not in the archive", self.label)
        if m.size > MAX_JSON:
            raise CimError(E_INVALIDARG, f"{what} {name!r} is larger than {MAX_JSON} bytes", self.label)
        try:
            data = self._extract(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CimError(E_INVALIDARG, f"cannot read {name!r} ({e})", self.label) from None
        if len(data) != m.size:
            raise CimError(E_INVALIDARG, f"{name!r} is truncated", self.label)
        return data

    @staticmethod
    def _digest_in_name(name: str) -> str | None:
        """The digest a content-addressed member name carries: blobs/sha256/<hex>, or <hex>.json for a config."""
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs" and parts[1] in ("sha256", "sha512"):
            return f"{parts[1]}:{parts[2]}"
        if len(parts) == 1 and name.endswith(".json") and len(name) == 69:
            return f"sha256:{name[:-5]}"
        return None

    def resolve(self, platform: str | None) -> ImageSpec:
        if "manifest.json" not in self.members and "index.json" in self.members:
            return _ArchivedLayout(self).resolve(platform)  # an OCI layout in a tar (oci-archive)
        manifest = _json(self._read("manifest.json", "manifest"), f"{self.label}: manifest.json", list)
        if not isinstance(manifest, list) or not manifest:
            raise CimError(E_INVALIDARG, "manifest.json lists no images", self.label)
        found = []
        for entry in manifest:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise CimError(E_INVALIDARG, "manifest.json entry without Config", self.label)
            cname = entry["Config"]
            cbytes = self._read(cname, "config")
            cdigest = self._digest_in_name(cname)
            if cdigest is not None:
                try:
                    blobs.parse_digest(cdigest)
                except CimError:
                    cdigest = None
            if cdigest is not None:
                _check_digest(cbytes, cdigest, f"{self.label}: config {cname}")
            else:
                cdigest = blobs.digest_bytes(cbytes)
            config = _json(cbytes, f"{self.label}: config {cname}")
            found.append((platform_of(config), entry, cdigest, cbytes, config))
        matching = [f for f in found if platform_matches(f[0], platform)]
        if not matching:
            have = ", ".join(platform_text(f[0]) for f in found)
            raise CimError(
                E_INVALIDARG, f"no image for {platform or 'any windows platform'} (the archive has: {have})", self.label
            )
        if len(matching) > 1:
            raise CimError(
                E_INVALIDARG, "the archive holds several matching images; choose one with --platform", self.label
            )
        p, entry, cdigest, cbytes, config = matching[0]
        names = entry.get("Layers")
        if not isinstance(names, list):
            raise CimError(E_INVALIDARG, "manifest.json entry without Layers", self.label)
        diff_ids = _diff_ids(config, f"{self.label}: config")
        if len(diff_ids) != len(names):
            raise CimError(
                E_INVALIDARG,
                f"manifest.json lists {len(names)} layers but the config has {len(diff_ids)} diff_ids",
                self.label,
            )
        sources = entry.get("LayerSources") or {}
        layers = []
        for i, (name, diff_id) in enumerate(zip(names, diff_ids)):
            foreign = sources.get(diff_id) if isinstance(sources, dict) else None
            m = self._member(name, "layer") if isinstance(name, str) else None
            digest = self._digest_in_name(name) if isinstance(name, str) else None
            mt = "application/vnd.docker.image.rootfs.diff.tar"
            urls: list = []
            size = m.size if m is not None else None
            if isinstance(foreign, dict):
                mt = foreign.get("mediaType", mt) if isinstance(foreign.get("mediaType"), str) else mt
                urls = (
                    [u for u in foreign.get("urls") or [] if isinstance(u, str)]
                    if isinstance(foreign.get("urls"), list)
                    else []
                )
                if isinstance(foreign.get("digest"), str):
                    digest = foreign["digest"]
                if isinstance(foreign.get("size"), int):
                    size = foreign["size"]
            opener = None
            if m is not None:
                opener = lambda m=m: self._extract(m)
            layers.append(LayerSpec(i, mt, "detect", digest, size, diff_id, list(urls), foreign is not None, opener))
        tags = entry.get("RepoTags")
        if tags is not None and not isinstance(tags, list):  # docker writes a list or null; text is not a tag list
            raise CimError(E_INVALIDARG, f"manifest.json: RepoTags is {type(tags).__name__}, not a list", self.label)
        refs = [checked.ref_name(t, f"{self.label}: manifest.json", f"RepoTags[{i}]") for i, t in enumerate(tags or [])]
        return ImageSpec(self.label, None, None, None, cdigest, config, cbytes, layers, refs, platform_text(p))

    def close(self) -> None:
        tf = getattr(self, "tf", None)
        if tf is not None:
            tf.close()
            self.tf = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._spooled is not None:
            try:
                os.unlink(self._spooled)
            except FileNotFoundError:
                pass
            self._spooled = None


def _open_archive(path: str):
    """An archive given by path: a regular file, or a FIFO or character device
    (``<(docker save app)``) read as a stream; the open itself never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise CimError(ERROR_FILE_NOT_FOUND, f"cannot open the archive: {e.strerror or e}", path) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise CimError(E_INVALIDARG, "not an OCI layout directory, an archive file or a pipe", path)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


class _SpaceChecked:
    """A member's data being spooled, with the free space checked every 64 MiB."""

    EVERY = 64 << 20

    def __init__(self, f, size: int, check):
        self.f, self.left, self.check, self.since = f, size, check, 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.left -= len(b)
        self.since += len(b)
        if self.since >= self.EVERY:
            self.since = 0
            self.check(max(self.left, 0))
        return b


class _ArchivedLayout(OciLayout):
    """An OCI image layout inside a tar (``skopeo copy ... oci-archive:``),
    read from the archive's members in place."""

    def __init__(self, archive: DockerArchive):
        self.archive = archive
        self.path = archive.label
        layout = _json(archive._read(blobs.OCI_LAYOUT_FILE, "oci-layout"), f"{self.path}: oci-layout")
        if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
            raise CimError(
                E_INVALIDARG, f"unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}", self.path
            )

    def read_index(self) -> tuple[dict, str]:
        where = f"{self.path}: index.json"
        return _json(self.archive._read("index.json", "index"), where), where

    @staticmethod
    def _name(digest: str) -> str:
        alg, hexd = blobs.parse_digest(digest)
        return f"blobs/{alg}/{hexd}"

    def read_blob(self, digest: str, what: str) -> bytes:
        name = self._name(digest)
        if self.archive._member(name, what) is None:
            raise CimError(ERROR_FILE_NOT_FOUND, f"{what} blob {digest} is not in the layout", self.path)
        data = self.archive._read(name, what)
        _check_digest(data, digest, f"{what} {self.path}:{name}")
        return data

    def opener(self, digest: str):
        m = self.archive._member(self._name(digest), "layer")
        if m is None:
            return None
        return lambda: self.archive._extract(m)


def open_source(src, spool_dir: str):
    """An OCI layout directory, a docker archive file, or a binary stream holding a docker archive."""
    if isinstance(src, str) and src != "-":
        if os.path.isdir(src):
            return OciLayout(src)
        if not os.path.exists(src):
            raise CimError(ERROR_FILE_NOT_FOUND, "no such OCI layout or image archive", src)
        return DockerArchive(src, spool_dir)
    return DockerArchive(src, spool_dir)
