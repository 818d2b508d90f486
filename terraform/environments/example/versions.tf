terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "5.100.0"
    }
  }

  # Keep state remote in real use, for example:
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "setpoint/example.tfstate"
  #   region       = "eu-west-1"
  #   use_lockfile = true
  # }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      "app"         = "setpoint"
      "environment" = var.environment
      "managed-by"  = "terraform"
    }
  }
}
