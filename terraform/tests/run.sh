#!/usr/bin/env bash
# Terraform test of setpoint's AWS deployment. Run from the repository root:
#   bash terraform/tests/run.sh
# Offline except for package registries (pip, when moto or checkov are missing). It:
#   1. writes a Terraform CLI config pointing at the local provider mirror (hashicorp/aws 5.100.0),
#   2. works on a copy of terraform/ in a temp dir (never writes into the git tree),
#   3. init (offline, committed lock files must match), fmt -check, validate: module and example,
#   4. checks that invalid inputs are refused by the validation blocks,
#   5. plans the example with its production defaults,
#   6. starts moto, makes the inputs a platform team brings (a CA bundle, a secret with a service
#      account token, secrets with the API's TLS certificate, key and client CA, a KMS key for
#      data volumes; a second served region), applies the example, reads every promise back through the AWS APIs,
#      re-plans (nothing may be replaced), destroys, checks nothing is left,
#   7. runs checkov over terraform/ (skips only inline, with reasons).
# Last line: "terraform: N passed, M failed"; exit status non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TF_SRC="$ROOT/terraform"
CACHE="${SETPOINT_CACHE:-/var/cache/setpoint}"
CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"

START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/setpoint-tf.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
MOTO_PID=""
cleanup() {
  if [ -n "$MOTO_PID" ]; then kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
failed_names=()

# step NAME CMD...: runs CMD with errexit in a subshell, logs its output, counts the result.
step() {
  local name="$1"
  shift
  local log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9' '_').log" t0=$SECONDS rc
  set +e
  (set -euo pipefail; "$@") >"$log" 2>&1
  rc=$?
  set -e
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    printf 'terraform: ok   %-58s %3ss\n' "$name" $((SECONDS - t0))
    grep -h '^summary: ' "$log" | sed 's/^summary: /terraform:        /' || true
  else
    failed=$((failed + 1))
    failed_names+=("$name")
    printf 'terraform: FAIL %-58s %3ss\n' "$name" $((SECONDS - t0))
    sed 's/\x1b\[[0-9;]*m//g' "$log" | tail -n 40 | sed 's/^/    | /'
  fi
  return $rc
}

finish() {
  echo "terraform: took $((SECONDS - START))s"
  [ $failed -eq 0 ] || echo "terraform: failed steps: ${failed_names[*]}"
  echo "terraform: $passed passed, $failed failed"
  [ $failed -eq 0 ]
  exit $?
}

# --- the provider mirror and the CLI config ------------------------------------------------
command -v terraform >/dev/null || { echo "terraform: terraform is not on PATH" >&2; failed=1; finish; }
# The mirror root is the folder above registry.terraform.io: $SETPOINT_TF_MIRROR, the usual
# places, or wherever a search of the file system finds the 5.100.0 binary.
find_provider() {
  local d f
  for d in ${SETPOINT_TF_MIRROR:-} /opt/tf-plugins /usr/share/terraform/plugins /usr/local/share/terraform/plugins \
    "$HOME/.terraform.d/plugins" "$HOME/.local/share/terraform/plugins"; do
    f="$(ls "$d"/registry.terraform.io/hashicorp/aws/5.100.0/*/terraform-provider-aws_* 2>/dev/null | head -n 1 || true)"
    if [ -n "$f" ]; then echo "$f"; return 0; fi
  done
  find / -name 'terraform-provider-aws_*' -path '*registry.terraform.io/hashicorp/aws/5.100.0/*' \
    -not -path '/proc/*' -not -path "$WORK/*" -not -path '*/.terraform/*' -not -path "$CACHE/terraform-plugin-cache/*" \
    2>/dev/null | head -n 1 || true
}
PROVIDER_BIN="$(find_provider)"
if [ -z "$PROVIDER_BIN" ]; then
  echo "terraform: no offline mirror of hashicorp/aws 5.100.0 found (looked for" \
    "*/registry.terraform.io/hashicorp/aws/5.100.0/*/terraform-provider-aws_*); see shared/PEERS.md" >&2
  failed=1
  finish
fi
MIRROR="${PROVIDER_BIN%%/registry.terraform.io/*}"
PLUGIN_CACHE="$CACHE/terraform-plugin-cache"
mkdir -p "$PLUGIN_CACHE" 2>/dev/null || PLUGIN_CACHE="$WORK/plugin-cache" && mkdir -p "$PLUGIN_CACHE"
cat >"$WORK/terraformrc" <<CFG
provider_installation {
  filesystem_mirror {
    path    = "$MIRROR"
    include = ["registry.terraform.io/hashicorp/*"]
  }
  direct {
    exclude = ["registry.terraform.io/hashicorp/*"]
  }
}
plugin_cache_dir = "$PLUGIN_CACHE"
CFG
export TF_CLI_CONFIG_FILE="$WORK/terraformrc"
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
echo "terraform: $(terraform version | head -n 1), provider mirror $MIRROR, work dir $WORK"

# A copy of terraform/ without local state or .terraform dirs; the git tree stays untouched.
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude='.terraform' --exclude='*.tfstate*' --exclude='terraform.tfvars' -cf - terraform | tar -C "$WORK/src" -xf -
MODULE="$WORK/src/terraform/modules/setpoint"
EXAMPLE="$WORK/src/terraform/environments/example"

tf() { # tf DIR ARGS...: terraform in DIR with its .terraform in the work dir
  local dir="$1"
  shift
  TF_DATA_DIR="$WORK/data/$(basename "$dir")" terraform -chdir="$dir" "$@"
}

init_offline() {
  local dir="$1" committed="$2"
  tf "$dir" init -input=false -backend=false -lockfile=readonly
  # The committed lock file must be the one an offline init produces (a stale or missing lock
  # would make `terraform init` in a fresh clone reach for the registry).
  cmp "$committed" "$dir/.terraform.lock.hcl"
  local providers
  providers="$(tf "$dir" providers -no-color)"
  echo "$providers"
  grep -q 'provider\[registry.terraform.io/hashicorp/aws\] 5.100.0' <<<"$providers"
}

# --- static checks ---------------------------------------------------------------------------
step "fmt -check -recursive terraform/" terraform fmt -check -recursive -diff "$WORK/src/terraform" || true
mod_ok=0
step "init (offline mirror, committed lock) modules/setpoint" init_offline "$MODULE" "$TF_SRC/modules/setpoint/.terraform.lock.hcl" && mod_ok=1 || true
[ $mod_ok -eq 1 ] && { step "validate modules/setpoint" tf "$MODULE" validate -no-color || true; }
ex_ok=0
step "init (offline mirror, committed lock) environments/example" init_offline "$EXAMPLE" "$TF_SRC/environments/example/.terraform.lock.hcl" && ex_ok=1 || true
[ $ex_ok -eq 1 ] && { step "validate environments/example" tf "$EXAMPLE" validate -no-color || true; }

descriptions_everywhere() {
  # every variable and output block has a description, every module variable has a validation
  # block or is a bool/map/free-form kind listed here.
  python3 - "$WORK/src/terraform" <<'PY'
import pathlib, re, sys
bad = []
for f in pathlib.Path(sys.argv[1]).rglob("*.tf"):
    text = f.read_text()
    for kind, name, body in re.findall(r'^(variable|output) "([^"]+)" \{\n(.*?)^\}', text, re.S | re.M):
        if not re.search(r'^\s+description\s+=\s+"[^"]{10,}', body, re.M):
            bad.append(f"{f.name}: {kind} {name} has no description")
        if kind == "variable" and "validation {" not in body and not re.search(r'type\s+=\s+(bool|map\(string\))', body):
            bad.append(f"{f.name}: variable {name} has no validation block")
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
PY
}
step "every variable/output described, non-bool variables validated" descriptions_everywhere || true

# --- moto ------------------------------------------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
pip_install() { # a Debian system Python refuses plain pip installs (PEP 668); say so and go on
  python3 -m pip install -q --disable-pip-version-check "$@" ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@"
}
if ! python3 -c 'import moto.server, boto3' 2>/dev/null; then
  echo "terraform: installing moto[server] with pip"
  python3 -m pip --version >/dev/null 2>&1 || as_root apt-get install -y -qq python3-pip >/dev/null
  pip_install 'moto[server]'
fi
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ENDPOINT="http://127.0.0.1:$PORT"
# AWS managed policies (AmazonECSTaskExecutionRolePolicy, ...) exist in moto only when loaded.
MOTO_IAM_LOAD_MANAGED_POLICIES=true python3 -m moto.server -H 127.0.0.1 -p "$PORT" >"$LOGS/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=eu-west-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN || true
moto_ready() {
  for _ in $(seq 1 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('$ENDPOINT/moto-api/', timeout=1)" 2>/dev/null && return 0
    kill -0 "$MOTO_PID" 2>/dev/null || { cat "$LOGS/moto.log"; return 1; }
    sleep 0.2
  done
  return 1
}
moto_ok=0
step "moto server on 127.0.0.1:$PORT" moto_ready && moto_ok=1 || true

# Provider settings for moto live in an override file of the copy: the example stays as a user
# would run it. Every AWS API the example uses points at moto.
SERVICES=(cloudwatch ec2 ecs elbv2 iam kms logs rds secretsmanager ses sesv2 sns sts)
{
  echo 'provider "aws" {'
  echo '  access_key                  = "test"'
  echo '  secret_key                  = "test"'
  echo '  skip_credentials_validation = true'
  echo '  skip_metadata_api_check     = true'
  echo '  skip_requesting_account_id  = false'
  echo '  endpoints {'
  for s in "${SERVICES[@]}"; do printf '    %-14s = "%s"\n' "$s" "$ENDPOINT"; done
  echo '  }'
  echo '}'
} >"$EXAMPLE/moto_override.tf"

NAME="setpoint-moto"
STATE="$WORK/example.tfstate"

# What a platform team brings: an AMI, an existing cluster's endpoint and CA bundle (a throw-away
# self-signed certificate here; its key is discarded), a secret holding the service account's
# token, made in moto the way the README says to make it in AWS, and the API's TLS material.
K8S_TOKEN_SECRET_ARN=""
SECRETS_KEY_ARN=""
K8S_CA_DATA=""
GRPC_TLS_VAR=""
DATA_VOLUME_KMS_ARN=""
cluster_inputs() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=kubernetes \
    -keyout /dev/null -out "$WORK/k8s-ca.pem" 2>/dev/null
  python3 - "$ENDPOINT" >"$WORK/k8s-token-arn" <<'PY'
import sys, boto3
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="eu-west-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
print(sm.create_secret(Name="test/kubernetes-token", SecretString="not-a-real-service-account-token")["ARN"])
PY
  # The key that seals credentials at rest, in the form `setpoint secrets-key` prints.
  python3 - "$ENDPOINT" >"$WORK/secrets-key-arn" <<'PY'
import base64, os, sys, boto3
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="eu-west-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
key = "k1:" + base64.b64encode(os.urandom(32)).decode()
print(sm.create_secret(Name="test/secrets-key", SecretString=key)["ARN"])
PY
  # The API's TLS: a throw-away CA, a server certificate it signed, the server key, each a PEM
  # secret, as the module's grpc_tls takes them.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=setpoint test CA" \
    -keyout "$WORK/grpc-ca.key" -out "$WORK/grpc-ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=setpoint-grpc \
    -keyout "$WORK/grpc.key" -out "$WORK/grpc.csr" 2>/dev/null
  printf 'subjectAltName=DNS:setpoint-grpc.internal\nextendedKeyUsage=serverAuth\n' >"$WORK/grpc.ext"
  openssl x509 -req -in "$WORK/grpc.csr" -CA "$WORK/grpc-ca.pem" -CAkey "$WORK/grpc-ca.key" -CAcreateserial \
    -days 2 -extfile "$WORK/grpc.ext" -out "$WORK/grpc.pem" 2>/dev/null
  python3 - "$ENDPOINT" "$WORK" >"$WORK/grpc-tls.tfvar" <<'PY'
import sys, boto3
sm = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="eu-west-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
arn = {k: sm.create_secret(Name=f"test/grpc-tls-{k}", SecretString=open(f"{sys.argv[2]}/{f}").read())["ARN"]
       for k, f in [("cert", "grpc.pem"), ("key", "grpc.key"), ("client-ca", "grpc-ca.pem")]}
print(f'grpc_tls={{certificate_secret_arn="{arn["cert"]}",private_key_secret_arn="{arn["key"]}",'
      f'client_ca_secret_arn="{arn["client-ca"]}"}}')
PY
  rm -f "$WORK/grpc-ca.key" "$WORK/grpc.key"
  # A customer managed key for the data volumes of the deployment region.
  python3 - "$ENDPOINT" >"$WORK/data-volume-kms-arn" <<'PY'
import sys, boto3
kms = boto3.client("kms", endpoint_url=sys.argv[1], region_name="eu-west-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
print(kms.create_key(Description="setpoint test: data volumes")["KeyMetadata"]["Arn"])
PY
}
inputs_ok=0
if [ $moto_ok -eq 1 ]; then
  step "cluster inputs: CA bundle, token secret, TLS secrets in moto" cluster_inputs && inputs_ok=1 || true
  K8S_TOKEN_SECRET_ARN="$(cat "$WORK/k8s-token-arn" 2>/dev/null || true)"
  SECRETS_KEY_ARN="$(cat "$WORK/secrets-key-arn" 2>/dev/null || true)"
  K8S_CA_DATA="$(base64 -w0 "$WORK/k8s-ca.pem" 2>/dev/null || true)"
  GRPC_TLS_VAR="$(cat "$WORK/grpc-tls.tfvar" 2>/dev/null || true)"
  DATA_VOLUME_KMS_ARN="$(cat "$WORK/data-volume-kms-arn" 2>/dev/null || true)"
fi
# A second served region (its VPC is not the example's business: the ids only reach IAM and the
# engine's environment), with a key of its own.
EXTRA_REGION_KMS_ARN="arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d-0a1b-0a1b-0a1b-0a1b2c3d4e5f"
EXTRA_REGIONS='ec2_additional_regions={"us-east-1"={subnet_id="subnet-0a1b2c3d4e5f60718",security_group_ids=["sg-0a1b2c3d4e5f60718","sg-0f1e2d3c4b5a60718"],image_id="ami-0a1b2c3d4e5f60718",data_volume_kms_key_arn="'"$EXTRA_REGION_KMS_ARN"'"}}'
export EXTRA_REGION_KMS_ARN
VARS=(-var "environment=moto" -var "region=eu-west-1" -var "ec2_image_id=ami-12c6146b"
  -var "kubernetes_api_endpoint=https://0123456789ABCDEF0123456789ABCDEF.gr7.eu-west-1.eks.amazonaws.com"
  -var "kubernetes_ca_data=$K8S_CA_DATA" -var "kubernetes_token_secret_arn=$K8S_TOKEN_SECRET_ARN"
  -var "secrets_key_secret_arn=$SECRETS_KEY_ARN"
  -var "$GRPC_TLS_VAR" -var "ec2_data_volume_kms_key_arn=$DATA_VOLUME_KMS_ARN" -var "$EXTRA_REGIONS")

# refused_plan WHY ARGS...: plans the example with VARS and ARGS, prints the output, and fails
# (saying WHY) unless the plan is refused. The output, with Terraform's wrapped lines joined, is
# left in REFUSED (long messages wrap anywhere).
REFUSED=""
refused_plan() {
  local why="$1" out rc
  shift
  set +e
  out="$(tf "$EXAMPLE" plan -input=false -no-color -lock=false -state="$WORK/never.tfstate" "${VARS[@]}" "$@" 2>&1)"
  rc=$?
  set -e
  echo "$out"
  [ $rc -ne 0 ] || { echo "plan accepted $why"; return 1; }
  REFUSED="$(tr '\n' ' ' <<<"$out" | tr -s ' ')"
}

invalid_inputs_refused() {
  refused_plan "invalid inputs" -var 'engine_image=setpoint:latest' -var 'environment=Bad_Name' \
    -var 'vpc_cidr=10.0.0.0/8' -var 'kubernetes_api_endpoint=http://k8s.example' \
    -var 'kubernetes_token_secret_arn=my-token' -var 'secrets_key_secret_arn=my-key' \
    -var 'grpc_tls={certificate_secret_arn="server.pem",private_key_secret_arn="server.key"}' \
    -var 'ec2_data_volume_kms_key_arn=alias/setpoint' \
    -var 'ec2_additional_regions={"us-east-1"={subnet_id="subnet-XYZ",security_group_ids=[],image_id="ami-1"}}'
  grep -q 'engine_image must name a tag' <<<"$REFUSED"
  grep -q 'environment must be' <<<"$REFUSED"
  grep -q 'vpc_cidr must be' <<<"$REFUSED"
  grep -q 'kubernetes_api_endpoint must be an https:// URL' <<<"$REFUSED"
  grep -q 'kubernetes_token_secret_arn must be a Secrets Manager secret ARN' <<<"$REFUSED"
  grep -q 'secrets_key_secret_arn must be a Secrets Manager secret ARN' <<<"$REFUSED"
  grep -q 'grpc_tls must hold full Secrets Manager secret ARNs' <<<"$REFUSED"
  grep -q 'ec2_data_volume_kms_key_arn must be a KMS key ARN' <<<"$REFUSED"
  grep -q 'ec2_additional_regions maps region codes' <<<"$REFUSED"
}

regions_refused() {
  # The deployment region is configured by ec2_subnet_id & co., never again in
  # ec2_additional_regions; a key for a region's data volumes must be of that region; region
  # codes only.
  refused_plan "the deployment region in ec2_additional_regions, its key from another region" \
    -var 'ec2_data_volume_kms_key_arn=arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d' \
    -var 'ec2_additional_regions={"eu-west-1"={subnet_id="subnet-0a1b2c3d",security_group_ids=["sg-0a1b2c3d"],image_id="ami-0a1b2c3d4e"}}'
  grep -q 'ec2_additional_regions names eu-west-1, the deployment region' <<<"$REFUSED"
  grep -q 'ec2_data_volume_kms_key_arn must be a key in the deployment region eu-west-1' <<<"$REFUSED"
  refused_plan "an additional region whose key is of another region" \
    -var 'ec2_additional_regions={"us-west-2"={subnet_id="subnet-0a1b2c3d",security_group_ids=["sg-0a1b2c3d"],image_id="ami-0a1b2c3d4e",data_volume_kms_key_arn="arn:aws:kms:eu-west-1:123456789012:key/0a1b2c3d"}}'
  grep -q 'ec2_additional_regions maps region codes' <<<"$REFUSED"
  refused_plan "a region that is no region code" \
    -var 'ec2_additional_regions={"US_EAST_1"={subnet_id="subnet-0a1b2c3d",security_group_ids=["sg-0a1b2c3d"],image_id="ami-0a1b2c3d4e"}}'
  grep -q 'ec2_additional_regions is keyed by region codes' <<<"$REFUSED"
}

extra_environment_cannot_replace() {
  # extra_environment may add variables; one the module sets (a plain one, and a secret) fails
  # the plan, which names both. SETPOINT_TLS_* keys are refused by the variable's validation.
  refused_plan "an extra_environment that replaces the module's variables" \
    -var 'extra_environment={SETPOINT_CONCURRENCY="32",RUST_LOG="debug",SETPOINT_SMTP_URL="x"}'
  grep -q 'extra_environment sets RUST_LOG, SETPOINT_SMTP_URL, which the module sets itself' <<<"$REFUSED"
  # TLS settings only through grpc_tls, whether it is set or not.
  refused_plan "a TLS key in extra_environment" \
    -var 'grpc_tls=null' -var 'extra_environment={SETPOINT_TLS_KEY_PEM="-----BEGIN PRIVATE KEY-----"}'
  grep -q 'must not start with SETPOINT_DATABASE_ or SETPOINT_TLS_' <<<"$REFUSED"
}

plan_production_defaults() {
  # The example as a user runs it (deletion protection, Multi-AZ, final snapshot), planned
  # against moto: refresh-free, nothing applied.
  tf "$EXAMPLE" plan -input=false -no-color -lock=false -state="$WORK/never.tfstate" "${VARS[@]}" -out="$WORK/prod.tfplan"
  tf "$EXAMPLE" show -json "$WORK/prod.tfplan" >"$WORK/prod.json"
  python3 - "$WORK/prod.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
rc = [r for r in plan["resource_changes"] if r["mode"] == "managed"]
assert all(r["change"]["actions"] == ["create"] for r in rc), "a fresh plan only creates"
db = [r for r in rc if r["type"] == "aws_db_instance"][0]["change"]["after"]
assert db["deletion_protection"] is True and db["multi_az"] is True and db["skip_final_snapshot"] is False, db
assert db["storage_encrypted"] is True and db["publicly_accessible"] is False and db["backup_retention_period"] >= 7
assert db.get("password") is None and db.get("password_wo") is None, "the password is write-only, never in a plan"
lb = [r for r in rc if r["type"] == "aws_lb"][0]["change"]["after"]
assert lb["enable_deletion_protection"] is True and lb["internal"] is True
print(f"summary: {len(rc)} resources to create, production safety switches on")
PY
}

plan_console_exposure() {
  # The web console behind the load balancer (off by default, so the apply below has none): a
  # listener and a sticky target group on its port, the engine listening there, the rules to
  # reach it; and a console port that collides with the API's is refused.
  tf "$EXAMPLE" plan -input=false -no-color -lock=false -state="$WORK/never.tfstate" "${VARS[@]}" \
    -var 'console_port=8443' -out="$WORK/console.tfplan"
  tf "$EXAMPLE" show -json "$WORK/console.tfplan" >"$WORK/console.json"
  python3 - "$WORK/console.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
rc = {r["address"]: r["change"]["after"] for r in plan["resource_changes"] if r["mode"] == "managed"}
def one(suffix):
    found = [v for k, v in rc.items() if k.endswith(suffix)]
    assert len(found) == 1, f"{suffix}: {len(found)}"
    return found[0]
listener = one("aws_lb_listener.console[0]")
assert listener["port"] == 8443 and listener["protocol"] == "TCP", listener
tg = one("aws_lb_target_group.console[0]")
assert tg["port"] == 8443 and tg["stickiness"][0]["enabled"] is True and tg["stickiness"][0]["type"] == "source_ip", tg
task = one("aws_ecs_task_definition.engine")
env = {e["name"]: e["value"] for e in json.loads(task["container_definitions"])[0]["environment"]}
assert env["SETPOINT_CONSOLE_LISTEN"] == "0.0.0.0:8443", env
rules = [k for k in rc if "console" in k and "security_group" in k]
assert len(rules) >= 3, rules
print(f"summary: console on 8443: listener, sticky target group, {len(rules)} security group rules, SETPOINT_CONSOLE_LISTEN")
PY
  refused_plan "a console port that is the API's" -var 'console_port=50051'
  grep -q 'console_port must be between 1024 and 65535 and differ from grpc_port' <<<"$REFUSED"
}

resource_types_in_plan=""
if [ $ex_ok -eq 1 ] && [ $moto_ok -eq 1 ] && [ $inputs_ok -eq 1 ]; then
  step "invalid inputs are refused (validation blocks)" invalid_inputs_refused || true
  step "extra_environment cannot replace the module's variables" extra_environment_cannot_replace || true
  step "served regions: deployment region once, keys of their own region" regions_refused || true
  step "plan example (production defaults)" plan_production_defaults || true
  step "plan example with the web console behind the load balancer" plan_console_exposure || true

  # Apply a throw-away variant: production=false turns deletion protection off so destroy works.
  APPLY_VARS=("${VARS[@]}" -var "production=false")

  apply_example() {
    tf "$EXAMPLE" plan -input=false -no-color -state="$STATE" "${APPLY_VARS[@]}" -out="$WORK/apply.tfplan"
    tf "$EXAMPLE" apply -input=false -no-color -state="$STATE" "$WORK/apply.tfplan"
    tf "$EXAMPLE" output -state="$STATE" -json >"$WORK/outputs.json"
    python3 -c "import json,sys; o=json.load(open(sys.argv[1])); assert o['engine_environment']['value']['SETPOINT_LISTEN']=='0.0.0.0:50051'" "$WORK/outputs.json"
  }
  applied=0
  step "apply example to moto" apply_example && applied=1 || true
  if [ $applied -eq 1 ]; then
    resource_types_in_plan="$(tf "$EXAMPLE" state list -state="$STATE" | grep -v '^data\.\|\.data\.' | sed -E 's/\[[^]]*\]$//' | awk -F. '{print $(NF-1)}' | sort -u | tr '\n' ' ')"
    # Every resource type of the example is applied: moto 5.2 serves them all (RDS, ECS, ELBv2,
    # Secrets Manager, SESv2, CloudWatch, Logs, KMS, SNS, IAM, EC2/VPC). Nothing is plan-only; if a
    # moto release drops one, this apply fails and says which.
    echo "terraform: plan-only resource types (moto cannot serve): none"
    echo "terraform: applied to moto: $(tf "$EXAMPLE" state list -state="$STATE" | grep -vc '^data\.\|\.data\.') resources of types: $resource_types_in_plan"
    step "read back from moto: DB private+encrypted, password only in Secrets Manager, IAM, env" \
      python3 "$TF_SRC/tests/verify_moto.py" applied "$ENDPOINT" eu-west-1 "$NAME" "$STATE" || true

    replan_no_replacements() {
      # A second plan must not replace anything (no create/delete), and may update in place only
      # the attributes moto does not round-trip (RDS monitoring/Performance Insights,
      # parameter-group parameters, ECS managed tags, SESv2 tags, cross-SG references returned
      # as "account/sg-..."): those are listed, anything else fails.
      tf "$EXAMPLE" plan -input=false -no-color -state="$STATE" "${APPLY_VARS[@]}" -out="$WORK/replan.tfplan"
      tf "$EXAMPLE" show -json "$WORK/replan.tfplan" >"$WORK/replan.json"
      python3 - "$WORK/replan.json" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
# Attributes moto 5.2 does not store or return, by resource type. An in-place update of anything
# else is real drift and fails the step.
MOTO_GAPS = {
    "aws_db_instance": {"monitoring_interval", "monitoring_role_arn", "performance_insights_enabled",
                        "performance_insights_kms_key_id", "performance_insights_retention_period"},
    "aws_db_parameter_group": {"parameter"},
    "aws_ecs_service": {"availability_zone_rebalancing", "enable_ecs_managed_tags", "health_check_grace_period_seconds"},
    "aws_sesv2_email_identity": {"tags", "tags_all"},
    "aws_vpc_security_group_ingress_rule": {"description", "referenced_security_group_id"},
    "aws_vpc_security_group_egress_rule": {"description", "referenced_security_group_id"},
    # the SMTP user's policy names the SES identity, whose (dropped) tags make it "known after apply"
    "aws_iam_user_policy": {"policy"},
}
changes = [r for r in plan["resource_changes"] if r["mode"] == "managed" and r["change"]["actions"] != ["no-op"]]
replaced = [r["address"] for r in changes if "delete" in r["change"]["actions"] or "create" in r["change"]["actions"]]
unexpected = []
for r in changes:
    c = r["change"]
    before, after, unknown = c.get("before") or {}, c.get("after") or {}, c.get("after_unknown") or {}
    keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) or unknown.get(k) is True)
    extra = [k for k in keys if k not in MOTO_GAPS.get(r["type"], set())]
    print(f"in-place drift from moto round-trip gaps: {r['address']}: {', '.join(keys)}")
    if extra:
        unexpected.append(f"{r['address']}: {', '.join(extra)}")
assert not replaced, f"second plan would replace: {replaced}"
assert not unexpected, f"second plan changes attributes moto does round-trip: {unexpected}"
print(f"summary: second plan replaces nothing; {len(changes)} in-place updates, all on attributes moto does not round-trip")
PY
    }
    step "re-plan after apply: nothing would be replaced" replan_no_replacements || true
    grep -h 'in-place drift' "$LOGS"/re_plan*.log 2>/dev/null | sed 's/^/terraform:   /' || true
  fi

  destroy_example() {
    tf "$EXAMPLE" destroy -input=false -no-color -auto-approve -state="$STATE" "${APPLY_VARS[@]}"
    left="$(tf "$EXAMPLE" state list -state="$STATE" | grep -v '^data\.\|\.data\.' || true)"
    [ -z "$left" ] || { echo "left in state: $left"; return 1; }
    python3 "$TF_SRC/tests/verify_moto.py" destroyed "$ENDPOINT" eu-west-1 "$NAME" "$STATE"
  }
  step "destroy example on moto, nothing left" destroy_example || true
fi

# --- checkov ---------------------------------------------------------------------------------
checkov_scan() {
  local venv="$CACHE/checkov-venv"
  if ! "$venv/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    mkdir -p "$CACHE" 2>/dev/null || venv="$WORK/checkov-venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then # Debian ships venv separately
      as_root apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
  fi
  # Scan the copy without the moto override (that file is the test's, not the project's).
  rm -f "$EXAMPLE/moto_override.tf"
  (cd "$WORK/src" && "$venv/bin/checkov" -d terraform --skip-download --compact --quiet)
  # Every skip is inline with a reason.
  ! grep -rnE '#checkov:skip=CKV[A-Z0-9_]+(:\s*)?$' "$WORK/src/terraform" --include='*.tf'
}
step "checkov $CHECKOV_VERSION over terraform/ (inline skips with reasons)" checkov_scan || true

finish
