//! Error classes: the one place where a Kubernetes API failure becomes transient or permanent.
//!
//! | failure | class | why |
//! |---|---|---|
//! | 429 Too Many Requests | transient (with `Retry-After`) | API priority and fairness throttling |
//! | 5xx, 408, 410 | transient | the server or its etcd is struggling; a watch cache expired |
//! | timeouts, connection refused/reset, HTTP errors | transient | the network or the server restarting |
//! | 409 conflict with another field manager | **permanent** | someone else owns a field we would change; an operator decides (or enables `force_conflicts`) |
//! | 409 other (a `resourceVersion` precondition failed, already exists) | transient | a concurrent writer; the adapter re-reads and retries a few times itself ([`is_stale_write`]), then the next attempt does |
//! | 400, 422 | permanent | the object is invalid; retrying sends the same object |
//! | 401, 403 | permanent | credentials or RBAC must change — except 403 *namespace terminating*, transient |
//! | 404 of a namespace | transient | the namespace vanished between our writes; the next attempt re-applies it |
//! | 404 of anything else, other 4xx | permanent | the API is not served (wrong cluster version) |
//! | bad TLS material, kubeconfig, response that does not parse | permanent | configuration must change |
//!
//! Messages never include request bodies, so secret data cannot leak into them.

use std::time::Duration;

use kube::core::Status;
use setpoint_adapter::AdapterError;

use crate::config::ConfigError;

/// The `reason` of a Status cause that reports a field-manager conflict.
pub const CAUSE_FIELD_MANAGER_CONFLICT: &str = "FieldManagerConflict";
/// The error code of a permanent field-manager conflict.
pub const CODE_FIELD_MANAGER_CONFLICT: &str = "FieldManagerConflict";

/// The error code of an apply or delete given up because the instance's objects kept changing
/// between the adapter's reads and its conditional writes (transient).
pub const CODE_KEPT_CHANGING: &str = "objects-kept-changing";

/// True when `err` is the API server refusing a write whose `resourceVersion` (or uid)
/// precondition no longer holds: 409 reason `Conflict` without field-manager causes. The
/// write changed nothing; reading again and retrying is the answer.
pub fn is_stale_write(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => {
            status.code == 409
                && status.reason == "Conflict"
                && !status.details.as_ref().is_some_and(|d| {
                    d.causes
                        .iter()
                        .any(|c| c.reason == CAUSE_FIELD_MANAGER_CONFLICT)
                })
        }
        _ => false,
    }
}

/// Classifies a kube client error. `what` names the call for the message, e.g.
/// `"apply Deployment setpoint-acme/kvx-…"`.
pub fn classify(what: &str, err: &kube::Error) -> AdapterError {
    match err {
        kube::Error::Api(status) => classify_status(what, status),
        kube::Error::HyperError(e) => {
            AdapterError::transient(format!("{what}: HTTP error talking to the API server: {e}"))
                .with_code("http")
        }
        kube::Error::Service(e) => {
            let chain = error_chain(e.as_ref());
            if chain.contains("certificate") || chain.contains("UnknownIssuer") {
                AdapterError::permanent(format!(
                    "{what}: the API server's TLS certificate is not trusted: {chain}"
                ))
                .with_code("tls")
            } else {
                let code = if chain.contains("timed out") || chain.contains("elapsed") {
                    "timeout"
                } else {
                    "connection"
                };
                AdapterError::transient(format!("{what}: cannot reach the API server: {chain}"))
                    .with_code(code)
            }
        }
        kube::Error::HttpError(e) => {
            AdapterError::transient(format!("{what}: HTTP error: {e}")).with_code("http")
        }
        kube::Error::ReadEvents(e) => {
            AdapterError::transient(format!("{what}: reading the response failed: {e}"))
                .with_code("connection")
        }
        kube::Error::SerdeError(e) => AdapterError::permanent(format!(
            "{what}: the API server's answer does not parse ({e}); is this a Kubernetes API server of a supported version?"
        ))
        .with_code("bad-response"),
        kube::Error::FromUtf8(_) => AdapterError::permanent(format!(
            "{what}: the API server's answer is not UTF-8"
        ))
        .with_code("bad-response"),
        kube::Error::BuildRequest(e) => {
            AdapterError::permanent(format!("{what}: invalid request: {e}")).with_code("invalid")
        }
        kube::Error::Auth(e) => AdapterError::permanent(format!(
            "{what}: authenticating to the API server failed: {e}"
        ))
        .with_code("auth"),
        kube::Error::RustlsTls(e) => {
            AdapterError::permanent(format!("{what}: TLS setup failed: {e}")).with_code("tls")
        }
        other => AdapterError::permanent(format!("{what}: {other}")).with_code("client"),
    }
}

