#!/usr/bin/env bash
# The main job on a fresh machine: install libtorch, build mulo, and generate an image end to end.
# Until the bundled emoji family lands, the models are small randomly initialised ones made by
# `mulo init` (the image is noise, the pipeline is the real one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-torch.sh
cargo build --release -p mulo-cli
mulo=target/release/mulo
work="${MULO_DEMO_DIR:-target/demo}"
mkdir -p "$work"
[ -f "$work/vq/config.json" ] || "$mulo" init vq --out "$work/vq" --codebook-size 1024 --ch-mult 1,1,2
[ -f "$work/c2i/config.json" ] || "$mulo" init gpt --out "$work/c2i" --vocab 1024 --grid 16 \
  --dim 256 --n-layer 4 --n-head 4 --num-classes 10 --init-std 0.05 --vq ../vq
"$mulo" info "$work/c2i"
"$mulo" generate --model "$work/c2i" --class 3 --seed 1 --out "$work/image.png" --tokens-out "$work/tokens.json"
