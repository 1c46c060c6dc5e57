#!/usr/bin/env bash
# The main job on a fresh machine: install libtorch, build mulo, and generate an image end to end
# with MuLo-SD and the bundled emoji family (models/emoji): the image, its acceptance map (each
# token tinted: accepted draft, rejected and resampled, expanded around a rejection) and the
# speed-up against AR measured on the same prompt and seed, in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-torch.sh
cargo build --release -p mulo-cli
mulo=target/release/mulo
work="${MULO_DEMO_DIR:-target/demo}"
prompt="${MULO_DEMO_PROMPT:-grinning face}"
name="$(echo "$prompt" | tr -c 'a-zA-Z0-9\n' '-')"
mkdir -p "$work"
"$mulo" info models/emoji/target
"$mulo" generate "$prompt" --method mulo --seed 1 --vs-ar --no-progress \
  --out "$work/$name.png" --map "$work/$name-map.png" --tokens-out "$work/$name.json"
