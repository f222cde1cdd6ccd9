#!/usr/bin/env bash
# Start ComfyUI with this pack, its example workflows and its shipped weights on http://127.0.0.1:8188.
# Uses COMFYUI_PATH if set (your install: the pack is linked into its custom_nodes), else provisions
# ComfyUI 0.3.75 offline into .cache/comfyui. Extra arguments go to ComfyUI's main.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
comfy="$(bash "$here/scripts/provision.sh" | tail -n 1)"
py="$here/.venv/bin/python"
[ -n "${COMFYUI_PATH:-}" ] && py="${COMFYUI_PYTHON:-$py}"

link="$comfy/custom_nodes/ComfyUI-FMBoost"
if [ ! -e "$link" ]; then
  ln -s "$here" "$link"
elif [ "$(readlink -f "$link")" != "$here" ]; then
  echo "note: $link exists and is not this checkout; ComfyUI will load that one" >&2
fi

# The pack's CFM models are found where they are (weights/cfm is registered as a cfm folder): nothing is
# copied. ComfyUI's own TAESD previews need TAESD in models/vae_approx, and the example workflow an input image;
# neither overwrites a file the user has.
mkdir -p "$comfy/models/vae_approx" "$comfy/input"
for f in "$here"/weights/taesd/taesd_*.safetensors; do
  [ -e "$comfy/models/vae_approx/$(basename "$f")" ] || cp "$f" "$comfy/models/vae_approx/"
done
[ -e "$comfy/input/fmboost_example.png" ] || cp "$here/assets/fmboost_example.png" "$comfy/input/"

device_args=()
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || device_args=(--cpu)
cd "$comfy"
echo "ComfyUI with FMBoost on http://127.0.0.1:${FMBOOST_PORT:-8188} (example workflows: Workflow → Browse Templates → ComfyUI-FMBoost)"
exec "$py" main.py --listen 127.0.0.1 --port "${FMBOOST_PORT:-8188}" --preview-method auto "${device_args[@]}" "$@"
