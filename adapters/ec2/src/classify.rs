//! The one place where EC2 failures become transient or permanent [`AdapterError`]s.
//!
//! Transient: throttling (`RequestLimitExceeded`, `Throttling`, …), any 5xx, timeouts,
//! connection and other dispatch failures, capacity (`InsufficientInstanceCapacity`,
//! `InsufficientFreeAddressesInSubnet`, with a long [`CAPACITY_RETRY_AFTER`]), an expired
//! request signature (`RequestExpired`). Permanent: bad AMI, instance type or parameters, permission and
//! authentication failures, `IdempotentParameterMismatch`, missing credentials, and any other
//! 4xx code (a client error that the same request will repeat). Messages say what to fix; they
//! quote AWS's own message and error code, which never contain credentials.
//!
//! Not failures at all: EBS refusing a volume change because of its limit on modifications
//! (`VolumeModificationRateExceeded`) or because the previous one is still under way
//! (`IncorrectModificationState`). Both are [`AdapterError::waiting`]: the unit waits without
//! using up an attempt, and [`volume_change_refused`] says when the next change is allowed.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use setpoint_adapter::AdapterError;

/// Earliest retry after EC2 throttled us.
pub const THROTTLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Earliest retry after EC2 had no capacity for the instance type in the AZ.
pub const CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long EBS makes a volume wait between two modifications: "wait at least 6 hours between
/// modifications per EBS volume" (`VolumeModificationRateExceeded`).
pub const VOLUME_COOLDOWN: Duration = Duration::from_secs(6 * 3600);

/// When EBS refuses a change for its rate limit and the adapter cannot tell when the limit
/// ends (the last change's start is unknown, or already more than [`VOLUME_COOLDOWN`] ago, as
/// under a limit counted over a longer window), it checks again after this long.
pub const VOLUME_RATE_RECHECK: Duration = Duration::from_secs(3600);

/// When the previous modification of a volume is still under way, the next attempt waits this
/// long (small volumes finish in minutes, large ones in hours).
pub const VOLUME_BUSY_RETRY_AFTER: Duration = Duration::from_secs(10 * 60);

/// Added to a computed cooldown end, so the retry does not arrive a moment too early.
const COOLDOWN_SLACK: Duration = Duration::from_secs(60);

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
    /// EBS's limit on modifications of one volume (the 6-hour rule).
    pub const VOLUME_RATE: &str = "VolumeModificationRateExceeded";
    /// The volume's previous modification is still under way.
    pub const VOLUME_BUSY: &str = "IncorrectModificationState";
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
        .with_retry_after(THROTTLE_RETRY_AFTER)
        .throttling(),
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
        // Not failures: the volume may change again later. `volume_change_refused` replaces the
        // message with one that says when, where the last change's start is known.
        codes::VOLUME_RATE => AdapterError::waiting(
            format!(
                "{operation}: EBS allows no further change of this volume yet ({aws}); \
                 checking again in {} minutes",
                VOLUME_RATE_RECHECK.as_secs() / 60
            ),
            VOLUME_RATE_RECHECK,
        ),
        codes::VOLUME_BUSY => AdapterError::waiting(
            format!(
                "{operation}: the volume's previous modification is still under way ({aws}); \
                 EBS takes a new one once it completes, checking again in {} minutes",
                VOLUME_BUSY_RETRY_AFTER.as_secs() / 60
            ),
            VOLUME_BUSY_RETRY_AFTER,
        ),
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
             engine's IAM identity ec2:RunInstances, ec2:CreateTags (instances and volumes), \
             ec2:DescribeInstances, ec2:DescribeVolumes, ec2:DescribeVolumesModifications, \
             ec2:TerminateInstances and, for resizes, ec2:StopInstances, ec2:StartInstances, \
             ec2:ModifyInstanceAttribute and ec2:ModifyVolume, plus the KMS grants of a data \
             volume key (or fix its credentials), then retry the unit"
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
        .with_retry_after(THROTTLE_RETRY_AFTER)
        .throttling(),
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

/// Refines a classified `ModifyVolume` failure of `volume_id` (AWS's own message:
/// `aws_message`) whose last modification started at `last_started`: for EBS's rate limit, the
/// waiting error says when the next change is allowed ([`VOLUME_COOLDOWN`] after the last one
/// began) and waits until then; anything else is returned as it is.
pub fn volume_change_refused(
    err: AdapterError,
    aws_message: Option<&str>,
    volume_id: &str,
    last_started: Option<SystemTime>,
    now: SystemTime,
) -> AdapterError {
    if err.code.as_deref() != Some(codes::VOLUME_RATE) {
        return err;
    }
    let aws = aws_message.unwrap_or("no message");
    let next = last_started.map(|t| (t, t + VOLUME_COOLDOWN));
    let (message, wait) = match next {
        Some((began, next)) if next > now => {
            let wait = next.duration_since(now).unwrap_or_default() + COOLDOWN_SLACK;
            (
                format!(
                    "EBS allows one change of volume {volume_id} every {} hours: the last began \
                     at {}, so the next is allowed from {}; the unit waits until then (AWS: \
                     {aws})",
                    VOLUME_COOLDOWN.as_secs() / 3600,
                    rfc3339(began),
                    rfc3339(next)
                ),
                wait,
            )
        }
        Some((began, _)) => (
            format!(
                "EBS refuses another change of volume {volume_id} for now although its last \
                 change began at {}, more than {} hours ago (a limit counted over a longer \
                 window); checking again at {} (AWS: {aws})",
                rfc3339(began),
                VOLUME_COOLDOWN.as_secs() / 3600,
                rfc3339(now + VOLUME_RATE_RECHECK)
            ),
            VOLUME_RATE_RECHECK,
        ),
        None => (
            format!(
                "EBS allows no further change of volume {volume_id} yet (at most one every {} \
                 hours); checking again at {} (AWS: {aws})",
                VOLUME_COOLDOWN.as_secs() / 3600,
                rfc3339(now + VOLUME_RATE_RECHECK)
            ),
            VOLUME_RATE_RECHECK,
        ),
    };
    AdapterError::waiting(message, wait).with_code(codes::VOLUME_RATE)
}

