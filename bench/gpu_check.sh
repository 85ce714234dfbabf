#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (about 9 minutes). Writes its results under $OUT (default ./gpu-out).
# Expects Fashion-MNIST's four idx .gz files under .fmnist/FashionMNIST/raw/ (that machine has no network).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOBILENET_FN_CACHE=$PWD/.fmnist
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== 1. throughput: bf16 channels-last training at 224 px batch 256"
timeout 170 python bench/throughput.py --device cuda --case train:224:256 --json "$OUT/throughput.json" 2>&1 \
    | tee "$OUT/throughput.txt"

echo "== 2. Fashion-MNIST on the GPU: α 1, 64 px, 40 epochs (test top-1 in the last line)"
start=$(date +%s)
timeout 240 mobilenet-fn train --data fashion-mnist --alpha 1.0 --resolution 64 --batch-size 256 --lr 0.2 \
    --epochs 40 --device cuda --out "$OUT/fm" 2>&1 | tail -5
echo "wall seconds: $(( $(date +%s) - start ))"
tail -1 "$OUT/fm/metrics.jsonl"

echo "== 3. the same 2 epochs, plain and through torchrun --nproc-per-node 1 (compare epoch 2's img_per_s)"
common=(--data fashion-mnist --alpha 1.0 --resolution 32 --batch-size 256 --epochs 2 --device cuda)
timeout 55 mobilenet-fn train "${common[@]}" --out "$OUT/plain" 2>&1 | tail -1
timeout 55 torchrun --nproc-per-node 1 -m mobilenet_fn train "${common[@]}" --out "$OUT/torchrun1" 2>&1 | tail -1
for r in plain torchrun1; do echo "$r: $(tail -1 "$OUT/$r/metrics.jsonl")"; done

echo "== 4. what --batch-size auto finds at α 1, 224 px (peak memory per batch size)"
timeout 40 python - <<'PY'
import torch
from mobilenet_fn import Config
from mobilenet_fn.train import TrainOptions, largest_batch
best, peaks = largest_batch(Config(num_classes=1000), TrainOptions(device="cuda"), torch.device("cuda"), start=64)
print({b: f"{p / 2**30:.2f} GiB" for b, p in peaks.items()}, "-> largest that fits:", best)
PY
rm -f "$OUT"/*/*.ckpt "$OUT"/*/weights.pkl
