# ---------------------------------------------------------------------------------------------
# Naming and placement
# ---------------------------------------------------------------------------------------------
variable "name" {
  description = "Name prefix for every resource (also the RDS identifier, ECS cluster and service name). Lower case letters, digits and hyphens, 3-32 characters, starting with a letter."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 characters of a-z, 0-9 and '-', start with a letter and not end with '-'."
  }
}

variable "tags" {
  description = "Tags added to every resource the module creates (merged with the provider's default_tags)."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "VPC that holds the database, the engine tasks and the internal load balancer."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two, in different availability zones) for the database, the engine tasks and the internal load balancer. They need a route to AWS APIs and the container registry (NAT gateway or VPC endpoints)."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2 && alltrue([for s in var.private_subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "private_subnet_ids needs at least two subnet ids (RDS subnet groups span two availability zones)."
  }
}

# ---------------------------------------------------------------------------------------------
# Engine service (ECS Fargate)
# ---------------------------------------------------------------------------------------------
variable "engine_image" {
  description = "Container image of the setpoint engine, with a tag or digest (for example 123456789012.dkr.ecr.eu-west-1.amazonaws.com/setpoint:1.4.0)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._/:-]*[:@][A-Za-z0-9._:-]+$", var.engine_image)) && !endswith(var.engine_image, ":latest")
    error_message = "engine_image must name a tag or a digest, and not ':latest' (deployments must be reproducible)."
  }
}

variable "engine_desired_count" {
  description = "Number of engine tasks. Any number of engines may share one database (Postgres is the only coordinator); use 2 or more for availability."
  type        = number
  default     = 2

  validation {
    condition     = var.engine_desired_count >= 0 && var.engine_desired_count <= 50 && floor(var.engine_desired_count) == var.engine_desired_count
    error_message = "engine_desired_count must be a whole number between 0 and 50."
  }
}

variable "engine_cpu" {
  description = "Fargate task CPU units (256, 512, 1024, 2048 or 4096)."
  type        = number
  default     = 512

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.engine_cpu)
    error_message = "engine_cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "engine_memory" {
  description = "Fargate task memory in MiB; must be a valid combination with engine_cpu (for example 512 CPU: 1024-4096 MiB)."
  type        = number
  default     = 1024

  validation {
    condition     = var.engine_memory >= 512 && var.engine_memory <= 30720 && var.engine_memory % 512 == 0
    error_message = "engine_memory must be a multiple of 512 between 512 and 30720 MiB."
  }
}

variable "engine_cpu_architecture" {
  description = "CPU architecture of the engine image: X86_64 or ARM64 (Graviton)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.engine_cpu_architecture)
    error_message = "engine_cpu_architecture must be X86_64 or ARM64."
  }
}

variable "engine_stop_timeout" {
  description = "Seconds between SIGTERM and SIGKILL on a task stop (Fargate allows at most 120). The engine gets SETPOINT_SHUTDOWN_GRACE = this minus 15 s to let in-flight work units finish; what does not finish is rescued by lease expiry."
  type        = number
  default     = 90

  validation {
    condition     = var.engine_stop_timeout >= 20 && var.engine_stop_timeout <= 120
    error_message = "engine_stop_timeout must be between 20 and 120 seconds."
  }
}

variable "engine_command" {
  description = "Command of the engine container (overrides the image's CMD). The repository's Dockerfile has ENTRYPOINT [\"setpoint\"] and CMD [\"serve\"], so null runs `setpoint serve`; give for example [\"serve\", \"--resync-interval\", \"5m\"] to add flags. One-off tasks of the same task definition override it (for example [\"work\", \"list\"])."
  type        = list(string)
  default     = null

  validation {
    condition     = try(length(var.engine_command) > 0, true)
    error_message = "engine_command must be null or a non-empty list."
  }
}

variable "grpc_port" {
  description = "Port of the engine's gRPC API (SETPOINT_LISTEN)."
  type        = number
  default     = 50051

  validation {
    condition     = var.grpc_port >= 1024 && var.grpc_port <= 65535
    error_message = "grpc_port must be between 1024 and 65535."
  }
}

