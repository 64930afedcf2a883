#!/bin/sh
# The second half of README.md's test command: the build with the hot path compiled by mypyc
# (setup.py, KMSD_MYPYC=1; kmsd/build.py lists the modules) on a copy of this tree, in a venv
# of its own, so the checkout and its .venv stay the interpreted reference. On it run the pure
# core and the server, vectors, store and faults tests; tests/test_build.py checks that every
# listed module is the compiled one. Fuzzing (tests/test_fuzz.py) and the rest of the system
# tier run on the interpreted build only (test_admin_http replaces a method of a store object,
# which a compiled class refuses; the other 1005 tests passed on the compiled build too).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.so' \
    --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$work" -xf -
cd "$work"
python3 -m venv .venv
# mypyc reads the types of what the modules import, so the dependencies come first.
.venv/bin/pip install -q 'setuptools>=77' -e '.[test]'
export KMSD_MYPYC=1
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -m pytest -p no:cacheprovider -m "not system" --ignore=tests/test_fuzz.py
.venv/bin/python -m pytest -p no:cacheprovider -m system tests/test_server.py \
    tests/test_vectors.py tests/test_store.py tests/test_faults.py
