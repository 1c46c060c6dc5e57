#!/usr/bin/env bash
# Installs what the browser test of the gateway's HTTP page (services/tests/http.rs) needs:
# Debian's chromium and chromium-driver (apt, when missing) and selenium in a venv under
# ~/.cache/mulo; appends MULO_BROWSER_PYTHON and MULO_CHROMEDRIVER to the .cargo/config.toml that
# scripts/setup-torch.sh writes. Run it after setup-torch.sh.
#
#   scripts/setup-browser.sh            (the venv: $MULO_BROWSER_VENV, default ~/.cache/mulo/browser-venv)
set -euo pipefail
SELENIUM=4.27.1
repo="$(cd "$(dirname "$0")/.." && pwd)"
cfg="$repo/.cargo/config.toml"
case "${1:-}" in -h|--help) sed -n '2,7p' "$0"; exit 0 ;; esac
[ -f "$cfg" ] || { echo "setup-browser: run scripts/setup-torch.sh first (no $cfg)" >&2; exit 1; }
if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
  echo "setup-browser: installing chromium and chromium-driver (apt)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core > /dev/null
fi
venv="${MULO_BROWSER_VENV:-$HOME/.cache/mulo/browser-venv}"
if [ -f "$venv/.mulo-complete" ]; then
  echo "setup-browser: reusing $venv"
else
  echo "setup-browser: installing selenium $SELENIUM into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "selenium==$SELENIUM"
  touch "$venv/.mulo-complete"
fi
grep -v '^MULO_BROWSER_PYTHON\|^MULO_CHROMEDRIVER' "$cfg" > "$cfg.tmp" && mv "$cfg.tmp" "$cfg"
echo "MULO_BROWSER_PYTHON = \"$venv/bin/python\"" >> "$cfg"
echo "MULO_CHROMEDRIVER = \"$(command -v chromedriver)\"" >> "$cfg"
echo "setup-browser: $(chromium --version 2>/dev/null | head -1), selenium $SELENIUM"
