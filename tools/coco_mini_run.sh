#!/usr/bin/env bash
# The acceptance run: train and evaluate on ../shared/coco-mini, offline, on a CPU, twice:
#   ours      grid 3 (10 image tokens), warmup + cosine LR, padding out of the loss, every caption each epoch;
#   original  the original's design: one global embedding, constant LR, padding trained as EOS,
#             one random caption per image per epoch;
# plus an ablation for choosing --image-grid (ours with grid 0), then both models on the test split.
# Usage: bash tools/coco_mini_run.sh [RUNS_DIR]   (about 25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
data=${DATA_DIR:-../shared/coco-mini}
epochs=${EPOCHS:-3}
export HF_HUB_OFFLINE=1
mkdir -p "$runs"
[ -d "$runs/small-decoder" ] || python tools/make_small_decoder.py "$runs/small-decoder" --layers 2 --width 128 --heads 4
common=(--data-dir "$data" --vision-backbone efficientnet-lite0 --language-model "$runs/small-decoder"
        --lr 1e-3 --max-epochs "$epochs" --cache-dir "$runs/cache" --log-interval 20)
python train.py "${common[@]}" --image-grid 3 --out-dir "$runs/ours"
python train.py "${common[@]}" --image-grid 0 --out-dir "$runs/ours-grid0"
python train.py "${common[@]}" --image-grid 0 --lr-schedule constant --train-padding --one-caption-per-image \
    --out-dir "$runs/original"
for run in ours original; do
    python evaluate.py --checkpoint "$runs/$run/model.pt" --data-dir "$data" --split test --beam-size 1 2 3 4 \
        --cache-dir "$runs/cache"
done
