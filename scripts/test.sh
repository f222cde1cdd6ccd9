#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: provisions the venv and ComfyUI (offline, see provision.sh),
# then runs unit tests and the tests against a real ComfyUI server. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/provision.sh" >/dev/null
# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing Debian's chromium for the browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null
fi
cd "$here"
exec "$here/.venv/bin/python" -m pytest -p no:cacheprovider --timeout 900 "$@"
