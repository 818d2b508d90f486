#!/usr/bin/env bash
# Upgrade checks against the previous release (92f679c), run by hand (CI runs tests/upgrade.rs,
# which needs only the committed fixture). See docs/upgrades.md for what they showed.
#
#   scripts/upgrade-check.sh [--build-old] fixture [OUT.sql]
#       Writes a database with the previous release's binary (`setpoint dev` on a throw-away
#       PostgreSQL, moto and aiosmtpd): instances READY (one asked for us-west-2, which that
#       release placed in us-east-1), UPDATING (its Kubernetes step kept failing, transiently,
#       when the engine stopped), FAILED (a parked unit: Kubernetes refused with 403) and
#       DELETED; then `pg_dump --no-owner` of it into OUT.sql (default
#       tests/fixtures/upgrade-92f679c.sql).
#   scripts/upgrade-check.sh [--build-old] round
#       The previous release's engine and this one on one database, as during a rollout: the
#       old one writes the database, the new one starts (expand migrations) while the old one
#       runs, a create, update and delete go through both APIs and both engines' workers, then
#       the old one stops, `setpoint migrate --contract` runs, and a last round runs on the new
#       one alone. Prints what each engine claimed and the machines moto holds.
#
# The previous release's binary: $SETPOINT_OLD_BIN, default
# /var/cache/setpoint/target-old/debug/setpoint. --build-old builds it first, in a worktree
# /work/wt-old (or $SETPOINT_OLD_WORKTREE) of 92f679c, with CARGO_TARGET_DIR
# /var/cache/setpoint/target-old. This release's binary: $SETPOINT_NEW_BIN, default
# $CARGO_TARGET_DIR/debug/setpoint (built with `cargo build --bin setpoint` when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OLD_REV=92f679c

build_old=false
if [ "${1:-}" = "--build-old" ]; then
    build_old=true
    shift
fi
mode=${1:-}
case "$mode" in
fixture | round) ;;
*)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac

OLD_TARGET=/var/cache/setpoint/target-old
OLD_BIN=${SETPOINT_OLD_BIN:-$OLD_TARGET/debug/setpoint}
if $build_old; then
    wt=${SETPOINT_OLD_WORKTREE:-/work/wt-old}
    [ -d "$wt" ] || git worktree add --detach "$wt" "$OLD_REV"
    (cd "$wt" && CARGO_TARGET_DIR=$OLD_TARGET cargo build --bin setpoint)
