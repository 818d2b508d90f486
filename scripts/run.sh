#!/usr/bin/env bash
# The README's "run" command: installs what is missing, builds setpoint (cargo shows its
# progress: the first build takes several minutes), then runs `setpoint dev` — the whole stack
# on this machine with no cloud account: its own PostgreSQL under .setpoint/dev (kept between
# runs), a moto server (EC2 and Route 53) and an aiosmtpd SMTP server (installed with pip on
# first use), the Kubernetes test API server, the engine, the gRPC API and the metrics
# endpoint. It prints the API address, an admin token, a tenant token and commands to try;
# Ctrl-C stops everything. Extra arguments go to `setpoint dev` (see `setpoint dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/setpoint/target}"
bash scripts/install-deps.sh
echo "== building setpoint (the first build compiles every dependency: several minutes)"
cargo build --bin setpoint
exec "$CARGO_TARGET_DIR/debug/setpoint" dev "$@"
