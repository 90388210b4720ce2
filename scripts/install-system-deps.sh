#!/usr/bin/env bash
# Debian packages the tests and the FUSE mount need (fuse3 for fusermount3,
# libfuse3-dev and pkg-config to build pyfuse3). Idempotent; run as root.
set -euo pipefail
need=()
for pkg in fuse3 libfuse3-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-system-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
