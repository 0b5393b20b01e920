#!/usr/bin/env bash
# The DP checks of one GPU session (device tool), run from the repository root; results under $OUT:
# CUDA graphs vs eager (dp_graphs_check), per-patient conv gradient variants (conv_wgrad_variants),
# the overhead bench with and without graphs, then exactness.
# Needs the wheels in .whl (bash bench/fetch_gpu_wheels.sh, here), carried: run(carry=[".whl"]).
#   bash bench/gpu_session.sh [BACKBONES]      (CASES=...,dp-opacus adds Opacus,
#                                              ~40 s a backbone more)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, opacus, pydantic; from medfusion_fl.privacy.dp_sgd import train_local_dp; \
print('torch', torch.__version__, 'timm', timm.__version__, 'opacus', opacus.__version__)" || exit 1
backbones=${1:-resnet18,resnet50,efficientnet_b0,convnext_tiny,vit_small_patch16_224}
timeout 120 python3 bench/dp_graphs_check.py --out "$OUT/dp-graphs-check.json" > "$OUT/graphs-check.log" 2>&1
echo "graphs check rc=$?"; grep -h '"max"\|"error"' "$OUT/dp-graphs-check.json" | cut -c1-300
timeout 60 python3 bench/conv_wgrad_variants.py --out "$OUT/conv-wgrad-variants.json" > "$OUT/conv-variants.log" 2>&1
echo "conv variants rc=$?"
python3 bench/dp_overhead.py --device cuda --image-size 224 --batch 64 --views 2 --bf16 --steps 5 --warmup 2 \
  --cases "${CASES:-timm-baseline,non-dp,non-dp-graphed,dp-bookkeeping,dp-bookkeeping-graphed}" \
  --backbones "$backbones" --profile "$OUT/profile.txt" --out "$OUT/dp-overhead-gpu.json" > "$OUT/overhead.log" 2>&1
echo "overhead rc=$?"
grep -h "ratio" "$OUT/overhead.log" | grep -v "^ " | cut -c1-600
timeout 200 python3 bench/dp_exactness.py --device cuda --out "$OUT/dp-exactness-gpu.json" > "$OUT/exactness.log" 2>&1
echo "exactness rc=$?"
