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

from .errors import CimError, CimFormatError
from .metadata import FileAttributes, FileMetadata, filetime_from_ns, filetime_to_ns
from .names import fold_name
from .reader import CimFile, DirEntry, Image, Stat, open
from .writer import ImageWriter, StreamWriter, create
from .merged import merge
from .mount import CimDismountImage, CimMergeMountImage, CimMountImage
from .win32 import (
    CimAddFsToMergedImage,
    CimAddFsToMergedImage2,
    CimCreateMergeLink,
    CimTombstoneFile,
    CimCloseImage,
    CimCloseStream,
    CimCommitImage,
    CimCreateAlternateStream,
    CimCreateFile,
    CimCreateHardLink,
    CimCreateFlags,
    CimCreateImage,
    CimCreateImage2,
    CimDeletePath,
    CimGetFileStatBasicInformation,
    CimReadFile,
    FILE_STAT_BASIC_INFORMATION,
    CimWriteStream,
)

__version__ = "0.1.0"

__all__ = [
    "CimError", "CimFormatError", "FileAttributes", "FileMetadata", "filetime_from_ns", "filetime_to_ns",
    "fold_name", "CimFile", "DirEntry", "Image", "Stat", "open", "ImageWriter", "StreamWriter", "create",
    "CimCreateImage", "CimCreateFile", "CimWriteStream", "CimCloseStream", "CimCreateAlternateStream",
    "CimCreateHardLink", "CimDeletePath", "CimCommitImage", "CimCloseImage", "CimMountImage", "CimDismountImage",
    "CimTombstoneFile", "CimCreateMergeLink", "CimAddFsToMergedImage", "CimAddFsToMergedImage2", "merge",
    "CimMergeMountImage",
]

__all__ += ["CimCreateImage2", "CimCreateFlags", "CimReadFile", "CimGetFileStatBasicInformation",
            "FILE_STAT_BASIC_INFORMATION"]
