variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region code such as eu-west-1."
  }
}

variable "environment" {
  description = "Environment name; also the name prefix of every resource (setpoint-<environment>)."
  type        = string
  default     = "example"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.environment))
    error_message = "environment must be 2-21 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "availability_zones" {
  description = "Exactly two availability zones for the subnets; empty means <region>a and <region>b."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || (length(var.availability_zones) == 2 && alltrue([for z in var.availability_zones : can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", z))]))
    error_message = "availability_zones must be empty or name exactly two zones such as eu-west-1a."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC the example creates (a /16 to /20; split into two public, two private and one workload subnet)."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid CIDR block between /16 and /20."
  }
}

variable "engine_image" {
  description = "setpoint engine image with a tag or digest (build it from the repository's Dockerfile and push it to ECR)."
  type        = string
  default     = "ghcr.io/example/setpoint:0.1.0"

  validation {
    condition     = can(regex("[:@][A-Za-z0-9._:-]+$", var.engine_image)) && !endswith(var.engine_image, ":latest")
    error_message = "engine_image must name a tag (not latest) or a digest."
  }
}

variable "engine_desired_count" {
  description = "Number of engine tasks."
  type        = number
  default     = 2

  validation {
    condition     = var.engine_desired_count >= 0 && var.engine_desired_count <= 10
    error_message = "engine_desired_count must be between 0 and 10 in this example."
  }
}

variable "ses_identity" {
  description = "Domain or e-mail address setpoint sends from (SES identity)."
  type        = string
  default     = "setpoint@example.com"

  validation {
    condition     = can(regex("^([^@\\s]+@)?([A-Za-z0-9-]+\\.)+[A-Za-z]{2,}$", var.ses_identity))
    error_message = "ses_identity must be a domain or an e-mail address."
  }
}

variable "ec2_image_id" {
  description = "AMI of the instances setpoint launches for its users (the engine may launch only this one)."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ec2_image_id))
    error_message = "ec2_image_id must be an AMI id such as ami-0123456789abcdef0."
  }
}

variable "ec2_data_volume_kms_key_arn" {
  description = "Optional KMS key (ARN, in var.region) that encrypts the data volumes of the instances setpoint launches here; null uses the account's default EBS key. Passed to the module."
  type        = string
  default     = null

  validation {
    condition     = var.ec2_data_volume_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.ec2_data_volume_kms_key_arn))
    error_message = "ec2_data_volume_kms_key_arn must be a KMS key ARN."
  }
}

variable "ec2_additional_regions" {
  description = "Other regions setpoint serves, each with a subnet and security groups of a VPC there (made outside this example), an AMI of that region and optionally a KMS key of that region for data volumes. Passed to the module (see its ec2_additional_regions)."
  type = map(object({
    subnet_id               = string
    security_group_ids      = list(string)
    image_id                = string
    data_volume_kms_key_arn = optional(string)
  }))
  default = {}

  validation {
    condition     = alltrue([for region, r in var.ec2_additional_regions : can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", region))])
    error_message = "ec2_additional_regions is keyed by region codes (e.g. us-east-1); the module checks the rest."
  }
}

variable "kubernetes_api_endpoint" {
  description = "HTTPS endpoint of the existing Kubernetes (EKS) cluster setpoint runs KVX workloads in: aws eks describe-cluster --name NAME --query cluster.endpoint --output text."
  type        = string

  validation {
    condition     = startswith(var.kubernetes_api_endpoint, "https://")
    error_message = "kubernetes_api_endpoint must be an https:// URL."
  }
}

variable "kubernetes_ca_data" {
  description = "The cluster's CA bundle, base64 as EKS gives it: aws eks describe-cluster --name NAME --query cluster.certificateAuthority.data --output text. Null only if the API server's certificate chains to a public CA."
  type        = string
  default     = null

  validation {
    condition     = try(length(base64decode(var.kubernetes_ca_data)) > 0, var.kubernetes_ca_data == null)
    error_message = "kubernetes_ca_data must be base64 (the form EKS gives)."
  }
}

variable "secrets_key_secret_arn" {
  description = "Full ARN of the Secrets Manager secret holding the key that seals resources' secret outputs (a plain string made by `setpoint secrets-key`; see the module's secrets_key_secret_arn)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.secrets_key_secret_arn))
    error_message = "secrets_key_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "kubernetes_token_secret_arn" {
  description = "Full ARN of the Secrets Manager secret holding the token of the service account setpoint acts as in the cluster (a plain string; see the module's kubernetes_token_secret_arn for the permissions it needs)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.kubernetes_token_secret_arn))
    error_message = "kubernetes_token_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "grpc_tls" {
  description = "TLS for the gRPC API: Secrets Manager secret ARNs of the PEM server certificate chain, its private key and (optional, for mutual TLS) the client CA; see the module's grpc_tls. null serves plaintext, where bearer tokens cross the network in the clear: set it for anything but a test."
  type = object({
    certificate_secret_arn = string
    private_key_secret_arn = string
    client_ca_secret_arn   = optional(string)
  })
  default = null

  validation {
    condition = var.grpc_tls == null ? true : alltrue([
      for arn in compact([var.grpc_tls.certificate_secret_arn, var.grpc_tls.private_key_secret_arn, var.grpc_tls.client_ca_secret_arn]) :
      can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+-[A-Za-z0-9]{6}$", arn))
    ])
    error_message = "grpc_tls must hold full Secrets Manager secret ARNs, with the 6-character suffix."
  }
}

variable "extra_environment" {
  description = "Extra environment variables for the engine (for example SETPOINT_CONCURRENCY); they may add to what the module sets, never replace it (see the module's extra_environment)."
  type        = map(string)
  default     = {}
}

variable "kubernetes_workload_image" {
  description = "Image every KVX instance runs in the cluster, with a tag or digest; null keeps the engine's default."
  type        = string
  default     = null

  validation {
    condition     = try(can(regex("[:@][A-Za-z0-9._:-]+$", var.kubernetes_workload_image)) && !endswith(var.kubernetes_workload_image, ":latest"), var.kubernetes_workload_image == null)
    error_message = "kubernetes_workload_image must name a tag (not latest) or a digest."
  }
}

variable "alarm_email_addresses" {
  description = "E-mail addresses that receive alarm notifications."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.alarm_email_addresses : can(regex("^[^@\\s]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", a))])
    error_message = "alarm_email_addresses must be e-mail addresses."
  }
}

variable "production" {
  description = "Production safety switches: deletion protection on the database and load balancer, Multi-AZ database, final snapshot on destroy. Keep false only for throw-away environments."
  type        = bool
  default     = true
}

variable "create_load_balancer" {
  description = "Create the internal Network Load Balancer for the gRPC API."
  type        = bool
  default     = true
}

variable "console_port" {
  description = "Port of the web console on the internal load balancer (docs/console.md); null (the default) keeps it off. Browsers inside the VPC may reach it."
  type        = number
  default     = null

  validation {
    condition     = var.console_port == null ? true : (var.console_port >= 1024 && var.console_port <= 65535)
    error_message = "console_port must be null (console off) or a port between 1024 and 65535."
  }
}
