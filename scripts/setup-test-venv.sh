#!/usr/bin/env bash
# Installs the reference packages the parity tests run (transformers' T5, tokenizers) into a venv
# beside the libtorch venv of scripts/setup-torch.sh, reusing its torch install (a .pth file) and
# adding the CUDA libraries `import torch` needs (~3.6 GB, reused across clones and CI runs). Run it
# after setup-torch.sh: it appends MULO_TEST_PYTHON to the .cargo/config.toml that script writes.
#
#   scripts/setup-test-venv.sh            (the venv: $MULO_TEST_VENV, default <torch venv>-test)
set -euo pipefail
TRANSFORMERS=5.25.0
TOKENIZERS=0.23.3
repo="$(cd "$(dirname "$0")/.." && pwd)"
cfg="$repo/.cargo/config.toml"
case "${1:-}" in -h|--help) sed -n '2,7p' "$0"; exit 0 ;; esac
torch_py="$(sed -n 's/^MULO_TORCH_PYTHON = "\(.*\)"$/\1/p' "$cfg" 2>/dev/null || true)"
[ -x "$torch_py" ] || { echo "setup-test-venv: run scripts/setup-torch.sh first (no MULO_TORCH_PYTHON in $cfg)" >&2; exit 1; }
torch_venv="$(dirname "$(dirname "$torch_py")")"
venv="${MULO_TEST_VENV:-$torch_venv-test}"
if [ -f "$venv/.mulo-complete" ]; then
  echo "setup-test-venv: reusing $venv"
else
  echo "setup-test-venv: installing transformers $TRANSFORMERS into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$torch_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/mulo-torch.pth"
  # torch is found through the .pth; pip adds only what it lacks (its CUDA libraries, transformers).
  "$venv/bin/pip" install --quiet "torch==$("$torch_py" -c 'import importlib.metadata as m; print(m.version("torch"))')" \
    "transformers==$TRANSFORMERS" "tokenizers==$TOKENIZERS"
  "$venv/bin/python" -c 'import torch, transformers; print("setup-test-venv: torch", torch.__version__, "transformers", transformers.__version__)'
  touch "$venv/.mulo-complete"
fi
grep -v '^MULO_TEST_PYTHON' "$cfg" > "$cfg.tmp" && mv "$cfg.tmp" "$cfg"
echo "MULO_TEST_PYTHON = \"$venv/bin/python\"" >> "$cfg"
echo "setup-test-venv: MULO_TEST_PYTHON=$venv/bin/python in $cfg"
