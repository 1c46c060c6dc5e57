#!/usr/bin/env bash
# Gathers what a service image carries (Dockerfile): the three service binaries and the shared
# libraries of the libtorch they were built against (torch/lib and, next to it, the nvidia/*/lib
# directories of the CUDA wheels), then checks with ldd that every library the binaries load
# resolves inside OUT/lib or the system's library directories.
#
#   scripts/collect-runtime.sh LIBTORCH_DIR BIN_DIR OUT      (MULO_COLLECT_LINK=1: symlink, not copy)
set -euo pipefail
[ $# -eq 3 ] || { sed -n '2,7p' "$0"; exit 2; }
libtorch="$1"; bins="$2"; out="$3"
site="$(dirname "$libtorch")"
put() { if [ "${MULO_COLLECT_LINK:-0}" = 1 ]; then ln -sf "$(realpath "$1")" "$2/"; else cp -aL "$1" "$2/"; fi; }
mkdir -p "$out/bin" "$out/lib"
for b in mulo-drafter mulo-verifier mulo-gateway; do
  test -x "$bins/$b" || { echo "collect-runtime: $bins/$b missing (cargo build --release -p mulo-services)" >&2; exit 1; }
  put "$bins/$b" "$out/bin"
done
for lib in "$libtorch"/lib/*.so*; do put "$lib" "$out/lib"; done
for dir in "$site"/nvidia/*/lib; do
  [ -d "$dir" ] || continue
  for lib in "$dir"/*.so*; do put "$lib" "$out/lib"; done
done
# Every library must come from OUT/lib or the system (the build's rpath will not exist at run time).
deps=""
for b in "$out"/bin/*; do
  deps+="$(LD_LIBRARY_PATH="$out/lib" ldd "$b")"$'\n' || { echo "collect-runtime: ldd $b failed" >&2; exit 1; }
done
outside=$(echo "$deps" | awk '/=>/ { print $1, ($3 == "not" ? "not found" : $3) }' \
  | grep -v -E " ($out/lib/|/lib/|/lib64/|/usr/lib/|/usr/lib64/)" | sort -u || true)
if [ -n "$outside" ]; then
  echo "collect-runtime: libraries resolved outside $out/lib and the system:" >&2
  echo "$outside" >&2
  exit 1
fi
echo "collect-runtime: $(ls "$out/bin" | wc -l) binaries, $(ls "$out/lib" | wc -l) libraries in $out"
