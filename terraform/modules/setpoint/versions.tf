terraform {
  # 1.11 is the first release with write-only arguments (password_wo, secret_string_wo), which
  # keep the database password out of plans and state.
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "5.100.0"
    }
  }
}
