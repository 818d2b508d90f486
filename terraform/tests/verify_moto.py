#!/usr/bin/env python3
"""Checks what `terraform apply` of the example made in moto, and that `destroy` removed it.

usage: verify_moto.py applied|destroyed ENDPOINT REGION NAME STATE_FILE

Reads back through the AWS APIs (boto3 against the moto server) the properties the module
promises: private encrypted database with backups, the password only in Secrets Manager (and not
in the Terraform state), the database reachable only from the engine, the least-privilege EC2
policy in every served region (data volumes: launch, tag at launch, grow only managed ones; KMS
only for the configured keys, through EC2), the engine's environment (served regions as
SETPOINT_EC2_REGIONS) and secrets, the SES identity, logs and alarms. EXTRA_REGION_KMS_ARN in the
environment is the key run.sh gave the additional region.
"""
import json
import os
import re
import sys

import boto3

mode, endpoint, region, name, state_file = sys.argv[1:6]
failures = []
checks = []


def check(cond, what):
    print(("  ok   " if cond else "  FAIL ") + what)
    checks.append(what)
    if not cond:
        failures.append(what)


def client(service):
    return boto3.client(service, endpoint_url=endpoint, region_name=region,
                        aws_access_key_id="test", aws_secret_access_key="test")


rds, ec2, sm, iam = client("rds"), client("ec2"), client("secretsmanager"), client("iam")
kms_client = client("kms")
ecs, ses, cw, logs = client("ecs"), client("sesv2"), client("cloudwatch"), client("logs")
elb, kms, sns = client("elbv2"), client("kms"), client("sns")

if mode == "destroyed":
    check(rds.describe_db_instances()["DBInstances"] == [], "no RDS instance left")
    secrets = [s for s in sm.list_secrets()["SecretList"] if name in s["Name"]]
    check(all("DeletedDate" in s for s in secrets), "database secret deleted (or scheduled for deletion)")
    clusters = ecs.describe_clusters(clusters=[name])["clusters"]
    check(all(c["status"] != "ACTIVE" for c in clusters), "no active ECS cluster left")
    arns = [a for c in ecs.list_clusters()["clusterArns"] for a in ecs.list_services(cluster=c).get("serviceArns", [])]
    services = ecs.describe_services(cluster=name, services=arns)["services"] if arns else []
    check(all(s["status"] != "ACTIVE" for s in services), "no active ECS service left")
    vpcs = [v for v in ec2.describe_vpcs()["Vpcs"] if not v.get("IsDefault")]
    check(vpcs == [], "no VPC left but the default one")
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(name)]
    check(roles == [], "no IAM role left")
    users = [u["UserName"] for u in iam.list_users()["Users"] if u["UserName"].startswith(name)]
    check(users == [], "no IAM user (SES SMTP) left")
    check([a for a in cw.describe_alarms()["MetricAlarms"] if a["AlarmName"].startswith(name)] == [], "no alarm left")
    check(elb.describe_load_balancers()["LoadBalancers"] == [], "no load balancer left")
    print(f"summary: {len(checks) - len(failures)}/{len(checks)} read-back checks after destroy passed")
    sys.exit(1 if failures else 0)

state_text = open(state_file).read()

# --- database -----------------------------------------------------------------------------
dbs = rds.describe_db_instances(DBInstanceIdentifier=name)["DBInstances"]
check(len(dbs) == 1, f"RDS instance {name} exists")
db = dbs[0]
check(db["Engine"] == "postgres", "engine is postgres")
check(db.get("StorageEncrypted") is True and db.get("KmsKeyId", "").startswith("arn:"), "storage encrypted with the module's KMS key")
check(db.get("PubliclyAccessible") is False, "database is not publicly accessible")
check(db.get("BackupRetentionPeriod", 0) >= 1, f"automated backups kept {db.get('BackupRetentionPeriod')} days")
db_sgs = [g["VpcSecurityGroupId"] for g in db["VpcSecurityGroups"]]
check(len(db_sgs) == 1, "database has exactly one security group")

