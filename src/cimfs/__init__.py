"""cimfs: build, read, fork, verify and mount Microsoft CimFS images without Windows.

Reading::

    with cimfs.open("layer.cim") as image:
        for dirpath, dirnames, filenames in image.walk():
            ...

Writing (commits on a clean exit, discards on an exception)::

    with cimfs.create("images", "layer.cim") as w:
        w.mkdir("Files")
        w.add_file("Files\\\\hello.txt", b"hello")

The Win32-shaped API (``CimCreateImage`` ...) is a thin facade over the same core.
"""

from typing import TYPE_CHECKING

from .lazy import exports

if TYPE_CHECKING:  # the names as type checkers and editors see them; at run time __getattr__ loads them
    from .errors import CimError, CimFormatError
    from .merged import merge
    from .metadata import FileAttributes, FileMetadata, filetime_from_ns, filetime_to_ns
    from .mount import CimDismountImage, CimMergeMountImage, CimMountImage
    from .names import fold_name
    from .reader import CimFile, DirEntry, Image, Stat, open
    from .win32 import (
        FILE_STAT_BASIC_INFORMATION,
        CimAddFsToMergedImage,
        CimAddFsToMergedImage2,
        CimCloseImage,
        CimCloseStream,
        CimCommitImage,
        CimCreateAlternateStream,
        CimCreateFile,
        CimCreateFlags,
        CimCreateHardLink,
        CimCreateImage,
        CimCreateImage2,
        CimCreateMergeLink,
        CimDeletePath,
        CimGetFileStatBasicInformation,
        CimReadFile,
        CimTombstoneFile,
        CimWriteStream,
    )
    from .writer import ImageWriter, StreamWriter, create

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562): ``import cimfs`` -- and so
# every ``cimfs`` command -- pays only for the modules it touches (start-up time,
# tests/test_startup.py).  Each name maps to the module that defines it.
_PUBLIC = {
    "errors": ("CimError", "CimFormatError"),
    "metadata": ("FileAttributes", "FileMetadata", "filetime_from_ns", "filetime_to_ns"),
    "names": ("fold_name",),
    "reader": ("CimFile", "DirEntry", "Image", "Stat", "open"),
    "writer": ("ImageWriter", "StreamWriter", "create"),
    "merged": ("merge",),
    "mount": ("CimMountImage", "CimMergeMountImage", "CimDismountImage"),
    "win32": (
        "CimAddFsToMergedImage",
        "CimAddFsToMergedImage2",
        "CimCreateMergeLink",
        "CimTombstoneFile",
        "CimCloseImage",
        "CimCloseStream",
        "CimCommitImage",
        "CimCreateAlternateStream",
        "CimCreateFile",
        "CimCreateHardLink",
        "CimCreateFlags",
        "CimCreateImage",
        "CimCreateImage2",
        "CimDeletePath",
        "CimGetFileStatBasicInformation",
        "CimReadFile",
        "FILE_STAT_BASIC_INFORMATION",
        "CimWriteStream",
    ),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}


__all__ = [
    "CimError",
    "CimFormatError",
    "FileAttributes",
    "FileMetadata",
    "filetime_from_ns",
    "filetime_to_ns",
    "fold_name",
    "CimFile",
    "DirEntry",
    "Image",
    "Stat",
    "open",
    "ImageWriter",
    "StreamWriter",
    "create",
    "CimCreateImage",
    "CimCreateFile",
    "CimWriteStream",
    "CimCloseStream",
    "CimCreateAlternateStream",
    "CimCreateHardLink",
    "CimDeletePath",
    "CimCommitImage",
    "CimCloseImage",
    "CimMountImage",
    "CimDismountImage",
    "CimTombstoneFile",
    "CimCreateMergeLink",
    "CimAddFsToMergedImage",
    "CimAddFsToMergedImage2",
    "merge",
    "CimMergeMountImage",
]

__all__ += [
    "CimCreateImage2",
    "CimCreateFlags",
    "CimReadFile",
    "CimGetFileStatBasicInformation",
    "FILE_STAT_BASIC_INFORMATION",
]


# ``cimfs.posix`` and the like worked without their own import when this file
# imported every module: a submodule is still found by attribute.
__getattr__, __dir__ = exports(__name__, globals(), _MODULE_OF, submodules=True)