/// Classifies an API `Status` (a 4xx/5xx answer of the API server).
pub fn classify_status(what: &str, status: &Status) -> AdapterError {
    let code = status.code;
    let reason = if status.reason.is_empty() {
        "Unknown"
    } else {
        status.reason.as_str()
    };
    let message = format!(
        "{what}: {code} {reason}: {}",
        if status.message.is_empty() {
            "(no message)"
        } else {
            status.message.as_str()
        }
    );
    let retry_after = status
        .details
        .as_ref()
        .map(|d| d.retry_after_seconds)
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(u64::from(s)));
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.as_slice())
        .unwrap_or_default();
    let err = match code {
        429 => AdapterError::transient(message)
            .with_code("TooManyRequests")
            .throttling(),
        500..=599 | 408 | 410 => AdapterError::transient(message).with_code(reason),
        409 if causes
            .iter()
            .any(|c| c.reason == CAUSE_FIELD_MANAGER_CONFLICT) =>
        {
            let fields: Vec<String> = causes
                .iter()
                .filter(|c| c.reason == CAUSE_FIELD_MANAGER_CONFLICT)
                .map(|c| format!("{} ({})", c.field, c.message))
                .collect();
            AdapterError::permanent(format!(
                "{what}: field manager conflict: another field manager owns fields setpoint would change: {}. \
                 Remove them from the other manager's configuration, or set kubernetes.force_conflicts \
                 to let setpoint take them over, then retry the unit",
                fields.join(", ")
            ))
            .with_code(CODE_FIELD_MANAGER_CONFLICT)
        }
        409 => AdapterError::transient(message).with_code(reason),
        403 if causes.iter().any(|c| c.reason == "NamespaceTerminating")
            || status.message.contains("being terminated") =>
        {
            AdapterError::transient(message).with_code("NamespaceTerminating")
        }
        404 if status
            .details
            .as_ref()
            .is_some_and(|d| d.kind == "namespaces") =>
        {
            AdapterError::transient(message).with_code("NamespaceNotFound")
        }
        400 | 422 => {
            let fields: Vec<String> = causes
                .iter()
                .filter(|c| !c.field.is_empty())
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect();
            let message = if fields.is_empty() {
                message
            } else {
                format!("{message} [{}]", fields.join("; "))
            };
            AdapterError::permanent(message).with_code(reason)
        }
        _ => AdapterError::permanent(message).with_code(reason),
    };
    match retry_after {
        Some(d) => err.with_retry_after(d),
        None => err,
    }
}

/// A configuration error as an adapter error (always permanent).
pub fn config_error(err: &ConfigError) -> AdapterError {
    AdapterError::permanent(err.to_string()).with_code("config")
}

