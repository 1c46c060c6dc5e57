#!/usr/bin/env bash
# One point of a GPT recipe sweep on the drafter (32 px, fast): trains `mulo train drafter` with
# the given flags into a scratch family that shares the bundled family's other members, then
# evaluates it with `mulo eval --method drafter-ar`. docs/train.md records the results.
#
#   scripts/recipe-sweep.sh NAME [train flags...]        (--steps defaults to 1000)
#
# Writes $MULO_SWEEP_DIR/NAME (default /tmp/mulo-sweep/NAME): drafter/, work/ and eval.json.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,8p' "$0"; exit 2; }
cd "$(dirname "$0")/.."
name=$1; shift
mulo=target/release/mulo
out="${MULO_SWEEP_DIR:-/tmp/mulo-sweep}/$name"
mkdir -p "$out"
for m in vq target upsampler draft-small evaluator; do ln -sfn "$PWD/models/emoji/$m" "$out/$m"; done
cp models/emoji/family.json "$out/"
steps=(--steps 1000)
for a in "$@"; do case "$a" in --steps|--steps=*) steps=() ;; esac; done
"$mulo" train drafter --vq models/emoji/vq --out "$out/drafter" --work "$out/work" "${steps[@]}" "$@"
"$mulo" eval --family "$out" --method drafter-ar --n 256 --json "$out/eval.json"
