"""cimfs: Composite Image File System images without Windows."""
