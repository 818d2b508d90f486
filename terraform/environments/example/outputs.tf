output "vpc_id" {
  description = "VPC of the environment."
  value       = aws_vpc.this.id
}

output "grpc_endpoint" {
  description = "host:port of setpoint's gRPC API on the internal load balancer (reachable from inside the VPC)."
  value       = module.setpoint.grpc_endpoint
}

output "console_url" {
  description = "URL of setpoint's web console on the internal load balancer (null unless console_port is set)."
  value       = module.setpoint.console_url
}

output "engine_environment" {
  description = "Environment the engine container runs with (no secrets)."
  value       = module.setpoint.engine_environment
}

output "engine_secrets" {
  description = "Environment names injected from Secrets Manager, with their secret ARNs."
  value       = module.setpoint.engine_secrets
}

output "database_address" {
  description = "Private host name of the PostgreSQL database."
  value       = module.setpoint.database_address
}

output "database_password_secret_arn" {
  description = "Secrets Manager ARN of the database password."
  value       = module.setpoint.database_password_secret_arn
}

output "ecs_cluster_name" {
  description = "ECS cluster running the engine."
  value       = module.setpoint.ecs_cluster_name
}

output "ecs_service_name" {
  description = "ECS service of the engine."
  value       = module.setpoint.ecs_service_name
}

output "engine_task_role_arn" {
  description = "IAM role of the engine (least-privilege EC2)."
  value       = module.setpoint.engine_task_role_arn
}

output "alarm_topic_arn" {
  description = "SNS topic of all alarms."
  value       = module.setpoint.alarm_topic_arn
}

output "ses_dkim_tokens" {
  description = "DKIM tokens to publish when ses_identity is a domain."
  value       = module.setpoint.ses_dkim_tokens
}

output "smtp_url_secret_arn" {
  description = "Secret holding the SMTP URL (SES SMTP credentials) the engine sends mail through."
  value       = module.setpoint.smtp_url_secret_arn
}

output "ec2_regions" {
  description = "Every EC2 region the engine serves: var.region and the keys of ec2_additional_regions."
  value       = module.setpoint.ec2_regions
}
