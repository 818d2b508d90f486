//! Drift: every resource of a kind that declares an observe step is checked once per interval,
//! whatever the number of engines, spread over the interval.
//!
//! Each resource has a fixed place on its kind's ring, drawn at random when it joins (which
//! spreads the checks evenly), and each kind a cursor: the time up to which checks are
//! enqueued. Every engine runs a [`DriftScheduler`]; a round locks a kind's cursor (`FOR UPDATE
//! SKIP LOCKED`, so engines never enqueue the same check twice), reads the resources whose
//! place the cursor passes between its time and now, enqueues their checks and moves the
//! cursor, in one transaction. A round writes one row per check enqueued (the unit) and none
//! per resource, so its cost does not grow with what the resources' rows weigh. A check runs
//! beside its resource: it never holds it, so a user's change is never refused because of it,
//! and a change that comes meanwhile supersedes it (the check starts no heal on a resource
//! that changed).
//!
//! Engines that schedule one kind should share its interval: the ring is read at each engine's
//! own interval, so two intervals check some resources twice or late for a while.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::chains::Chains;
use chrono::DateTime;

use crate::store::StoreError;
use crate::store::drift::{
    DriftDue, drift_cursor_advance, drift_cursor_lock, drift_due_between, drift_schedule_forget,
    drift_schedule_new,
};
use crate::store::work::{Lane, work_enqueue};

/// A drift scheduler's settings.
#[derive(Debug, Clone, Copy)]
pub struct DriftConfig {
    /// How often each resource is checked.
    pub interval: Duration,
    /// About how many checks one transaction enqueues (the window it covers is sized to it),
    /// and the most resources one statement gives a place.
    pub batch: i64,
}

/// Enqueues the due drift checks of every kind that declares one.
#[derive(Debug, Clone)]
pub struct DriftScheduler {
    pool: PgPool,
    chains: Arc<Chains>,
    config: DriftConfig,
}

impl DriftScheduler {
    /// A scheduler over `pool` for the kinds of `chains`.
    pub fn new(pool: PgPool, chains: Arc<Chains>, config: DriftConfig) -> Self {
        Self {
            pool,
            chains,
            config: DriftConfig {
                batch: config.batch.max(1),
                ..config
            },
        }
    }

    /// The kinds with an observe step.
    fn kinds(&self) -> Vec<String> {
        self.chains
            .catalog()
            .kinds()
            .filter(|k| k.decl.observe.is_some())
            .map(|k| k.decl.name.clone())
            .collect()
    }

    /// Runs rounds until `shutdown`: every second, or every twentieth of a shorter interval
    /// (at least every 250 ms). Frequent rounds keep the checks a steady stream rather than
    /// bursts; a round that finds nothing due costs one row lock per kind.
    pub async fn run(self, shutdown: CancellationToken) {
        let tick =
            (self.config.interval / 20).clamp(Duration::from_millis(250), Duration::from_secs(1));
        tracing::info!(interval = ?self.config.interval, "drift checks scheduled");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            match self.run_once().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(checks = n, "drift checks enqueued"),
                Err(e) => tracing::warn!(error = %e, "drift round failed; trying again next round"),
            }
        }
    }

    /// One round: gives resources that have not joined the schedule a place, then enqueues
    /// every check whose place each kind's cursor passes up to now. Returns how many checks it
    /// enqueued.
    ///
    /// # Errors
    /// Database errors.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let kinds = self.kinds();
        if kinds.is_empty() {
            return Ok(0);
        }
        loop {
            let mut conn = self.pool.acquire().await?;
            let joined = drift_schedule_new(&mut conn, &kinds, self.config.batch).await?;
            if joined < self.config.batch as u64 {
                break;
            }
        }
        let mut total = 0;
        for kind in &kinds {
            total += self.sweep(kind).await?;
        }
        Ok(total)
    }

    /// Moves `kind`'s cursor to now, enqueuing the checks it passes, in transactions of
    /// about `batch` checks each. Does nothing when another engine holds the cursor.
    async fn sweep(&self, kind: &str) -> Result<usize, StoreError> {
        let interval = micros(self.config.interval).max(1);
        // Sized from the last transaction's density, so a catch-up after a long pause is many
        // short transactions rather than one long one.
        let mut span = micros(self.config.interval / 20).max(1);
        let mut total = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let Some(cursor) = drift_cursor_lock(&mut tx, kind).await? else {
                tx.commit().await?;
                return Ok(total);
            };
            let now = cursor.now.timestamp_micros();
            // Checks missed for longer than an interval (no engine ran) are one check each.
            let from = cursor.through.timestamp_micros().max(now - interval);
            if from >= now {
                tx.commit().await?;
                return Ok(total);
            }
            let to = now.min(from.saturating_add(span));
            let mut due = Vec::new();
            for (lo, hi) in ring_windows(from, to, interval) {
                due.extend(drift_due_between(&mut tx, kind, lo, hi).await?);
            }
            let gone: Vec<_> = due.iter().filter(|r| r.gone).map(|r| r.id).collect();
            let units: Vec<_> = due
                .iter()
                // A resource that is not READY, or busy, is not checked this time round: its
                // chain brings it to its spec, and a check would only compete with it.
                .filter(|r| checkable(r))
                .filter_map(|r| {
                    self.chains
                        .first_unit(kind, "observe", r.id, &r.tenant, r.generation)
                        .map(|u| u.beside_resource().in_lane(Lane::Drift))
                })
                .collect();
            work_enqueue(&mut tx, &units).await?;
            drift_schedule_forget(&mut tx, &gone).await?;
            let through = DateTime::from_timestamp_micros(to).unwrap_or(cursor.now);
            drift_cursor_advance(&mut tx, kind, through).await?;
            tx.commit().await?;
            total += units.len();
            if to >= now {
                return Ok(total);
            }
            let per_row = (to - from) as f64 / due.len().max(1) as f64;
            span = ((per_row * self.config.batch as f64) as i64).clamp(1_000, interval);
        }
    }
}