/// `err` and its sources, joined by ": ".
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use kube::core::response::{StatusCause, StatusDetails};
    use setpoint_adapter::ErrorClass;

    use super::*;

    fn status(code: u16, reason: &str) -> Status {
        Status::failure("msg", reason).with_code(code)
    }

    fn api(s: Status) -> kube::Error {
        kube::Error::Api(Box::new(s))
    }

    fn details(kind: &str, causes: Vec<StatusCause>, retry: u32) -> StatusDetails {
        StatusDetails {
            name: "x".into(),
            group: String::new(),
            kind: kind.into(),
            uid: String::new(),
            causes,
            retry_after_seconds: retry,
        }
    }

    #[test]
    fn throttling_is_transient_and_honours_retry_after() {
        let e = classify(
            "apply",
            &api(status(429, "TooManyRequests").with_details(details("", vec![], 7))),
        );
        assert_eq!(e.class, ErrorClass::Transient);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let e = classify("apply", &api(status(429, "TooManyRequests")));
        assert_eq!((e.class, e.retry_after), (ErrorClass::Transient, None));
    }

    #[test]
    fn server_errors_are_transient() {
        for code in [500, 502, 503, 504, 408, 410] {
            assert!(
                classify("x", &api(status(code, ""))).is_transient(),
                "{code}"
            );
        }
    }

    #[test]
    fn invalid_and_forbidden_are_permanent() {
        for (code, reason) in [
            (400, "BadRequest"),
            (422, "Invalid"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "NotFound"),
            (415, "UnsupportedMediaType"),
        ] {
            let e = classify("x", &api(status(code, reason)));
            assert_eq!(e.class, ErrorClass::Permanent, "{code}");
            assert_eq!(e.code.as_deref(), Some(reason));
        }
    }

    #[test]
    fn invalid_names_the_fields() {
        let cause = StatusCause {
            reason: "FieldValueInvalid".into(),
            message: "Invalid value: \"a b\"".into(),
            field: "data[a b]".into(),
        };
        let e = classify(
            "apply Secret",
            &api(status(422, "Invalid").with_details(details("Secret", vec![cause], 0))),
        );
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(e.message.contains("data[a b]"), "{}", e.message);
    }

    #[test]
    fn field_manager_conflict_is_permanent_and_named() {
        let cause = StatusCause {
            reason: CAUSE_FIELD_MANAGER_CONFLICT.into(),
            message: "conflict with \"kubectl\"".into(),
            field: ".spec.replicas".into(),
        };
        let e = classify(
            "apply Deployment",
            &api(status(409, "Conflict").with_details(details("deployments", vec![cause], 0))),
        );
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.code.as_deref(), Some(CODE_FIELD_MANAGER_CONFLICT));
        assert!(e.message.contains("kubectl"), "{}", e.message);
        assert!(e.message.contains(".spec.replicas"), "{}", e.message);
    }

    #[test]
    fn other_conflicts_and_vanished_namespaces_are_transient() {
        assert!(classify("x", &api(status(409, "Conflict"))).is_transient());
        let gone = status(404, "NotFound").with_details(details("namespaces", vec![], 0));
        assert!(classify("x", &api(gone)).is_transient());
        let terminating = Status::failure(
            "unable to create new content in namespace x because it is being terminated",
            "Forbidden",
        )
        .with_code(403);
        assert!(classify("x", &api(terminating)).is_transient());
    }

    #[test]
    fn only_version_conflicts_are_stale_writes() {
        let modified = Status::failure(
            "Operation cannot be fulfilled on secrets \"x\": the object has been modified; \
             please apply your changes to the latest version and try again",
            "Conflict",
        )
        .with_code(409);
        assert!(is_stale_write(&api(modified)));
        let cause = StatusCause {
            reason: CAUSE_FIELD_MANAGER_CONFLICT.into(),
            message: "conflict with \"kubectl\"".into(),
            field: ".spec.replicas".into(),
        };
        let managers = status(409, "Conflict").with_details(details("deployments", vec![cause], 0));
        assert!(!is_stale_write(&api(managers)));
        assert!(!is_stale_write(&api(status(409, "AlreadyExists"))));
        assert!(!is_stale_write(&api(status(500, "InternalError"))));
    }

    #[test]
    fn connection_errors_are_transient_and_tls_is_permanent() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = classify("x", &kube::Error::Service(Box::new(refused)));
        assert_eq!(
            (e.class, e.code.as_deref()),
            (ErrorClass::Transient, Some("connection"))
        );
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "operation timed out");
        let e = classify("x", &kube::Error::Service(Box::new(timeout)));
        assert_eq!(
            (e.class, e.code.as_deref()),
            (ErrorClass::Transient, Some("timeout"))
        );
        let tls = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(!classify("x", &kube::Error::Service(Box::new(tls))).is_transient());
        let garbage = serde_json::from_str::<u8>("x").unwrap_err();
        assert!(!classify("x", &kube::Error::SerdeError(garbage)).is_transient());
    }
}
