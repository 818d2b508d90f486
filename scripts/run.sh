#!/usr/bin/env bash
# The README's "run" command: installs what is missing, then runs `setpoint dev` — the whole
# stack on this machine with no cloud account: its own PostgreSQL under .setpoint/dev (kept
# between runs), a moto server (EC2) and an aiosmtpd SMTP server (installed with pip on first
# use), the Kubernetes test API server, the workers, the gRPC API and the metrics endpoint.
# It prints the API address, an admin token and a tenant token; Ctrl-C stops everything.
# Extra arguments go to `setpoint dev` (see `setpoint dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/setpoint/target}"
bash scripts/install-deps.sh
exec cargo run --quiet --bin setpoint -- dev "$@"
