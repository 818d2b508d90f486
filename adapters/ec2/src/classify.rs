//! The one place where EC2 failures become transient or permanent [`AdapterError`]s.
//!
//! Transient: throttling (`RequestLimitExceeded`, `Throttling`, …), any 5xx, timeouts,
//! connection and other dispatch failures, capacity (`InsufficientInstanceCapacity`,
//! `InsufficientFreeAddressesInSubnet`, with a long [`CAPACITY_RETRY_AFTER`]), an expired
//! request signature (`RequestExpired`). Permanent: bad AMI, instance type or parameters, permission and
//! authentication failures, `IdempotentParameterMismatch`, missing credentials, and any other
//! 4xx code (a client error that the same request will repeat). Messages say what to fix; they
//! quote AWS's own message and error code, which never contain credentials.

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use setpoint_adapter::AdapterError;

/// Earliest retry after EC2 throttled us.
pub const THROTTLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Earliest retry after EC2 had no capacity for the instance type in the AZ.
pub const CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The error code setpoint uses for failures that carry no AWS code.
pub mod codes {
    /// A call or connect timed out.
    pub const TIMEOUT: &str = "ec2-timeout";
    /// The request never reached EC2 (connection refused, DNS, TLS).
    pub const DISPATCH: &str = "ec2-dispatch";
    /// EC2 answered with something the SDK could not read.
    pub const RESPONSE: &str = "ec2-response";
    /// The SDK could not build the request.
    pub const CONSTRUCTION: &str = "ec2-construction";
    /// No credentials were found in the standard chain.
    pub const NO_CREDENTIALS: &str = "ec2-no-credentials";
}

/// Turns a failed EC2 call into an [`AdapterError`]. `operation` names the call for the message
/// (e.g. `"RunInstances"`).
pub fn classify<E>(operation: &str, err: &SdkError<E, HttpResponse>) -> AdapterError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            classify_code(
                operation,
                service.err().code(),
                service.err().message(),
                status,
            )
        }
        SdkError::TimeoutError(_) => AdapterError::transient(format!(
            "{operation} timed out; EC2 may be slow or unreachable, the unit will be retried"
        ))
        .with_code(codes::TIMEOUT),
        SdkError::DispatchFailure(dispatch) => {
            let detail = DisplayErrorContext(err).to_string();
            if dispatch.is_timeout() {
                AdapterError::transient(format!("{operation} timed out connecting to EC2"))
                    .with_code(codes::TIMEOUT)
            } else if looks_like_missing_credentials(&detail) {
                AdapterError::permanent(format!(
                    "{operation}: no AWS credentials were found in the standard chain \
                     (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity, ECS or \
                     instance role); configure credentials for the engine and retry the unit"
                ))
                .with_code(codes::NO_CREDENTIALS)
            } else {
                AdapterError::transient(format!(
                    "{operation} could not reach EC2 (connection failed; check endpoint_url and \
                     network if this persists): {}",
                    short(&detail)
                ))
                .with_code(codes::DISPATCH)
            }
        }
        SdkError::ResponseError(response) => {
            let status = response.raw().status().as_u16();
            AdapterError::transient(format!(
                "{operation}: EC2 answered HTTP {status} with a response that could not be read"
            ))
            .with_code(codes::RESPONSE)
        }
        SdkError::ConstructionFailure(_) => AdapterError::permanent(format!(
            "{operation}: the request could not be built (a bug or a bad setting in [ec2]): {}",
            short(&DisplayErrorContext(err).to_string())
        ))
        .with_code(codes::CONSTRUCTION),
        // `SdkError` is non-exhaustive; a new kind of failure is most likely transport-level.
        _ => AdapterError::transient(format!(
            "{operation} failed: {}",
            short(&DisplayErrorContext(err).to_string())
        )),
    }
}

