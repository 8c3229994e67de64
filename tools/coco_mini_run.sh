#!/usr/bin/env bash
# The acceptance run: train and evaluate on ../shared/coco-mini, offline, on a CPU:
#   ours             grid 3 (10 image tokens), warmup + cosine LR, padding out of the loss, every caption each epoch;
#   ours-grid0       the same with the single global embedding: the ablation behind the default --image-grid;
#   original         the original's design: one global embedding, constant LR, padding trained as EOS,
#                    one random caption per image per epoch, for as many epochs as ours;
#   original-steps   the same design given as many optimizer steps (and captions) as ours: 5x the epochs;
#   ours-constant-lr ours with the original's constant LR: which of the differences matters at this budget.
# Grid choice on the val split; every model on the test split (reporting only).
# Usage: bash tools/coco_mini_run.sh [RUNS_DIR]   (35 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
data=${DATA_DIR:-../shared/coco-mini}
epochs=${EPOCHS:-3}
export HF_HUB_OFFLINE=1
mkdir -p "$runs"
[ -d "$runs/small-decoder" ] || python tools/make_small_decoder.py "$runs/small-decoder" --layers 2 --width 128 --heads 4
common=(--data-dir "$data" --vision-backbone efficientnet-lite0 --language-model "$runs/small-decoder"
        --lr 1e-3 --cache-dir "$runs/cache" --log-interval 20)
original=(--image-grid 0 --lr-schedule constant --train-padding --one-caption-per-image)
python train.py "${common[@]}" --max-epochs "$epochs" --image-grid 3 --out-dir "$runs/ours"
python train.py "${common[@]}" --max-epochs "$epochs" --image-grid 0 --out-dir "$runs/ours-grid0"
python train.py "${common[@]}" --max-epochs "$epochs" "${original[@]}" --out-dir "$runs/original"
python train.py "${common[@]}" --max-epochs $((epochs * 5)) "${original[@]}" --out-dir "$runs/original-steps"
python train.py "${common[@]}" --max-epochs "$epochs" --image-grid 3 --lr-schedule constant --out-dir "$runs/ours-constant-lr"
for run in ours ours-grid0; do
    python evaluate.py --checkpoint "$runs/$run/model" --data-dir "$data" --split val --beam-size 1 2 3 4 \
        --cache-dir "$runs/cache" --out-dir "$runs/$run/val"
done
for run in ours ours-grid0 original original-steps ours-constant-lr; do
    python evaluate.py --checkpoint "$runs/$run/model" --data-dir "$data" --split test --beam-size 1 2 3 4 \
        --cache-dir "$runs/cache"
done

# The README's table: every metric of every model on the test split, and its last validation loss
python - "$runs" ours ours-grid0 original original-steps ours-constant-lr <<'PY'
import json, sys
runs, names = sys.argv[1], sys.argv[2:]
keys = ["bleu1", "bleu4", "meteor", "rouge_l", "cider_d", "bleu4_sacrebleu", "bleu4_original"]
old_names = {"bleu4": "bleu4_coco", "bleu4_original": "bleu4_seed"}  # metrics.json files from before
print("| model | val loss | beam | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | BLEU-4 sacrebleu "
      "| BLEU-4 original's protocol |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in names:
    with open(f"{runs}/{name}/log.jsonl") as f:
        val_loss = [r for r in map(json.loads, f) if r["type"] == "epoch"][-1]["val_loss"]
    with open(f"{runs}/{name}/metrics.json") as f:
        results = json.load(f)["results"]
    for k, r in enumerate(results):
        r = {**{new: r[old] for new, old in old_names.items() if old in r}, **r}
        figures = " | ".join("n/a" if r[key] is None else f"{r[key]:.3f}" for key in keys)
        print(f"| {name if k == 0 else ''} | {f'{val_loss:.3f}' if k == 0 else ''} | {r['beam_size']} | {figures} |")
PY
