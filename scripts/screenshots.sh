#!/usr/bin/env bash
# Build the docs site and take screenshots of some of its pages with headless Chromium, to look at how they render.
#
#   scripts/screenshots.sh [OUT_DIR] [PAGE ...]
#
# OUT_DIR: where the PNGs go (default: screens/ in a new temporary folder, printed at the end). PAGE: site paths
# (default: the home, the API reference's iscse page, the benchmarks page). Each page is taken in the light and the
# dark scheme, at a desktop width (1280 px) and a phone width (390 px). Needs the docs extra
# (pip install -e '.[docs]') and Chromium (Debian: apt-get install chromium). The site is built outside the clone.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$(mktemp -d)/screens}"
shift || true
pages=("$@")
[ ${#pages[@]} -gt 0 ] || pages=(index.html reference/iscse.html benchmarks.html)

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "screenshots.sh: no Chromium found (Debian: apt-get install chromium)" >&2; exit 1; }

work="$(mktemp -d)"
server=""
cleanup() { [ -z "$server" ] || kill "$server" 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
(cd "$repo" && NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$work/site")
mkdir -p "$out"

# Served over HTTP on localhost, as a reader sees it (from file:// the search does not load).
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
python -m http.server "$port" --bind 127.0.0.1 --directory "$work/site" > /dev/null 2>&1 &
server=$!
for _ in $(seq 50); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2> /dev/null && break
    sleep 0.2
done

shoot() {  # shoot URL PNG WIDTH HEIGHT SCHEME
    # preferredColorScheme=0 makes prefers-color-scheme: dark true, which picks the site's dark (slate) palette.
    local dark=()
    [ "$5" = dark ] && dark=(--blink-settings=preferredColorScheme=0)
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
        --user-data-dir="$work/profile-$5" "${dark[@]}" --virtual-time-budget=3000 \
        --window-size="$3,$4" --screenshot="$2" "$1" > /dev/null 2>&1
    [ -s "$2" ] || { echo "screenshots.sh: no screenshot of $1" >&2; return 1; }
}

for page in "${pages[@]}"; do
    [ -f "$work/site/$page" ] || { echo "screenshots.sh: the site has no page $page" >&2; exit 1; }
    name="$(echo "${page%.html}" | tr '/' '-')"
    for scheme in light dark; do
        shoot "http://127.0.0.1:$port/$page" "$out/$name-$scheme.png" 1280 1600 "$scheme"
    done
    shoot "http://127.0.0.1:$port/$page" "$out/$name-phone.png" 390 1200 light
done
ls -1 "$out"/*.png
echo "screenshots in $out"