/// Classifies an AWS error code (and HTTP status) the way [`classify`] does for service errors.
pub fn classify_code(
    operation: &str,
    code: Option<&str>,
    message: Option<&str>,
    status: u16,
) -> AdapterError {
    let code_str = code.unwrap_or("");
    let aws = message.unwrap_or("no message");
    let err = match code_str {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "TooManyRequestsException" => AdapterError::transient(format!(
            "{operation} was throttled by EC2 ({aws}); retrying later"
        ))
        .with_retry_after(THROTTLE_RETRY_AFTER),
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity" => AdapterError::transient(format!(
            "{operation}: EC2 has no capacity for this instance type in the subnet's availability \
             zone right now ({aws}); retrying in the same subnet later (a token is scoped to its \
             AZ). If it persists, choose another instance type for the plan"
        ))
        .with_retry_after(CAPACITY_RETRY_AFTER),
        "InsufficientFreeAddressesInSubnet" => AdapterError::transient(format!(
            "{operation}: the subnet has no free IP address right now ({aws}); retrying in the \
             same subnet later (addresses free up as machines end). If it persists, give the \
             engine a larger subnet"
        ))
        .with_retry_after(CAPACITY_RETRY_AFTER),
        // A signed request that arrived too late (a slow network, a late SDK retry, clock skew):
        // signing it again is all a retry needs, unless the clock is wrong, which the message
        // says.
        "RequestExpired" => AdapterError::transient(format!(
            "{operation}: EC2 received the request after its signature expired ({aws}); \
             retrying. If it repeats, check the engine host's clock"
        )),
        "InternalError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "Unavailable"
        | "IncorrectInstanceState"
        | "IncorrectState" => AdapterError::transient(format!(
            "{operation}: EC2 reported a temporary problem ({aws}); retrying"
        )),
        c if c.starts_with("InvalidAMIID") => AdapterError::permanent(format!(
            "{operation}: the AMI does not exist or is not usable in this region/account ({aws}); \
             fix ec2.plans.<plan>.image_id, ec2.default_image_id or the spec's image_id, then \
             retry the unit"
        )),
        c if c.starts_with("InvalidInstanceType") || c == "InvalidInstanceAttributeValue" => {
            AdapterError::permanent(format!(
                "{operation}: the instance type is not offered here ({aws}); fix \
                 ec2.plans.<plan>.instance_type or the spec's instance_type, then retry the unit"
            ))
        }
        "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "InvalidParameter"
        | "MissingParameter"
        | "Unsupported"
        | "UnsupportedOperation" => AdapterError::permanent(format!(
            "{operation}: EC2 rejected the request parameters ({aws}); fix the plan or spec \
                 (image, instance type, subnet, security groups), then retry the unit"
        )),
        c if c.starts_with("InvalidSubnetID") || c.starts_with("InvalidGroup") => {
            AdapterError::permanent(format!(
                "{operation}: a configured subnet or security group does not exist ({aws}); fix \
                 ec2.subnet_ids / ec2.security_group_ids, then retry the unit"
            ))
        }
        "UnauthorizedOperation"
        | "AuthFailure"
        | "OptInRequired"
        | "Blocked"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch" => AdapterError::permanent(format!(
            "{operation}: AWS refused the engine's credentials or permissions ({aws}); grant the \
             engine's IAM identity ec2:RunInstances, ec2:CreateTags, ec2:DescribeInstances, \
             ec2:TerminateInstances and, for resizes, ec2:StopInstances, ec2:StartInstances and \
             ec2:ModifyInstanceAttribute (or fix its credentials), then retry the unit"
        )),
        "IdempotentParameterMismatch" => AdapterError::permanent(format!(
            "{operation}: EC2 already used this unit's client token with different parameters \
             ({aws}); the plan or spec, or the engine's EC2 settings (subnet_ids, image, plan \
             instance types), changed after the first attempt. Restore the settings and retry \
             the unit, or cancel it and update the resource instead"
        )),
        "InstanceLimitExceeded" | "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded" => {
            AdapterError::permanent(format!(
                "{operation}: the account's EC2 quota is exhausted ({aws}); raise the quota or \
                 free capacity, then retry the unit"
            ))
        }
        _ if status >= 500 => AdapterError::transient(format!(
            "{operation}: EC2 failed with HTTP {status} ({aws}); retrying"
        )),
        _ if status == 429 => AdapterError::transient(format!(
            "{operation} was throttled (HTTP 429: {aws}); retrying later"
        ))
        .with_retry_after(THROTTLE_RETRY_AFTER),
        _ if (400..500).contains(&status) => AdapterError::permanent(format!(
            "{operation}: EC2 rejected the request with {code_str} (HTTP {status}: {aws}); the \
             same request will fail again, fix it and retry the unit"
        )),
        _ => AdapterError::transient(format!(
            "{operation}: EC2 failed with {code_str} (HTTP {status}: {aws})"
        )),
    };
    match code {
        Some(c) if !c.is_empty() => err.with_code(c),
        _ => err,
    }
}

fn looks_like_missing_credentials(detail: &str) -> bool {
    detail.contains("no providers in chain provided credentials")
        || detail.contains("CredentialsNotLoaded")
        || detail.contains("failed to load credentials")
}

