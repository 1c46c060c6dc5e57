#!/usr/bin/env bash
# Re-runs the benchmark tables of docs/methods.md on the bundled family, one `mulo bench` per run:
#   A: tau swept around the base setting, with sd and lantern (n = 128)
#   B: the other parameters, one at a time around the base setting (n = 128)
#   C: the defaults against the baselines and the ablations, with pipelining off as a row (n = 256)
# Each run writes OUT_DIR/<run>.json, .png and .log; docs/methods.md quotes the printed tables.
# Usage: scripts/methods-tables.sh OUT_DIR [more mulo bench flags, e.g. --threads 2]
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
out=$1; shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
mulo=target/release/mulo
# The tables predate issue 19's defaults: pin the sequential resampler and the parameters they
# measured (run C's "defaults" are tau 0.03, pool_k 256, block_rows 2).
seq=resample=sequential
base=tau=0.05,pool_k=256,radius=1,block_rows=2,zipar_window=2,$seq
old=tau=0.03,pool_k=256,block_rows=2,$seq
run() {
  local name=$1; shift
  "$mulo" bench "$@" --json "$out/$name.json" --plot "$out/$name.png" 2>&1 | tee "$out/$name.log"
}
run sweep-tau --n 128 "$@" --method sd --method lantern --method "mulo:$base" \
  --sweep tau=0.01,0.02,0.03,0.1,0.2
b=(--method "mulo:$base")
for v in pool_k=64 pool_k=1024 radius=0 radius=2 block_rows=1 block_rows=4 rejection=raster \
  zipar_window=0 tau=0.03; do
  b+=(--method "mulo:$base,$v")
done
run params --n 128 "$@" "${b[@]}"
run bench-defaults --n 256 "$@" --method sd --method lantern --method "mulo:$old" \
  --method "mulo:$old,pipeline=0" --method "mulo:$old,tau=0.05" \
  --method "mulo:$old,rejection=raster" --method "mulo:$old,radius=0"
