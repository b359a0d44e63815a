#!/usr/bin/env bash
# The README's test command as a new user runs it: the committed HEAD cloned into a temporary folder
# with ../shared beside it, a brand-new venv, then the command from .ci/run (so the two cannot
# drift). Prints the pytest summary and the wall time, install included.
#   tools/fresh_check.sh [PYTEST ARGS...]     e.g. -m "not slow", or -p randomly
set -uo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
shared=$(cd "$repo/../shared" 2>/dev/null && pwd) || { echo "no ../shared beside $repo" >&2; exit 2; }
work=$(mktemp -d /tmp/fresh-check.XXXXXX)
git clone -q "$repo" "$work/repo"
ln -s "$shared" "$work/shared"
python3 -m venv "$work/venv"
command=$(grep -E "^pip install .* && python -m pytest" "$repo/.ci/run")
log="$work/log.txt"
start=$(date +%s)
(cd "$work/repo" && source "$work/venv/bin/activate" && bash tools/install_browser.sh &&
 if [ $# -gt 0 ]; then eval "$command $(printf '%q ' "$@")"; else eval "$command"; fi) > "$log" 2>&1
status=$?
end=$(date +%s)
grep -E "^(=+ )?[0-9]+ (passed|failed)|^FAILED|^ERROR" "$log" | tail -20
echo "fresh check: exit $status, $((end - start)) s wall (install included); log: $log"
exit $status
