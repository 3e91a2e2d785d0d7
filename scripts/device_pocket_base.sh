#!/usr/bin/env bash
# Issue 14 on a lent GPU, in one device command: train pocket-base on from the shipped weights, check its CFG 25
# prompt following against the shipped base on held-out prompts, and pack the new model for the trip back.
#
#   scripts/device_pocket_base.sh OUT_DIR [more train_pocket.py options, e.g. --time-box base=400]
#
# Writes OUT_DIR/pocket-base.tar (the model folder, fp16, pocket.json with every run and the summed samples),
# OUT_DIR/check.jsonl (scripts/check_pocket_base.py: the shipped base, then the new one) and OUT_DIR/log.txt.
# Training goes to $WORK (default /tmp/pocket-base-more; an existing base output there is kept, so a second
# call only re-checks). The base is time-boxed to $BASE_SECONDS (default 400: with the data and the checks,
# inside one 10-minute device command). DEVICE=cpu with --quick is the smoke test CI runs.
#
# The lent machine has PyTorch CUDA and transformers but no diffusers or ftfy: put their wheels in .whl/ (here:
# `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# ftfy==6.3.1 wcwidth==0.9.4 importlib-metadata==10.2.0`; /work/.library/device/README.md) and carry .whl:
# this script installs whatever it finds there into /tmp/site first.
set -euo pipefail
out=${1:?usage: scripts/device_pocket_base.sh OUT_DIR [train_pocket.py options]}
shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
work=${WORK:-/tmp/pocket-base-more}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1

if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl
    export PYTHONPATH="/tmp/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

"$py" "$here/train_pocket.py" "$work" --device "$device" --plan gpu --no-progress --stages data base \
    --base-init pocket-base --time-box "base=${BASE_SECONDS:-400}" "$@"
"$py" "$here/check_pocket_base.py" --device "$device" --prompts "${CHECK_PROMPTS:-64}" pocket-base "$work/pocket-base" \
    > "$out/check.jsonl"
cat "$out/check.jsonl"
tar -C "$work" -cf "$out/pocket-base.tar.partial" pocket-base log.jsonl
mv "$out/pocket-base.tar.partial" "$out/pocket-base.tar"
echo "wrote $out/pocket-base.tar ($(du -h "$out/pocket-base.tar" | cut -f1)) and $out/check.jsonl"
