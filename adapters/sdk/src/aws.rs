//! The AWS SDK's own retries beneath a shared request budget (docs/budgets.md).
//!
//! With its standard retry mode the SDK resends a throttled call itself (up to
//! `max_attempts`), beneath the budget: the resends are throttled too, and the budget hears
//! of the throttle only after them. [`LeaveThrottlesToBudget`] forbids those resends, so a
//! throttle goes straight back to the budget (which lowers the shared rate and turns it into
//! a wait), while transport errors and 5xx answers are still resent by the SDK.

use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{
    ClassifyRetry, RetryAction, RetryClassifierPriority, RetryReason,
};
use aws_smithy_types::retry::ErrorKind;

/// A retry classifier that runs after the SDK's own and forbids resending any answer they
/// classified as throttling; every other verdict is left as they made it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeaveThrottlesToBudget;

impl ClassifyRetry for LeaveThrottlesToBudget {
    fn classify_retry(&self, _ctx: &InterceptorContext) -> RetryAction {
        RetryAction::NoActionIndicated
    }

    fn classify_retry_v2(&self, _ctx: &InterceptorContext, previous: &RetryAction) -> RetryAction {
        match previous {
            RetryAction::RetryIndicated(RetryReason::RetryableError {
                kind: ErrorKind::ThrottlingError,
                ..
            }) => RetryAction::RetryForbidden,
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "LeaveThrottlesToBudget"
    }

    fn priority(&self) -> RetryClassifierPriority {
        // After every classifier of the SDK (the transient-error one runs last).
        RetryClassifierPriority::run_after(RetryClassifierPriority::transient_error_classifier())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_runtime_api::client::interceptors::context::Input;

    #[test]
    fn only_a_throttle_is_kept_from_the_sdk() {
        let ctx = InterceptorContext::new(Input::erase(()));
        let c = LeaveThrottlesToBudget;
        assert_eq!(
            c.classify_retry_v2(&ctx, &RetryAction::throttling_error()),
            RetryAction::RetryForbidden
        );
        for other in [
            RetryAction::transient_error(),
            RetryAction::server_error(),
            RetryAction::NoActionIndicated,
        ] {
            assert_eq!(
                c.classify_retry_v2(&ctx, &other),
                RetryAction::NoActionIndicated
            );
        }
    }
}
