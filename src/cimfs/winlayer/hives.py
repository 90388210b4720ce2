"""Base-layer processing as hcsshim's CIM layer writer does it
(internal/wclayer/cim/process.go, processBaseLayerHives and processLayoutFile;
names from internal/wclayer/cim/LayerWriter.go ``hives`` and
internal/wclayer/legacy.go ``RegFilesPath``/``HivesPath``):

- a ``Hives`` directory (attributes DIRECTORY);
- for each registry hive ``Files\\Windows\\System32\\config\\<NAME>`` a hard
  link ``Hives\\<NAME>_BASE`` (DEFAULT -> ``DEFAULTUSER_BASE``);
- a file ``layout`` in the root holding ``vhd-with-hives\\n`` (attributes
  NORMAL).

hcsshim stamps the new directory and file with the current time; here they get
the image's ``created`` time (FILETIME 0 without one), so importing an image
twice gives identical layer images.

And the processing of a non-base layer (process.go ``processNonBaseLayer``,
registry.go ``mergeHive``): for each hive whose ``Hives\\<X>_DELTA`` the layer
brings (found case-insensitively: real layers spell it ``System_Delta``,
``system_Delta``), ``Hives\\<X>_BASE`` = the parent's ``Hives\\<X>_BASE``
flattened with the delta (offreg's ``ORMergeHives([base, delta])``, here
:func:`cimfs.regf.merge`), a file with attributes NORMAL and the same times as
the base-layer processing's.  The delta stays.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from typing import IO, Any

import cimfs

from ..errors import E_INVALIDARG, ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, CimError, CimFormatError
from ..metadata import FileAttributes, FileMetadata

REG_FILES_PATH = "Files\\Windows\\System32\\config"
HIVES_PATH = "Hives"
LAYOUT_FILE = "layout"
LAYOUT_CONTENT = b"vhd-with-hives\n"
# (hive file under REG_FILES_PATH, base hive under Hives, delta hive under Hives)
HIVES = (
    ("SYSTEM", "SYSTEM_BASE", "SYSTEM_DELTA"),
    ("SOFTWARE", "SOFTWARE_BASE", "SOFTWARE_DELTA"),
    ("SAM", "SAM_BASE", "SAM_DELTA"),
    ("SECURITY", "SECURITY_BASE", "SECURITY_DELTA"),
    ("DEFAULT", "DEFAULTUSER_BASE", "DEFAULTUSER_DELTA"),
)
DELTA_NAMES = frozenset(d.casefold() for _, _, d in HIVES)

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|z|[+-]\d\d:\d\d)")


def created_filetime(config: dict) -> int:
    """The config's ``created`` (RFC 3339) as FILETIME ticks; 0 when absent or unreadable."""
    import datetime as dt  # start-up time: only an image config's time is parsed

    m = _RFC3339.fullmatch(str(config.get("created", "")).strip())
    if not m:
        return 0
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        offset = (
            dt.timedelta(0)
            if tz in ("Z", "z")
            else (1 if tz[0] == "+" else -1) * dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        )
        t = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s)) - offset
    except ValueError:
        return 0
    secs = (t - dt.datetime(1601, 1, 1)).days * 86400 + (t - dt.datetime(1601, 1, 1)).seconds
    ticks = int(((frac or "") + "0000000")[:7])
    return max(0, secs * 10_000_000 + ticks)


def is_delta_hive(member: str) -> bool:
    """A tar member ``Hives/<NAME>_DELTA``."""
    parts = [p for p in member.replace("\\", "/").split("/") if p not in ("", ".")]
    return len(parts) == 2 and parts[0].casefold() == HIVES_PATH.casefold() and parts[1].casefold() in DELTA_NAMES


