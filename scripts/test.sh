#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: provisions the venv and ComfyUI (offline, see provision.sh),
# then runs unit tests and the tests against a real ComfyUI server. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$here/scripts/provision.sh" >/dev/null
cd "$here"
exec "$here/.venv/bin/python" -m pytest -p no:cacheprovider --timeout 900 "$@"
