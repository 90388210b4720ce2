"""Windows registry hive files ("regf"): a reader that never trusts its input, a writer of clean hives, and
the flattening of differencing (layered) hives as offline registry's ORMergeHives does.  docs/REGF.md.

Modules: ``layout`` (every struct and constant), ``errors`` (``HiveFormatError``), ``names`` (Windows'
upcase, lh hash, name encodings), ``reader`` (``Hive``, ``Key``, ``Value``, ``open_hive``), ``writer``
(``NewKey``, ``NewValue``, ``write_hive``, ``HiveBuilder``), ``merge`` (``merge``, ``merge_files``).
Importing the package builds no table.
"""

from .errors import HiveFormatError
from .layout import (
    LAYER_SEMANTICS_NAMES,
    MERGE,
    REG_BINARY,
    REG_DWORD,
    REG_DWORD_BIG_ENDIAN,
    REG_DWORD_LITTLE_ENDIAN,
    REG_EXPAND_SZ,
    REG_FULL_RESOURCE_DESCRIPTOR,
    REG_LINK,
    REG_MULTI_SZ,
    REG_NONE,
    REG_QWORD,
    REG_QWORD_LITTLE_ENDIAN,
    REG_RESOURCE_LIST,
    REG_RESOURCE_REQUIREMENTS_LIST,
    REG_SZ,
    REG_TYPE_NAMES,
    SUPERSEDE_LOCAL,
    SUPERSEDE_TREE,
    TOMBSTONE,
)
from .merge import merge, merge_files
from .names import upcase
from .reader import Hive, HiveKeyNotFound, Key, Value, open_hive
from .writer import NewKey, NewValue, write_hive

__all__ = [
    "LAYER_SEMANTICS_NAMES",
    "MERGE",
    "REG_BINARY",
    "REG_DWORD",
    "REG_DWORD_BIG_ENDIAN",
    "REG_DWORD_LITTLE_ENDIAN",
    "REG_EXPAND_SZ",
    "REG_FULL_RESOURCE_DESCRIPTOR",
    "REG_LINK",
    "REG_MULTI_SZ",
    "REG_NONE",
    "REG_QWORD",
    "REG_QWORD_LITTLE_ENDIAN",
    "REG_RESOURCE_LIST",
    "REG_RESOURCE_REQUIREMENTS_LIST",
    "REG_SZ",
    "REG_TYPE_NAMES",
    "SUPERSEDE_LOCAL",
    "SUPERSEDE_TREE",
    "TOMBSTONE",
    "Hive",
    "HiveFormatError",
    "HiveKeyNotFound",
    "Key",
    "NewKey",
    "NewValue",
    "Value",
    "merge",
    "merge_files",
    "open_hive",
    "upcase",
    "write_hive",
]