variable "metrics_port" {
  description = "Port of the engine's Prometheus metrics endpoint (SETPOINT_METRICS_LISTEN)."
  type        = number
  default     = 9090

  validation {
    condition     = var.metrics_port >= 1024 && var.metrics_port <= 65535
    error_message = "metrics_port must be between 1024 and 65535."
  }
}

variable "grpc_tls" {
  description = "TLS for the gRPC API, ending in the engine (the load balancer passes TCP through). Full ARNs of Secrets Manager secrets whose plain-string values are PEM: the server certificate chain (certificate_secret_arn, SETPOINT_TLS_CERT_PEM), its private key (private_key_secret_arn, SETPOINT_TLS_KEY_PEM) and, for mutual TLS, the CA client certificates must chain to (client_ca_secret_arn, SETPOINT_TLS_CLIENT_CA_PEM; optional). ECS injects them at task start; they never reach the task definition, and the task execution role may read exactly these secrets. The certificate must name the address clients dial (the load balancer's DNS name, or your own name for it). null (the default) serves plaintext: then only bearer tokens protect the API, and they cross the network in the clear."
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
    error_message = "grpc_tls must hold full Secrets Manager secret ARNs, with the 6-character suffix (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-AbCdEf): the execution role's policy names them exactly."
  }
  validation {
    condition     = var.grpc_tls == null ? true : var.grpc_tls.certificate_secret_arn != var.grpc_tls.private_key_secret_arn
    error_message = "grpc_tls: the certificate and the private key must be two secrets (each value is one PEM document)."
  }
}

variable "grpc_allowed_cidrs" {
  description = "CIDR blocks of gRPC clients allowed to reach the internal load balancer (and the tasks). Keep it to your private ranges."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.grpc_allowed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "grpc_allowed_cidrs must hold valid CIDR blocks and not 0.0.0.0/0 (the API is internal)."
  }
}

variable "metrics_allowed_cidrs" {
  description = "CIDR blocks of Prometheus scrapers allowed to reach the metrics port on the tasks (the built-in CloudWatch agent sidecar needs none)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.metrics_allowed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "metrics_allowed_cidrs must hold valid CIDR blocks and not 0.0.0.0/0."
  }
}

variable "console_port" {
  description = "Port of the engine's web console (SETPOINT_CONSOLE_LISTEN; docs/console.md), exposed on the internal load balancer. null (the default) keeps the console off. It serves HTTPS with grpc_tls's certificate when grpc_tls is set (TLS ends in the engine, as for the API), plain HTTP otherwise."
  type        = number
  default     = null

  validation {
    condition     = var.console_port == null ? true : (var.console_port >= 1024 && var.console_port <= 65535 && var.console_port != var.grpc_port && var.console_port != var.metrics_port)
    error_message = "console_port must be between 1024 and 65535 and differ from grpc_port and metrics_port."
  }
}

variable "console_allowed_cidrs" {
  description = "CIDR blocks of browsers allowed to reach the web console on the internal load balancer (and the tasks). Only used with console_port."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.console_allowed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "console_allowed_cidrs must hold valid CIDR blocks and not 0.0.0.0/0 (the console is internal)."
  }
}

variable "create_load_balancer" {
  description = "Create an internal Network Load Balancer in front of the gRPC port (TCP, so HTTP/2 passes through untouched)."
  type        = bool
  default     = true
}

variable "load_balancer_deletion_protection" {
  description = "Deletion protection of the internal load balancer."
  type        = bool
  default     = true
}

variable "rust_log" {
  description = "RUST_LOG filter for the engine (for example info or setpoint=debug,info)."
  type        = string
  default     = "info"

  validation {
    condition     = can(regex("^[A-Za-z0-9_:=,.-]+$", var.rust_log))
    error_message = "rust_log must be a tracing filter such as info or setpoint=debug,info."
  }
}

variable "extra_environment" {
  description = "Extra environment variables for the engine container. They add to what the module sets and may not replace any of it (a plan fails and names the keys; use the module's variables for those)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.extra_environment) : can(regex("^[A-Z_][A-Z0-9_]*$", k)) && !startswith(k, "SETPOINT_DATABASE_") && !startswith(k, "SETPOINT_TLS_")])
    error_message = "extra_environment keys must be upper-case environment names and must not start with SETPOINT_DATABASE_ or SETPOINT_TLS_ (TLS comes only through grpc_tls, so a key never sits in the task definition)."
  }
}

