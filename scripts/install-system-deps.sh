#!/usr/bin/env bash
# What the mounts (and their tests) need on Debian: fuse3 (fusermount3),
# erofs-utils (fsck.erofs checks the kernel engine's EROFS indexes),
# libfuse3-dev + pkg-config + a C compiler to build pyfuse3, then pyfuse3 and
# trio from PyPI.  The image tests (tests/test_oci.py) use skopeo and
# docker-registry (Debian's distribution registry) as real clients.
# The hive tests (tests/test_regf*.py) check cimfs.regf's output with hivex (libhivex-bin: hivexsh,
# hivexget; libwin-hivex-perl: hivexregedit).  Idempotent: installs only what is missing.  Run as root.
# PYTHON names the interpreter to install into (default: python3).
# Known to work here: libfuse 3.14 (Debian 12), pyfuse3 3.5.0 with trio
# 0.22.2 and 0.35.0, CPython 3.11.
set -euo pipefail
PYTHON=${PYTHON:-python3}
export DEBIAN_FRONTEND=noninteractive PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc erofs-utils skopeo docker-registry libhivex-bin libwin-hivex-perl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# pyfuse3 is built from source: the interpreter's own headers must exist.
inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ ! -f "$inc/Python.h" ] && [ "$inc" = "/usr/include/python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]; then
    need+=(python3-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-system-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! "$PYTHON" -c 'import pyfuse3, trio' 2>/dev/null; then
    if ! "$PYTHON" -m pip install -q "pyfuse3>=3.2,<4" "trio>=0.22"; then
        echo "install-system-deps: warning: pyfuse3 did not build; FUSE mounts (and their tests) are unavailable" >&2
    fi
fi
