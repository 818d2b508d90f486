//! Shared request budgets: how an adapter keeps every engine together under a peer's rate
//! limit, and backs off together when the peer throttles.
//!
//! A [`BudgetKey`] names one limit of a peer: `(adapter, account or endpoint, region,
//! operation class)`, e.g. `ec2/123456789012/eu-west-1/run_instances`. A [`Budgets`]
//! implementation hands out tokens of a key at its [`Limit`]'s rate; the engine's is a token
//! bucket in PostgreSQL shared by every engine process, with additive increase and
//! multiplicative decrease of the rate when the peer throttles (docs/budgets.md). Adapter tests
//! and engines without budgets use [`Unlimited`].
//!
//! An adapter holds one [`Budget`] per operation class and wraps each call to the peer:
//!
//! ```
//! # use std::sync::Arc;
//! use setpoint_adapter::{AdapterError, Budget, BudgetKey, Limit, Unlimited};
//!
//! # async fn example() -> Result<(), AdapterError> {
//! let launches = Budget::new(
//!     Arc::new(Unlimited),
//!     BudgetKey::new("dns", "https://api.example.net", "global", "change"),
//!     Limit::new(5.0, 5.0),
//! );
//! // Takes a token first (or returns a *waiting* error before any side effect); a throttling
//! // answer of the call lowers the shared rate and also becomes a wait.
//! let answer = launches
//!     .call(async { Ok::<_, AdapterError>("changed") })
//!     .await?;
//! # let _ = answer;
//! # Ok(())
//! # }
//! ```
//!
//! A wait is never a failure: the engine gives the attempt back, releases the unit's lease and
//! worker slot, and runs the unit again when the budget has a token (see
//! [`AdapterError::waiting`]).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::AdapterError;
use crate::handler::BoxFuture;

/// The error code of a wait for budget ([`AdapterError::code`]).
pub const CODE_BUDGET_WAIT: &str = "budget-wait";

/// The error code of a wait after the peer throttled a call.
pub const CODE_THROTTLED: &str = "throttled";

/// One rate limit of a peer: `adapter/scope/region/class`.
///
/// `scope` is the account (or, for a peer without accounts, its endpoint: a Kubernetes API
/// server URL, an SMTP `host:port`); `region` is `global` where the peer has none. Every
/// engine that names the same key shares one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetKey {
    /// The adapter (`ec2`, `kubernetes`, `smtp`, `route53`, or a platform team's).
    pub adapter: String,
    /// The account or endpoint.
    pub scope: String,
    /// The region, or `global`.
    pub region: String,
    /// The operation class (`run_instances`, `mutating`, `describe`, `write`, `send`, …).
    pub class: String,
}

impl BudgetKey {
    /// The key `adapter/scope/region/class`.
    pub fn new(
        adapter: impl Into<String>,
        scope: impl Into<String>,
        region: impl Into<String>,
        class: impl Into<String>,
    ) -> Self {
        Self {
            adapter: adapter.into(),
            scope: scope.into(),
            region: region.into(),
            class: class.into(),
        }
    }
}

impl fmt::Display for BudgetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.adapter, self.scope, self.region, self.class
        )
    }
}

/// A configured limit: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Tokens per second when the peer does not throttle (the most AIMD raises the rate to).
    pub rate: f64,
    /// The most tokens the bucket holds (calls that may go at once after a quiet time).
    pub burst: f64,
}

impl Limit {
    /// `rate` per second, `burst` at most.
    pub const fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst }
    }

    /// Checks that both numbers are positive and finite, and that `burst` is at least 1 (a
    /// bucket that can never hold one token never lets a call through).
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(format!(
                "rate must be a positive number (got {})",
                self.rate
            ));
        }
        if !(self.burst.is_finite() && self.burst >= 1.0) {
            return Err(format!("burst must be at least 1 (got {})", self.burst));
        }
        Ok(())
    }
}

