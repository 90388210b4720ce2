#!/usr/bin/env bash
# Install cimfs, build an image from examples/tree, fork it with a change,
# then list and read both with the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e .

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

# git cannot store hard links: make one in a copy of the example tree
cp -a examples/tree "$work/tree"
ln "$work/tree/hello.txt" "$work/tree/docs/hello-again.txt"
mkdir "$work/images"
cd "$work"

run cimfs create tree images/base.cim
run cimfs ls images/base.cim -lR
run cimfs cat images/base.cim docs/hello-again.txt

printf 'Version 2 of the example tree.\n' > motd-v2
run cimfs fork images/base.cim images/v2.cim --add motd-v2:/etc/motd --delete docs/guide.md
run cimfs ls images/v2.cim -lR
run cimfs cat images/v2.cim etc/motd
run cimfs cat images/base.cim etc/motd
run cimfs diff images/base.cim images/v2.cim
run cimfs info images/v2.cim
run cimfs fsck images/v2.cim
run cimfs extract images/v2.cim out
run ls -l out out/docs
