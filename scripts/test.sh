#!/usr/bin/env bash
# The project's test command (README.md, .ci/run): installs libtorch, the reference venv of the
# parity tests and the headless browser of the page test if needed, then formatting,
# clippy with warnings as errors, the Kubernetes manifests and the Dockerfile
# (validate-deploy.sh), and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-torch.sh
bash scripts/setup-test-venv.sh
bash scripts/setup-browser.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
bash scripts/validate-deploy.sh
cargo test --workspace
