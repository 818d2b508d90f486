data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# ---------------------------------------------------------------------------------------------
# Execution role: what ECS itself needs to start a task (pull the image, write logs, read secrets).
# ---------------------------------------------------------------------------------------------
resource "aws_iam_role" "execution" {
  name_prefix        = "${var.name}-exec-"
  description        = "ECS task execution role of setpoint ${var.name}"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    sid       = "ReadEngineSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = distinct(values(local.engine_secrets))
  }
  statement {
    sid       = "DecryptEngineSecrets"
    actions   = ["kms:Decrypt"]
    resources = concat([aws_kms_key.this.arn], var.secrets_kms_key_arns)
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name_prefix = "secrets-"
  role        = aws_iam_role.execution.id
  policy      = data.aws_iam_policy_document.execution_secrets.json
}

# ---------------------------------------------------------------------------------------------
# Task role: what the engine (and its metrics sidecar) may do in AWS. Least privilege for EC2:
#  - launch only instances that carry the request tag setpoint:managed=true, only into the
#    configured subnet and security groups;
#  - create tags only as part of RunInstances (ec2:CreateAction), only on the new instance,
#    never on existing resources;
#  - terminate only instances that carry setpoint:managed=true;
#  - resize (a plan change) only instances that carry setpoint:managed=true: stop, start, and
#    ModifyInstanceAttribute only when the request sets the instance type (not user data,
#    security groups, termination protection or any other attribute);
#  - describe anything (Describe* cannot be scoped to resources).
# ---------------------------------------------------------------------------------------------
resource "aws_iam_role" "engine" {
  name_prefix        = "${var.name}-engine-"
  description        = "Task role of the setpoint ${var.name} engine"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

locals {
  ec2_arn = "arn:${local.partition}:ec2:${local.region}:${local.account_id}"
}

data "aws_iam_policy_document" "engine" {
  #checkov:skip=CKV_AWS_356:Only ec2:Describe* has resource "*": EC2 Describe actions support no resource-level permissions. Every mutating action is scoped by ARN and tag conditions.
  statement {
    sid       = "Ec2Describe"
    actions   = ["ec2:Describe*"]
    resources = ["*"]
  }

  statement {
    sid       = "Ec2LaunchOnlyTaggedInstances"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/setpoint:managed"
      values   = ["true"]
    }
  }

  statement {
    sid     = "Ec2LaunchOnlyIntoConfiguredNetwork"
    actions = ["ec2:RunInstances"]
    resources = concat(
      ["${local.ec2_arn}:subnet/${var.ec2_subnet_id}"],
      [for sg in var.ec2_security_group_ids : "${local.ec2_arn}:security-group/${sg}"],
    )
  }

  # What a launch creates or reads besides the instance: its network interface and volumes,
  # and the snapshots behind an EBS-backed image. No key pair or launch template: the engine
  # names neither, and EC2 checks only the resources a request names.
  statement {
    sid     = "Ec2LaunchSupportingResources"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:network-interface/*",
      "${local.ec2_arn}:volume/*",
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
    ]
  }

  statement {
    sid       = "Ec2LaunchOnlyTheConfiguredImage"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}::image/${var.ec2_image_id}"]
  }

  statement {
    sid     = "Ec2TagOnlyOnLaunch"
    actions = ["ec2:CreateTags"]
    # The launch tags only the instance (its TagSpecifications name no volume or interface).
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "Ec2TerminateOnlyManagedInstances"
    actions   = ["ec2:TerminateInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/setpoint:managed"
      values   = ["true"]
    }
  }

  # Resizing on a plan change (adapters/ec2 resize_instance): stop, change the type, start.
  statement {
    sid       = "Ec2StopStartOnlyManagedInstances"
    actions   = ["ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/setpoint:managed"
      values   = ["true"]
    }
  }

  # ModifyInstanceAttribute changes one attribute per call, and can change user data, security
  # groups, termination/stop protection, the shutdown behaviour and more. The engine only ever
  # sets the instance type, so the request must carry ec2:Attribute/InstanceType (a key of this
  # action in the Service Authorization Reference; present when the request sets the instance
  # type). Its presence is tested rather than the value of ec2:Attribute: condition key names
  # are case-insensitive, whereas the exact value ec2:Attribute takes is not documented.
  statement {
    sid       = "Ec2ResizeOnlyManagedInstances"
    actions   = ["ec2:ModifyInstanceAttribute"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/setpoint:managed"
      values   = ["true"]
    }
    condition {
      test     = "Null"
      variable = "ec2:Attribute/InstanceType"
      values   = ["false"]
    }
  }

  dynamic "statement" {
    for_each = var.enable_prometheus_metrics ? [1] : []
    content {
      sid       = "PrometheusSidecarPublishesMetrics"
      actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
      resources = ["${aws_cloudwatch_log_group.metrics[0].arn}:*"]
    }
  }
}

resource "aws_iam_role_policy" "engine" {
  name_prefix = "engine-"
  role        = aws_iam_role.engine.id
  policy      = data.aws_iam_policy_document.engine.json
}
