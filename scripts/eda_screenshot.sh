#!/usr/bin/env bash
# Screenshot an HTML report (the EDA or results page) in headless Chromium and fail on JavaScript/console errors.
# usage: scripts/eda_screenshot.sh REPORT_HTML OUT_PNG [WIDTH,HEIGHT]
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT_HTML OUT_PNG [WIDTH,HEIGHT]" >&2
    exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,4000}
[[ -f "$html" ]] || { echo "no such report: $html" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n "$browser" ]] || { echo "chromium not found (apt-get install -y chromium)" >&2; exit 3; }

profile=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$profile" "$log"' EXIT
mkdir -p "$(dirname "$out")"
rm -f "$out"
timeout 90 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --enable-logging=stderr --v=0 \
    --screenshot="$out" --window-size="$size" "file://$html" >"$log" 2>&1 || {
    echo "chromium failed:" >&2; cat "$log" >&2; exit 1; }

if grep -E "Uncaught|ERROR:CONSOLE|CONSOLE\(.*\)\] \"(Error|Failed)" "$log" >&2; then
    echo "console errors while rendering $html" >&2
    exit 1
fi
[[ -s "$out" ]] || { echo "no screenshot written" >&2; cat "$log" >&2; exit 1; }
echo "$out"
