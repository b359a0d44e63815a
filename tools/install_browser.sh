#!/usr/bin/env bash
# The browser the playground test drives (tests/test_playground.py): Debian's Chromium, which
# Playwright (a test dependency) launches through `executable_path`. Needs root and Debian's
# package registry; does nothing where Chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
