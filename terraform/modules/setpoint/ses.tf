# SES sending identity. A domain identity gets Easy DKIM; publish the three CNAME records from the
# ses_dkim_tokens output. An address identity is verified by the link SES mails to it.
resource "aws_sesv2_email_identity" "this" {
  email_identity = var.ses_identity
  tags           = local.tags
}