# --- security groups: only the engine reaches the database -----------------------------------
sg = ec2.describe_security_groups(GroupIds=db_sgs)["SecurityGroups"][0]
ingress = sg["IpPermissions"]
engine_sg_ids = {p["GroupId"] for r in ingress for p in r.get("UserIdGroupPairs", [])}
check(len(ingress) == 1 and ingress[0]["FromPort"] == 5432 and ingress[0]["ToPort"] == 5432,
      "database ingress: one rule, port 5432")
check(all(not r.get("IpRanges") and not r.get("Ipv6Ranges") for r in ingress), "database ingress names no CIDR")
engine_sg = ec2.describe_security_groups(GroupIds=list(engine_sg_ids))["SecurityGroups"][0] if engine_sg_ids else {}
check(engine_sg.get("GroupName", "").startswith(f"{name}-engine-"), "database ingress comes only from the engine security group")
check(sg.get("IpPermissionsEgress", []) == [], "database security group has no egress")
open_egress = [r for r in engine_sg.get("IpPermissionsEgress", []) if r.get("IpProtocol") == "-1"]
check(open_egress == [], "engine egress is per port (no all-traffic rule)")

# --- the password lives in Secrets Manager, never in the state --------------------------------
secrets = [s for s in sm.list_secrets()["SecretList"] if s["Name"].startswith(f"setpoint/{name}/database-password-")]
check(len(secrets) == 1, "database password secret exists")
secret = secrets[0]
check(bool(secret.get("KmsKeyId")), "secret encrypted with the module's KMS key")
password = sm.get_secret_value(SecretId=secret["ARN"])["SecretString"]
check(re.fullmatch(r"[A-Za-z0-9]{40}", password) is not None, "password: 40 URL-safe characters")
check(password not in state_text, "password does not appear in the Terraform state (write-only arguments)")

# --- IAM: least-privilege EC2 policy ----------------------------------------------------------
engine_roles = [r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(f"{name}-engine-")]
check(len(engine_roles) == 1, "engine task role exists")
role = engine_roles[0]["RoleName"]
assume = engine_roles[0]["AssumeRolePolicyDocument"]
assume = json.loads(assume) if isinstance(assume, str) else assume
check(assume["Statement"][0]["Principal"]["Service"] == "ecs-tasks.amazonaws.com", "engine role is assumable by ECS tasks only")
policy_names = iam.list_role_policies(RoleName=role)["PolicyNames"]
check(len(policy_names) == 1 and iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == [],
      "engine role has one inline policy and no managed policies")
doc = iam.get_role_policy(RoleName=role, PolicyName=policy_names[0])["PolicyDocument"]
doc = json.loads(doc) if isinstance(doc, str) else doc
stmts = doc["Statement"]


def as_list(v):
    return v if isinstance(v, list) else [v]


# The engine's environment (the task definition), read here because the IAM checks compare the
# policy with the regions and keys the engine is configured with.
_svc = ecs.describe_services(cluster=name, services=[f"{name}-engine"])["services"]
_td = ecs.describe_task_definition(taskDefinition=_svc[0]["taskDefinition"])["taskDefinition"] if _svc else {"containerDefinitions": []}
env = {e["name"]: e["value"] for c in _td["containerDefinitions"] if c["name"] == "setpoint" for e in c["environment"]}
try:
    extra_regions = json.loads(env.get("SETPOINT_EC2_REGIONS", "{}"))
except ValueError:
    extra_regions = {}
check(isinstance(extra_regions, dict) and set(extra_regions) == {"us-east-1"},
      f"SETPOINT_EC2_REGIONS holds the additional region's table ({sorted(extra_regions) if isinstance(extra_regions, dict) else extra_regions})")
east = extra_regions.get("us-east-1", {}) if isinstance(extra_regions, dict) else {}
check(east.get("subnet_ids") == ["subnet-0a1b2c3d4e5f60718"] and east.get("security_group_ids") == ["sg-0a1b2c3d4e5f60718", "sg-0f1e2d3c4b5a60718"]
      and east.get("default_image_id") == "ami-0a1b2c3d4e5f60718"
      and east.get("data_volume") == {"kms_key_id": os.environ.get("EXTRA_REGION_KMS_ARN")}
      and {p: t.get("instance_type") for p, t in east.get("plans", {}).items()} == {"kvx.small": "t3.small", "kvx.medium": "t3.medium", "kvx.large": "t3.large"}
      and set(east) == {"subnet_ids", "security_group_ids", "default_image_id", "plans", "data_volume"},
      "us-east-1's table: its subnet, security groups, image, data volume key and the plans' instance types (keys the engine reads)")


