#!/usr/bin/env bash
# Resolve the test (and server) dependency set into requirements/test.lock, the constraints the
# README's test command installs through. The library's own `dependencies` stay ranges; this file
# pins one set that is known to work together. Re-run after changing pyproject.toml's dependencies,
# then run tools/fresh_check.sh before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || python -m pip install -q uv
{
  cat <<'HEADER'
# Constraints for the test suite (pip install -c requirements/test.lock -e '.[test]'), resolved by
# tools/lock.sh from pyproject.toml's [test] extra for CPython 3.11 on x86-64 Linux.
# Pins with a reason beyond "resolved together":
#   pytest < 9.2: pytest 9.2 removed Node._nodeid, which schemathesis 4.32 still reads (tests/test_fuzz.py).
#   torch == 2.13.0: the CPU build pip finds on this project's machines (/opt/wheels); the CUDA
#     packages below are what PyPI's torch would pull in and stay unused with the CPU wheel.
# Refresh: bash tools/lock.sh, then bash tools/fresh_check.sh.
HEADER
  uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
      --index-url https://pypi.org/simple --no-header --no-annotate 2>/dev/null
} > requirements/test.lock
echo "wrote requirements/test.lock ($(grep -c '==' requirements/test.lock) pins)"