# ---------------------------------------------------------------------------------------------
# What the engine manages: EC2 and e-mail
# ---------------------------------------------------------------------------------------------
variable "ec2_subnet_id" {
  description = "Subnet in which setpoint launches the EC2 instances it manages (SETPOINT_EC2_SUBNET_ID). The engine role may launch only into this subnet."
  type        = string

  validation {
    condition     = can(regex("^subnet-[0-9a-f]+$", var.ec2_subnet_id))
    error_message = "ec2_subnet_id must look like subnet-0123456789abcdef0."
  }
}

variable "ec2_security_group_ids" {
  description = "Security groups attached to the EC2 instances setpoint launches (SETPOINT_EC2_SECURITY_GROUP_IDS). The engine role may use only these."
  type        = list(string)

  validation {
    condition     = length(var.ec2_security_group_ids) >= 1 && alltrue([for s in var.ec2_security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "ec2_security_group_ids needs at least one security group id (sg-...)."
  }
}

variable "ses_identity" {
  description = "SES sending identity: a domain (example.com; publish the DKIM records from the ses_dkim_tokens output) or a single e-mail address (verified by the link SES mails to it)."
  type        = string

  validation {
    condition     = can(regex("^[^@\\s]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", var.ses_identity)) || can(regex("^([A-Za-z0-9-]+\\.)+[A-Za-z]{2,}$", var.ses_identity))
    error_message = "ses_identity must be a domain name or an e-mail address."
  }
}

variable "email_from" {
  description = "From address of the mails setpoint sends; must belong to ses_identity. Defaults to setpoint@<domain> (or the identity itself when it is an address)."
  type        = string
  default     = null

  validation {
    condition     = var.email_from == null || can(regex("^[^@\\s]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", var.email_from))
    error_message = "email_from must be an e-mail address."
  }
}

variable "smtp_url_secret_arn" {
  description = "Optional full ARN of a Secrets Manager secret holding the SMTP URL the engine sends through (smtp://USER:PASSWORD@HOST:587, user and password percent-encoded; STARTTLS). Passed as SETPOINT_SMTP_URL. When null (the default) the module makes SES SMTP credentials itself (an IAM user that may only send from the SES identity, its access key, and a secret with the URL of email-smtp.REGION.amazonaws.com:587); those credentials are then in the Terraform state. The engine always sends over SMTP, never through the SES API."
  type        = string
  default     = null

  validation {
    condition     = var.smtp_url_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.smtp_url_secret_arn))
    error_message = "smtp_url_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "ec2_image_id" {
  description = "AMI of the instances setpoint launches (SETPOINT_EC2_IMAGE_ID, the engine's ec2.default_image_id). The engine role may launch only this image."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ec2_image_id))
    error_message = "ec2_image_id must be an AMI id such as ami-0123456789abcdef0."
  }
}

variable "ec2_plan_instance_types" {
  description = "EC2 instance type of each KVX plan (SETPOINT_EC2_PLAN_INSTANCE_TYPES, the engine's ec2.plans.<plan>.instance_type). A plan change to another type resizes the machine."
  type        = map(string)
  default = {
    "kvx.small"  = "t3.small"
    "kvx.medium" = "t3.medium"
    "kvx.large"  = "t3.large"
  }

  validation {
    condition = alltrue([
      for plan, type in var.ec2_plan_instance_types :
      can(regex("^[a-z0-9][a-z0-9.-]{0,62}$", plan)) && can(regex("^[a-z0-9-]+\\.[a-z0-9]+$", type))
    ])
    error_message = "ec2_plan_instance_types maps plan names (e.g. kvx.small) to EC2 instance types (e.g. t3.small)."
  }
}

variable "ec2_data_volume_kms_key_arn" {
  description = "Optional ARN of the KMS key that encrypts the data volumes setpoint launches in the deployment region (SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID, the engine's ec2.data_volume.kms_key_id). Null (the default): the account's default EBS key (aws/ebs), which needs no grant. With a key, the engine role gets the KMS permissions EBS needs on exactly that key, only through EC2; the key's policy must let the account's IAM policies grant them (the default key policy does)."
  type        = string
  default     = null

  validation {
    condition     = var.ec2_data_volume_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", var.ec2_data_volume_kms_key_arn))
    error_message = "ec2_data_volume_kms_key_arn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), not an alias or a bare key id."
  }
}