/// `2026-05-01T12:00:00Z`, to the second.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    aws_sdk_ec2::primitives::DateTime::from_secs(i64::try_from(secs).unwrap_or(i64::MAX))
        .fmt(aws_sdk_ec2::primitives::DateTimeFormat::DateTime)
        .unwrap_or_else(|_| format!("{secs} s after the epoch"))
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
            assert!(e.throttled, "a budget lowers its rate on it");
        }
        assert!(!check(&service("InternalError", 500), ErrorClass::Transient).throttled);
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

    /// EBS's limit on volume changes (moto has none, so these are unit tests on the codes AWS
    /// sends): a wait that uses up no attempt, until the time the message names.
    #[test]
    fn the_volume_change_limit_is_a_wait_until_the_cooldown_ends() {
        const RATE_MESSAGE: &str = "You've reached the maximum modification rate per volume \
                                    limit. Wait at least 6 hours between modifications per EBS \
                                    volume.";
        let refused = || {
            classify_code(
                "ModifyVolume",
                Some(codes::VOLUME_RATE),
                Some(RATE_MESSAGE),
                400,
            )
        };
        let plain = refused();
        assert!(plain.waiting && plain.is_transient(), "{plain}");
        assert_eq!(plain.retry_after, Some(VOLUME_RATE_RECHECK));
        assert_eq!(plain.code.as_deref(), Some(codes::VOLUME_RATE));

        // The last change began 2 hours ago: the next is allowed in 4 hours.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let began = now - Duration::from_secs(2 * 3600);
        let e = volume_change_refused(refused(), Some(RATE_MESSAGE), "vol-1", Some(began), now);
        assert!(e.waiting, "{e}");
        assert_eq!(e.code.as_deref(), Some(codes::VOLUME_RATE));
        assert_eq!(
            e.retry_after,
            Some(Duration::from_secs(4 * 3600) + COOLDOWN_SLACK)
        );
        assert!(e.message.contains("vol-1"), "{e}");
        assert!(e.message.contains("2027-01-15T06:00:00Z"), "began: {e}");
        assert!(
            e.message
                .contains("next is allowed from 2027-01-15T12:00:00Z"),
            "{e}"
        );
        assert!(
            e.message.contains("Wait at least 6 hours"),
            "AWS's message kept: {e}"
        );

        // Unknown start, or one longer ago than the cooldown: check again in an hour.
        let e = volume_change_refused(refused(), Some(RATE_MESSAGE), "vol-1", None, now);
        assert!(
            e.waiting && e.retry_after == Some(VOLUME_RATE_RECHECK),
            "{e}"
        );
        assert!(e.message.contains("2027-01-15T09:00:00Z"), "{e}");
        let long_ago = now - Duration::from_secs(7 * 3600);
        let e = volume_change_refused(refused(), Some(RATE_MESSAGE), "vol-1", Some(long_ago), now);
        assert!(
            e.waiting && e.retry_after == Some(VOLUME_RATE_RECHECK),
            "{e}"
        );

        // Other failures pass through untouched.
        let other = classify_code(
            "ModifyVolume",
            Some("InvalidParameterValue"),
            Some("m"),
            400,
        );
        assert_eq!(
            volume_change_refused(other.clone(), None, "vol-1", Some(began), now),
            other
        );
    }

    #[test]
    fn a_volume_still_being_modified_is_a_wait_too() {
        let e = classify_code(
            "ModifyVolume",
            Some(codes::VOLUME_BUSY),
            Some("Volume vol-1 cannot be modified in modification state OPTIMIZING"),
            400,
        );
        assert!(e.waiting && e.is_transient(), "{e}");
        assert_eq!(e.retry_after, Some(VOLUME_BUSY_RETRY_AFTER));
        assert!(e.message.contains("OPTIMIZING"), "{e}");
        // volume_change_refused leaves it as it is.
        let now = SystemTime::now();
        assert_eq!(
            volume_change_refused(e.clone(), None, "vol-1", Some(now), now),
            e
        );
        // Through `classify`, from a real SDK error value.
        let sdk = service(codes::VOLUME_BUSY, 400);
        let e = classify("RunInstances", &sdk);
        assert!(e.waiting, "{e}");
        // Ordinary errors are never waits.
        assert!(!check(&service("Throttling", 400), ErrorClass::Transient).waiting);
    }
}