def process_base_layer(writer, when: int) -> tuple[list[str], list[str]]:
    """Add the Hives directory, the ``*_BASE`` links and the ``layout`` file to a
    base layer being written.  Returns (paths added, hive files not found)."""
    added: list[str] = []
    missing: list[str] = []
    present = [
        h
        for h in HIVES
        if writer.exists(f"{REG_FILES_PATH}\\{h[0]}") and not writer.is_dir(f"{REG_FILES_PATH}\\{h[0]}")
    ]
    missing = [f"{REG_FILES_PATH}\\{h[0]}" for h in HIVES if h not in present]
    if not present:
        return added, missing
    times: dict[str, Any] = dict(creation_time=when, last_write_time=when, change_time=when, last_access_time=when)
    if not writer.exists(HIVES_PATH):
        writer.mkdir(HIVES_PATH, FileMetadata(attributes=FileAttributes.DIRECTORY, **times))
        added.append(HIVES_PATH)
    for name, base, _delta in present:
        link = f"{HIVES_PATH}\\{base}"
        if writer.exists(link):
            continue
        writer.link(link, f"{REG_FILES_PATH}\\{name}")
        added.append(link)
    if not writer.exists(LAYOUT_FILE):
        writer.add_file(LAYOUT_FILE, LAYOUT_CONTENT, FileMetadata(attributes=FileAttributes.NORMAL, **times))
        added.append(LAYOUT_FILE)
    return added, missing


# ------------------------------------------------------------------ non-base layers
SPOOL_IN_MEMORY = 64 << 20  # a hive larger than this is kept in a temporary file (mapped) instead of memory


def delta_kind(parts: list[str]) -> tuple[str, str] | None:
    """(base hive name, delta hive name) when image path ``parts`` is ``Hives\\<X>_DELTA``, else None."""
    if len(parts) != 2 or parts[0].casefold() != HIVES_PATH.casefold():
        return None
    folded = parts[1].casefold()
    for _name, base, delta in HIVES:
        if folded == delta.casefold():
            return base, delta
    return None


class DeltaSpool:
    """The bytes of one ``Hives\\<X>_DELTA`` member, kept while the layer is
    written (the image writer has no read-back): in memory up to 64 MiB, past
    that in a temporary file, which the hive reader maps instead of reading
    (memory stays bounded whatever size a layer claims)."""

    def __init__(self, path: str):
        self.path = path  # the image path as the layer spells it
        self._memory: io.BytesIO | None = io.BytesIO()
        self._file: IO[bytes] | None = None

    def write(self, data) -> int:
        if self._memory is not None and self._memory.tell() + len(data) > SPOOL_IN_MEMORY:
            spill = self._file = tempfile.TemporaryFile()
            spill.write(self._memory.getbuffer())
            self._memory = None
        if self._memory is not None:
            return self._memory.write(data)
        assert self._file is not None  # the memory spilled into it
        return self._file.write(data)

    def source(self):
        """Bytes, or the temporary file (positioned at 0) for :func:`cimfs.regf.open_hive`."""
        if self._memory is not None:
            return self._memory.getvalue()
        self._file.flush()
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = self._file = None


def _parent_base(parents, base: str):
    """The nearest of ``parents`` (open :class:`cimfs.Image` readers or image
    paths, nearest first) that has ``Hives\\<base>``: its bytes, or for one
    over 64 MiB a temporary file holding them (the caller closes it); None
    when none has it.  A tombstone or a directory there counts as missing."""
    path = f"{HIVES_PATH}\\{base}"
    for parent in parents:
        own = not isinstance(parent, cimfs.Image)
        img = cimfs.open(parent) if own else parent
        try:
            try:
                st = img.stat(path)
            except CimError as e:
                if e.hresult in (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND):
                    continue
                raise
            if st.is_dir or st.reparse_data:
                return None  # a tombstone, merge marker or directory: no base hive to merge with
            with img.open(path) as f:
                if st.size <= SPOOL_IN_MEMORY:
                    return f.read()
                spool = tempfile.TemporaryFile()
                try:
                    shutil.copyfileobj(f, spool, 1 << 20)
                    spool.seek(0)
                except BaseException:
                    spool.close()
                    raise
                return spool
        finally:
            if own:
                img.close()
    return None


