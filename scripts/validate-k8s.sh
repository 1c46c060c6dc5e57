#!/usr/bin/env bash
# Renders every kustomize overlay under k8s/overlays with `kubectl kustomize` and validates the
# objects offline against the Kubernetes JSON schemas of a pinned version (PyPI kubernetes-validate,
# installed into a venv under ~/.cache/mulo), strictly (unknown fields are errors).
#
#   scripts/validate-k8s.sh [OUT_DIR]      (rendered YAML is kept in OUT_DIR when given)
set -euo pipefail
K8S_VERSION=1.32.0
VALIDATE="kubernetes-validate==1.37.0"
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MULO_K8S_VENV:-$HOME/.cache/mulo/k8s-validate}"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$VALIDATE"
fi
command -v kubectl >/dev/null || { echo "validate-k8s: kubectl (with kustomize) is needed" >&2; exit 1; }
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
for dir in "$repo"/k8s/overlays/*/; do
  name="$(basename "$dir")"
  kubectl kustomize "$dir" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet "$out/$name.yaml"
  echo "validate-k8s: $name renders $(grep -c '^kind:' "$out/$name.yaml") objects, valid for Kubernetes $K8S_VERSION"
done
