# The engine as an ECS Fargate service. Engines coordinate only through Postgres, so the service
# is a plain replicated service: no leader, any task may die, rolling deployments are safe.

locals {
  # Everything the engine is configured with, taken from the resources above. Exposed as the
  # engine_environment output so other runtimes (a CLI job, a local shell) can use the same values.
  # With engine_secrets below, this is all `setpoint serve` needs: EC2, Kubernetes and SMTP are
  # all configured, so the KVX workflows run (tests/serve_config.rs starts the engine with exactly
  # these names).
  module_environment = merge(
    {
      SETPOINT_DATABASE_HOST          = aws_db_instance.this.address
      SETPOINT_DATABASE_PORT          = tostring(aws_db_instance.this.port)
      SETPOINT_DATABASE_NAME          = var.db_name
      SETPOINT_DATABASE_USER          = var.db_username
      SETPOINT_DATABASE_SSLMODE       = "require"
      SETPOINT_SHUTDOWN_GRACE         = "${var.engine_stop_timeout - 15}s"
      SETPOINT_LOG_FORMAT             = "json"
      SETPOINT_LISTEN                 = "0.0.0.0:${var.grpc_port}"
      SETPOINT_METRICS_LISTEN         = "0.0.0.0:${var.metrics_port}"
      SETPOINT_AWS_REGION             = local.region
      SETPOINT_EC2_SUBNET_ID          = var.ec2_subnet_id
      SETPOINT_EC2_SECURITY_GROUP_IDS = join(",", var.ec2_security_group_ids)
      SETPOINT_EC2_IMAGE_ID           = var.ec2_image_id
      SETPOINT_EC2_PLAN_INSTANCE_TYPES = join(",", [
        for plan, type in var.ec2_plan_instance_types : "${plan}=${type}"
      ])
      SETPOINT_KUBERNETES_URL = var.kubernetes_api_endpoint
      SETPOINT_EMAIL_FROM     = local.email_from
      RUST_LOG                = var.rust_log
    },
    var.kubernetes_ca_data == null ? {} : { SETPOINT_KUBERNETES_CA_DATA = var.kubernetes_ca_data },
    var.ec2_data_volume_kms_key_arn == null ? {} : { SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID = var.ec2_data_volume_kms_key_arn },
    length(var.ec2_additional_regions) == 0 ? {} : { SETPOINT_EC2_REGIONS = local.ec2_additional_regions_json },
    var.kubernetes_workload_image == null ? {} : { SETPOINT_KUBERNETES_IMAGE = var.kubernetes_workload_image },
    var.console_port == null ? {} : { SETPOINT_CONSOLE_LISTEN = "0.0.0.0:${var.console_port}" },
  )
  # The console behind the load balancer: only with a console port and a load balancer.
  console_lb = var.console_port != null && var.create_load_balancer
  # The regions served besides the deployment region, as the engine reads them: one table per
  # region with the keys of its [ec2.regions.<name>] tables (SETPOINT_EC2_REGIONS).
  ec2_additional_regions_json = jsonencode({
    for region, r in var.ec2_additional_regions : region => {
      subnet_ids         = [r.subnet_id]
      security_group_ids = r.security_group_ids
      default_image_id   = r.image_id
      plans              = { for plan, type in var.ec2_plan_instance_types : plan => { instance_type = type } }
      data_volume        = { kms_key_id = r.data_volume_kms_key_arn }
    }
  })
  # extra_environment adds to these and may not replace any (the task definition's
  # precondition says which): a silent override of, say, the listen address would break the
  # load balancer, and a silently ignored value would mislead.
  engine_environment = merge(var.extra_environment, local.module_environment)

  # Secrets ECS injects as environment at task start (the values never reach the task definition).
  # The TLS PEM documents come only this way: the engine takes no key on its command line.
  engine_secrets = merge(
    {
      SETPOINT_DATABASE_PASSWORD = aws_secretsmanager_secret.db_password.arn
      SETPOINT_KUBERNETES_TOKEN  = var.kubernetes_token_secret_arn
      SETPOINT_SMTP_URL          = local.smtp_url_secret_arn
      SETPOINT_SECRETS_KEY       = var.secrets_key_secret_arn
    },
    var.grpc_tls == null ? {} : { SETPOINT_TLS_CERT_PEM = var.grpc_tls.certificate_secret_arn },
    var.grpc_tls == null ? {} : { SETPOINT_TLS_KEY_PEM = var.grpc_tls.private_key_secret_arn },
    try(var.grpc_tls.client_ca_secret_arn, null) == null ? {} : { SETPOINT_TLS_CLIENT_CA_PEM = var.grpc_tls.client_ca_secret_arn },
  )

  prometheus_config = yamlencode({
    global = { scrape_interval = "30s", scrape_timeout = "10s" }
    scrape_configs = [{
      job_name       = "setpoint"
      static_configs = [{ targets = ["localhost:${var.metrics_port}"], labels = { service = var.name } }]
    }]
  })

  cloudwatch_agent_config = jsonencode({
    logs = {
      force_flush_interval = 15
      metrics_collected = {
        prometheus = {
          cluster_name           = var.name
          log_group_name         = local.log_group_metrics
          prometheus_config_path = "env:PROMETHEUS_CONFIG_CONTENT"
          emf_processor = {
            metric_namespace = var.metrics_namespace
            metric_declaration = [{
              source_labels    = ["job"]
              label_matcher    = "^setpoint$"
              dimensions       = [["service"]]
              metric_selectors = ["^${var.queue_age_metric_name}$", "^${var.parked_units_metric_name}$", "^${local.tls_expiry_metric}$"]
            }]
          }
        }
      }
    }
  })

  engine_container = {
    name                   = "setpoint"
    image                  = var.engine_image
    essential              = true
    readonlyRootFilesystem = true
    stopTimeout            = var.engine_stop_timeout
    command                = var.engine_command
    portMappings = concat(
      [
        { name = "grpc", containerPort = var.grpc_port, protocol = "tcp" },
        { name = "metrics", containerPort = var.metrics_port, protocol = "tcp" },
      ],
      var.console_port == null ? [] : [{ name = "console", containerPort = var.console_port, protocol = "tcp" }],
    )
    environment = [for k in sort(keys(local.engine_environment)) : { name = k, value = local.engine_environment[k] }]
    secrets     = [for k in sort(keys(local.engine_secrets)) : { name = k, valueFrom = local.engine_secrets[k] }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.engine.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "engine"
      }
    }
  }

  metrics_container = {
    name                   = "cloudwatch-agent"
    image                  = var.cloudwatch_agent_image
    essential              = false
    readonlyRootFilesystem = false # the agent writes its runtime config to its own file system
    environment = [
      { name = "CW_CONFIG_CONTENT", value = local.cloudwatch_agent_config },
      { name = "PROMETHEUS_CONFIG_CONTENT", value = local.prometheus_config },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.engine.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "cloudwatch-agent"
      }
    }
  }
}

