#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (see bench/README.md). Writes its results under $OUT (default ./gpu-out).
# Expects Fashion-MNIST's four idx .gz files under .fmnist/FashionMNIST/raw/ (that machine has no network).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOBILENET_FN_CACHE=$PWD/.fmnist
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== 0. what --batch-size auto finds at α 1, 224 px (peak memory per batch size)"
timeout 90 python - <<'PY'
import torch
from mobilenet_fn import Config
from mobilenet_fn.train import TrainOptions, largest_batch
best, peaks = largest_batch(Config(num_classes=1000), TrainOptions(device="cuda"), torch.device("cuda"), start=64)
print({b: f"{p / 2**30:.2f} GiB" for b, p in peaks.items()}, "-> largest that fits:", best)
PY

echo "== 1. throughput: bf16 channels-last training at 224 px batch 256, inference at 224 px batch 256"
timeout 200 python bench/throughput.py --device cuda --case train:224:256 --case infer:224:256 \
    --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"

echo "== 2. the same 2 epochs of Fashion-MNIST, plain and through torchrun --nproc-per-node 1"
common=(--data fashion-mnist --alpha 1.0 --resolution 32 --batch-size 256 --epochs 2 --device cuda)
timeout 120 mobilenet-fn train "${common[@]}" --out "$OUT/plain" 2>&1 | tail -3
timeout 120 torchrun --nproc-per-node 1 -m mobilenet_fn train "${common[@]}" --out "$OUT/torchrun1" 2>&1 | tail -3
for r in plain torchrun1; do echo "$r: $(tail -1 "$OUT/$r/metrics.jsonl")"; done

echo "== 3. Fashion-MNIST: best test top-1 within 5 minutes of training"
# The first epoch (warm-up of the learning rate, the same whatever the total) measures the speed; the run is then
# extended to as many epochs as fit in 5 minutes, its cosine schedule laid over that total.
fm=(--data fashion-mnist --alpha 1.0 --resolution 64 --batch-size 256 --lr 0.2 --device cuda)
start=$(date +%s)
timeout 150 mobilenet-fn train "${fm[@]}" --epochs 1 --out "$OUT/fm" 2>&1 | tail -2
epochs=$(python - "$OUT/fm/metrics.jsonl" "$start" <<'PY'
import json, sys, time
m = json.loads(open(sys.argv[1]).read().splitlines()[-1])
left = 300 - (time.time() - float(sys.argv[2]))
print(max(2, 1 + int(left / (m["seconds"] * 1.05))))
PY
)
echo "training to $epochs epochs"
timeout 330 mobilenet-fn train --resume "$OUT/fm" --epochs "$epochs" --device cuda 2>&1 | tail -4
echo "wall seconds: $(( $(date +%s) - start ))"
tail -1 "$OUT/fm/metrics.jsonl"
rm -f "$OUT"/*/*.ckpt "$OUT"/*/weights.pkl