/// Whether a due resource gets its check this time round.
fn checkable(r: &DriftDue) -> bool {
    !r.gone && r.status == "READY" && !r.has_active_work
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The places on a ring of `interval` µs that the time span `[from, to)` (µs, `from < to`)
/// passes, as half-open fractions `[lo, hi)` of the ring: one window, two when the span wraps
/// around, the whole ring when it lasts an interval or more. Consecutive spans give windows
/// that meet exactly (each bound is computed from the same integer), so a place is passed once.
fn ring_windows(from: i64, to: i64, interval: i64) -> Vec<(f64, f64)> {
    if to - from >= interval {
        return vec![(0.0, 1.0)];
    }
    let at = |t: i64| t.rem_euclid(interval) as f64 / interval as f64;
    let (lo, hi) = (at(from), at(to));
    if lo < hi {
        vec![(lo, hi)]
    } else if hi == 0.0 {
        vec![(lo, 1.0)]
    } else {
        vec![(lo, 1.0), (0.0, hi)]
    }
}

#[cfg(test)]
mod tests {
    use super::ring_windows;

    #[test]
    fn spans_that_follow_each_other_pass_each_place_once() {
        let interval = 1_000;
        // Spans of every length across the ring, many times round.
        let mut t = 123;
        let mut covered = 0.0;
        for len in (1..400).cycle().take(2_000) {
            for (lo, hi) in ring_windows(t, t + len, interval) {
                assert!(
                    (0.0..1.0).contains(&lo) && lo < hi && hi <= 1.0,
                    "{lo}..{hi}"
                );
                covered += hi - lo;
            }
            t += len;
        }
        let expected = (t - 123) as f64 / interval as f64;
        assert!((covered - expected).abs() < 1e-6, "{covered} vs {expected}");
    }

    #[test]
    fn a_span_of_an_interval_or_more_is_the_whole_ring_and_a_wrap_is_two_windows() {
        assert_eq!(ring_windows(0, 1_000, 1_000), vec![(0.0, 1.0)]);
        assert_eq!(ring_windows(5, 9_000, 1_000), vec![(0.0, 1.0)]);
        assert_eq!(
            ring_windows(900, 1_100, 1_000),
            vec![(0.9, 1.0), (0.0, 0.1)]
        );
        assert_eq!(ring_windows(900, 1_000, 1_000), vec![(0.9, 1.0)]);
        assert_eq!(ring_windows(-100, 100, 1_000), vec![(0.9, 1.0), (0.0, 0.1)]);
    }
}
