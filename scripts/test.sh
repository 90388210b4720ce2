#!/usr/bin/env bash
# Install everything the test suite needs (Debian packages for FUSE, the
# package with its extras), check lint, formatting and types, and run every
# test.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -f scripts/install-system-deps.sh ]; then
    bash scripts/install-system-deps.sh
fi
if ! python3 -m pip install -q -e ".[test,mount,oci,remote]"; then
    echo "warning: the FUSE extra (pyfuse3) did not install; mount tests will be skipped" >&2
    python3 -m pip install -q -e ".[test,oci,remote]"
fi
# The house rules first (pyproject.toml: the ruff rule set, the formatter, mypy on src/cimfs).
python3 -m ruff check --quiet .
python3 -m ruff format --check --quiet .
python3 -m mypy
exec python3 -m pytest -q "$@"
