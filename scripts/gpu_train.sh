#!/usr/bin/env bash
# On a lent GPU machine (the device tool runs it in the repo root, with .gpu carried; see DEVELOPERS.md, GPU):
# trains RECIPE from the carried latent store for MINUTES and leaves in $OUT the weights in pieces of at most
# 15 MiB (files come back at most 16 MiB each), the log and the GPU's name. Reassemble here with
#   cat model.safetensors.part-* > model.safetensors
#   bash scripts/gpu_train.sh [RECIPE] [MINUTES]
set -euo pipefail
recipe="${1:-training/recipes/gpu-sd15-x2-pixel-c96.json}"; minutes="${2:-7}"
out="${OUT:?OUT: the folder whose files the device tool brings back}"
export PYTHONUNBUFFERED=1
run=/tmp/fmboost-gpu-run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" >> "$out/gpu.txt"
set +e
python3 scripts/train_cfm.py --config "$recipe" --store .gpu/store --val-images .gpu/val --run-dir "$run" \
    --out "$run/model.safetensors" --max-minutes "$minutes" 2>&1 | tr '\r' '\n' | grep -v '^train: ' \
    > "$out/train.log"
status=${PIPESTATUS[0]}
set -e
tail -n 5 "$out/train.log"
[ -f "$run/model.safetensors" ] && split -b 15M -d "$run/model.safetensors" "$out/model.safetensors.part-"
exit "$status"
