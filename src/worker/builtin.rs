//! Work kinds every engine knows.
//!
//! - `setpoint.noop`: does nothing and succeeds; for smoke tests and `setpoint bench queue`.
//! - `setpoint.probe`: behaves as its spec says (sleep, fail, stop at a failpoint, record its
//!   runs); for the engine's own tests and for operators checking a deployment. Registered
//!   only when `enable_probe` is configured.

use std::time::Duration;

use serde::Deserialize;
use setpoint_adapter::{AdapterError, FollowUp, Outcome, TypedHandler, WorkContext, failpoint};
use sqlx::PgPool;

/// `setpoint.noop`: succeeds at once.
#[derive(Debug, Default)]
pub struct Noop;

impl TypedHandler for Noop {
    type Spec = serde_json::Value;
    const KIND: &'static str = "setpoint.noop";

    async fn run(
        &self,
        _ctx: &WorkContext,
        _spec: serde_json::Value,
    ) -> Result<Outcome, AdapterError> {
        Ok(Outcome::done())
    }
}

/// The spec of a `setpoint.probe` unit. Every field is optional.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// Sleep this long before anything else.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Fail transiently while the attempt number is at most this.
    #[serde(default)]
    pub fail_transient_until_attempt: i32,
    /// Fail permanently with this message.
    pub fail_permanent: Option<String>,
    /// Stop at this failpoint (see `setpoint_adapter::failpoint`) after recording the start.
    pub failpoint: Option<String>,
    /// Record each run's start and end in the `probe_runs` table (which the test creates).
    #[serde(default)]
    pub record: bool,
    /// Enqueue a follow-up probe with this step name and the same spec minus `then`.
    pub then: Option<String>,
    /// Merge this object into the resource's observed state.
    pub observed: Option<serde_json::Value>,
}

/// `setpoint.probe`: see [`ProbeSpec`].
#[derive(Debug, Clone)]
pub struct Probe {
    pool: PgPool,
    worker: String,
}

impl Probe {
    /// A probe recording into `pool` as `worker`.
    pub fn new(pool: PgPool, worker: String) -> Self {
        Self { pool, worker }
    }

    async fn record(&self, ctx: &WorkContext, phase: &str) -> Result<(), AdapterError> {
        // A side effect like any adapter's: a stale attempt must not make it.
        ctx.fence.check()?;
        sqlx::query(
            "INSERT INTO probe_runs (work_id, token, attempt, worker, phase) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(ctx.work_id)
        .bind(ctx.token.as_str())
        .bind(ctx.attempt)
        .bind(&self.worker)
        .bind(phase)
        .execute(&self.pool)
        .await
        .map_err(|e| AdapterError::transient(format!("probe could not record its run: {e}")))?;
        Ok(())
    }
}

impl TypedHandler for Probe {
    type Spec = ProbeSpec;
    const KIND: &'static str = "setpoint.probe";

    async fn run(&self, ctx: &WorkContext, spec: ProbeSpec) -> Result<Outcome, AdapterError> {
        if spec.record {
            self.record(ctx, "start").await?;
        }
        if let Some(point) = &spec.failpoint {
            failpoint::hit(point);
        }
        if spec.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(spec.sleep_ms)).await;
        }
        ctx.record_call("probe:act");
        if ctx.attempt <= spec.fail_transient_until_attempt {
            return Err(AdapterError::transient(format!(
                "probe fails transiently until attempt {}",
                spec.fail_transient_until_attempt
            ))
            .with_code("probe-transient"));
        }
        if let Some(msg) = spec.fail_permanent {
            return Err(AdapterError::permanent(msg).with_code("probe-permanent"));
        }
        if spec.record {
            self.record(ctx, "end").await?;
        }
        let mut outcome = Outcome::done();
        if let Some(observed) = spec.observed {
            outcome = outcome.observed(observed);
        }
        if let Some(step) = spec.then {
            outcome = outcome.then(FollowUp::new(
                step,
                Self::KIND,
                serde_json::json!({ "record": spec.record }),
            ));
        }
        Ok(outcome)
    }
}