/// Where tokens come from. The engine's implementation is shared by every engine through
/// PostgreSQL; [`Unlimited`] grants everything.
pub trait Budgets: Send + Sync {
    /// Takes one token of `key` (whose configured limit is `limit`).
    ///
    /// # Errors
    /// A [waiting](AdapterError::waiting) error with code [`CODE_BUDGET_WAIT`] and the time
    /// until the key is expected to have a token for this caller, when it has none now. An
    /// implementation that cannot reach its store may grant the token (failing open) or return
    /// a transient error; the engine's grants from its local reserve and otherwise waits.
    fn take<'a>(
        &'a self,
        key: &'a BudgetKey,
        limit: Limit,
    ) -> BoxFuture<'a, Result<(), AdapterError>>;

    /// The peer throttled a call of `key`: lowers the shared rate (at most once per second per
    /// key, whoever reports it) and returns how long the throttled caller should wait.
    fn throttled<'a>(&'a self, key: &'a BudgetKey, limit: Limit) -> BoxFuture<'a, Duration>;

    /// True when the budget is shared and its wait after a throttle is the one to keep; false
    /// for [`Unlimited`], whose fixed wait gives way to the peer's own hint (`retry_after`).
    fn shared(&self) -> bool {
        true
    }
}

/// Grants every token and waits [`Unlimited::THROTTLE_WAIT`] after a throttle: for adapter
/// tests and engines that share no budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Unlimited {
    /// How long a throttled caller waits when nothing else says.
    pub const THROTTLE_WAIT: Duration = Duration::from_secs(1);
}

impl Budgets for Unlimited {
    fn take<'a>(
        &'a self,
        _key: &'a BudgetKey,
        _limit: Limit,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }

    fn throttled<'a>(&'a self, _key: &'a BudgetKey, _limit: Limit) -> BoxFuture<'a, Duration> {
        Box::pin(async { Self::THROTTLE_WAIT })
    }

    fn shared(&self) -> bool {
        false
    }
}

