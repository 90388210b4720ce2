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
"""

from __future__ import annotations

import re

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
    import datetime as dt

    m = _RFC3339.fullmatch(str(config.get("created", "")).strip())
    if not m:
        return 0
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        offset = dt.timedelta(0) if tz in ("Z", "z") else \
            (1 if tz[0] == "+" else -1) * dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
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
    present = [h for h in HIVES if writer.exists(f"{REG_FILES_PATH}\\{h[0]}")
               and not writer.is_dir(f"{REG_FILES_PATH}\\{h[0]}")]
    missing = [f"{REG_FILES_PATH}\\{h[0]}" for h in HIVES if h not in present]
    if not present:
        return added, missing
    times = dict(creation_time=when, last_write_time=when, change_time=when, last_access_time=when)
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
