output "engine_environment" {
  description = "Environment of the engine container (no secrets): database host/port/name/user, listen addresses, AWS region, EC2 subnet, security groups, AMI and data volume KMS key, the other served regions (SETPOINT_EC2_REGIONS), Kubernetes API URL (and CA bundle, workload image), From address, RUST_LOG."
  value       = local.engine_environment
}

output "engine_secrets" {
  description = "Environment names the engine gets from Secrets Manager at task start, mapped to the secret ARNs: SETPOINT_DATABASE_PASSWORD, SETPOINT_KUBERNETES_TOKEN and SETPOINT_SMTP_URL."
  value       = local.engine_secrets
}

output "smtp_url_secret_arn" {
  description = "ARN of the secret holding the engine's SMTP URL: the one the module made from SES SMTP credentials, or smtp_url_secret_arn."
  value       = local.smtp_url_secret_arn
}

output "ses_smtp_user_name" {
  description = "IAM user whose access key the SES SMTP credentials derive from (null when smtp_url_secret_arn is given)."
  value       = local.create_smtp_credentials ? aws_iam_user.smtp[0].name : null
}

output "database_address" {
  description = "Host name of the RDS PostgreSQL instance (private)."
  value       = aws_db_instance.this.address
}

output "database_port" {
  description = "Port of the RDS PostgreSQL instance."
  value       = aws_db_instance.this.port
}

output "database_name" {
  description = "Name of the setpoint database."
  value       = var.db_name
}

output "database_username" {
  description = "Database user of the engine."
  value       = var.db_username
}

output "database_password_secret_arn" {
  description = "ARN of the Secrets Manager secret that holds the database password (a plain string)."
  value       = aws_secretsmanager_secret.db_password.arn
}

output "database_security_group_id" {
  description = "Security group of the database (ingress only from engine_security_group_id)."
  value       = aws_security_group.db.id
}

output "engine_security_group_id" {
  description = "Security group of the engine tasks."
  value       = aws_security_group.engine.id
}

output "engine_task_role_arn" {
  description = "IAM role the engine runs as (least-privilege EC2 policy; it needs no SES permission, mail goes over SMTP)."
  value       = aws_iam_role.engine.arn
}

output "engine_execution_role_arn" {
  description = "IAM role ECS uses to start engine tasks (image pull, logs, secrets)."
  value       = aws_iam_role.execution.arn
}

output "ecs_cluster_name" {
  description = "Name of the ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "ecs_service_name" {
  description = "Name of the engine's ECS service."
  value       = aws_ecs_service.engine.name
}

output "task_definition_arn" {
  description = "ARN (with revision) of the engine task definition; run one-off commands such as setpoint migrations with it."
  value       = aws_ecs_task_definition.engine.arn
}

output "grpc_endpoint" {
  description = "host:port of the engine's gRPC API on the internal load balancer (null without a load balancer)."
  value       = var.create_load_balancer ? "${aws_lb.grpc[0].dns_name}:${var.grpc_port}" : null
}

output "console_url" {
  description = "URL of the web console on the internal load balancer (null when console_port is not set or there is no load balancer)."
  value       = local.console_lb ? "${var.grpc_tls == null ? "http" : "https"}://${aws_lb.grpc[0].dns_name}:${var.console_port}" : null
}

output "log_group_name" {
  description = "CloudWatch log group of the engine (and its metrics sidecar)."
  value       = aws_cloudwatch_log_group.engine.name
}

output "alarm_topic_arn" {
  description = "SNS topic every alarm notifies; subscribe your pager to it."
  value       = aws_sns_topic.alarms.arn
}

output "alarm_names" {
  description = "Names of the CloudWatch alarms the module created."
  value = concat(
    [for a in aws_cloudwatch_metric_alarm.queue : a.alarm_name],
    [for a in aws_cloudwatch_metric_alarm.db : a.alarm_name],
    [aws_cloudwatch_metric_alarm.engine_running_tasks.alarm_name, aws_cloudwatch_metric_alarm.engine_memory.alarm_name],
    [for a in aws_cloudwatch_metric_alarm.grpc_unhealthy_targets : a.alarm_name],
    [for a in aws_cloudwatch_metric_alarm.tls_certificate_expiry : a.alarm_name],
  )
}

output "ses_identity_arn" {
  description = "ARN of the SES sending identity."
  value       = aws_sesv2_email_identity.this.arn
}

output "ses_dkim_tokens" {
  description = "Easy DKIM tokens of a domain identity: publish <token>._domainkey.<domain> CNAME <token>.dkim.amazonses.com for each."
  value       = aws_sesv2_email_identity.this.dkim_signing_attributes[0].tokens
}

output "kms_key_arn" {
  description = "ARN of the customer-managed KMS key that encrypts the database, the secret, the logs and the alarm topic."
  value       = aws_kms_key.this.arn
}

output "ec2_regions" {
  description = "Every EC2 region the engine serves and its role may act in: the deployment region and the keys of ec2_additional_regions, sorted."
  value       = local.ec2_region_names
}