resource "aws_cloudwatch_log_group" "engine" {
  name              = local.log_group_engine
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_cloudwatch_log_group" "metrics" {
  count             = var.enable_prometheus_metrics ? 1 : 0
  name              = local.log_group_metrics
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_ecs_cluster" "this" {
  name = var.name
  tags = local.tags

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = ["FARGATE"]

  default_capacity_provider_strategy {
    capacity_provider = "FARGATE"
    weight            = 1
  }
}

resource "aws_ecs_task_definition" "engine" {
  #checkov:skip=CKV_AWS_336:The engine container has a read-only root file system; only the optional CloudWatch agent sidecar needs a writable one for its generated config.
  family                   = "${var.name}-engine"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = tostring(var.engine_cpu)
  memory                   = tostring(var.engine_memory)
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.engine.arn
  tags                     = local.tags

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.engine_cpu_architecture
  }

  container_definitions = jsonencode(concat(
    [local.engine_container],
    var.enable_prometheus_metrics ? [local.metrics_container] : [],
  ))

  lifecycle {
    precondition {
      condition = length(setintersection(
        keys(var.extra_environment), concat(keys(local.module_environment), keys(local.engine_secrets))
      )) == 0
      error_message = "extra_environment sets ${join(", ", sort(setintersection(keys(var.extra_environment), concat(keys(local.module_environment), keys(local.engine_secrets)))))}, which the module sets itself: use the module's variables for these (e.g. rust_log for RUST_LOG)."
    }
  }
}

