# Alarms on what matters for a work queue: is work waiting too long, is work parked for an operator,
# are engines running, is the database healthy. All alarms notify one encrypted SNS topic.

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_sns_topic_subscription" "alarm_email" {
  for_each  = toset(var.alarm_email_addresses)
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]
  # The engine's gauge of the seconds left until the API's certificate expires (src/metrics.rs).
  tls_expiry_metric = "setpoint_api_tls_certificate_expiry_seconds"

  # Queue alarms read the engine's Prometheus gauges, published by the CloudWatch agent sidecar.
  queue_alarms = var.enable_prometheus_metrics ? {
    queue-age = {
      description = "The oldest runnable work unit has waited more than ${var.queue_age_alarm_seconds}s: engines are down, stuck or too few."
      metric      = var.queue_age_metric_name
      threshold   = var.queue_age_alarm_seconds
      # No data means no engine is publishing metrics: that is an outage too.
      missing = "breaching"
    }
    parked-units = {
      description = "More than ${var.parked_units_alarm_threshold} work units are parked and wait for an operator (setpoint work list --state parked; retry or cancel)."
      metric      = var.parked_units_metric_name
      threshold   = var.parked_units_alarm_threshold
      missing     = "notBreaching"
    }
  } : {}

  db_alarms = {
    db-cpu = {
      description = "Database CPU above 80% for 15 minutes."
      metric      = "CPUUtilization"
      statistic   = "Average"
      comparison  = "GreaterThanThreshold"
      threshold   = 80
    }
    db-free-storage = {
      description = "Database free storage below 2 GiB (autoscaling ceiling reached, or bloat: check vacuum of the work table)."
      metric      = "FreeStorageSpace"
      statistic   = "Minimum"
      comparison  = "LessThanThreshold"
      threshold   = 2 * 1024 * 1024 * 1024
    }
    db-connections = {
      description = "Database connections above ${var.db_max_connections_alarm}."
      metric      = "DatabaseConnections"
      statistic   = "Maximum"
      comparison  = "GreaterThanThreshold"
      threshold   = var.db_max_connections_alarm
    }
    db-freeable-memory = {
      description = "Database freeable memory below 128 MiB."
      metric      = "FreeableMemory"
      statistic   = "Minimum"
      comparison  = "LessThanThreshold"
      threshold   = 128 * 1024 * 1024
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "queue" {
  for_each            = local.queue_alarms
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.description
  namespace           = var.metrics_namespace
  metric_name         = each.value.metric
  dimensions          = { service = var.name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.threshold
  treat_missing_data  = each.value.missing
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "db" {
  for_each            = local.db_alarms
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.description
  namespace           = "AWS/RDS"
  metric_name         = each.value.metric
  dimensions          = { DBInstanceIdentifier = aws_db_instance.this.identifier }
  statistic           = each.value.statistic
  period              = 300
  evaluation_periods  = 3
  comparison_operator = each.value.comparison
  threshold           = each.value.threshold
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "engine_running_tasks" {
  alarm_name          = "${var.name}-engine-running-tasks"
  alarm_description   = "Fewer engine tasks run than desired (${var.engine_desired_count}): tasks crash or cannot start (image, secrets, database)."
  namespace           = "ECS/ContainerInsights"
  metric_name         = "RunningTaskCount"
  dimensions          = { ClusterName = aws_ecs_cluster.this.name, ServiceName = aws_ecs_service.engine.name }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "LessThanThreshold"
  threshold           = var.engine_desired_count
  treat_missing_data  = var.engine_desired_count > 0 ? "breaching" : "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "engine_memory" {
  alarm_name          = "${var.name}-engine-memory"
  alarm_description   = "Engine memory above 85% of the task's memory."
  namespace           = "AWS/ECS"
  metric_name         = "MemoryUtilization"
  dimensions          = { ClusterName = aws_ecs_cluster.this.name, ServiceName = aws_ecs_service.engine.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = 85
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "grpc_unhealthy_targets" {
  count               = var.create_load_balancer ? 1 : 0
  alarm_name          = "${var.name}-grpc-unhealthy-targets"
  alarm_description   = "The load balancer sees unhealthy engine tasks on the gRPC port."
  namespace           = "AWS/NetworkELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = { LoadBalancer = aws_lb.grpc[0].arn_suffix, TargetGroup = aws_lb_target_group.grpc[0].arn_suffix }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# The API's TLS certificate (grpc_tls): renewing it takes a secret update and a new deployment, so
# warn well before clients start refusing it. Every engine serves the same certificate.
resource "aws_cloudwatch_metric_alarm" "tls_certificate_expiry" {
  count               = var.enable_prometheus_metrics && var.grpc_tls != null ? 1 : 0
  alarm_name          = "${var.name}-tls-certificate-expiry"
  alarm_description   = "The gRPC API's TLS certificate expires in less than ${var.tls_certificate_expiry_alarm_days} days: put a renewed one in the grpc_tls secrets and force a new deployment."
  namespace           = var.metrics_namespace
  metric_name         = local.tls_expiry_metric
  dimensions          = { service = var.name }
  statistic           = "Minimum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "LessThanThreshold"
  threshold           = var.tls_certificate_expiry_alarm_days * 86400
  # The queue-age alarm already reports engines that publish nothing.
  treat_missing_data = "notBreaching"
  alarm_actions      = local.alarm_actions
  ok_actions         = local.alarm_actions
  tags               = local.tags
}