variable "ec2_additional_regions" {
  description = "EC2 regions setpoint also serves besides the deployment region, keyed by region code, each with the subnet and security groups (in that region's VPC) and the AMI (of that region) the engine launches with there, and optionally the KMS key of that region for its data volumes. The engine gets them as SETPOINT_EC2_REGIONS (JSON region tables, plans from ec2_plan_instance_types) and its role may act in every served region, on the same terms as in the deployment region."
  type = map(object({
    subnet_id               = string
    security_group_ids      = list(string)
    image_id                = string
    data_volume_kms_key_arn = optional(string)
  }))
  default = {}

  validation {
    condition = alltrue([
      for region, r in var.ec2_additional_regions :
      can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", region))
      && can(regex("^subnet-[0-9a-f]+$", r.subnet_id))
      && length(r.security_group_ids) >= 1
      && alltrue([for sg in r.security_group_ids : can(regex("^sg-[0-9a-f]+$", sg))])
      && can(regex("^ami-[0-9a-f]{8,17}$", r.image_id))
      && (r.data_volume_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:${region}:[0-9]{12}:key/[A-Za-z0-9-]+$", coalesce(r.data_volume_kms_key_arn, "-"))))
    ])
    error_message = "ec2_additional_regions maps region codes (e.g. us-east-1) to { subnet_id = \"subnet-...\", security_group_ids = [\"sg-...\", ...] (at least one), image_id = \"ami-...\", data_volume_kms_key_arn = optional KMS key ARN in that same region }."
  }
}

variable "secrets_kms_key_arns" {
  description = "Customer-managed KMS keys that encrypt the secrets you pass in (kubernetes_token_secret_arn, smtp_url_secret_arn, grpc_tls); the task execution role may decrypt with them. Leave empty when those secrets use the AWS managed key aws/secretsmanager."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for k in var.secrets_kms_key_arns : can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]+$", k))])
    error_message = "secrets_kms_key_arns must hold KMS key ARNs (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

# ---------------------------------------------------------------------------------------------
# The Kubernetes cluster the engine runs KVX workloads in (for example an existing EKS cluster)
# ---------------------------------------------------------------------------------------------
variable "kubernetes_api_endpoint" {
  description = "HTTPS URL of the Kubernetes API server the engine manages KVX workloads in (SETPOINT_KUBERNETES_URL), for example an EKS cluster's endpoint: aws eks describe-cluster --name NAME --query cluster.endpoint. The engine tasks reach it through their HTTPS egress (any other port in the URL gets its own egress rule)."
  type        = string

  validation {
    condition     = can(regex("^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$", var.kubernetes_api_endpoint))
    error_message = "kubernetes_api_endpoint must be an https:// URL with a host name and optional port and no path, such as https://ABC123.gr7.eu-west-1.eks.amazonaws.com (the token is never sent over plain http)."
  }
}

variable "kubernetes_ca_data" {
  description = "CA bundle of the Kubernetes API server as base64 of its PEM text (SETPOINT_KUBERNETES_CA_DATA), exactly as EKS gives it (aws_eks_cluster's certificate_authority[0].data, or aws eks describe-cluster --query cluster.certificateAuthority.data) and as kubeconfig's certificate-authority-data holds it. Null: the server's certificate must chain to a public CA."
  type        = string
  default     = null

  validation {
    # try(): null fails base64decode and falls back to "is it null" (true); bad base64 to false.
    condition     = try(strcontains(base64decode(var.kubernetes_ca_data), "-----BEGIN CERTIFICATE-----"), var.kubernetes_ca_data == null)
    error_message = "kubernetes_ca_data must be base64 of PEM certificates (the form EKS and kubeconfig files use)."
  }
}

variable "kubernetes_token_secret_arn" {
  description = "Full ARN of a Secrets Manager secret whose plain-string value is the bearer token of the Kubernetes service account the engine acts as (SETPOINT_KUBERNETES_TOKEN, injected by ECS at task start; never in the task definition). The service account needs, cluster-wide: get/create/patch on namespaces, and get/list/create/patch/delete on secrets, services and apps/deployments. The task execution role may read exactly this secret."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.kubernetes_token_secret_arn))
    error_message = "kubernetes_token_secret_arn must be a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-SUFFIX)."
  }
}

