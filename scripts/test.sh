#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, then runs every test
# against real peers that the tests start themselves (PostgreSQL, moto, SMTP, terraform).
set -euo pipefail
cd "$(dirname "$0")/.."

# Build output lives outside the clone so that repeated runs (and CI on this machine) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/setpoint/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

bash scripts/install-deps.sh

echo "== cargo test (workspace, debug profile)"
cargo test --workspace --all-targets --no-fail-fast
cargo test --workspace --doc

echo "== terraform"
bash terraform/tests/run.sh
