"""Bounds on what a tar's headers can make ``tarfile`` buffer.

``tarfile`` reads a PAX extended header, a GNU long name or long link, and a
GNU sparse map into memory whole, however large the header's size field says
it is: a gzip'd tar of a few MB with a 1 GiB PAX header makes a reader grow by
gigabytes, and a chain of extension headers recurses once per header.
:class:`BoundedTarInfo` (pass it as ``tarinfo=`` to ``tarfile.open``) checks
each header before ``tarfile`` reads its payload, through the ``_proc_member``
hook ``tarfile`` provides for TarInfo subclasses.

[choice] The limits (docs/CLI.md, "Tar input"):

* an extension header (PAX ``x``/``g``/``X``, GNU ``L``/``K``) holds at most
  ``MAX_HEADER_BYTES`` (1 MiB: the longest Windows path is 32 767 UTF-16
  units, under 100 KB of UTF-8; a security descriptor or EA is under 64 KiB);
* at most ``MAX_HEADER_CHAIN`` (16) extension headers precede one member;
* the global PAX headers of a whole archive hold at most ``MAX_HEADER_BYTES``
  together (every later member carries a copy of them);
* a GNU sparse map (old ``S`` extension blocks, or the 1.0 map in front of
  the data) takes at most ``MAX_HEADER_BYTES``.

Past a limit, and on a header ``tarfile`` cannot parse (a broken sparse map
makes it raise ``ValueError``), reading raises ``tarfile.ReadError`` naming
the header's offset; callers turn that into their CimError.
"""

from __future__ import annotations

import tarfile

MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_CHAIN = 16

_EXTENSION_TYPES = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
}


class _Budget:
    """The archive's file object, read through a byte budget (for the sparse
    maps ``tarfile`` reads block by block until the map says it is done)."""

    def __init__(self, fileobj, what: str, offset: int):
        self._f = fileobj
        self._left = MAX_HEADER_BYTES
        self._what = what
        self._offset = offset

    def read(self, size=-1):
        if size is None or size < 0 or size > self._left:
            raise tarfile.ReadError(
                f"{self._what} at byte {self._offset} is longer than {MAX_HEADER_BYTES} bytes (the limit)"
            )
        self._left -= size
        return self._f.read(size)

    def __getattr__(self, name):
        return getattr(self._f, name)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose headers are bounded (see the module doc).

    An error is final: ``tarfile`` may have moved its position past the bad
    member before the error, so every later read of the archive raises it
    again instead of going on from there."""

    @classmethod
    def fromtarfile(cls, tf):
        failed = getattr(tf, "_cimfs_failed", None)
        if failed is not None:
            raise tarfile.ReadError(failed)
        try:
            return super().fromtarfile(tf)
        except tarfile.ReadError as e:
            tf._cimfs_failed = str(e)
            raise

    def _proc_member(self, tf):
        what = _EXTENSION_TYPES.get(self.type)
        if what is None:
            tf._cimfs_chain = 0
        else:
            if self.size > MAX_HEADER_BYTES:
                raise tarfile.ReadError(
                    f"{what} at byte {self.offset} holds {self.size} bytes; the limit is {MAX_HEADER_BYTES}"
                )
            chain = getattr(tf, "_cimfs_chain", 0) + 1
            if chain > MAX_HEADER_CHAIN:
                raise tarfile.ReadError(
                    f"more than {MAX_HEADER_CHAIN} extension headers in a row (at byte {self.offset})"
                )
            tf._cimfs_chain = chain
            if self.type == tarfile.XGLTYPE:
                total = getattr(tf, "_cimfs_global_bytes", 0) + self.size
                if total > MAX_HEADER_BYTES:
                    raise tarfile.ReadError(
                        f"the archive's global PAX headers exceed {MAX_HEADER_BYTES} bytes (at byte {self.offset})"
                    )
                tf._cimfs_global_bytes = total
        try:
            return super()._proc_member(tf)
        except (ValueError, IndexError, OverflowError) as e:
            # A sparse map or a number tarfile cannot parse (UnicodeDecodeError
            # is a ValueError too).
            raise tarfile.ReadError(f"malformed header at byte {self.offset} ({e or type(e).__name__})") from None

    def _proc_sparse(self, tf):
        return self._with_budget(tf, "GNU sparse map", lambda: super(BoundedTarInfo, self)._proc_sparse(tf))

    def _proc_gnusparse_10(self, next, pax_headers, tf):
        return self._with_budget(
            tf, "GNU sparse map", lambda: super(BoundedTarInfo, self)._proc_gnusparse_10(next, pax_headers, tf)
        )

    def _with_budget(self, tf, what, run):
        real = tf.fileobj
        tf.fileobj = _Budget(real, what, self.offset)
        try:
            return run()
        finally:
            tf.fileobj = real
