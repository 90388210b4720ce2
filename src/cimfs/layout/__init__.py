"""The byte layouts of the formats cimfs reads and writes: CIM (``cim.py``), the NTFS/WSL blobs stored in images
(``ntfs.py``) and EROFS (``erofs.py``).  Nothing outside these modules packs or unpacks format bytes."""