def _again(e: CimError, reason: str, label: str) -> CimError:
    """``e`` reworded to name the layer, keeping its kind (damage in a hive stays a CimFormatError)."""
    if isinstance(e, CimFormatError):
        err: CimError = CimFormatError(reason, label, e.hresult)
    else:
        err = CimError(e.hresult, reason, label)
    err.__suppress_context__ = True
    return err


def process_non_base_layer(writer, deltas: dict[str, DeltaSpool], parents, when: int, label: str) -> list[str]:
    """Write ``Hives\\<X>_BASE`` = merge(the parent's ``<X>_BASE``, this layer's
    ``<X>_DELTA``) for each delta in ``deltas`` (base hive name -> spooled
    delta), in the order of :data:`HIVES`.  ``parents``: the images the
    parent's base hives are read from, nearest first (the parent of a fork; the
    layer images below an independent layer).  Returns the paths written.

    A missing parent base hive or a delta that is not a valid hive raises a
    one-line :class:`CimError` naming the layer (``label``), the hive and the
    reason."""
    if not deltas:
        return []
    from .. import regf  # imported late: only layers with hive deltas need the hive package

    made: list[str] = []
    times: dict[str, Any] = dict(creation_time=when, last_write_time=when, change_time=when, last_access_time=when)
    for _name, base, _delta in HIVES:
        spool = deltas.get(base)
        if spool is None:
            continue
        merged = _merge_one(regf, spool, parents, base, label)
        out = f"{HIVES_PATH}\\{base}"
        if writer.exists(out):
            writer.delete(out)  # the parent's, inherited by the fork (or a link to its config\\<X>)
        writer.add_file(out, merged, FileMetadata(attributes=FileAttributes.NORMAL, **times))
        made.append(out)
    return made


def _merge_one(regf, spool: DeltaSpool, parents, base: str, label: str) -> bytes:
    delta_path = spool.path
    try:
        # [choice] a plain (not layered) hive in a delta's place is merged as a layer
        # whose keys all merge (semantics 0), as ORMergeHives takes any hive in its array.
        delta = regf.open_hive(spool.source(), name=delta_path)
    except CimError as e:
        raise _again(e, f"registry hive {base[:-5]}: {delta_path} is not a valid hive ({e.strerror})", label) from None
    parent_data = None
    try:
        parent_data = _parent_base(parents, base)
        if parent_data is None:
            raise CimError(
                ERROR_FILE_NOT_FOUND,
                f"registry hive {base[:-5]}: the layer has {delta_path} but its parent layer has no "
                f"{HIVES_PATH}\\{base} to merge it into",
                label,
            )
        why = f"registry hive {base[:-5]}: cannot merge {delta_path} into the parent's {HIVES_PATH}\\{base}"
        try:
            with regf.open_hive(parent_data, name=f"parent {HIVES_PATH}\\{base}") as parent_hive:
                return regf.merge(parent_hive, [delta])
        except CimError as e:
            raise _again(e, f"{why} ({e.strerror})", label) from None
        except (ValueError, OverflowError, RecursionError, MemoryError) as e:
            raise CimError(E_INVALIDARG, f"{why} ({e})", label) from None
    finally:
        delta.close()
        if parent_data is not None and not isinstance(parent_data, bytes):
            parent_data.close()


def derived_bases(img) -> dict[str, list[str]]:
    """The generated base hives of a non-base layer image ``img`` (an open
    :class:`cimfs.Image`): folded ``Hives\\<X>_BASE`` -> the parts of the
    ``Hives\\<X>_DELTA`` it was made from, for each X that has both."""
    found: dict[str, list[str]] = {}
    try:
        st = img.stat(HIVES_PATH)
    except CimError:
        return found
    if not st.is_dir:
        return found
    names = {e.name.casefold(): e for e in img.scandir(st.file_id)}
    for _name, base, delta in HIVES:
        d, b = names.get(delta.casefold()), names.get(base.casefold())
        if d is None or b is None:
            continue
        dst = img.stat(d.file_id)
        if dst.is_dir or dst.reparse_data:
            continue  # a tombstone or merge marker of an independent layer: no delta of its own
        found[img.fold(f"{HIVES_PATH}\\{b.name}")] = [HIVES_PATH, d.name]
    return found
