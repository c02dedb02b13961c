#!/usr/bin/env bash
# The GPU benchmark tables of docs/benchmark.md in one go, on one GPU: SD 1.5 architecture at 512 px (the
# pending speed variants, each variant's profile, sampling), then SD 3 medium and SDXL base architectures at
# 1024 px. Each model runs in its own process under its own time limit; logs go to $OUT (default ./benchmark-out).
#   bash benchmarks/gpu_suite.sh [seconds for SD 1.5] [seconds for SD 3] [seconds for SDXL]
set -u
OUT=${OUT:-benchmark-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
FAST=bf16,channels_last,fused,cudnn_benchmark
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, diffusers, peft, transformers; print(torch.__version__, diffusers.__version__, peft.__version__, transformers.__version__)" >> "$OUT/gpu.txt" 2>&1
timeout "${1:-230}" "$PY" benchmarks/train_step.py --model sd15-arch --batch 8 --device cuda --steps 5 --warmup 3 \
    --repeats 3 --ours "$FAST,compile" --also "$FAST,cudagraphs;$FAST,compile,cudnn_attention" --profile \
    --sampling-steps 20 > "$OUT/sd15.log" 2>&1
echo "sd15 exit $?" >> "$OUT/gpu.txt"
timeout "${2:-160}" "$PY" benchmarks/train_step.py --model sd3-arch --resolution 1024 --batch 2 --device cuda --steps 3 \
    --warmup 2 --repeats 2 --sampling-steps 20 > "$OUT/sd3.log" 2>&1
echo "sd3 exit $?" >> "$OUT/gpu.txt"
timeout "${3:-160}" "$PY" benchmarks/train_step.py --model sdxl-arch --resolution 1024 --batch 2 --device cuda --steps 3 \
    --warmup 2 --repeats 2 --sampling-steps 20 > "$OUT/sdxl.log" 2>&1
echo "sdxl exit $?" >> "$OUT/gpu.txt"
