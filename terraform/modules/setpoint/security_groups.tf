# Only the engine reaches the database; the gRPC port is open only to the load balancer and to
# the CIDRs the caller names; the engine may leave the VPC only on 443 (AWS APIs, registry, the
# Kubernetes API), 587 (SMTP) and the Kubernetes API's port when its URL names one other than 443.

locals {
  kubernetes_api_port = try(tonumber(regex("^https://[^/:]+:([0-9]+)", var.kubernetes_api_endpoint)[0]), 443)
}

resource "aws_security_group" "engine" {
  name_prefix = "${var.name}-engine-"
  description = "setpoint ${var.name} engine tasks"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-engine" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "db" {
  name_prefix = "${var.name}-db-"
  description = "setpoint ${var.name} database: reachable from the engine only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-db" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "db_from_engine" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the setpoint engine"
  ip_protocol                  = "tcp"
  from_port                    = local.db_port
  to_port                      = local.db_port
  referenced_security_group_id = aws_security_group.engine.id
}

resource "aws_vpc_security_group_egress_rule" "engine_to_db" {
  security_group_id            = aws_security_group.engine.id
  description                  = "PostgreSQL to the setpoint database"
  ip_protocol                  = "tcp"
  from_port                    = local.db_port
  to_port                      = local.db_port
  referenced_security_group_id = aws_security_group.db.id
}

resource "aws_vpc_security_group_egress_rule" "engine_https" {
  security_group_id = aws_security_group.engine.id
  description       = "HTTPS to AWS APIs (EC2, Secrets Manager, CloudWatch), the image registry and the Kubernetes API"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "engine_kubernetes_api" {
  count             = local.kubernetes_api_port == 443 ? 0 : 1
  security_group_id = aws_security_group.engine.id
  description       = "Kubernetes API (HTTPS on port ${local.kubernetes_api_port})"
  ip_protocol       = "tcp"
  from_port         = local.kubernetes_api_port
  to_port           = local.kubernetes_api_port
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "engine_smtp" {
  security_group_id = aws_security_group.engine.id
  description       = "SMTP submission (STARTTLS) to SES or the relay in SETPOINT_SMTP_URL"
  ip_protocol       = "tcp"
  from_port         = 587
  to_port           = 587
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "engine_grpc_from_lb" {
  count                        = var.create_load_balancer ? 1 : 0
  security_group_id            = aws_security_group.engine.id
  description                  = "gRPC from the internal load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.grpc_port
  to_port                      = var.grpc_port
  referenced_security_group_id = aws_security_group.lb[0].id
}

resource "aws_vpc_security_group_ingress_rule" "engine_grpc" {
  for_each          = toset(var.grpc_allowed_cidrs)
  security_group_id = aws_security_group.engine.id
  description       = "gRPC from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.grpc_port
  to_port           = var.grpc_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "engine_metrics" {
  for_each          = toset(var.metrics_allowed_cidrs)
  security_group_id = aws_security_group.engine.id
  description       = "Prometheus scrape from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = each.value
}

resource "aws_security_group" "lb" {
  count       = var.create_load_balancer ? 1 : 0
  name_prefix = "${var.name}-lb-"
  description = "setpoint ${var.name} internal gRPC load balancer"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-lb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "lb_grpc" {
  for_each          = var.create_load_balancer ? toset(var.grpc_allowed_cidrs) : toset([])
  security_group_id = aws_security_group.lb[0].id
  description       = "gRPC from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.grpc_port
  to_port           = var.grpc_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_engine" {
  count                        = var.create_load_balancer ? 1 : 0
  security_group_id            = aws_security_group.lb[0].id
  description                  = "gRPC and health checks to the engine tasks"
  ip_protocol                  = "tcp"
  from_port                    = var.grpc_port
  to_port                      = var.grpc_port
  referenced_security_group_id = aws_security_group.engine.id
}

# The web console (console_port): from the load balancer, and from the console's CIDRs.
resource "aws_vpc_security_group_ingress_rule" "engine_console_from_lb" {
  count                        = local.console_lb ? 1 : 0
  security_group_id            = aws_security_group.engine.id
  description                  = "Web console from the internal load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.console_port
  to_port                      = var.console_port
  referenced_security_group_id = aws_security_group.lb[0].id
}

resource "aws_vpc_security_group_ingress_rule" "engine_console" {
  for_each          = var.console_port == null ? toset([]) : toset(var.console_allowed_cidrs)
  security_group_id = aws_security_group.engine.id
  description       = "Web console from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.console_port
  to_port           = var.console_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "lb_console" {
  for_each          = local.console_lb ? toset(var.console_allowed_cidrs) : toset([])
  security_group_id = aws_security_group.lb[0].id
  description       = "Web console from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.console_port
  to_port           = var.console_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_engine_console" {
  count                        = local.console_lb ? 1 : 0
  security_group_id            = aws_security_group.lb[0].id
  description                  = "Web console and its health checks to the engine tasks"
  ip_protocol                  = "tcp"
  from_port                    = var.console_port
  to_port                      = var.console_port
  referenced_security_group_id = aws_security_group.engine.id
}
