"""Generate src/cimfs/layout/upcase.bin, the upcase table cimfs writes into new images.

Run once; the output is committed so that image bytes do not depend on the
Unicode database of whichever Python builds the image (spec §7).

[choice] The table is Windows' own (``RtlUpcaseUnicodeChar``, Windows 10): what
Windows' CimFS writer stores and what its driver and the registry sort names
with.  It is built as a rule plus the code units where Windows differs from it:

* the rule: a BMP character whose ``str.upper()`` (Unicode 14.0, CPython 3.11)
  is a single BMP character maps to it; everything else (surrogates,
  characters with multi-character upper case) maps to itself;
* ``tools/windows-upcase.tsv``: the 244 code units where Windows' table
  differs from the rule (code unit, Windows' upper case, the rule's), checked
  against the rule as it is computed here.

``--check`` compares the committed table with a fresh one instead of writing.
"""

import array
import pathlib
import sys
import unicodedata

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / "src/cimfs/layout/upcase.bin"
DIFFERENCES = HERE / "windows-upcase.tsv"
UNICODE_VERSION = "14.0.0"  # the database the differences were listed against (CPython 3.11)


def rule_table() -> array.array:
    table = array.array("H", range(65536))
    for cu in range(65536):
        if 0xD800 <= cu <= 0xDFFF:
            continue
        up = chr(cu).upper()
        if len(up) == 1 and ord(up) < 0x10000:
            table[cu] = ord(up)
    return table


def windows_differences() -> list[tuple[int, int, int]]:
    """(code unit, Windows' upper case, the rule's upper case) of each listed difference."""
    rows = []
    for line in DIFFERENCES.read_text(encoding="ascii").splitlines():
        if line.strip() and not line.startswith("#"):
            cu, windows, rule = (int(field, 16) for field in line.split("\t"))
            rows.append((cu, windows, rule))
    return rows


def windows_table() -> array.array:
    if unicodedata.unidata_version != UNICODE_VERSION:
        sys.exit(
            f"this Python has Unicode {unicodedata.unidata_version}; the differences were listed against "
            f"{UNICODE_VERSION} (run with CPython 3.11)"
        )
    table = rule_table()
    for cu, windows, rule in windows_differences():
        if table[cu] != rule:
            sys.exit(f"{DIFFERENCES.name}: U+{cu:04X} upper-cases to U+{table[cu]:04X} here, not U+{rule:04X}")
        table[cu] = windows
    return table


def main() -> None:
    table = windows_table()
    if sys.byteorder != "little":
        table.byteswap()
    data = table.tobytes()
    if "--check" in sys.argv[1:]:
        if OUT.read_bytes() != data:
            sys.exit(f"{OUT} is not the table this script makes")
        print(OUT, "is current")
        return
    OUT.write_bytes(data)
    print(OUT, sum(1 for i, v in enumerate(table) if i != v), "mapped")


if __name__ == "__main__":
    main()