def stmts_for(action):
    return [s for s in stmts if action in as_list(s["Action"])]


for s in stmts:
    check(s["Effect"] == "Allow" and not any(a in ("*", "ec2:*") for a in as_list(s["Action"])),
          f"statement {s.get('Sid')}: no wildcard action")
    if "*" in as_list(s["Resource"]):
        check(all(a.startswith("ec2:Describe") for a in as_list(s["Action"])), f"statement {s.get('Sid')}: resource * only for Describe*")
run = stmts_for("ec2:RunInstances")
inst_run = [s for s in run if any(r.endswith(":instance/*") for r in as_list(s["Resource"]))]
check(len(inst_run) == 1 and inst_run[0].get("Condition", {}).get("StringEquals", {}).get("aws:RequestTag/setpoint:managed") == "true",
      "RunInstances on instances only with request tag setpoint:managed=true")
check(all(":instance/" not in r for s in run if s not in inst_run for r in as_list(s["Resource"])),
      "no other RunInstances statement covers instances")
tags = stmts_for("ec2:CreateTags")
check(len(tags) == 1 and tags[0].get("Condition", {}).get("StringEquals", {}).get("ec2:CreateAction") == "RunInstances",
      "CreateTags only on launch (ec2:CreateAction = RunInstances)")
check(len(tags) == 1 and all(r.endswith(":instance/*") or r.endswith(":volume/*") for r in as_list(tags[0]["Resource"]))
      and any(r.endswith(":volume/*") for r in as_list(tags[0]["Resource"])),
      "CreateTags only on instances and the volumes the launch makes (the launch tags nothing else)")
run_resources = {r for s in run for r in as_list(s["Resource"])}
check(not any(":key-pair/" in r or ":launch-template/" in r for r in run_resources),
      "RunInstances names no key pair or launch template (the engine uses neither)")
term = stmts_for("ec2:TerminateInstances")
check(len(term) == 1 and term[0].get("Condition", {}).get("StringEquals", {}).get("aws:ResourceTag/setpoint:managed") == "true",
      "TerminateInstances only on instances tagged setpoint:managed=true")


def managed_instances_only(s):
    return (all(r.endswith(":instance/*") for r in as_list(s["Resource"]))
            and s.get("Condition", {}).get("StringEquals", {}).get("aws:ResourceTag/setpoint:managed") == "true")


# Resize on a plan change: stop, change the type, start; only managed instances.
for action in ["ec2:StopInstances", "ec2:StartInstances", "ec2:ModifyInstanceAttribute"]:
    found = stmts_for(action)
    check(len(found) == 1 and managed_instances_only(found[0]),
          f"{action} only on instances tagged setpoint:managed=true")
modify = stmts_for("ec2:ModifyInstanceAttribute")
check(len(modify) == 1 and as_list(modify[0]["Action"]) == ["ec2:ModifyInstanceAttribute"]
      and {k.lower(): v for k, v in modify[0].get("Condition", {}).get("Null", {}).items()}.get("ec2:attribute/instancetype") == "false",
      "ModifyInstanceAttribute only when the request sets the instance type (ec2:Attribute/InstanceType present)")
# Every statement on instances but the launch (request tag) and launch-time tagging needs the tag.
for s in stmts:
    if any(r.endswith(":instance/*") for r in as_list(s["Resource"])) and \
            not set(as_list(s["Action"])) <= {"ec2:RunInstances", "ec2:CreateTags"}:
        check(managed_instances_only(s), f"statement {s.get('Sid')} on instances requires setpoint:managed=true")
net = [s for s in run if any(":subnet/" in r for r in as_list(s["Resource"]))]
check(len(net) == 1 and all(":subnet/subnet-" in r or ":security-group/sg-" in r for r in as_list(net[0]["Resource"])),
      "RunInstances only into the configured subnet and security groups")

