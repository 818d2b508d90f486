# SES sending identity. A domain identity gets Easy DKIM; publish the three CNAME records from the
# ses_dkim_tokens output. An address identity is verified by the link SES mails to it.
resource "aws_sesv2_email_identity" "this" {
  email_identity = var.ses_identity
  tags           = local.tags
}

# How the engine sends: over SMTP (its e-mail adapter speaks SMTP only), to the SES SMTP endpoint
# of this region with SES SMTP credentials, given to it as SETPOINT_SMTP_URL from a secret.
#
# SES SMTP credentials can only be derived from an IAM user's access key (the task role's
# temporary credentials cannot sign in to SES SMTP). Unless smtp_url_secret_arn names a secret
# you made yourself, the module makes that user (allowed only ses:SendRawEmail from the SES
# identity with the engine's From address), its access key, and a secret with the URL. The
# access key's secret and the derived SMTP password are in the Terraform state (as for every
# aws_iam_access_key): keep the state encrypted and access-controlled, or make the credentials
# outside Terraform and pass smtp_url_secret_arn. Rotate with
# `terraform apply -replace='module.setpoint.aws_iam_access_key.smtp[0]'`, then redeploy.
locals {
  create_smtp_credentials = var.smtp_url_secret_arn == null
  ses_smtp_endpoint       = "email-smtp.${local.region}.amazonaws.com:587"
  smtp_url_secret_arn     = local.create_smtp_credentials ? aws_secretsmanager_secret.smtp_url[0].arn : var.smtp_url_secret_arn
}

resource "aws_iam_user" "smtp" {
  #checkov:skip=CKV_AWS_273:SES SMTP credentials can only be derived from an IAM user's access key; this user has no console access and may only send mail from the SES identity.
  count = local.create_smtp_credentials ? 1 : 0
  name  = "${var.name}-ses-smtp"
  path  = "/setpoint/"
  tags  = local.tags
}

data "aws_iam_policy_document" "smtp" {
  statement {
    sid       = "SendFromTheIdentityOnly"
    actions   = ["ses:SendRawEmail"]
    resources = [aws_sesv2_email_identity.this.arn]
    condition {
      test     = "StringEquals"
      variable = "ses:FromAddress"
      values   = [local.email_from]
    }
  }
}

resource "aws_iam_user_policy" "smtp" {
  #checkov:skip=CKV_AWS_40:SES SMTP needs an IAM user (see above); the user exists only for this one policy, so a group would add nothing.
  count  = local.create_smtp_credentials ? 1 : 0
  name   = "ses-smtp-send"
  user   = aws_iam_user.smtp[0].name
  policy = data.aws_iam_policy_document.smtp.json
}

resource "aws_iam_access_key" "smtp" {
  count = local.create_smtp_credentials ? 1 : 0
  user  = aws_iam_user.smtp[0].name
}

resource "aws_secretsmanager_secret" "smtp_url" {
  #checkov:skip=CKV2_AWS_57:The value derives from an IAM access key that Terraform owns; rotate by replacing aws_iam_access_key.smtp (see above), which rewrites this secret.
  count                   = local.create_smtp_credentials ? 1 : 0
  name_prefix             = "setpoint/${var.name}/smtp-url-"
  description             = "SMTP URL (SES SMTP credentials) the setpoint ${var.name} engine sends mail through."
  kms_key_id              = aws_kms_key.this.arn
  recovery_window_in_days = 7
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "smtp_url" {
  count     = local.create_smtp_credentials ? 1 : 0
  secret_id = aws_secretsmanager_secret.smtp_url[0].id
  # smtp:// is STARTTLS for the engine; user and password percent-encoded (the password may hold
  # '+' and '/').
  secret_string = "smtp://${urlencode(aws_iam_access_key.smtp[0].id)}:${urlencode(aws_iam_access_key.smtp[0].ses_smtp_password_v4)}@${local.ses_smtp_endpoint}"
}
