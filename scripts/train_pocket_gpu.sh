#!/usr/bin/env bash
# Retrain the Pocket SD family on one CUDA GPU in about 12 minutes (scripts/train_pocket.py's GPU plan):
# the data, the VAE (skipped when OUT_DIR/vae exists), pocket-base; then the toon fine-tune and the
# three SUN adapters (MSC p = 0.1, 0, 0.25) side by side on the same GPU; then the VAE decoder fine-tune.
#
#   scripts/train_pocket_gpu.sh OUT_DIR [more train_pocket.py options, e.g. --time-box base=600]
#
# DEVICE=cpu runs the same chain on the CPU (with --quick: a smoke test). PYTHON picks the interpreter.
set -euo pipefail
out=${1:?usage: scripts/train_pocket_gpu.sh OUT_DIR [train_pocket.py options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
run() { "$py" "$here/train_pocket.py" "$out" --device "${DEVICE:-cuda}" --plan gpu --no-progress "$@"; }

run --stages data vae base "$@"
stages=(toon sun sun-p0 sun-p0.25)
pids=()
for stage in "${stages[@]}"; do
    run --stages "$stage" "$@" >"$out/$stage.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { failed=1; echo "stage ${stages[$i]} failed; its log: $out/${stages[$i]}.log" >&2; }
done
# the VAE's decoder fine-tuned on both styles, its encoder frozen, into both models (after the stages that read them)
run --stages decoder "$@" >"$out/decoder.log" 2>&1 || { failed=1; echo "stage decoder failed; its log: $out/decoder.log" >&2; }
for model in pocket-base pocket-toon; do  # the shipped adapter beside both models (SUN plugs into fine-tunes)
    if [ -f "$out/adapters/sun-p0.1.safetensors" ] && [ -d "$out/$model" ]; then
        cp "$out/adapters/sun-p0.1.safetensors" "$out/$model/sun-adapter.safetensors"
    fi
done
cat "$out/log.jsonl"
exit $failed
