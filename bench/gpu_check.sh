#!/usr/bin/env bash
# Everything that needs a GPU, in one go (for a lent GPU machine with torch + transformers + pytest installed):
# the whole test suite (its GPU tests included) on that machine's library versions, then the four benchmarks
# (extraction on the photographs in $IMAGES, default ../shared/coco-mini: carry a folder of them if it is absent).
# Usage: bash bench/gpu_check.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-.}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -15 | tee "$log/pytest.txt"
python3 bench/train_throughput.py --device cuda 2>&1 | tee "$log/train_throughput.txt"
python3 bench/extract_throughput.py --device cuda --random-weights --batch-size 256 --max-images 2048 --images "${IMAGES:-../shared/coco-mini}" 2>&1 | tee "$log/extract_throughput.txt"
python3 bench/decode_throughput.py --device cuda --images 64 --uncached-images 16 2>&1 | grep -v generation | tee "$log/decode_throughput.txt"
python3 bench/scst_step.py --device cuda 2>&1 | tee "$log/scst_step.txt"
