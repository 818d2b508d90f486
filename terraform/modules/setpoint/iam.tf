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
# Task role: what the engine (and its metrics sidecar) may do in AWS. Least privilege for EC2, in
# every served region (the deployment region and ec2_additional_regions), each on the same terms:
#  - launch only instances that carry the request tag setpoint:managed=true, only into the
#    region's configured subnet and security groups, only with its configured image;
#  - create tags only as part of RunInstances (ec2:CreateAction), only on the new instance and
#    the volumes the launch makes, never on existing resources;
#  - terminate only instances that carry setpoint:managed=true;
#  - resize (a plan change) only instances that carry setpoint:managed=true: stop, start, and
#    ModifyInstanceAttribute only when the request sets the instance type (not user data,
#    security groups, termination protection or any other attribute);
#  - grow (ModifyVolume) only volumes that carry setpoint:managed=true (the launch tags them);
#  - describe exactly what the adapter reads: instances, volumes, volume modifications;
#  - with a data volume KMS key: what EBS needs of that key, only through EC2 in its region.
# ---------------------------------------------------------------------------------------------
resource "aws_iam_role" "engine" {
  name_prefix        = "${var.name}-engine-"
  description        = "Task role of the setpoint ${var.name} engine"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

locals {
  # Every region the engine serves, with what it launches there.
  ec2_regions = merge(var.ec2_additional_regions, {
    (local.region) = {
      subnet_id               = var.ec2_subnet_id
      security_group_ids      = var.ec2_security_group_ids
      image_id                = var.ec2_image_id
      data_volume_kms_key_arn = var.ec2_data_volume_kms_key_arn
    }
  })
  ec2_region_names = sort(keys(local.ec2_regions))
  # arn:PARTITION:ec2:REGION:ACCOUNT per served region.
  ec2_arns = [for r in local.ec2_region_names : "arn:${local.partition}:ec2:${r}:${local.account_id}"]
  # The data volume keys, and the EC2 endpoints they may be used through.
  data_volume_kms_regions = [for r in local.ec2_region_names : r if local.ec2_regions[r].data_volume_kms_key_arn != null]
  data_volume_kms_keys    = [for r in local.data_volume_kms_regions : local.ec2_regions[r].data_volume_kms_key_arn]
}

data "aws_iam_policy_document" "engine" {
  #checkov:skip=CKV_AWS_356:Only the three EC2 Describe actions have resource "*": EC2 Describe actions support no resource-level permissions. Every mutating action is scoped by ARN and tag conditions.
  statement {
    sid       = "Ec2Describe"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeVolumes", "ec2:DescribeVolumesModifications"]
    resources = ["*"]
  }

  statement {
    sid       = "Ec2LaunchOnlyTaggedInstances"
    actions   = ["ec2:RunInstances"]
    resources = [for a in local.ec2_arns : "${a}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/setpoint:managed"
      values   = ["true"]
    }
  }

  statement {
    sid     = "Ec2LaunchOnlyIntoConfiguredNetwork"
    actions = ["ec2:RunInstances"]
    resources = flatten([
      for r in local.ec2_region_names : concat(
        ["arn:${local.partition}:ec2:${r}:${local.account_id}:subnet/${local.ec2_regions[r].subnet_id}"],
        [for sg in local.ec2_regions[r].security_group_ids : "arn:${local.partition}:ec2:${r}:${local.account_id}:security-group/${sg}"],
      )
    ])
  }

  # What a launch creates or reads besides the instance: its network interface and volumes (the
  # root volume and the data volume of its block device mapping), and the snapshots behind an
  # EBS-backed image. No key pair or launch template: the engine names neither, and EC2 checks
  # only the resources a request names.
  statement {
    sid     = "Ec2LaunchSupportingResources"
    actions = ["ec2:RunInstances"]
    resources = flatten([
      for r in local.ec2_region_names : [
        "arn:${local.partition}:ec2:${r}:${local.account_id}:network-interface/*",
        "arn:${local.partition}:ec2:${r}:${local.account_id}:volume/*",
        "arn:${local.partition}:ec2:${r}::snapshot/*",
      ]
    ])
  }

  statement {
    sid       = "Ec2LaunchOnlyTheConfiguredImage"
    actions   = ["ec2:RunInstances"]
    resources = [for r in local.ec2_region_names : "arn:${local.partition}:ec2:${r}::image/${local.ec2_regions[r].image_id}"]
  }

  statement {
    sid     = "Ec2TagOnlyOnLaunch"
    actions = ["ec2:CreateTags"]
    # The launch tags the instance and the volumes it makes (TagSpecifications of both types).
    resources = flatten([for a in local.ec2_arns : ["${a}:instance/*", "${a}:volume/*"]])
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "Ec2TerminateOnlyManagedInstances"
    actions   = ["ec2:TerminateInstances"]
    resources = [for a in local.ec2_arns : "${a}:instance/*"]
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
    resources = [for a in local.ec2_arns : "${a}:instance/*"]
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
    resources = [for a in local.ec2_arns : "${a}:instance/*"]
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

  # Growing the data volume on a size change (resize_instance): only volumes the launch tagged.
  statement {
    sid       = "Ec2GrowOnlyManagedVolumes"
    actions   = ["ec2:ModifyVolume"]
    resources = [for a in local.ec2_arns : "${a}:volume/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/setpoint:managed"
      values   = ["true"]
    }
  }

  # A data volume encrypted with a customer managed key: EBS asks KMS for a data key and a grant
  # on the caller's behalf (the EBS encryption requirements list these actions). Only the
  # configured keys, only through EC2 in their regions; grants only for AWS resources.
  dynamic "statement" {
    for_each = length(local.data_volume_kms_keys) > 0 ? [1] : []
    content {
      sid       = "KmsDataVolumeKeysThroughEc2"
      actions   = ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"]
      resources = local.data_volume_kms_keys
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = [for r in local.data_volume_kms_regions : "ec2.${r}.amazonaws.com"]
      }
    }
  }

  dynamic "statement" {
    for_each = length(local.data_volume_kms_keys) > 0 ? [1] : []
    content {
      sid       = "KmsDataVolumeGrantsForEbs"
      actions   = ["kms:CreateGrant"]
      resources = local.data_volume_kms_keys
      condition {
        test     = "Bool"
        variable = "kms:GrantIsForAWSResource"
        values   = ["true"]
      }
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

  lifecycle {
    # The deployment region is configured by ec2_subnet_id & co.; naming it again would leave
    # two configurations of one region, of which the engine would take only one.
    precondition {
      condition     = !contains(keys(var.ec2_additional_regions), local.region)
      error_message = "ec2_additional_regions names ${local.region}, the deployment region: configure it with ec2_subnet_id, ec2_security_group_ids, ec2_image_id and ec2_data_volume_kms_key_arn instead."
    }
    # KMS keys are regional: EBS in this region can only use a key of this region.
    precondition {
      condition     = var.ec2_data_volume_kms_key_arn == null || split(":", coalesce(var.ec2_data_volume_kms_key_arn, "a:b:c:d"))[3] == local.region
      error_message = "ec2_data_volume_kms_key_arn must be a key in the deployment region ${local.region} (EBS uses keys of its own region only)."
    }
  }
}