/// Keeps error details readable in a work event (the SDK's chains can be long).
fn short(s: &str) -> String {
    const MAX: usize = 400;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_ec2::operation::run_instances::RunInstancesError;
    use setpoint_adapter::ErrorClass;

    use super::*;

    fn raw(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), "".into())
    }

    fn service(code: &str, status: u16) -> SdkError<RunInstancesError, HttpResponse> {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message(format!("message for {code}"))
            .build();
        SdkError::service_error(RunInstancesError::generic(meta), raw(status))
    }

    fn check(err: &SdkError<RunInstancesError, HttpResponse>, class: ErrorClass) -> AdapterError {
        let e = classify("RunInstances", err);
        assert_eq!(e.class, class, "{e}");
        assert!(e.message.starts_with("RunInstances"), "{e}");
        e
    }

    #[test]
    fn throttling_is_transient_with_retry_after() {
        for code in ["RequestLimitExceeded", "Throttling"] {
            let e = check(&service(code, 503), ErrorClass::Transient);
            assert_eq!(e.code.as_deref(), Some(code));
            assert_eq!(e.retry_after, Some(THROTTLE_RETRY_AFTER));
        }
    }

    #[test]
    fn free_addresses_and_expired_signatures_are_transient() {
        let e = check(
            &service("InsufficientFreeAddressesInSubnet", 400),
            ErrorClass::Transient,
        );
        assert_eq!(e.retry_after, Some(CAPACITY_RETRY_AFTER));
        let e = check(&service("RequestExpired", 400), ErrorClass::Transient);
        assert!(e.message.contains("clock"), "{e}");
    }

    #[test]
    fn capacity_is_transient_with_a_long_delay() {
        let e = check(
            &service("InsufficientInstanceCapacity", 500),
            ErrorClass::Transient,
        );
        assert_eq!(e.retry_after, Some(CAPACITY_RETRY_AFTER));
        assert!(e.message.contains("same subnet"), "{e}");
    }

    #[test]
    fn server_errors_are_transient() {
        check(&service("InternalError", 500), ErrorClass::Transient);
        check(&service("SomethingNew", 503), ErrorClass::Transient);
        let garbled: SdkError<RunInstancesError, HttpResponse> =
            SdkError::response_error("unparseable body", raw(502));
        let e = check(&garbled, ErrorClass::Transient);
        assert_eq!(e.code.as_deref(), Some(codes::RESPONSE));
    }

    #[test]
    fn timeouts_and_dispatch_failures_are_transient() {
        let t: SdkError<RunInstancesError, HttpResponse> =
            SdkError::timeout_error("operation timeout (all attempts including retries) occurred");
        assert_eq!(
            check(&t, ErrorClass::Transient).code.as_deref(),
            Some(codes::TIMEOUT)
        );
        let ct: SdkError<RunInstancesError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::timeout("connect timed out".into()));
        assert_eq!(
            check(&ct, ErrorClass::Transient).code.as_deref(),
            Some(codes::TIMEOUT)
        );
        let io: SdkError<RunInstancesError, HttpResponse> = SdkError::dispatch_failure(
            ConnectorError::io("Connection refused (os error 111)".into()),
        );
        assert_eq!(
            check(&io, ErrorClass::Transient).code.as_deref(),
            Some(codes::DISPATCH)
        );
    }

    #[test]
    fn missing_credentials_are_permanent() {
        let e: SdkError<RunInstancesError, HttpResponse> = SdkError::dispatch_failure(
            ConnectorError::other("no providers in chain provided credentials".into(), None),
        );
        let e = check(&e, ErrorClass::Permanent);
        assert_eq!(e.code.as_deref(), Some(codes::NO_CREDENTIALS));
    }

    #[test]
    fn bad_requests_are_permanent_with_actionable_messages() {
        for (code, hint) in [
            ("InvalidAMIID.NotFound", "image_id"),
            ("InvalidAMIID.Malformed", "image_id"),
            ("InvalidParameterValue", "fix the plan or spec"),
            ("InvalidParameterCombination", "fix the plan or spec"),
            ("InvalidInstanceType", "instance_type"),
            ("InvalidInstanceType.NotFound", "instance_type"),
            ("InvalidInstanceAttributeValue", "instance_type"),
            ("InvalidSubnetID.NotFound", "subnet_ids"),
            ("UnauthorizedOperation", "IAM"),
            ("AuthFailure", "credentials"),
            ("IdempotentParameterMismatch", "subnet_ids"),
            ("VcpuLimitExceeded", "quota"),
            ("SomeNewClientError", "fix it"),
        ] {
            let e = check(&service(code, 400), ErrorClass::Permanent);
            assert_eq!(e.code.as_deref(), Some(code));
            assert!(e.message.contains(hint), "{code}: {e}");
            assert!(e.message.contains(&format!("message for {code}")), "{e}");
            assert_eq!(e.retry_after, None);
        }
    }

    #[test]
    fn construction_failures_are_permanent() {
        let e: SdkError<RunInstancesError, HttpResponse> =
            SdkError::construction_failure("missing required field");
        check(&e, ErrorClass::Permanent);
    }

    #[test]
    fn long_details_are_cut_on_a_char_boundary() {
        let s = "é".repeat(300);
        assert!(short(&s).len() <= 404);
    }
}
