#!/usr/bin/env bash
# PyTorch CUDA path at full size: SUN 4 steps against CFG 25 steps at fp16, eager, with CUDA
# graphs and with torch.compile, on a full-size SD1.5-architecture model with random weights.
#
#   scripts/measure_cuda.sh OUT_DIR [MODEL_DIR]
#
# Runs the GPU tests of tests/test_torch_speed.py first (optimized calls equal eager), then one
# `sun-edge bench` per --optimize choice (each in its own process: fresh peak-memory figures),
# writing OUT_DIR/bench-<choice>.json and OUT_DIR/log.txt. Needs sun-edge[torch] and a CUDA GPU.
set -euo pipefail
out=${1:?usage: measure_cuda.sh OUT_DIR [MODEL_DIR]}
model=${2:-/tmp/sd15-random}
repeats=${REPEATS:-5}
mkdir -p "$out"
log="$out/log.txt"
exec > >(tee -a "$log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_torch_speed.py -k "cuda or signature" || echo "GPU TESTS FAILED (see above)"

[ -d "$model" ] || python3 scripts/make_random_sd15.py "$model"
for choice in ${CHOICES:-none cuda-graph compile compile-cuda-graph}; do
    echo "== --optimize $choice"
    start=$(date +%s)
    sun-edge bench --model "$model" --device cuda --precision fp16 --optimize "$choice" \
        --repeats "$repeats" --json "$out/bench-$choice.json"
    echo "(bench --optimize $choice took $(( $(date +%s) - start )) s including load and compilation)"
done
