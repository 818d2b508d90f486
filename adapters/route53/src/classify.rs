//! The one place where Route 53 failures become transient or permanent [`AdapterError`]s.
//!
//! Transient: throttling (`Throttling`, `ThrottlingException`, HTTP 429), `PriorRequestNotComplete`
//! (Route 53 is still applying an earlier change to the zone), `HostedZoneAlreadyExists` (the
//! zone this token made was not listed; the retry looks again — `ensure_zone` itself turns it
//! permanent when the zone is gone for good), any 5xx, timeouts,
//! connection and other dispatch failures, unreadable responses, an expired signature.
//! An `InvalidChangeBatch` that says a record to delete was not found is transient too: the
//! zone changed between reading and writing, and the retry reads it again. Permanent: any other `InvalidChangeBatch`, `InvalidInput`, `InvalidDomainName`, `NoSuchHostedZone`
//! (callers that can take "already gone" handle it before it gets here), `HostedZoneNotEmpty`,
//! access and credential failures, quotas, and any other 4xx code (a client error that the same
//! request repeats). A `Retry-After` header, where Route 53 sends one, becomes `retry_after`.
//! Messages say what to fix; they quote AWS's own message and code, which never hold
//! credentials.

use std::error::Error as StdError;
use std::time::Duration;

use aws_sdk_route53::config::http::HttpResponse;
use aws_sdk_route53::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use setpoint_adapter::AdapterError;

/// Earliest retry after Route 53 throttled us (it allows five change requests per second per
/// account) and sent no `Retry-After`.
pub const THROTTLE_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Earliest retry while Route 53 is still applying an earlier change to the zone, or has not
/// yet shown a zone it just made.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The error codes setpoint uses for failures that carry no AWS code.
pub mod codes {
    /// A call or connect timed out.
    pub const TIMEOUT: &str = "route53-timeout";
    /// The request never reached Route 53 (connection refused, DNS, TLS).
    pub const DISPATCH: &str = "route53-dispatch";
    /// Route 53 answered with something the SDK could not read.
    pub const RESPONSE: &str = "route53-response";
    /// The SDK could not build the request.
    pub const CONSTRUCTION: &str = "route53-construction";
    /// No credentials were found in the standard chain.
    pub const NO_CREDENTIALS: &str = "route53-no-credentials";
}

/// The IAM actions the adapter needs, for messages about permissions.
const IAM_ACTIONS: &str = "route53:ListHostedZones, route53:GetHostedZone, \
     route53:CreateHostedZone, route53:UpdateHostedZoneComment, route53:DeleteHostedZone, \
     route53:ListResourceRecordSets, route53:ChangeResourceRecordSets, \
     route53:ListTagsForResource and route53:ChangeTagsForResource";