/// One operation class of one peer, as an adapter uses it: its key, its limit and where tokens
/// come from. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    budgets: Arc<dyn Budgets>,
    key: Arc<BudgetKey>,
    limit: Limit,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("key", &self.key)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Budget {
    /// The budget `key` at `limit`, drawn from `budgets`.
    pub fn new(budgets: Arc<dyn Budgets>, key: BudgetKey, limit: Limit) -> Self {
        Self {
            budgets,
            key: Arc::new(key),
            limit,
        }
    }

    /// A budget that never limits (for adapters built without an engine).
    pub fn unlimited(key: BudgetKey) -> Self {
        Self::new(Arc::new(Unlimited), key, Limit::new(f64::MAX, f64::MAX))
    }

    /// Its key.
    pub fn key(&self) -> &BudgetKey {
        &self.key
    }

    /// Its configured limit.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes one token, or returns a waiting error (see [`Budgets::take`]). Call it before the
    /// side effect, never after.
    ///
    /// # Errors
    /// As [`Budgets::take`].
    pub async fn take(&self) -> Result<(), AdapterError> {
        self.budgets.take(&self.key, self.limit).await
    }

    /// Reports that the peer throttled a call, and turns `err` (the throttling answer) into a
    /// wait: the unit runs again after the returned delay, and the attempt does not count.
    pub async fn throttled(&self, err: AdapterError) -> AdapterError {
        let wait = self.budgets.throttled(&self.key, self.limit).await;
        // Without a shared budget, the adapter's own hint for this answer (a relay's "slow
        // down": 60 s) says best how long to wait.
        let wait = if self.budgets.shared() {
            wait
        } else {
            err.retry_after.unwrap_or(wait)
        };
        let code = err
            .code
            .clone()
            .unwrap_or_else(|| CODE_THROTTLED.to_owned());
        let mut waiting = AdapterError::waiting(
            format!(
                "{} (the shared budget {} was lowered; waiting {} ms)",
                err.message,
                self.key,
                wait.as_millis()
            ),
            wait,
        )
        .with_code(code);
        waiting.throttled = true;
        waiting
    }

    /// Passes `result` on, turning a throttling answer ([`AdapterError::throttled`]) into a
    /// wait after reporting it ([`Budget::throttled`]). For a call whose token was taken
    /// separately ([`Budget::take`], e.g. before a fence check that must come last).
    ///
    /// # Errors
    /// `result`'s error, a throttle as a wait.
    pub async fn report<T>(&self, result: Result<T, AdapterError>) -> Result<T, AdapterError> {
        match result {
            Err(e) => Err(self.report_error(e).await),
            ok => ok,
        }
    }

    /// [`Budget::report`] for an error already taken out of its result: a throttle becomes a
    /// wait after it is reported, any other error is returned as it is.
    pub async fn report_error(&self, err: AdapterError) -> AdapterError {
        if err.throttled {
            self.throttled(err).await
        } else {
            err
        }
    }

    /// Takes a token, runs `call`, and when the peer throttled it ([`AdapterError::throttled`])
    /// reports the throttle and returns a wait instead of the failure.
    ///
    /// # Errors
    /// A wait for budget before the call; the call's own error otherwise (a throttle as a wait).
    pub async fn call<T, F>(&self, call: F) -> Result<T, AdapterError>
    where
        F: Future<Output = Result<T, AdapterError>>,
    {
        self.take().await?;
        self.report(call.await).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recording {
        throttles: Mutex<Vec<String>>,
    }

    impl Budgets for Recording {
        fn take<'a>(
            &'a self,
            key: &'a BudgetKey,
            _limit: Limit,
        ) -> BoxFuture<'a, Result<(), AdapterError>> {
            Box::pin(async move {
                if key.class == "empty" {
                    Err(
                        AdapterError::waiting("no token", Duration::from_millis(300))
                            .with_code(CODE_BUDGET_WAIT),
                    )
                } else {
                    Ok(())
                }
            })
        }

        fn throttled<'a>(&'a self, key: &'a BudgetKey, _limit: Limit) -> BoxFuture<'a, Duration> {
            Box::pin(async move {
                self.throttles.lock().unwrap().push(key.to_string());
                Duration::from_millis(700)
            })
        }
    }

    #[tokio::test]
    async fn a_call_waits_for_a_token_and_a_throttle_becomes_a_wait() {
        let rec = Arc::new(Recording::default());
        let key = BudgetKey::new("ec2", "acct", "eu-west-1", "describe");
        assert_eq!(key.to_string(), "ec2/acct/eu-west-1/describe");
        let b = Budget::new(rec.clone(), key, Limit::new(20.0, 100.0));

        assert_eq!(b.call(async { Ok::<_, AdapterError>(7) }).await, Ok(7));

        let throttle = AdapterError::transient("slow down")
            .with_code("RequestLimitExceeded")
            .throttling();
        let e = b.call(async { Err::<(), _>(throttle) }).await.unwrap_err();
        assert!(e.waiting && e.throttled, "{e:?}");
        assert_eq!(e.retry_after, Some(Duration::from_millis(700)));
        assert_eq!(e.code.as_deref(), Some("RequestLimitExceeded"));
        assert_eq!(
            *rec.throttles.lock().unwrap(),
            ["ec2/acct/eu-west-1/describe"]
        );

        // Any other failure passes through unchanged.
        let e = b
            .call(async { Err::<(), _>(AdapterError::permanent("bad AMI")) })
            .await
            .unwrap_err();
        assert!(!e.waiting && !e.is_transient());

        // No token: the call is not made.
        let empty = Budget::new(
            rec.clone(),
            BudgetKey::new("ec2", "acct", "eu-west-1", "empty"),
            Limit::new(1.0, 1.0),
        );
        let mut made = false;
        let e = empty
            .call(async {
                made = true;
                Ok::<_, AdapterError>(())
            })
            .await
            .unwrap_err();
        assert!(e.waiting && !made);
        assert_eq!(e.code.as_deref(), Some(CODE_BUDGET_WAIT));
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limit::new(2.0, 5.0).validate().is_ok());
        assert!(Limit::new(0.0, 5.0).validate().is_err());
        assert!(Limit::new(2.0, 0.5).validate().is_err());
        assert!(Limit::new(f64::NAN, 5.0).validate().is_err());
    }
}
