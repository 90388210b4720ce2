"""Generate src/cimfs/layout/upcase.bin, the upcase table cimfs writes into new images.

Run once; the output is committed so that image bytes do not depend on the
Unicode database of whichever Python builds the image (spec §7).
Rule: a BMP character whose str.upper() is a single BMP character maps to it;
everything else (surrogates, characters with multi-character upper case) maps
to itself.
"""
import array
import pathlib
import sys

table = array.array("H", range(65536))
for cu in range(65536):
    if 0xD800 <= cu <= 0xDFFF:
        continue
    up = chr(cu).upper()
    if len(up) == 1 and ord(up) < 0x10000:
        table[cu] = ord(up)
if sys.byteorder != "little":
    table.byteswap()
out = pathlib.Path(__file__).resolve().parent.parent / "src/cimfs/layout/upcase.bin"
out.write_bytes(table.tobytes())
print(out, sum(1 for i, v in enumerate(table) if i != v), "mapped")
