#!/usr/bin/env bash
# Installs PyTorch 2.11.0 (the libtorch that tch 0.24 builds against) into a venv outside the repo,
# reused by every clone and CI run, and writes .cargo/config.toml pointing torch-sys at it.
#
#   scripts/setup-torch.sh [--variant cpu|cuda|auto]     (default: auto, or $MULO_TORCH_VARIANT)
#
# cpu  : the PyPI wheel without its CUDA dependencies, plus the CUDA runtime and CUPTI libraries that
#        libtorch_cpu.so links against (~1.2 GB). Runs on CPU only.
# cuda : the full PyPI install with every CUDA library (~4.7 GB).
# auto : cuda when nvidia-smi sees a GPU, else cpu.
#
# The venv lives in $MULO_TORCH_VENV (default ~/.cache/mulo/torch-2.11.0[-cuda]).
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME="nvidia-cuda-runtime==13.0.96.*"
CUDA_CUPTI="nvidia-cuda-cupti==13.0.85.*"

variant="${MULO_TORCH_VARIANT:-auto}"
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="${2:?--variant needs cpu|cuda|auto}"; shift 2 ;;
    --variant=*) variant="${1#--variant=}"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup-torch: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$variant" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi
case "$variant" in cpu|cuda) ;; *) echo "setup-torch: --variant must be cpu, cuda or auto, not '$variant'" >&2; exit 2 ;; esac

suffix=""; [ "$variant" = cuda ] && suffix="-cuda"
venv="${MULO_TORCH_VENV:-$HOME/.cache/mulo/torch-$TORCH_VERSION$suffix}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

site() { "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

if [ -f "$venv/.mulo-complete" ]; then
  echo "setup-torch: reusing $venv ($variant)"
else
  echo "setup-torch: installing torch $TORCH_VERSION ($variant) into $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  if [ "$variant" = cpu ]; then
    # libtorch_cpu.so needs only the CUDA runtime and CUPTI; `import torch` in Python does not work in
    # this variant (nothing in mulo needs it: the checkpoint reader and test references use numpy).
    "$venv/bin/pip" install --quiet --no-deps "torch==$TORCH_VERSION" "$CUDA_RUNTIME" "$CUDA_CUPTI"
    "$venv/bin/pip" install --quiet numpy
  else
    "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" numpy
    "$venv/bin/python" -c 'import torch; print("setup-torch: torch", torch.__version__, "cuda:", torch.cuda.is_available())'
  fi
  test -f "$(site)/torch/lib/libtorch_cpu.so" || { echo "setup-torch: libtorch_cpu.so missing after install" >&2; exit 1; }
  "$venv/bin/python" -c 'import numpy; print("setup-torch: numpy", numpy.__version__, "ok")'
  touch "$venv/.mulo-complete"
fi

libtorch="$(site)/torch"
mkdir -p "$repo/.cargo"
cat > "$repo/.cargo/config.toml" <<CFG
# Written by scripts/setup-torch.sh ($variant); not committed. Points torch-sys at the venv's libtorch.
[env]
LIBTORCH = "$libtorch"
LIBTORCH_CXX11_ABI = "1"
MULO_TORCH_PYTHON = "$venv/bin/python"
CFG
echo "setup-torch: wrote $repo/.cargo/config.toml (LIBTORCH=$libtorch)"
