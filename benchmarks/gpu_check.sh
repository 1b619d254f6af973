#!/usr/bin/env bash
# The GPU check (issue #14): one script, at most about 5 minutes on one GPU. Never run by CI (no GPU there).
#
#   1. MoE dispatch vs the dense floor in bf16 at E = 4, 16, 64 (benchmarks/moe_dispatch.py; native = the
#      torch._grouped_mm path); target: SparseMoE fwd+bwd <= 1.3x dense at every E.
#   2. bf16 equality of the grouped-matmul backends, and of a SparseMoE layer run with each
#      (benchmarks/grouped_mm_check.py).
#   3. 200 bf16 training steps of an AV-digits-shaped model (configs/avdigits.yaml: its fusion, heads and encoder
#      shapes, with a random-init tiny text encoder and no init files) on demo data: samples/s and peak GPU memory.
#
# On the lent GPU machine (see the device tool's README): torch, transformers, timm and accelerate are there;
# webdataset, soundfile and soxr are not and travel as wheels: run `make gpu-wheels` here first, carry `.whl`,
# and this script installs them. Output: stdout, and every log under $OUT (default runs/gpu_check).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # a smoke run of the script itself, on CPU, in fp32
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    DTYPE=bf16 PRECISION=bf16
else
    DTYPE=fp32 PRECISION=no
fi
$PY -c "import torch; print('torch', torch.__version__)"

echo "== 1. MoE dispatch vs dense, $DTYPE on $DEVICE"
if [ -n "$QUICK" ]; then
    $PY benchmarks/moe_dispatch.py --device "$DEVICE" --dtype "$DTYPE" --quick | tee "$OUT/moe_dispatch.txt"
else
    $PY benchmarks/moe_dispatch.py --device "$DEVICE" --dtype "$DTYPE" --experts 4 16 64 --tokens 16384 \
        --d-model 1024 --d-hidden 2048 --rounds 9 --min-sample-ms 20 | tee "$OUT/moe_dispatch.txt"
fi

echo "== 2. grouped-matmul backends, $DTYPE on $DEVICE"
$PY benchmarks/grouped_mm_check.py --device "$DEVICE" --dtype "$DTYPE" | tee "$OUT/grouped_mm_check.txt"

echo "== 3. AV-digits-shaped training, $PRECISION on $DEVICE"
STEPS=200; COUNT=2000; WORKERS=8
[ -n "$QUICK" ] && STEPS=4 && COUNT=120 && WORKERS=0
DATA="$OUT/demo"
$PY -m moefuse.cli demo-data --out "$DATA/data" --count "$COUNT" --quiet --overwrite
$PY -m moefuse.cli build-shards --manifest "$DATA/data/manifest.jsonl" --out "$DATA/shards" --quiet --overwrite
rm -rf "$OUT/train"
$PY -m moefuse train configs/avdigits.yaml "data.train_shards=[$DATA/shards]" "data.val_shards=[$DATA/shards]" \
    "train.output_dir=$OUT/train" encoders.text.preset=tiny encoders.text.finetune=full \
    encoders.image.init_file=null encoders.audio.init_file=null "train.max_steps=$STEPS" train.log_every=10 \
    train.eval_every=100000 train.save_every=100000 train.tensorboard=false "train.mixed_precision=$PRECISION" \
    "data.num_workers=$WORKERS" 2>&1 | tail -n 5 | tee "$OUT/train.txt"
$PY - "$OUT/train/metrics.jsonl" <<'PYEOF' | tee -a "$OUT/train.txt"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in rows if "train/samples_per_s" in r]
later = rows[len(rows) // 2:] or rows  # the second half: warm-up (first batches, cuDNN autotuning) excluded
sps = statistics.median(r["train/samples_per_s"] for r in later)
peak = max((r.get("train/peak_memory_gib", 0.0) for r in rows), default=0.0)
print(f"training: median {sps:.0f} samples/s over steps {later[0]['step']}-{later[-1]['step']}, "
      f"peak GPU memory {peak:.2f} GiB (torch.cuda.max_memory_allocated), last loss {rows[-1]['train/loss']:.4f}")
PYEOF
echo "gpu_check: done; logs in $OUT"
