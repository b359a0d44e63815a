#!/usr/bin/env bash
# The README's test command as a new user runs it, before handing work in: the committed HEAD cloned
# into a temporary folder with ../shared beside it, a brand-new venv and an empty pip cache, then
# .ci/run's steps (the browser, then the test command, which must be the README's word for word).
# Prints the pytest summary and the wall time, install included; keeps only the log.
#   tools/fresh_check.sh [PYTEST ARGS...]     e.g. -m "not slow", or -p randomly (then install it first:
#                                             PRE_INSTALL=pytest-randomly tools/fresh_check.sh -p randomly)
set -uo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
shared=$(cd "$repo/../shared" 2>/dev/null && pwd) || { echo "no ../shared beside $repo" >&2; exit 2; }
command=$(grep -E "^pip install .* && python -m pytest$" "$repo/.ci/run")
[ "$(grep -cxF "$command" "$repo/README.md")" -ge 1 ] || { echo "README.md lacks .ci/run's test command: $command" >&2; exit 2; }
work=$(mktemp -d /tmp/fresh-check.XXXXXX)
log=/tmp/$(basename "$work").log
trap 'rm -rf "$work"' EXIT
git clone -q --no-checkout "$repo" "$work/repo" && git -C "$work/repo" checkout -q "$(git -C "$repo" rev-parse HEAD)"
ln -s "$shared" "$work/shared"
python3 -m venv "$work/venv"
start=$(date +%s)
(cd "$work/repo" && source "$work/venv/bin/activate" && export PIP_CACHE_DIR="$work/pip-cache" &&
 bash tools/install_browser.sh &&
 if [ -n "${PRE_INSTALL:-}" ]; then pip install -q -c requirements/test.lock $PRE_INSTALL; fi &&
 if [ $# -gt 0 ]; then eval "$command $(printf '%q ' "$@")"; else eval "$command"; fi) > "$log" 2>&1
status=$?
end=$(date +%s)
grep -E "^(=+ )?[0-9]+ (passed|failed)|^FAILED|^ERROR|Successfully installed" "$log" | cut -c1-300 | tail -20
echo "fresh check of $(git -C "$repo" rev-parse --short HEAD): exit $status, $((end - start)) s wall (install included); log: $log"
exit $status