# --- every served region, on the same terms; the data volume ----------------------------------
# The engine's environment names the served regions: SETPOINT_AWS_REGION and the tables of
# SETPOINT_EC2_REGIONS (JSON, the keys of [ec2.regions.<name>]).
served = {region} | set(extra_regions)
check(served == {region, "us-east-1"}, f"the example serves the deployment region and us-east-1 ({sorted(served)})")
for s in stmts:
    arns = [r for r in as_list(s["Resource"]) if r.startswith("arn:aws:ec2:")]
    if arns:
        check({r.split(":")[3] for r in arns} == served, f"statement {s.get('Sid')} covers every served region, no other")
expected_net = {f"arn:aws:ec2:{region}:123456789012:subnet/{env.get('SETPOINT_EC2_SUBNET_ID')}"} | {
    f"arn:aws:ec2:{r}:123456789012:subnet/{t['subnet_ids'][0]}" for r, t in extra_regions.items()} | {
    f"arn:aws:ec2:{region}:123456789012:security-group/{g}" for g in env.get("SETPOINT_EC2_SECURITY_GROUP_IDS", "").split(",")} | {
    f"arn:aws:ec2:{r}:123456789012:security-group/{g}" for r, t in extra_regions.items() for g in t["security_group_ids"]}
check(len(net) == 1 and set(as_list(net[0]["Resource"])) == expected_net,
      "RunInstances only into each served region's configured subnet and security groups")
describe = [s for s in stmts if "*" in as_list(s["Resource"])]
check(len(describe) == 1 and sorted(as_list(describe[0]["Action"])) == ["ec2:DescribeInstances", "ec2:DescribeVolumes", "ec2:DescribeVolumesModifications"],
      "Describe only what the adapter reads: instances, volumes, volume modifications (no Describe*)")
grow = stmts_for("ec2:ModifyVolume")
check(len(grow) == 1 and as_list(grow[0]["Action"]) == ["ec2:ModifyVolume"]
      and all(r.endswith(":volume/*") for r in as_list(grow[0]["Resource"]))
      and grow[0].get("Condition", {}).get("StringEquals", {}).get("aws:ResourceTag/setpoint:managed") == "true",
      "ModifyVolume only on volumes tagged setpoint:managed=true")
for s in stmts:
    if any(r.endswith(":volume/*") for r in as_list(s["Resource"])):
        acts = set(as_list(s["Action"]))
        ok = (acts == {"ec2:RunInstances"}
              or (acts == {"ec2:CreateTags"} and s.get("Condition", {}).get("StringEquals", {}).get("ec2:CreateAction") == "RunInstances")
              or s.get("Condition", {}).get("StringEquals", {}).get("aws:ResourceTag/setpoint:managed") == "true")
        check(ok, f"statement {s.get('Sid')} on volumes: the launch, tags at launch, or managed volumes only")
check(any(r.endswith(":volume/*") for s in run for r in as_list(s["Resource"])),
      "RunInstances on volumes (the launch makes the data volume)")

# KMS: exactly the configured data volume keys, only through EC2 in their regions, grants only for AWS resources.
home_keys = [k["KeyArn"] for k in kms_client.list_keys()["Keys"]]
home_key = env.get("SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID")
check(home_key in home_keys, f"SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID is the given key ({home_key})")
extra_key = os.environ.get("EXTRA_REGION_KMS_ARN")
keys = {home_key, extra_key}
kms_stmts = [s for s in stmts if any(a.startswith("kms:") for a in as_list(s["Action"]))]
use = [s for s in kms_stmts if "kms:GenerateDataKeyWithoutPlaintext" in as_list(s["Action"])]
grant = [s for s in kms_stmts if "kms:CreateGrant" in as_list(s["Action"])]
check(len(kms_stmts) == 2 and all("*" not in as_list(s["Resource"]) for s in kms_stmts), "two KMS statements, none on *")
check(len(use) == 1 and set(as_list(use[0]["Action"])) == {"kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"}
      and set(as_list(use[0]["Resource"])) == keys
      and set(as_list(use[0].get("Condition", {}).get("StringEquals", {}).get("kms:ViaService", []))) == {f"ec2.{r}.amazonaws.com" for r in served},
      "KMS use of exactly the data volume keys, only via EC2 in the served regions")
