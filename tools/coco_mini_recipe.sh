#!/usr/bin/env bash
# The chosen coco-mini recipe (docs/recipe.md), exactly, and nothing else: cross-entropy training with the
# levers chosen on the val split (none: no lever beat the baseline by more than two seeds of it differ), then
# SCST from its model, then both models on the test split at beams 1 and 3 (reporting only), and the
# repetition counts of their test captions.
# Usage: bash tools/coco_mini_recipe.sh LM_DIR DATA_DIR CACHE_DIR OUT_DIR
#   LM_DIR     the 4-layer 256-wide GPT-2 (made here by tools/make_small_decoder.py if it does not exist)
#   DATA_DIR   ../shared/coco-mini
#   CACHE_DIR  the embedding cache (reused when it holds these images)
#   OUT_DIR    OUT_DIR/ce and OUT_DIR/scst: the two runs, each with test/ (metrics.json, captions.jsonl)
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 LM_DIR DATA_DIR CACHE_DIR OUT_DIR" >&2; exit 2; }
lm=$1 data=$2 cache=$3 out=$4
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
timed() { /usr/bin/time -f "%e s wall-clock: $*" "$@"; }
[ -d "$lm" ] || python tools/make_small_decoder.py "$lm" --layers 4 --width 256 --heads 4
common=(--data-dir "$data" --cache-dir "$cache" --device cpu --precision 32)
timed python train.py "${common[@]}" --vision-backbone efficientnet-lite0 --language-model "$lm" --lr 1e-3 \
    --batch-size 64 --max-epochs 6 --select-by cider_d --out-dir "$out/ce"
timed python scst.py "${common[@]}" --checkpoint "$out/ce/model" --samples-per-image 20 --batch-size 32 \
    --lr 1e-4 --bleu-weight 1 --max-epochs 2 --out-dir "$out/scst"
for run in ce scst; do
    python evaluate.py --checkpoint "$out/$run/model" --data-dir "$data" --cache-dir "$cache" --split test \
        --beam-size 1 3 --gallery 0 --out-dir "$out/$run/test"
done
python tools/repetition.py "$out" ce/test scst/test
