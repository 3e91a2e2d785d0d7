#!/usr/bin/env bash
# Full-size ONNX measurement (issue 3): export a full-size SD1.5-architecture model with random
# weights at 512x512 in fp32 and fp16 (with the CFG baseline UNet and a TAESD decoder), recording
# wall time and peak RAM (/usr/bin/time -v), file sizes and the parity the export measured; then
# `sun-edge bench` on the fp32 bundle (ONNX Runtime, CPU). Run it alone on the machine.
#
#   scripts/measure_onnx.sh WORK_DIR [MODEL_DIR]
#
# MODEL_DIR defaults to WORK_DIR/sd15-random (made by scripts/make_random_sd15.py if absent).
set -euo pipefail
work=${1:?usage: measure_onnx.sh WORK_DIR [MODEL_DIR]}
model=${2:-$work/sd15-random}
repeats=${REPEATS:-3}
mkdir -p "$work"
[ -d "$model" ] || python scripts/make_random_sd15.py "$model"
taesd="$work/taesd-random"
[ -d "$taesd" ] || python - "$taesd" <<'EOF'
import sys, torch
from diffusers import AutoencoderTiny
torch.manual_seed(0)
AutoencoderTiny().save_pretrained(sys.argv[1])  # TAESD's architecture (diffusers' defaults), random weights
print("wrote", sys.argv[1])
EOF

for precision in fp32 fp16; do
    out="$work/onnx-$precision"
    echo "== export $precision"
    /usr/bin/time -v -o "$work/export-$precision.time" sun-edge export --target onnx --model "$model" \
        --precision "$precision" --with-baseline --vae-decoder "tiny:$taesd" --force -o "$out"
    grep -E "Elapsed|Maximum resident" "$work/export-$precision.time"
    du -b "$out"/* | sort -k2
    python - "$out" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
print(json.dumps(m.get("parity"), indent=1))
EOF
done

echo "== bench fp32 (ONNX Runtime, CPU)"
sun-edge bench --bundle "$work/onnx-fp32" --repeats "$repeats" --json "$work/bench-onnx-fp32.json"

echo "== images: SUN 4 steps with TAESD beside CFG 25 steps with the full VAE (fp32 bundle, seed 0)"
prompt="a photo of a cat sitting on a wooden table"
sun-edge generate --bundle "$work/onnx-fp32" --prompt "$prompt" --vae-decoder tiny -o "$work/sun4-tiny.png"
sun-edge generate --bundle "$work/onnx-fp32" --prompt "$prompt" --mode cfg -o "$work/cfg25-full.png"
python - "$work" <<'EOF'
import sys
from PIL import Image
from sun_edge.imaging import side_by_side
w = sys.argv[1]
side_by_side([Image.open(f"{w}/sun4-tiny.png"), Image.open(f"{w}/cfg25-full.png")],
             [["SUN 4 steps, TAESD decoder"], ["CFG 25 steps (DPM-Solver++), full VAE"]]).save(f"{w}/side-by-side.png")
print("wrote", f"{w}/side-by-side.png")
EOF