/// Turns a failed Route 53 call into an [`AdapterError`]. `operation` names the call for the
/// message (e.g. `"CreateHostedZone"`).
pub fn classify<E>(operation: &str, err: &SdkError<E, HttpResponse>) -> AdapterError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let raw = service.raw();
            let retry_after = raw
                .headers()
                .get("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let e = classify_code(
                operation,
                service.err().code(),
                service.err().message(),
                raw.status().as_u16(),
            );
            match retry_after {
                Some(after) if e.is_transient() => e.with_retry_after(after),
                _ => e,
            }
        }
        SdkError::TimeoutError(_) => AdapterError::transient(format!(
            "{operation} timed out; Route 53 may be slow or unreachable, the unit will be retried"
        ))
        .with_code(codes::TIMEOUT),
        SdkError::DispatchFailure(dispatch) => {
            let detail = DisplayErrorContext(err).to_string();
            if dispatch.is_timeout() {
                AdapterError::transient(format!("{operation} timed out connecting to Route 53"))
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
                    "{operation} could not reach Route 53 (connection failed; check \
                     route53.endpoint_url and the network if this persists): {}",
                    short(&detail)
                ))
                .with_code(codes::DISPATCH)
            }
        }
        SdkError::ResponseError(response) => {
            let status = response.raw().status().as_u16();
            AdapterError::transient(format!(
                "{operation}: Route 53 answered HTTP {status} with a response that could not be \
                 read"
            ))
            .with_code(codes::RESPONSE)
        }
        SdkError::ConstructionFailure(_) => AdapterError::permanent(format!(
            "{operation}: the request could not be built (a bug, or a bad setting in \
             [route53]): {}",
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

/// Classifies a Route 53 error code (and HTTP status) the way [`classify`] does for service
/// errors.
pub fn classify_code(
    operation: &str,
    code: Option<&str>,
    message: Option<&str>,
    status: u16,
) -> AdapterError {
    let code_str = code.unwrap_or("");
    let aws = message.unwrap_or("no message");
    let err = match code_str {
        "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => AdapterError::transient(format!(
            "{operation} was throttled by Route 53 ({aws}); retrying later"
        ))
        .with_retry_after(THROTTLE_RETRY_AFTER)
        .throttling(),
        "PriorRequestNotComplete" => AdapterError::transient(format!(
            "{operation}: Route 53 is still applying an earlier change to this zone ({aws}); \
             retrying later"
        ))
        .with_retry_after(BUSY_RETRY_AFTER),
        // The lookup by CallerReference missed a zone this token made; the retry looks again
        // and adopts it. (`ensure_zone` looks again at once, and makes it permanent if the zone
        // is gone: a CallerReference can never create a second zone.)
        "HostedZoneAlreadyExists" => AdapterError::transient(format!(
            "{operation}: Route 53 already made a zone for this unit's token ({aws}) but did not \
             list it; the retry looks for it again"
        ))
        .with_retry_after(BUSY_RETRY_AFTER),
        "RequestExpired" => AdapterError::transient(format!(
            "{operation}: Route 53 received the request after its signature expired ({aws}); \
             retrying. If it repeats, check the engine host's clock"
        )),
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            AdapterError::transient(format!(
                "{operation}: Route 53 reported a temporary problem ({aws}); retrying"
            ))
        }
        // A DELETE of what the zone held when setpoint read it: the zone changed in between.
        // The retry reads it again and decides afresh.
        "InvalidChangeBatch" if aws.contains("but it was not found") => {
            AdapterError::transient(format!(
                "{operation}: the zone changed while setpoint was writing to it ({aws}); the \
                 retry reads it again"
            ))
            .with_retry_after(BUSY_RETRY_AFTER)
        }
        "InvalidChangeBatch" => AdapterError::permanent(format!(
            "{operation}: Route 53 refused the record changes ({aws}); the spec's records \
             conflict with the zone (a CNAME next to other records, weighted and simple sets \
             of one name and type, a record outside the zone). Fix the spec or the zone, then \
             retry the unit"
        )),
        "InvalidInput" | "InvalidArgument" | "InvalidDomainName" => {
            AdapterError::permanent(format!(
                "{operation}: Route 53 rejected the request ({aws}); the spec passed setpoint's \
                 checks, so this is a gap in them: fix the spec (zone name, record names and \
                 values), then retry the unit"
            ))
        }
        "NoSuchHostedZone" => AdapterError::permanent(format!(
            "{operation}: the hosted zone does not exist ({aws}); it was deleted outside \
             setpoint or the recorded zone id is wrong. Let the resync recreate it, or cancel \
             the unit"
        )),
        "HostedZoneNotEmpty" => AdapterError::permanent(format!(
            "{operation}: the zone still holds records besides its SOA and NS ({aws}); records \
             setpoint does not own are in it. Delete them in Route 53, then retry the unit"
        )),
        "ConflictingDomainExists" | "DelegationSetNotAvailable" | "DelegationSetNotReusable" => {
            AdapterError::permanent(format!(
                "{operation}: Route 53 cannot create this zone ({aws}); another zone for the \
                 domain conflicts. Choose another name or remove the other zone, then retry the \
                 unit"
            ))
        }
        "TooManyHostedZones" | "LimitsExceeded" | "TooManyTagKeys" => {
            AdapterError::permanent(format!(
                "{operation}: the account's Route 53 quota is exhausted ({aws}); raise the quota \
                 or delete unused zones, then retry the unit"
            ))
        }
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "NotAuthorizedException"
        | "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "MissingAuthenticationToken"
        | "ExpiredToken" => AdapterError::permanent(format!(
            "{operation}: AWS refused the engine's credentials or permissions ({aws}); grant \
             the engine's IAM identity {IAM_ACTIONS} (or fix its credentials), then retry the \
             unit"
        )),
        _ if status >= 500 => AdapterError::transient(format!(
            "{operation}: Route 53 failed with HTTP {status} ({aws}); retrying"
        )),
        _ if status == 429 => AdapterError::transient(format!(
            "{operation} was throttled (HTTP 429: {aws}); retrying later"
        ))
        .with_retry_after(THROTTLE_RETRY_AFTER)
        .throttling(),
        _ if (400..500).contains(&status) => AdapterError::permanent(format!(
            "{operation}: Route 53 rejected the request with {code_str} (HTTP {status}: {aws}); \
             the same request will fail again, fix it and retry the unit"
        )),
        _ => AdapterError::transient(format!(
            "{operation}: Route 53 failed with {code_str} (HTTP {status}: {aws})"
        )),
    };
    match code {
        Some(c) if !c.is_empty() => err.with_code(c),
        _ => err,
    }
}

