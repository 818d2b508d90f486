//! The one error type adapters return, and its classes.

use std::fmt;
use std::time::Duration;

/// Whether retrying the same call later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The peer may succeed later (timeout, throttling, 5xx, connection reset, capacity). The
    /// engine retries the unit with capped exponential backoff until its attempts run out.
    Transient,
    /// Retrying the same request cannot succeed (bad spec, invalid AMI, permission denied). The
    /// engine parks the unit at once for an operator.
    Permanent,
}

impl ErrorClass {
    /// `"transient"` or `"permanent"`, as stored in work events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An adapter failure: its class, a message a person can act on, an optional machine-readable
/// code (e.g. `InvalidAMIID.NotFound`, `smtp-550`), and an optional earliest retry time.
///
/// Messages must never contain secrets (passwords, keys, bearer tokens).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} error{}: {message}", code.as_deref().map(|c| format!(" [{c}]")).unwrap_or_default())]
pub struct AdapterError {
    /// Transient or permanent.
    pub class: ErrorClass,
    /// What went wrong and, where possible, what to do about it.
    pub message: String,
    /// The peer's error code, when it gave one.
    pub code: Option<String>,
    /// The earliest time a retry makes sense (e.g. a throttling hint); the engine never retries
    /// sooner than this, nor sooner than its own backoff.
    pub retry_after: Option<Duration>,
    /// True when nothing failed: the unit waits for something outside it that is known to
    /// pass (a cloud's cooldown between two changes of a volume, a request budget). Made by
    /// [`AdapterError::waiting`]; the engine retries after `retry_after` without counting the
    /// attempt against the unit's attempt limit, and shows the unit as waiting.
    pub waiting: bool,
    /// True when the peer refused the call for its rate limit (EC2 `RequestLimitExceeded`,
    /// HTTP 429, an SMTP 421/451 rate reply). Set by [`AdapterError::throttling`]. A
    /// [`crate::Budget`] lowers its shared rate on it and turns it into a wait; the engine never
    /// counts a throttled attempt nor parks a unit for throttling.
    pub throttled: bool,
}

impl AdapterError {
    /// A transient error: retrying later may succeed.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            code: None,
            retry_after: None,
            waiting: false,
            throttled: false,
        }
    }

    /// Not a failure: the unit must wait `retry_after` for something outside it (see
    /// field `waiting`); `message` says what, for the
    /// people watching the unit.
    pub fn waiting(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            code: None,
            retry_after: Some(retry_after),
            waiting: true,
            throttled: false,
        }
    }

    /// A permanent error: the unit is parked for an operator.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
            code: None,
            retry_after: None,
            waiting: false,
            throttled: false,
        }
    }

    /// Attaches the peer's error code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Asks the engine not to retry before `delay` has passed.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Marks the error as the peer's throttling answer (see field `throttled`).
    pub fn throttling(mut self) -> Self {
        self.throttled = true;
        self
    }

    /// True when the engine may retry the unit.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_class_and_code() {
        let e =
            AdapterError::permanent("AMI ami-1 does not exist").with_code("InvalidAMIID.NotFound");
        assert_eq!(
            e.to_string(),
            "permanent error [InvalidAMIID.NotFound]: AMI ami-1 does not exist"
        );
        assert_eq!(
            AdapterError::transient("timed out").to_string(),
            "transient error: timed out"
        );
    }
}