check(len(grant) == 1 and as_list(grant[0]["Action"]) == ["kms:CreateGrant"] and set(as_list(grant[0]["Resource"])) == keys
      and str(grant[0].get("Condition", {}).get("Bool", {}).get("kms:GrantIsForAWSResource")).lower() == "true",
      "kms:CreateGrant on exactly the data volume keys, only for AWS resources (EBS)")

# --- the engine service and its configuration -------------------------------------------------
svc = ecs.describe_services(cluster=name, services=[f"{name}-engine"])["services"]
check(len(svc) == 1 and svc[0]["launchType"] == "FARGATE", "ECS Fargate service exists")
net_cfg = svc[0]["networkConfiguration"]["awsvpcConfiguration"]
check(net_cfg.get("assignPublicIp") == "DISABLED", "engine tasks get no public IP")
td = ecs.describe_task_definition(taskDefinition=svc[0]["taskDefinition"])["taskDefinition"]
engine = [c for c in td["containerDefinitions"] if c["name"] == "setpoint"][0]
env = {e["name"]: e["value"] for e in engine["environment"]}
secrets_env = {e["name"]: e["valueFrom"] for e in engine.get("secrets", [])}
for var in ["SETPOINT_DATABASE_HOST", "SETPOINT_DATABASE_PORT", "SETPOINT_DATABASE_NAME", "SETPOINT_DATABASE_USER",
            "SETPOINT_LISTEN", "SETPOINT_METRICS_LISTEN", "SETPOINT_AWS_REGION", "SETPOINT_EC2_SUBNET_ID",
            "SETPOINT_EC2_SECURITY_GROUP_IDS", "SETPOINT_EC2_IMAGE_ID", "SETPOINT_KUBERNETES_URL",
            "SETPOINT_KUBERNETES_CA_DATA", "SETPOINT_EMAIL_FROM", "RUST_LOG", "SETPOINT_EC2_PLAN_INSTANCE_TYPES",
            "SETPOINT_EC2_REGIONS", "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID"]:
    check(bool(env.get(var)), f"engine environment sets {var}")
check(sorted(env.get("SETPOINT_EC2_PLAN_INSTANCE_TYPES", "").split(",")) ==
      ["kvx.large=t3.large", "kvx.medium=t3.medium", "kvx.small=t3.small"],
      "each KVX plan has its instance type (resizing on a plan change)")
check("SETPOINT_SES_IDENTITY" not in env, "no SETPOINT_SES_IDENTITY (the engine sends over SMTP; nothing reads it)")
check(env.get("SETPOINT_KUBERNETES_URL", "").startswith("https://"), "SETPOINT_KUBERNETES_URL is https")
check(not any("TOKEN" in k for k in env), "no Kubernetes token in the plain environment")
check(env.get("SETPOINT_DATABASE_HOST") == db["Endpoint"]["Address"], "SETPOINT_DATABASE_HOST is the RDS endpoint")
check(env.get("SETPOINT_LISTEN") == "0.0.0.0:50051" and env.get("SETPOINT_METRICS_LISTEN") == "0.0.0.0:9090", "listen addresses")
check(env.get("SETPOINT_AWS_REGION") == region, "SETPOINT_AWS_REGION is the deployment region")
check(secrets_env.get("SETPOINT_DATABASE_PASSWORD") == secret["ARN"], "SETPOINT_DATABASE_PASSWORD comes from the secret (ECS secrets)")
check(not any("PASSWORD" in k for k in env), "no password in the plain environment")
check(set(secrets_env) == {"SETPOINT_DATABASE_PASSWORD", "SETPOINT_KUBERNETES_TOKEN", "SETPOINT_SMTP_URL",
                           "SETPOINT_SECRETS_KEY",
                           "SETPOINT_TLS_CERT_PEM", "SETPOINT_TLS_KEY_PEM", "SETPOINT_TLS_CLIENT_CA_PEM"},
      f"ECS secrets: database password, Kubernetes token, SMTP URL, secrets key, API TLS certificate, key, client CA ({sorted(secrets_env)})")