/// True if `err` is Route 53's `NoSuchHostedZone` (for callers where it means "already gone").
pub(crate) fn is_no_such_zone(err: &AdapterError) -> bool {
    err.code.as_deref() == Some("NoSuchHostedZone")
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
    use aws_sdk_route53::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_route53::operation::change_resource_record_sets::ChangeResourceRecordSetsError;
    use setpoint_adapter::ErrorClass;

    use super::*;

    type Err = SdkError<ChangeResourceRecordSetsError, HttpResponse>;

    fn raw(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().unwrap(), "".into())
    }

    fn service(code: &str, status: u16) -> Err {
        let meta = ErrorMetadata::builder()
            .code(code)
            .message(format!("message for {code}"))
            .build();
        SdkError::service_error(ChangeResourceRecordSetsError::generic(meta), raw(status))
    }

    fn check(err: &Err, class: ErrorClass) -> AdapterError {
        let e = classify("ChangeResourceRecordSets", err);
        assert_eq!(e.class, class, "{e}");
        assert!(e.message.starts_with("ChangeResourceRecordSets"), "{e}");
        e
    }

    #[test]
    fn throttling_and_busy_zones_are_transient_with_retry_after() {
        for (code, after) in [
            ("Throttling", THROTTLE_RETRY_AFTER),
            ("ThrottlingException", THROTTLE_RETRY_AFTER),
            ("PriorRequestNotComplete", BUSY_RETRY_AFTER),
            ("HostedZoneAlreadyExists", BUSY_RETRY_AFTER),
        ] {
            let e = check(&service(code, 400), ErrorClass::Transient);
            assert_eq!(e.code.as_deref(), Some(code));
            assert_eq!(e.retry_after, Some(after), "{code}");
        }
    }

    #[test]
    fn a_zone_that_changed_under_a_batch_is_transient() {
        let message = "Tried to delete resource record set [name='a.example.com.', type='A'] \
                       but it was not found";
        let e = classify_code(
            "ChangeResourceRecordSets",
            Some("InvalidChangeBatch"),
            Some(message),
            400,
        );
        assert!(e.is_transient(), "{e}");
        assert_eq!(e.retry_after, Some(BUSY_RETRY_AFTER));
        let e = classify_code(
            "ChangeResourceRecordSets",
            Some("InvalidChangeBatch"),
            Some("RRSet of type CNAME with DNS name a.example.com. is not permitted"),
            400,
        );
        assert!(!e.is_transient(), "{e}");
    }

    #[test]
    fn a_retry_after_header_wins() {
        let mut response = raw(400);
        response.headers_mut().insert("Retry-After", "7");
        let meta = ErrorMetadata::builder().code("Throttling").build();
        let err: Err =
            SdkError::service_error(ChangeResourceRecordSetsError::generic(meta), response);
        let e = check(&err, ErrorClass::Transient);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn server_errors_timeouts_and_dispatch_failures_are_transient() {
        check(&service("InternalFailure", 500), ErrorClass::Transient);
        check(&service("SomethingNew", 503), ErrorClass::Transient);
        check(&service("", 429), ErrorClass::Transient);
        let garbled: Err = SdkError::response_error("unparseable body", raw(502));
        let e = check(&garbled, ErrorClass::Transient);
        assert_eq!(e.code.as_deref(), Some(codes::RESPONSE));
        let t: Err = SdkError::timeout_error("operation timeout");
        assert_eq!(
            check(&t, ErrorClass::Transient).code.as_deref(),
            Some(codes::TIMEOUT)
        );
        let ct: Err = SdkError::dispatch_failure(ConnectorError::timeout("connect".into()));
        assert_eq!(
            check(&ct, ErrorClass::Transient).code.as_deref(),
            Some(codes::TIMEOUT)
        );
        let io: Err = SdkError::dispatch_failure(ConnectorError::io(
            "Connection refused (os error 111)".into(),
        ));
        assert_eq!(
            check(&io, ErrorClass::Transient).code.as_deref(),
            Some(codes::DISPATCH)
        );
    }

    #[test]
    fn bad_requests_and_permissions_are_permanent_with_actionable_messages() {
        for (code, hint) in [
            ("InvalidChangeBatch", "Fix the spec or the zone"),
            ("InvalidInput", "fix the spec"),
            ("InvalidDomainName", "fix the spec"),
            ("NoSuchHostedZone", "resync"),
            ("HostedZoneNotEmpty", "Delete them"),
            ("ConflictingDomainExists", "another zone"),
            ("TooManyHostedZones", "quota"),
            ("AccessDenied", "route53:ChangeResourceRecordSets"),
            ("InvalidClientTokenId", "credentials"),
            ("SomeNewClientError", "fix it"),
        ] {
            let e = check(&service(code, 400), ErrorClass::Permanent);
            assert_eq!(e.code.as_deref(), Some(code));
            assert!(e.message.contains(hint), "{code}: {e}");
            assert!(e.message.contains(&format!("message for {code}")), "{e}");
            assert_eq!(e.retry_after, None);
        }
        assert!(is_no_such_zone(&classify(
            "GetHostedZone",
            &service("NoSuchHostedZone", 404)
        )));
    }

    #[test]
    fn missing_credentials_and_construction_failures_are_permanent() {
        let e: Err = SdkError::dispatch_failure(ConnectorError::other(
            "no providers in chain provided credentials".into(),
            None,
        ));
        let e = check(&e, ErrorClass::Permanent);
        assert_eq!(e.code.as_deref(), Some(codes::NO_CREDENTIALS));
        let e: Err = SdkError::construction_failure("missing required field");
        check(&e, ErrorClass::Permanent);
    }

    #[test]
    fn long_details_are_cut_on_a_char_boundary() {
        assert!(short(&"é".repeat(300)).len() <= 404);
    }
}
