data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  tags = merge(var.tags, { "setpoint:deployment" = var.name })

  # SES: a domain identity, or a single address.
  ses_is_email = strcontains(var.ses_identity, "@")
  email_from   = coalesce(var.email_from, local.ses_is_email ? var.ses_identity : "setpoint@${var.ses_identity}")

  db_port = 5432
  # RDS parameter group family from the major version ("15.7" -> "postgres15").
  db_family = "postgres${split(".", var.db_engine_version)[0]}"

  log_group_engine  = "/setpoint/${var.name}/engine"
  log_group_metrics = "/setpoint/${var.name}/prometheus"
}

# One customer-managed key for everything the module encrypts: RDS storage, Performance Insights,
# the database secret, the log groups and the alarm topic.
data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:Key policies must name the account root with kms:* (resource "*" means this key); otherwise the key becomes unmanageable.
  #checkov:skip=CKV_AWS_111:Same as above: a key policy's resource is always the key itself.
  #checkov:skip=CKV_AWS_356:A key policy's resource "*" refers to the key the policy is attached to.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsUse"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
    }
  }

  statement {
    sid       = "CloudWatchAlarmsPublishToTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "setpoint ${var.name}: RDS, secrets, logs, alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/setpoint-${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