key_secrets = [x for x in sm.list_secrets()["SecretList"] if x["Name"] == "test/secrets-key"]
check(len(key_secrets) == 1 and secrets_env.get("SETPOINT_SECRETS_KEY") == key_secrets[0]["ARN"],
      "SETPOINT_SECRETS_KEY comes from the given key secret")
check("SETPOINT_SECRETS_KEY" not in env, "no secrets key in the plain environment")
for var, secret_name in [("SETPOINT_TLS_CERT_PEM", "test/grpc-tls-cert"), ("SETPOINT_TLS_KEY_PEM", "test/grpc-tls-key"),
                         ("SETPOINT_TLS_CLIENT_CA_PEM", "test/grpc-tls-client-ca")]:
    given = [x for x in sm.list_secrets()["SecretList"] if x["Name"] == secret_name]
    check(len(given) == 1 and secrets_env.get(var) == given[0]["ARN"], f"{var} comes from the given grpc_tls secret")
check(not any("PEM" in k for k in env), "no TLS material in the plain environment")
token_secrets = [x for x in sm.list_secrets()["SecretList"] if x["Name"] == "test/kubernetes-token"]
check(len(token_secrets) == 1 and secrets_env.get("SETPOINT_KUBERNETES_TOKEN") == token_secrets[0]["ARN"],
      "SETPOINT_KUBERNETES_TOKEN comes from the given token secret")
smtp_secrets = [x for x in sm.list_secrets()["SecretList"] if x["Name"].startswith(f"setpoint/{name}/smtp-url-")]
check(len(smtp_secrets) == 1 and secrets_env.get("SETPOINT_SMTP_URL") == smtp_secrets[0]["ARN"],
      "SETPOINT_SMTP_URL comes from the module's SMTP secret")
smtp_url = sm.get_secret_value(SecretId=smtp_secrets[0]["ARN"])["SecretString"] if smtp_secrets else ""
check(re.fullmatch(rf"smtp://[A-Z0-9]+:[A-Za-z0-9%]+@email-smtp\.{region}\.amazonaws\.com:587", smtp_url) is not None,
      "SMTP URL: SES SMTP credentials (percent-encoded) for email-smtp.REGION.amazonaws.com:587, STARTTLS")
check(bool(smtp_secrets) and bool(smtp_secrets[0].get("KmsKeyId")), "SMTP secret encrypted with the module's KMS key")

# The execution role reads exactly the engine's secrets.
exec_roles = [r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(f"{name}-exec-")]
check(len(exec_roles) == 1, "task execution role exists")
exec_docs = [iam.get_role_policy(RoleName=exec_roles[0]["RoleName"], PolicyName=p)["PolicyDocument"]
             for p in iam.list_role_policies(RoleName=exec_roles[0]["RoleName"])["PolicyNames"]] if exec_roles else []
exec_stmts = [st for d in exec_docs for st in (json.loads(d) if isinstance(d, str) else d)["Statement"]]
readable = {r for st in exec_stmts if "secretsmanager:GetSecretValue" in as_list(st["Action"]) for r in as_list(st["Resource"])}
check(readable == set(secrets_env.values()), "execution role may read exactly the engine secrets")
grace = env.get("SETPOINT_SHUTDOWN_GRACE", "")
check(grace.endswith("s") and 0 < int(grace[:-1]) < engine.get("stopTimeout", 30),
      f"shutdown grace {grace} ends before ECS kills the task (stopTimeout {engine.get('stopTimeout')}s)")
check(engine.get("readonlyRootFilesystem") is True, "engine container has a read-only root file system")
check(td.get("taskRoleArn", "").split("/")[-1] == role, "task runs as the engine role")

# --- the engine role has no SES permission; the SMTP user may only send from the identity -----
check(not any(a.startswith("ses:") for st in stmts for a in as_list(st["Action"])), "engine role has no SES permission (mail goes over SMTP)")
image_stmts = [st for st in run if any(":image/" in r for r in as_list(st["Resource"]))]
expected_images = {f"arn:aws:ec2:{region}::image/{env.get('SETPOINT_EC2_IMAGE_ID')}"} | {
    f"arn:aws:ec2:{r}::image/{t['default_image_id']}" for r, t in extra_regions.items()}
