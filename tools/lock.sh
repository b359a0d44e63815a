#!/usr/bin/env bash
# Resolve the test dependency set (the [test] extra, which pulls in [server]) into
# requirements/test.lock, the constraints the README's test command installs through. The library's
# own `dependencies` stay ranges; this file pins one set known to work together.
# Re-run after changing pyproject.toml's dependencies (or to take newer releases: delete the lock
# first, since uv keeps the versions an existing output file names), then run tools/fresh_check.sh
# before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || python -m pip install -q uv
lock=requirements/test.lock
body=$(mktemp)
trap 'rm -f "$body"' EXIT
# /opt/wheels holds the CPU build of torch (2.13.0+cpu), which pip also finds there through the
# machine's pip config; without it uv would lock PyPI's CUDA build and its ~3 GB of nvidia packages.
# An existing lock is passed as the output file so that uv keeps its versions (smallest change).
[ -f "$lock" ] && grep -v -e '^#' -e '^torch==' "$lock" > "$body" || true  # torch: always the local CPU build
uv pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --find-links /opt/wheels --no-header --no-annotate --quiet -o "$body"
{
  cat <<'HEADER'
# Constraints for the test suite: pip install -c requirements/test.lock -e '.[test]'
# Resolved by tools/lock.sh (uv pip compile) from pyproject.toml's [test] extra, which includes
# [server], for CPython 3.11 on x86-64 Linux. Refresh: bash tools/lock.sh, then
# bash tools/fresh_check.sh; commit both pyproject.toml and this file.
# Pins with a reason beyond "resolved together":
#   pytest < 9.2: pytest 9.2 removed Node._nodeid, which schemathesis 4.32 still reads
#     (tests/test_fuzz.py fails with AttributeError: 'Function' object has no attribute '_nodeid').
#   torch == 2.13.0+cpu: the CPU build in this project's machines' /opt/wheels, where pip finds it;
#     PyPI's torch 2.13.0 is the CUDA build (several GB). Elsewhere, add PyTorch's CPU wheel index
#     to pip's index URLs.
#   jax-cuda13-plugin / jax-cuda13-pjrt == jax's own version, nvidia-cuda-nvcc (ptxas) and
#     nvidia-cudnn-cu13 (with the cuBLAS and NVRTC wheels it requires): the [gpu-plan] extra, which
#     [test] includes so that tests/test_plan.py compiles for an H200 and 8 H100s without a GPU
#     (2.3 GB; docs/serving.md).
HEADER
  cat "$body"
} > "$lock"
echo "wrote $lock ($(grep -c '==' "$lock") pins)"
