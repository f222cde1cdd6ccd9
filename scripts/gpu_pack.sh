#!/usr/bin/env bash
# Here, before a lent GPU's run: fills .gpu/ (ignored by git, named in the device call's `carry`) with the first
# N chunks of a latent store built here (64 photos each, ~5.7 MB) and the first 16 held-out photos for the
# trainer's validation, and checks that everything that travels stays under the device's 64 MiB.
#   bash scripts/gpu_pack.sh ../fmboost-runs/cache/store-<key> [N=4]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
store="${1:?usage: gpu_pack.sh STORE_FOLDER [CHUNKS]}"; n="${2:-4}"
shared="${FMBOOST_SHARED:-$here/../shared}"
cd "$here"
rm -rf .gpu && mkdir -p .gpu/store .gpu/val
ls "$store"/chunk-*.safetensors | sort | head -n "$n" | xargs -I{} cp {} .gpu/store/
ls "$shared/data/photos/val" | sort | head -n 16 | xargs -I{} cp "$shared/data/photos/val/{}" .gpu/val/
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
total=$((tracked + carried))
echo "[gpu_pack] .gpu: $(ls .gpu/store | wc -l) store chunks, $(ls .gpu/val | wc -l) val photos; travels $((total / 1048576)) MiB of 64"
[ "$total" -lt $((64 * 1048576)) ] || { echo "[gpu_pack] over 64 MiB: use fewer chunks" >&2; exit 1; }
