#!/usr/bin/env bash
# The main job on a fresh machine: install libtorch, build mulo, and generate an image end to end
# with the bundled emoji family (models/emoji).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-torch.sh
cargo build --release -p mulo-cli
mulo=target/release/mulo
work="${MULO_DEMO_DIR:-target/demo}"
mkdir -p "$work"
"$mulo" info models/emoji/target
"$mulo" generate "red apple" --seed 1 --out "$work/red-apple.png" --tokens-out "$work/red-apple.json"