variable "secrets_key_secret_arn" {
  description = "Full ARN of a Secrets Manager secret whose plain-string value is the key that seals resources' secret outputs at rest (SETPOINT_SECRETS_KEY: make one with `setpoint secrets-key`; to rotate, store `new:…,old:…` so that what the old key sealed stays readable). KVX instances keep their generated credentials sealed with it, and the engine refuses to start without it. Injected by ECS at task start, never in the task definition; the task execution role may read exactly this secret. Losing it loses every stored credential: back the secret up."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.secrets_key_secret_arn))
    error_message = "secrets_key_secret_arn must be a Secrets Manager secret ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-SUFFIX)."
  }
}

variable "kubernetes_workload_image" {
  description = "Container image every KVX instance runs in the cluster (SETPOINT_KUBERNETES_IMAGE), with a tag or digest; null keeps the engine's default."
  type        = string
  default     = null

  validation {
    condition     = try(can(regex("^[a-z0-9][a-z0-9._/:-]*[:@][A-Za-z0-9._:-]+$", var.kubernetes_workload_image)) && !endswith(var.kubernetes_workload_image, ":latest"), var.kubernetes_workload_image == null)
    error_message = "kubernetes_workload_image must name a tag or a digest, and not ':latest'."
  }
}

# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------
variable "db_engine_version" {
  description = "PostgreSQL major (or major.minor) version on RDS."
  type        = string
  default     = "15"

  validation {
    condition     = can(regex("^1[4-7](\\.[0-9]+)?$", var.db_engine_version))
    error_message = "db_engine_version must be PostgreSQL 14 to 17, for example 15 or 15.7."
  }
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.small"

  validation {
    condition     = can(regex("^db\\.[a-z0-9]+\\.[a-z0-9]+$", var.db_instance_class))
    error_message = "db_instance_class must look like db.t4g.small."
  }
}

variable "db_allocated_storage" {
  description = "Initial storage in GiB (gp3)."
  type        = number
  default     = 20

  validation {
    condition     = var.db_allocated_storage >= 20 && var.db_allocated_storage <= 65536
    error_message = "db_allocated_storage must be between 20 and 65536 GiB."
  }
}

variable "db_max_allocated_storage" {
  description = "Storage autoscaling ceiling in GiB (0 turns autoscaling off)."
  type        = number
  default     = 100

  validation {
    condition     = var.db_max_allocated_storage == 0 || (var.db_max_allocated_storage >= 20 && var.db_max_allocated_storage <= 65536)
    error_message = "db_max_allocated_storage must be 0 or between 20 and 65536 GiB."
  }
}

variable "db_name" {
  description = "Name of the setpoint database (SETPOINT_DATABASE_NAME)."
  type        = string
  default     = "setpoint"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,62}$", var.db_name))
    error_message = "db_name must start with a letter and hold only a-z, 0-9 and '_' (at most 63 characters)."
  }
}

variable "db_username" {
  description = "Master user of the database (SETPOINT_DATABASE_USER)."
  type        = string
  default     = "setpoint"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,62}$", var.db_username)) && !contains(["admin", "postgres", "rdsadmin"], var.db_username)
    error_message = "db_username must start with a letter, hold only a-z, 0-9 and '_', and not be a reserved name (admin, postgres, rdsadmin)."
  }
}

variable "db_password_version" {
  description = "Version of the generated database password. Raise it by one to rotate: Terraform makes a new password, writes it to RDS and to the secret; then redeploy the service so tasks read it."
  type        = number
  default     = 1

  validation {
    condition     = var.db_password_version >= 1 && floor(var.db_password_version) == var.db_password_version
    error_message = "db_password_version must be a whole number >= 1."
  }
}

variable "db_multi_az" {
  description = "Run the database Multi-AZ (a standby in a second zone)."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups (point-in-time recovery window)."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 1 and 35 (0 would turn automated backups off)."
  }
}

