#!/usr/bin/env python3
"""Checks what `terraform apply` of the example made in moto, and that `destroy` removed it.

usage: verify_moto.py applied|destroyed ENDPOINT REGION NAME STATE_FILE

Reads back through the AWS APIs (boto3 against the moto server) the properties the module
promises: private encrypted database with backups, the password only in Secrets Manager (and not
in the Terraform state), the database reachable only from the engine, the least-privilege EC2
policy, the engine's environment and secrets, the SES identity, logs and alarms.
"""
import json
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
term = stmts_for("ec2:TerminateInstances")
check(len(term) == 1 and term[0].get("Condition", {}).get("StringEquals", {}).get("aws:ResourceTag/setpoint:managed") == "true",
      "TerminateInstances only on instances tagged setpoint:managed=true")
net = [s for s in run if any(":subnet/" in r for r in as_list(s["Resource"]))]
check(len(net) == 1 and all(":subnet/subnet-" in r or ":security-group/sg-" in r for r in as_list(net[0]["Resource"])),
      "RunInstances only into the configured subnet and security groups")

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
            "SETPOINT_EC2_SECURITY_GROUP_IDS", "SETPOINT_SES_IDENTITY", "RUST_LOG"]:
    check(bool(env.get(var)), f"engine environment sets {var}")
check(env.get("SETPOINT_DATABASE_HOST") == db["Endpoint"]["Address"], "SETPOINT_DATABASE_HOST is the RDS endpoint")
check(env.get("SETPOINT_LISTEN") == "0.0.0.0:50051" and env.get("SETPOINT_METRICS_LISTEN") == "0.0.0.0:9090", "listen addresses")
check(env.get("SETPOINT_AWS_REGION") == region, "SETPOINT_AWS_REGION is the deployment region")
check(secrets_env.get("SETPOINT_DATABASE_PASSWORD") == secret["ARN"], "SETPOINT_DATABASE_PASSWORD comes from the secret (ECS secrets)")
check(not any("PASSWORD" in k for k in env), "no password in the plain environment")
grace = env.get("SETPOINT_SHUTDOWN_GRACE", "")
check(grace.endswith("s") and 0 < int(grace[:-1]) < engine.get("stopTimeout", 30),
      f"shutdown grace {grace} ends before ECS kills the task (stopTimeout {engine.get('stopTimeout')}s)")
check(engine.get("readonlyRootFilesystem") is True, "engine container has a read-only root file system")
check(td.get("taskRoleArn", "").split("/")[-1] == role, "task runs as the engine role")

# --- SES, logs, alarms, load balancer ---------------------------------------------------------
ident = env.get("SETPOINT_SES_IDENTITY")
check(ses.get_email_identity(EmailIdentity=ident)["IdentityType"] in ("EMAIL_ADDRESS", "DOMAIN"), f"SES identity {ident} exists")
lg = logs.describe_log_groups(logGroupNamePrefix=f"/setpoint/{name}/")["logGroups"]
check(len(lg) >= 2 and all(g.get("kmsKeyId") and g.get("retentionInDays") for g in lg), "log groups encrypted, with retention")
alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"]}
for suffix in ["queue-age", "parked-units", "db-cpu", "db-free-storage", "db-connections", "engine-running-tasks"]:
    check(f"{name}-{suffix}" in alarms, f"alarm {name}-{suffix} exists")
topics = [t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(f":{name}-alarms")]
check(len(topics) == 1 and all(a["AlarmActions"] == topics for a in alarms.values()), "every alarm notifies the alarm topic")
lbs = elb.describe_load_balancers()["LoadBalancers"]
check(len(lbs) == 1 and lbs[0]["Scheme"] == "internal", "gRPC load balancer is internal")

print(f"summary: {len(checks) - len(failures)}/{len(checks)} read-back checks after apply passed")
sys.exit(1 if failures else 0)