check(len(image_stmts) == 1 and set(as_list(image_stmts[0]["Resource"])) == expected_images,
      f"RunInstances only with the configured AMI of each served region ({sorted(expected_images)})")
smtp_users = [u["UserName"] for u in iam.list_users()["Users"] if u["UserName"] == f"{name}-ses-smtp"]
check(len(smtp_users) == 1, "SES SMTP user exists")
if smtp_users:
    user = smtp_users[0]
    check(iam.list_attached_user_policies(UserName=user)["AttachedPolicies"] == [], "SMTP user has no managed policy")
    upols = iam.list_user_policies(UserName=user)["PolicyNames"]
    udoc = iam.get_user_policy(UserName=user, PolicyName=upols[0])["PolicyDocument"] if len(upols) == 1 else {"Statement": []}
    udoc = json.loads(udoc) if isinstance(udoc, str) else udoc
    ust = udoc["Statement"]
    check(len(ust) == 1 and as_list(ust[0]["Action"]) == ["ses:SendRawEmail"]
          and ust[0].get("Condition", {}).get("StringEquals", {}).get("ses:FromAddress") == env.get("SETPOINT_EMAIL_FROM"),
          "SMTP user may only ses:SendRawEmail, only with the engine's From address")
    keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    check(len(keys) == 1 and smtp_url.startswith(f"smtp://{keys[0]['AccessKeyId']}:"), "SMTP URL uses the SMTP user's access key")

# --- SES, logs, alarms, load balancer ---------------------------------------------------------
idents = [i["IdentityName"] for i in ses.list_email_identities()["EmailIdentities"]]
sender = env.get("SETPOINT_EMAIL_FROM", "")
check(any(i in (sender, sender.split("@")[-1]) for i in idents), f"SES identity for {sender} exists ({idents})")
lg = logs.describe_log_groups(logGroupNamePrefix=f"/setpoint/{name}/")["logGroups"]
check(len(lg) >= 2 and all(g.get("kmsKeyId") and g.get("retentionInDays") for g in lg), "log groups encrypted, with retention")
alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]}
for suffix in ["queue-age", "parked-units", "db-cpu", "db-free-storage", "db-connections", "engine-running-tasks",
               "tls-certificate-expiry"]:
    check(f"{name}-{suffix}" in alarms, f"alarm {name}-{suffix} exists")
tls_alarm = alarms.get(f"{name}-tls-certificate-expiry", {})
check(tls_alarm.get("MetricName") == "setpoint_api_tls_certificate_expiry_seconds" and tls_alarm.get("Threshold") == 21 * 86400
      and tls_alarm.get("ComparisonOperator") == "LessThanThreshold",
      "TLS alarm: the engine's certificate expiry gauge below 21 days")
topics = [t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(f":{name}-alarms")]
check(len(topics) == 1 and all(a["AlarmActions"] == topics for a in alarms.values()), "every alarm notifies the alarm topic")
lbs = elb.describe_load_balancers()["LoadBalancers"]
check(len(lbs) == 1 and lbs[0]["Scheme"] == "internal", "gRPC load balancer is internal")
tgs = elb.describe_target_groups(LoadBalancerArn=lbs[0]["LoadBalancerArn"])["TargetGroups"] if lbs else []
check(len(tgs) == 1 and tgs[0]["Protocol"] == "TCP" and tgs[0]["Port"] == 50051, "gRPC target group: TCP pass-through on 50051")
hc = tgs[0] if tgs else {}
check(hc.get("HealthCheckProtocol") == "TCP" and str(hc.get("HealthCheckPort")) in ("traffic-port", "50051"),
      f"load balancer health check: the gRPC port accepts connections ({hc.get('HealthCheckProtocol')} {hc.get('HealthCheckPort')})")

print(f"summary: {len(checks) - len(failures)}/{len(checks)} read-back checks after apply passed")
sys.exit(1 if failures else 0)
