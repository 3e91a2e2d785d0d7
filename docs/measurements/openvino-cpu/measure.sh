#!/usr/bin/env bash
# Full-size OpenVINO measurement: a random full-size SD1.5 (scripts/make_random_sd15.py) exported to
# ONNX fp32 with the CFG baseline UNet, then
#   1. sun-edge parity through OpenVINO at its default precision (bf16 on this CPU) against the
#      PyTorch fp32 reference: every component and the whole 4-step image;
#   2. sun-edge bench with ONNX Runtime (fp32) and OpenVINO side by side in one process.
# Each step is timed by /usr/bin/time -v. Run it alone on the machine, from the repository root.
#
#   docs/measurements/openvino-cpu/measure.sh WORK_DIR OUT_DIR
set -euo pipefail
work=${1:?usage: measure.sh WORK_DIR OUT_DIR}
out=${2:?usage: measure.sh WORK_DIR OUT_DIR}
repeats=${REPEATS:-1}  # one repeat: ONNX Runtime's CFG 25 image alone takes about 2 minutes here
model="$work/sd15-random"
bundle="$work/onnx-fp32"
mkdir -p "$work" "$out"
[ -d "$model" ] || python scripts/make_random_sd15.py "$model"
if [ ! -f "$bundle/manifest.json" ]; then
    echo "== export onnx fp32 ($(date -u +%H:%M:%S))"
    /usr/bin/time -v -o "$out/export-fp32.time" sun-edge export --target onnx --model "$model" --precision fp32 \
        --with-baseline --force -o "$bundle"
    cp "$bundle/manifest.json" "$out/manifest-fp32.json"
fi
echo "== parity, OpenVINO default precision ($(date -u +%H:%M:%S))"
/usr/bin/time -v -o "$out/parity-openvino.time" sun-edge parity --bundle "$bundle" --runtime openvino \
    --ov-cache-dir "$work/ov-cache" --json "$out/parity-openvino.json" | tee "$out/parity-openvino.txt" || true
echo "== bench onnxruntime vs openvino ($(date -u +%H:%M:%S))"
/usr/bin/time -v -o "$out/bench.time" sun-edge bench --bundle "$bundle" --runtime onnxruntime openvino \
    --ov-cache-dir "$work/ov-cache" --repeats "$repeats" --json "$out/bench-onnxruntime-openvino.json" \
    | tee "$out/bench-onnxruntime-openvino.txt"
echo "== start-up: the SUN UNet imported from the cache parity filled, then compiled from unet.onnx ($(date -u +%H:%M:%S))"
python - "$bundle" "$work/ov-cache" <<'PY' | tee "$out/startup.txt"
import sys, time
from sun_edge.runtimes.openvino import OpenVinoRuntime
for label, cache in (("from the cache (CACHE_DIR)", sys.argv[2]), ("no cache (read unet.onnx, compile)", None)):
    rt = OpenVinoRuntime.open(sys.argv[1], ov_cache_dir=cache)
    start = time.perf_counter()
    rt.compiled("unet")
    print(f"{label}: {time.perf_counter() - start:.1f} s to a ready SUN UNet at {rt.precision}", flush=True)
    del rt
PY
echo "== done ($(date -u +%H:%M:%S))"
