"""``HiveFormatError``: damage inside a registry hive, reported in one line naming the hive (the caller's
label: a file path or a path inside an image), the cell's rel offset when one is at fault, and the reason."""

from __future__ import annotations

from ..errors import ERROR_FILE_CORRUPT, CimFormatError


class HiveFormatError(CimFormatError):
    """A registry hive is corrupt, truncated, hostile or of an unsupported version.

    ``.hive`` is the label the hive was opened with, ``.cell`` the rel offset (from the start of the hive
    bins) of the offending cell or ``None``, ``.reason`` the reason; ``str()`` is ``HIVE: cell 0x...: REASON``."""

    def __init__(self, hive: str, cell: int | None, reason: str):
        self.hive, self.cell, self.reason = hive, cell, reason
        where = "" if cell is None else f"cell 0x{cell:x}: "
        super().__init__(where + reason.replace("\n", " "), hive, ERROR_FILE_CORRUPT)

    def __reduce__(self):
        return (type(self), (self.hive, self.cell, self.reason))