fi
[ -x "$OLD_BIN" ] || {
    echo "no binary of the previous release at $OLD_BIN: pass --build-old (or set SETPOINT_OLD_BIN)" >&2
    exit 1
}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/setpoint/target}
NEW_BIN=${SETPOINT_NEW_BIN:-$CARGO_TARGET_DIR/debug/setpoint}
if [ "$mode" = round ] && [ ! -x "$NEW_BIN" ]; then cargo build --bin setpoint; fi

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/setpoint-upgrade.XXXXXX)
chmod 755 "$WORK"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        for f in "$WORK"/*.log; do
            echo "---- $f" >&2
            tail -n 25 "$f" >&2
        done
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}
json() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
wait_file() { for _ in $(seq 1 1200); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; return 1; }

# PostgreSQL, moto, aiosmtpd: shared by every engine of the run.
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
chmod 700 "$WORK/pg"
PG_PORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK/pg" start >/dev/null
DB="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
MOTO_PORT=$(free_port)
python3 -m moto.server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
SMTP_PORT=$(free_port)
python3 -m aiosmtpd -n -l "127.0.0.1:$SMTP_PORT" -c aiosmtpd.handlers.Mailbox "$WORK/mail" >"$WORK/smtp.log" 2>&1 &
PIDS+=($!)
wait_port "$MOTO_PORT"
wait_port "$SMTP_PORT"
MOTO="http://127.0.0.1:$MOTO_PORT"

# `setpoint dev` of binary $1 on the shared peers; API on port $2; $3 the Kubernetes URL
# ("" for its own test server); sets DEV_PID and TOKEN (tenant demo).
start_dev() {
    local bin=$1 port=$2 k8s=$3 name=$4
    local info="$WORK/$name.json"
    rm -f "$info"
    local extra=()
    [ -n "$k8s" ] && extra=(--kubernetes-url "$k8s")
    RUST_LOG=info,sqlx=warn "$bin" dev --dir "$WORK/$name" --database-url "$DB" \
        --ec2-endpoint "$MOTO" --smtp "127.0.0.1:$SMTP_PORT" "${extra[@]}" \
        --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --info-file "$info" \
        --lease 2s --poll-interval 100ms >>"$WORK/$name.log" 2>&1 &
    DEV_PID=$!
    PIDS+=("$DEV_PID")
    wait_file "$info"
    TOKEN=$(json "$info" tenant_token)
}
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }
psql_q() { psql "$DB" -qAtX -c "$1"; }
status_of() { psql_q "SELECT status FROM instances WHERE tenant = 'demo' AND name = '$1' AND (deleted_at IS NULL OR status = 'DELETED') ORDER BY created_at DESC LIMIT 1"; }
wait_status() {
    for _ in $(seq 1 1200); do
        [ "$(status_of "$1")" = "$2" ] && return 0
        sleep 0.1
    done
    echo "$1 did not reach $2 (it is $(status_of "$1"))" >&2
    return 1
}
# Client calls with binary $1 against the API on port $2.
cli() {
    local bin=$1 port=$2
    shift 2
    SETPOINT_SERVER="http://127.0.0.1:$port" SETPOINT_TOKEN="$TOKEN" "$bin" instances "$@" >/dev/null
}

if [ "$mode" = fixture ]; then
    OUT=${2:-$ROOT/tests/fixtures/upgrade-92f679c.sql}
    # A Kubernetes API that refuses with 403 or fails with 503, as the file $WORK/k8s-mode says.
    K8S_PORT=$(free_port)
    echo 503 >"$WORK/k8s-mode"
    python3 - "$K8S_PORT" "$WORK/k8s-mode" >"$WORK/k8s.log" 2>&1 <<'EOF' &
import http.server, json, sys
port, mode = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def any(self):
        n = int(self.headers.get('Content-Length') or 0)
        self.rfile.read(n)
        code = int(open(mode).read().strip())
        reason = 'Forbidden' if code == 403 else 'ServiceUnavailable'
        body = json.dumps({'kind': 'Status', 'apiVersion': 'v1', 'status': 'Failure',
                           'message': f'fixture: {reason}', 'reason': reason,
                           'code': code}).encode()
        self.send_response(code)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = any
http.server.ThreadingHTTPServer(('127.0.0.1', port), H).serve_forever()
EOF
    PIDS+=($!)
    wait_port "$K8S_PORT"
    API=$(free_port)

    echo "== 92f679c: ready, west, updating, parked and deleted instances"
    start_dev "$OLD_BIN" "$API" "" old-a
    cli "$OLD_BIN" "$API" create ready-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com --request-id fixture-create-ready-1
    cli "$OLD_BIN" "$API" create west-1 --plan kvx.medium --region us-west-2 --size-gb 20 --owner-email owner@example.com --request-id fixture-create-west-1
    cli "$OLD_BIN" "$API" create updating-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com --request-id fixture-create-updating-1
    cli "$OLD_BIN" "$API" create parked-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com --request-id fixture-create-parked-1
    cli "$OLD_BIN" "$API" create deleted-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com --request-id fixture-create-deleted-1
    for n in ready-1 west-1 updating-1 parked-1 deleted-1; do wait_status "$n" READY; done
    cli "$OLD_BIN" "$API" delete deleted-1 --request-id fixture-delete-deleted-1
    wait_status deleted-1 DELETED
    stop "$DEV_PID"

    # The same engine with a Kubernetes API that refuses (403: parked) or fails (503: retried).
    start_dev "$OLD_BIN" "$API" "http://127.0.0.1:$K8S_PORT" old-b
    echo 403 >"$WORK/k8s-mode"
    cli "$OLD_BIN" "$API" update parked-1 --plan kvx.medium --request-id fixture-update-parked-1
    wait_status parked-1 FAILED
    echo 503 >"$WORK/k8s-mode"
    cli "$OLD_BIN" "$API" update updating-1 --size-gb 15 --request-id fixture-update-updating-1
    for _ in $(seq 1 600); do
        [ "$(psql_q "SELECT count(*) FROM work_events WHERE event = 'failed' AND error_class = 'transient'")" -gt 0 ] && break
        sleep 0.1
    done
    stop "$DEV_PID"
    psql_q "SELECT name, status, generation, coalesce(operation, '-') FROM instances ORDER BY name"
    psql_q "SELECT kind, state, attempt, coalesce(lease_owner, '-') FROM work ORDER BY id"
    mkdir -p "$(dirname "$OUT")"
    {
        echo "-- A database written by setpoint $OLD_REV (the release before engines, kinds and regions),"
        echo "-- made by \`scripts/upgrade-check.sh fixture\`: instances READY (ready-1; west-1, asked for"
        echo "-- us-west-2 and placed in us-east-1 by that release), UPDATING (updating-1: its Kubernetes"
        echo "-- step failed transiently when the engine stopped), FAILED (parked-1: a parked unit,"
        echo "-- Kubernetes refused with 403) and DELETED (deleted-1). Tokens in it are test tokens of a"
        echo "-- throw-away stack. Restored by tests/upgrade.rs."
        # Without pg_dump's \restrict guard (random per dump, and unknown to psql before
        # 15.14): the fixture is reviewed and committed.
        as_pg "$PG_BIN/pg_dump" --no-owner --no-privileges --no-comments -h "$WORK/pg" -p "$PG_PORT" -U postgres postgres |
            grep -v '^\\\(un\)\?restrict '
    } >"$OUT"
    echo "wrote $OUT ($(wc -c <"$OUT") bytes)"
    exit 0
fi

# round: the previous release writes the database and keeps running while this one starts.
# One Kubernetes test server for both engines, outliving either.
K8S_BIN=$CARGO_TARGET_DIR/debug/examples/test-server
[ -x "$K8S_BIN" ] || cargo build -p setpoint-kubernetes --example test-server
"$K8S_BIN" 127.0.0.1:0 >"$WORK/k8s.url" 2>"$WORK/k8s.log" &
PIDS+=($!)
wait_file "$WORK/k8s.url"
K8S_URL=$(head -n1 "$WORK/k8s.url")
OLD_API=$(free_port)
NEW_API=$(free_port)
t0=$(date +%s.%N)
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}s')" "$1" "$(date +%s.%N)"; }
echo "== 92f679c alone"
start_dev "$OLD_BIN" "$OLD_API" "$K8S_URL" old
cli "$OLD_BIN" "$OLD_API" create before-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com --wait
OLD_TOKEN=$TOKEN
# The kind and first state of every unit from now on (the claim events name the engine; the
# unit's row is gone once it finished).
psql_q "CREATE TABLE upgrade_unit_kinds (work_id bigint PRIMARY KEY, kind text, state text);
        CREATE FUNCTION upgrade_unit_kind() RETURNS trigger LANGUAGE plpgsql AS \$\$
        BEGIN INSERT INTO upgrade_unit_kinds VALUES (NEW.id, NEW.kind, NEW.state::text)
              ON CONFLICT DO NOTHING; RETURN NEW; END \$\$;
        CREATE TRIGGER upgrade_unit_kind AFTER INSERT ON work FOR EACH ROW
        EXECUTE FUNCTION upgrade_unit_kind();"
echo "== this release starts on the same database and peers while 92f679c runs"
SECRETS_KEY="upgrade:$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')"
cat >"$WORK/new.toml" <<EOF
database_url = "$DB"
[worker]
poll_interval = "100ms"
lease = "2s"
[ec2]
region = "us-east-1"
endpoint_url = "$MOTO"
default_image_id = "ami-12c6146b"
# The plans' sizes of the previous release's dev stack, so both engines size alike.
[ec2.plans."kvx.small"]
instance_type = "t3.small"
[ec2.plans."kvx.medium"]
instance_type = "t3.medium"
[ec2.plans."kvx.large"]
instance_type = "t3.large"
[kubernetes]
access = { mode = "url", url = "$K8S_URL" }
[smtp]
host = "127.0.0.1"
port = $SMTP_PORT
security = "none"
from = "setpoint <noreply@setpoint.test>"
EOF
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true \
    SETPOINT_SECRETS_KEY="$SECRETS_KEY" RUST_LOG=info,sqlx=warn \
    "$NEW_BIN" serve --config "$WORK/new.toml" --worker-id new-engine \
    --listen "127.0.0.1:$NEW_API" >"$WORK/new.log" 2>&1 &
NEW_PID=$!
PIDS+=("$NEW_PID")
wait_port "$NEW_API"
echo "   migrations: $(psql_q "SELECT string_agg(version::text, ',' ORDER BY version) FROM _sqlx_migrations")"
# A 92f679c engine that started now with migrations on would stop at once: its migrator does
# not ignore versions it does not know (hence --no-migrate for it during a rollout).
if out=$("$OLD_BIN" migrate --database-url "$DB" 2>&1); then
    echo "   92f679c's migrate on this database: succeeded (unexpected): $out"
else
    echo "   92f679c's migrate on this database: refused: ${out#error: }"
fi
TOKEN=$OLD_TOKEN
echo "== create through 92f679c's API, update through this release's, delete through 92f679c's"
FIRST_MIXED_UNIT=$(psql_q "SELECT coalesce(max(work_id), 0) FROM upgrade_unit_kinds")
for i in 1 2 3 4 5 6; do
    cli "$OLD_BIN" "$OLD_API" create mixed-$i --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com
done
for i in 1 2 3 4 5 6; do wait_status mixed-$i READY; done
for i in 1 2 3 4 5 6; do cli "$NEW_BIN" "$NEW_API" update mixed-$i --plan kvx.medium --size-gb 20; done
for i in 1 2 3 4 5 6; do
    for _ in $(seq 1 1200); do
        [ "$(psql_q "SELECT status = 'READY' AND generation = 2 FROM instances WHERE name = 'mixed-$i' AND deleted_at IS NULL")" = t ] && break
        sleep 0.1
    done
done
cli "$OLD_BIN" "$OLD_API" update before-1 --plan kvx.medium --wait
for i in 1 2 3 4 5 6; do cli "$OLD_BIN" "$OLD_API" delete mixed-$i; done
for i in 1 2 3 4 5 6; do wait_status mixed-$i DELETED; done
echo "   round with both releases: $(since "$t0")"
echo "   claims (engine, unit kind, units):"
psql_q "SELECT '     ' || rpad(engine, 14) || rpad(kind, 20) || rpad(state, 9) || n FROM (
            SELECT CASE WHEN e.worker = 'new-engine' THEN 'this release' ELSE '92f679c' END AS engine,
                   k.kind, k.state, count(*) AS n
            FROM work_events e JOIN upgrade_unit_kinds k USING (work_id)
            WHERE e.event IN ('claimed', 'rescued') AND k.work_id > $FIRST_MIXED_UNIT
            GROUP BY 1, 2, 3) c
        ORDER BY kind, engine, state"
echo "   units this release enqueued ('queued') that 92f679c claimed: $(psql_q "
    SELECT count(*) FROM work_events e JOIN upgrade_unit_kinds k USING (work_id)
    WHERE e.event IN ('claimed', 'rescued') AND e.worker <> 'new-engine' AND k.state = 'queued'")"
echo "   units parked: $(psql_q "SELECT count(*) FROM work_events WHERE event = 'parked'")"
echo "   machines in moto (state: count):"
python3 - "$MOTO" <<'EOF'
import boto3, collections, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
per = collections.defaultdict(list)
for r in ec2.describe_instances()['Reservations']:
    for i in r['Instances']:
        tags = {t['Key']: t['Value'] for t in i.get('Tags', [])}
        per[tags.get('setpoint:instance-id')].append(i['State']['Name'])
print('     ', dict(collections.Counter(s for v in per.values() for s in v)))
print('      resources with more than one machine:', sum(1 for v in per.values() if len(v) > 1))
EOF
echo "== 92f679c stops; contract migrations; this release alone"
stop "$DEV_PID"
"$NEW_BIN" migrate --database-url "$DB" --contract
t1=$(date +%s.%N)
cli "$NEW_BIN" "$NEW_API" create after-1 --plan kvx.small --region us-east-1 --size-gb 10 --owner-email owner@example.com
wait_status after-1 READY
cli "$NEW_BIN" "$NEW_API" update after-1 --size-gb 30
for _ in $(seq 1 1200); do
    [ "$(psql_q "SELECT status = 'READY' AND generation = 2 FROM instances WHERE name = 'after-1' AND deleted_at IS NULL")" = t ] && break
    sleep 0.1
done
cli "$NEW_BIN" "$NEW_API" delete before-1
cli "$NEW_BIN" "$NEW_API" delete after-1
wait_status before-1 DELETED
wait_status after-1 DELETED
echo "   round after the contract: $(since "$t1")"
echo "   instances: $(psql_q "SELECT string_agg(status || ':' || n, ' ') FROM (SELECT status, count(*) n FROM instances GROUP BY 1) s")"
echo "   work rows left: $(psql_q "SELECT count(*) FROM work")"
stop "$NEW_PID"
