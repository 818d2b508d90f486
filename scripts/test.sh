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

# Every part runs even when an earlier one failed, so one run reports every failure; the exit
# status is the first failure's.
status=0
failed() { [ "$status" -ne 0 ] || status=$1; }
echo "== cargo test (workspace, debug profile)"
cargo test --workspace --all-targets --no-fail-fast || failed $?
cargo test --workspace --doc || failed $?

echo "== cargo test (the core alone: no adapter plugins compiled in)"
# The engine without its default features (ec2, kubernetes, email, dns): the library's unit tests
# and the queue's life-cycle tests, which need no adapter.
cargo test -p setpoint --no-default-features --lib --test queue_lifecycle --test queue_processes \
  --no-fail-fast || failed $?

echo "== cargo test (examples/custom-engine: an engine built outside the workspace)"
# Its own lock and workspace, the same target directory: the dependencies it shares with the
# workspace (all but its HTTP client) are compiled once for both.
cargo test --locked --no-fail-fast --manifest-path examples/custom-engine/Cargo.toml || failed $?

echo "== terraform"
bash terraform/tests/run.sh || failed $?
exit "$status"
