"""Reading what the layer store does not control: the files of an image
source (an OCI layout's index, manifests, configs and blobs, a docker
archive's manifest.json) and the store's own JSON (refs.json, the layer
records), which an edited or attacker-writable store may have changed.

* Files are opened non-blocking and must be regular files (a FIFO named
  ``index.json`` would block forever); their size is bounded before reading.
* JSON is parsed with its nesting bounded and every field the store uses
  checked for its type, so a damaged file is one line naming it and the field,
  never a traceback.
* Every name the store's JSON gives for a file (layer images, blob digests)
  is checked to be a plain file name of the store's own forms before it is
  used: nothing read from refs.json can name a path outside the store.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat

from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, CimError
from . import blobs

MAX_JSON = 64 << 20  # an index, manifest, config or store record larger than this is not read
MAX_DEPTH = 64  # [choice] real image JSON nests under 10 levels; deeper is refused before any use
MAX_REF_NAME = 1024  # a reference (name:tag) longer than this is refused

_IMAGE_NAME = re.compile(r"(?:base-|ind-|merged-)?(?:[0-9a-f]{64}|[0-9a-f]{128})\.cim")


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


# ---------------------------------------------------------------- files
def open_regular(path: str, what: str):
    """``path`` opened for reading (binary, blocking) if it is a regular file;
    the open itself never blocks (O_NONBLOCK, cleared once the type is known).
    OSError of the open is the caller's; anything but a regular file is a CimError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CimError(E_INVALIDARG, f"{what} is not a regular file", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str, what: str, limit: int = MAX_JSON) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    try:
        with open_regular(path, what) as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise CimError(ERROR_FILE_NOT_FOUND, f"{what} does not exist", path) from None
    except OSError as e:
        if isinstance(e, CimError):
            raise
        raise CimError(ERROR_FILE_NOT_FOUND, f"cannot read {what}: {e.strerror or e}", path) from None
    if len(data) > limit:
        raise CimError(E_INVALIDARG, f"{what} is larger than {limit} bytes", path)
    return data


# ---------------------------------------------------------------- JSON
def _depth_ok(obj) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (dict, list)))
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return True


def parse_json(data: bytes, what: str, kind=(dict, list)):
    """JSON ``data`` of type ``kind``; invalid, too deeply nested or of another
    type is a one-line CimError naming ``what`` (a file, or source: member)."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise CimError(E_INVALIDARG, f"JSON nested deeper than {MAX_DEPTH} levels", what) from None
    except (ValueError, UnicodeError) as e:
        raise CimError(E_INVALIDARG, f"not valid JSON ({e})", what) from None
    if not _depth_ok(obj):
        raise CimError(E_INVALIDARG, f"JSON nested deeper than {MAX_DEPTH} levels", what)
    if not isinstance(obj, kind):
        name = "a JSON object" if kind is dict else "a JSON list" if kind is list else "a JSON object or list"
        raise CimError(E_INVALIDARG, f"not {name}", what)
    return obj


def load_json(path: str, what: str, kind=dict):
    return parse_json(read_regular(path, what), path, kind)


# ---------------------------------------------------------------- names
def image_name(name, where: str, field: str) -> str:
    """A layer image name read from the store's JSON: one of the store's own
    forms (``<chain hex>.cim``, ``base-``/``ind-``/``merged-<hex>.cim``), so a
    plain file name inside ``layers/``."""
    if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
        raise CimError(E_INVALIDARG, f"{field} is {_short(name)}, not a layer image name of the store", where)
    return name


def digest(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise CimError(E_INVALIDARG, f"{field} is {_short(value)}, not a digest", where)
    try:
        blobs.parse_digest(value)
    except CimError:
        raise CimError(E_INVALIDARG, f"{field} is {_short(value)}, not a sha256/sha512 digest", where) from None
    return value


def ref_name(value, where: str, field: str) -> str:
    """A reference (``name:tag``) an image is known by: printable text on one line."""
    if not isinstance(value, str) or not value or len(value) > MAX_REF_NAME or not value.isprintable():
        raise CimError(
            E_INVALIDARG,
            f"{field} is {_short(value)}, not a reference name (printable text of 1 to {MAX_REF_NAME} characters)",
            where,
        )
    return value


def _list(value, where: str, field: str) -> list:
    if not isinstance(value, list):
        raise CimError(E_INVALIDARG, f"{field} is {_short(value)}, not a list", where)
    return value


# ---------------------------------------------------------------- the store's own JSON
def check_refs(refs, where: str) -> dict:
    """refs.json checked field by field: every image record with the types the
    store relies on and every name in it a plain file name of the store."""
    if not isinstance(refs, dict) or not isinstance(refs.get("images"), dict):
        raise CimError(E_INVALIDARG, "the store's refs file has no images", where)
    version = refs.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CimError(E_INVALIDARG, f"version is {_short(version)}, not a number", where)
    for key, rec in refs["images"].items():
        f = f"images[{_short(key)}]"
        digest(key, where, f"the image ID {f}")
        if not isinstance(rec, dict):
            raise CimError(E_INVALIDARG, f"{f} is not a JSON object", where)
        if rec.get("manifest_digest") is not None:
            digest(rec["manifest_digest"], where, f"{f}.manifest_digest")
        digest(rec.get("config_digest"), where, f"{f}.config_digest")
        for i, r in enumerate(_list(rec.get("refs", []), where, f"{f}.refs")):
            ref_name(r, where, f"{f}.refs[{i}]")
        if not isinstance(rec.get("platform", ""), str):
            raise CimError(E_INVALIDARG, f"{f}.platform is {_short(rec['platform'])}, not text", where)
        layers = _list(rec.get("layers"), where, f"{f}.layers")
        for i, c in enumerate(layers):
            digest(c, where, f"{f}.layers[{i}]")
        mode = rec.get("mode")
        if mode not in (None, "independent"):
            raise CimError(E_INVALIDARG, f"{f}.mode is {_short(mode)}, not 'independent'", where)
        top = rec.get("top")
        if top is not None or layers:
            image_name(top, where, f"{f}.top")
        if mode == "independent":
            own = _list(rec.get("independent_layers"), where, f"{f}.independent_layers")
            if len(own) != len(layers):
                raise CimError(
                    E_INVALIDARG, f"{f}.independent_layers lists {len(own)} images for {len(layers)} layers", where
                )
            for i, n in enumerate(own):
                image_name(n, where, f"{f}.independent_layers[{i}]")
    return refs


def check_layer_record(rec, where: str) -> dict:
    """A layer's record (layers/<name>.json): the fields read back are lists of text."""
    if not isinstance(rec, dict):
        raise CimError(E_INVALIDARG, "a layer record is not a JSON object", where)
    for field in ("warnings", "base_processing"):
        value = rec.get(field) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CimError(E_INVALIDARG, f"{field} is {_short(value)}, not a list of text", where)
    return rec
