# A small, complete environment: a VPC with two private subnets (database, engines, load balancer),
# two public subnets with one NAT gateway (image pulls and AWS APIs), one subnet and security group
# for the EC2 instances setpoint launches, and the setpoint module.

locals {
  name = "setpoint-${var.environment}"
  # Two zones, named explicitly so the layout never changes when AWS adds a zone.
  azs = length(var.availability_zones) == 2 ? var.availability_zones : ["${var.region}a", "${var.region}b"]
}

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = local.name }
}

# Lock down the default security group: nothing uses it, nothing may pass it.
resource "aws_default_security_group" "this" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = "${local.name}-default-unused" }
}

resource "aws_subnet" "public" {
  count                   = 2
  vpc_id                  = aws_vpc.this.id
  availability_zone       = local.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, count.index)
  map_public_ip_on_launch = false
  tags                    = { Name = "${local.name}-public-${count.index}" }
}

resource "aws_subnet" "private" {
  count             = 2
  vpc_id            = aws_vpc.this.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 4, 2 + count.index)
  tags              = { Name = "${local.name}-private-${count.index}" }
}

# Where setpoint launches the instances it manages.
resource "aws_subnet" "workloads" {
  vpc_id            = aws_vpc.this.id
  availability_zone = local.azs[0]
  cidr_block        = cidrsubnet(var.vpc_cidr, 4, 4)
  tags              = { Name = "${local.name}-workloads" }
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = local.name }
}

resource "aws_eip" "nat" {
  domain = "vpc"
  tags   = { Name = "${local.name}-nat" }
}

resource "aws_nat_gateway" "this" {
  allocation_id = aws_eip.nat.id
  subnet_id     = aws_subnet.public[0].id
  tags          = { Name = local.name }

  depends_on = [aws_internet_gateway.this]
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = "${local.name}-public" }
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "public" {
  count          = 2
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = "${local.name}-private" }
}

resource "aws_route" "private_nat" {
  route_table_id         = aws_route_table.private.id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.this.id
}

resource "aws_route_table_association" "private" {
  count          = 2
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private.id
}

resource "aws_route_table_association" "workloads" {
  subnet_id      = aws_subnet.workloads.id
  route_table_id = aws_route_table.private.id
}

# The instances setpoint launches: reachable over SSH from inside the VPC only, out over HTTPS.
resource "aws_security_group" "workloads" {
  #checkov:skip=CKV2_AWS_5:Attached at run time: setpoint passes it to RunInstances for every instance it launches (SETPOINT_EC2_SECURITY_GROUP_IDS).
  name_prefix = "${local.name}-workloads-"
  description = "Instances launched by setpoint"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${local.name}-workloads" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "workloads_ssh" {
  security_group_id = aws_security_group.workloads.id
  description       = "SSH from inside the VPC"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = var.vpc_cidr
}

resource "aws_vpc_security_group_egress_rule" "workloads_https" {
  security_group_id = aws_security_group.workloads.id
  description       = "HTTPS out (packages, AWS APIs)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# VPC flow logs, encrypted with the module's key.
resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/setpoint/${local.name}/vpc-flow-logs"
  retention_in_days = 365
  kms_key_id        = module.setpoint.kms_key_arn
}

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogGroups", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role" "flow_logs" {
  name_prefix        = "${local.name}-flow-"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

resource "aws_iam_role_policy" "flow_logs" {
  name_prefix = "flow-logs-"
  role        = aws_iam_role.flow_logs.id
  policy      = data.aws_iam_policy_document.flow_logs.json
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn    = aws_iam_role.flow_logs.arn
}

module "setpoint" {
  source = "../../modules/setpoint"

  name               = local.name
  vpc_id             = aws_vpc.this.id
  private_subnet_ids = aws_subnet.private[*].id

  engine_image         = var.engine_image
  engine_desired_count = var.engine_desired_count
  grpc_allowed_cidrs   = [var.vpc_cidr]
  create_load_balancer = var.create_load_balancer

  console_port          = var.console_port
  console_allowed_cidrs = [var.vpc_cidr]

  ec2_subnet_id          = aws_subnet.workloads.id
  ec2_security_group_ids = [aws_security_group.workloads.id]
  ec2_image_id           = var.ec2_image_id
  ses_identity           = var.ses_identity

  ec2_data_volume_kms_key_arn = var.ec2_data_volume_kms_key_arn
  ec2_additional_regions      = var.ec2_additional_regions

  kubernetes_api_endpoint     = var.kubernetes_api_endpoint
  kubernetes_ca_data          = var.kubernetes_ca_data
  kubernetes_token_secret_arn = var.kubernetes_token_secret_arn
  secrets_key_secret_arn      = var.secrets_key_secret_arn
  kubernetes_workload_image   = var.kubernetes_workload_image

  grpc_tls          = var.grpc_tls
  extra_environment = var.extra_environment

  db_multi_az                       = var.production
  db_deletion_protection            = var.production
  db_skip_final_snapshot            = !var.production
  load_balancer_deletion_protection = var.production

  alarm_email_addresses = var.alarm_email_addresses
}