variable "db_deletion_protection" {
  description = "Deletion protection of the database. Keep true in production; turn off only to tear an environment down."
  type        = bool
  default     = true
}

variable "db_skip_final_snapshot" {
  description = "Skip the final snapshot when the database is destroyed (only for throw-away environments)."
  type        = bool
  default     = false
}

variable "db_max_connections_alarm" {
  description = "Alarm threshold for DatabaseConnections (size it to engine_desired_count times the engine's pool size, below the instance's max_connections)."
  type        = number
  default     = 150

  validation {
    condition     = var.db_max_connections_alarm > 0
    error_message = "db_max_connections_alarm must be positive."
  }
}

# ---------------------------------------------------------------------------------------------
# Logs, metrics and alarms
# ---------------------------------------------------------------------------------------------
variable "log_retention_days" {
  description = "Retention of the engine and metrics log groups, in days (a value CloudWatch Logs accepts)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be one of the values CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, ...)."
  }
}

variable "alarm_email_addresses" {
  description = "E-mail addresses subscribed to the alarm topic (each must confirm the subscription)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.alarm_email_addresses : can(regex("^[^@\\s]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", a))])
    error_message = "alarm_email_addresses must be e-mail addresses."
  }
}

variable "enable_prometheus_metrics" {
  description = "Run a CloudWatch agent sidecar that scrapes the engine's Prometheus endpoint and publishes the queue metrics to CloudWatch (namespace metrics_namespace), and alarm on them."
  type        = bool
  default     = true
}

variable "cloudwatch_agent_image" {
  description = "Image of the CloudWatch agent sidecar (pin a version)."
  type        = string
  default     = "public.ecr.aws/cloudwatch-agent/cloudwatch-agent:1.300053.0b1046"

  validation {
    condition     = can(regex("[:@][A-Za-z0-9._:-]+$", var.cloudwatch_agent_image)) && !endswith(var.cloudwatch_agent_image, ":latest")
    error_message = "cloudwatch_agent_image must name a tag or digest other than latest."
  }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the engine's Prometheus metrics."
  type        = string
  default     = "Setpoint"

  validation {
    condition     = can(regex("^[A-Za-z0-9._/#:-]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "metrics_namespace must be a valid custom CloudWatch namespace (not AWS/...)."
  }
}

variable "queue_age_metric_name" {
  description = "Prometheus gauge: age in seconds of the oldest pending (runnable) work unit."
  type        = string
  default     = "setpoint_oldest_pending_age_seconds"

  validation {
    condition     = can(regex("^[a-zA-Z_:][a-zA-Z0-9_:]*$", var.queue_age_metric_name))
    error_message = "queue_age_metric_name must be a Prometheus metric name."
  }
}

variable "parked_units_metric_name" {
  description = "Prometheus gauge: number of parked work units (waiting for an operator)."
  type        = string
  default     = "setpoint_units_parked"

  validation {
    condition     = can(regex("^[a-zA-Z_:][a-zA-Z0-9_:]*$", var.parked_units_metric_name))
    error_message = "parked_units_metric_name must be a Prometheus metric name."
  }
}

variable "tls_certificate_expiry_alarm_days" {
  description = "With grpc_tls: alarm when the gRPC API's certificate expires in fewer than this many days (renewal takes a secret update and a new deployment)."
  type        = number
  default     = 21

  validation {
    condition     = var.tls_certificate_expiry_alarm_days >= 1 && var.tls_certificate_expiry_alarm_days <= 365
    error_message = "tls_certificate_expiry_alarm_days must be between 1 and 365."
  }
}

variable "queue_age_alarm_seconds" {
  description = "Alarm when the oldest runnable work unit has waited longer than this many seconds (workers are not keeping up, or none are running)."
  type        = number
  default     = 300

  validation {
    condition     = var.queue_age_alarm_seconds >= 10
    error_message = "queue_age_alarm_seconds must be at least 10."
  }
}

variable "parked_units_alarm_threshold" {
  description = "Alarm when more than this many work units are parked (0: any parked unit pages an operator)."
  type        = number
  default     = 0

  validation {
    condition     = var.parked_units_alarm_threshold >= 0
    error_message = "parked_units_alarm_threshold must be >= 0."
  }
}