resource "aws_ecs_service" "engine" {
  name                               = "${var.name}-engine"
  cluster                            = aws_ecs_cluster.this.id
  task_definition                    = aws_ecs_task_definition.engine.arn
  desired_count                      = var.engine_desired_count
  launch_type                        = "FARGATE"
  platform_version                   = "LATEST"
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  propagate_tags                     = "SERVICE"
  enable_ecs_managed_tags            = true
  enable_execute_command             = false
  wait_for_steady_state              = false
  health_check_grace_period_seconds  = var.create_load_balancer ? 60 : null
  tags                               = local.tags

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.engine.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  dynamic "load_balancer" {
    for_each = var.create_load_balancer ? [1] : []
    content {
      target_group_arn = aws_lb_target_group.grpc[0].arn
      container_name   = "setpoint"
      container_port   = var.grpc_port
    }
  }

  dynamic "load_balancer" {
    for_each = local.console_lb ? [1] : []
    content {
      target_group_arn = aws_lb_target_group.console[0].arn
      container_name   = "setpoint"
      container_port   = var.console_port
    }
  }

  depends_on = [aws_iam_role_policy.engine, aws_iam_role_policy.execution_secrets, aws_lb_listener.grpc, aws_lb_listener.console, aws_secretsmanager_secret_version.smtp_url]
}

# ---------------------------------------------------------------------------------------------
# Internal Network Load Balancer for the gRPC API (TCP pass-through keeps HTTP/2 intact; TLS, when
# grpc_tls is set, terminates in the engine, so the bearer tokens are encrypted up to it).
# ---------------------------------------------------------------------------------------------
resource "aws_lb" "grpc" {
  #checkov:skip=CKV_AWS_91:NLB access logs exist only for TLS listeners; this listener is TCP pass-through (TLS, with grpc_tls, ends in the engine).
  count                            = var.create_load_balancer ? 1 : 0
  name                             = substr("${var.name}-grpc", 0, 32)
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.private_subnet_ids
  security_groups                  = [aws_security_group.lb[0].id]
  enable_deletion_protection       = var.load_balancer_deletion_protection
  enable_cross_zone_load_balancing = true
  tags                             = local.tags
}

resource "aws_lb_target_group" "grpc" {
  count                = var.create_load_balancer ? 1 : 0
  name_prefix          = "spgrpc"
  port                 = var.grpc_port
  protocol             = "TCP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = var.engine_stop_timeout
  tags                 = local.tags

  # The API's port accepts connections. Not /readyz: ECS replaces tasks this check fails, and a
  # database failover (one to two minutes on RDS Multi-AZ) would fail every task's readiness at
  # once and restart them all; database trouble is the alarms' job.
  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "grpc" {
  #checkov:skip=CKV_AWS_2:TCP pass-through for gRPC over HTTP/2; TLS (the grpc_tls variable) is terminated by the engine, not by the load balancer.
  #checkov:skip=CKV_AWS_103:Same: no TLS listener on the load balancer, so no TLS policy to set.
  count             = var.create_load_balancer ? 1 : 0
  load_balancer_arn = aws_lb.grpc[0].arn
  port              = var.grpc_port
  protocol          = "TCP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.grpc[0].arn
  }
}

# ---------------------------------------------------------------------------------------------
# The web console on the same internal load balancer (console_port; off by default). TCP pass-
# through like the API: TLS, with grpc_tls, ends in the engine. Sessions live in each task's
# memory, so a browser must keep reaching the same task: stickiness by source address.
# ---------------------------------------------------------------------------------------------
resource "aws_lb_target_group" "console" {
  count                = local.console_lb ? 1 : 0
  name_prefix          = "spcons"
  port                 = var.console_port
  protocol             = "TCP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = var.engine_stop_timeout
  tags                 = local.tags

  stickiness {
    enabled = true
    type    = "source_ip"
  }

  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "console" {
  #checkov:skip=CKV_AWS_2:TCP pass-through to the console; TLS (the grpc_tls variable) is terminated by the engine, not by the load balancer.
  #checkov:skip=CKV_AWS_103:Same: no TLS listener on the load balancer, so no TLS policy to set.
  count             = local.console_lb ? 1 : 0
  load_balancer_arn = aws_lb.grpc[0].arn
  port              = var.console_port
  protocol          = "TCP"
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.console[0].arn
  }
}
