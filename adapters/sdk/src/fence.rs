//! The fence of one attempt: whether the attempt still holds its unit of work, so that an
//! attempt that lost its lease (its process was paused, cut off from the database, or too slow
//! to renew) stops acting before another worker redoes the unit.
//!
//! The engine makes one [`Fence`] per attempt and renews it with every successful lease
//! renewal. A fence is *held* until the time the engine last set, and *lost* for good once
//! that time passes or the engine says so ([`Fence::lose`]). The time is read from the
//! monotonic clock at each check, so an attempt resumed after a pause sees at its very next
//! check that it lost its unit, even before any engine task has run.
//!
//! Adapters call [`Fence::check`] immediately before every side effect (a launch, an apply, a
//! mail's DATA), and may race long waits against [`Fence::lost`]. The only side effect a
//! stale attempt can still make is the one already in flight when it lost the unit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

use crate::error::AdapterError;

/// The error code of [`Fence::check`] once the attempt lost its unit.
pub const CODE_LEASE_LOST: &str = "lease-lost";

/// Whether one attempt still holds its unit. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Fence {
    inner: Arc<Inner>,
}

struct Inner {
    /// The clock's reading the fence's times count from.
    origin: Instant,
    /// Held until `origin` + this many microseconds; `u64::MAX` is "no limit".
    until_micros: AtomicU64,
    /// Set once, never cleared.
    lost: AtomicBool,
    /// Wakes [`Fence::lost`] waiters.
    notify: Notify,
    /// Why the fence was lost, for logs (first reason wins).
    why: std::sync::OnceLock<&'static str>,
}

impl Fence {
    /// A fence held until `until` unless renewed ([`Fence::extend`]) or lost first.
    pub fn until(until: Instant) -> Self {
        let origin = Instant::now();
        let fence = Self {
            inner: Arc::new(Inner {
                origin,
                until_micros: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                notify: Notify::new(),
                why: std::sync::OnceLock::new(),
            }),
        };
        fence.store_until(until);
        fence
    }

    /// A fence that is only lost by [`Fence::lose`]: for adapter tests and tools that run
    /// outside the engine's leases.
    pub fn unbounded() -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                until_micros: AtomicU64::new(u64::MAX),
                lost: AtomicBool::new(false),
                notify: Notify::new(),
                why: std::sync::OnceLock::new(),
            }),
        }
    }

    fn store_until(&self, until: Instant) {
        let micros = until
            .saturating_duration_since(self.inner.origin)
            .as_micros()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.inner.until_micros.store(micros, Ordering::Release);
    }

    fn until_instant(&self) -> Option<Instant> {
        match self.inner.until_micros.load(Ordering::Acquire) {
            u64::MAX => None,
            micros => Some(self.inner.origin + Duration::from_micros(micros)),
        }
    }

    /// The engine renewed the lease: the attempt holds its unit until `until`. A fence that
    /// is already lost (or whose time already passed) stays lost: once an attempt may have
    /// been overtaken, nothing it does can be trusted again. Times never move back.
    pub fn extend(&self, until: Instant) {
        if !self.is_held() {
            self.lose("the lease ran out before it was renewed");
            return;
        }
        if self.until_instant().is_some_and(|now| until > now) {
            self.store_until(until);
        }
    }

    /// The engine says the attempt lost its unit (`why` is logged). Wakes every waiter of
    /// [`Fence::lost`]; idempotent.
    pub fn lose(&self, why: &'static str) {
        let _ = self.inner.why.set(why);
        if !self.inner.lost.swap(true, Ordering::AcqRel) {
            self.inner.notify.notify_waiters();
        }
    }

    /// True while the attempt holds its unit: not lost, and its time not passed.
    pub fn is_held(&self) -> bool {
        !self.inner.lost.load(Ordering::Acquire)
            && self
                .until_instant()
                .is_none_or(|until| Instant::now() < until)
    }

    /// Why the fence was lost, if the engine said.
    pub fn lost_because(&self) -> Option<&'static str> {
        self.inner.why.get().copied()
    }

    /// When the fence runs out unless renewed; `None` for [`Fence::unbounded`].
    pub fn held_until(&self) -> Option<Instant> {
        self.until_instant()
    }

    /// Call immediately before every side effect.
    ///
    /// # Errors
    /// A transient [`AdapterError`] with code [`CODE_LEASE_LOST`] once the attempt lost its
    /// unit; the engine discards it (the unit belongs to another attempt now).
    pub fn check(&self) -> Result<(), AdapterError> {
        if self.is_held() {
            Ok(())
        } else {
            Err(lease_lost())
        }
    }

    /// Resolves once the attempt lost its unit: at once when that already happened (its time
    /// passed, or the engine said so), otherwise when the engine says so ([`Fence::lose`]),
    /// which it does as soon as the fence's time passes. Never resolves for a fence that is
    /// never lost. Polled before the work it guards (as [`Fence::guard`] does), it stops that
    /// work at the first poll after a pause, before the work can take another step.
    pub async fn lost(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if !self.is_held() {
                return;
            }
            notified.await;
        }
    }

    /// Checks the fence, then runs `call` unless the fence is lost first (the call is then
    /// dropped: a request already sent may still take effect, nothing after it does).
    ///
    /// # Errors
    /// `call`'s error, or the [`Fence::check`] error.
    pub async fn guard<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, AdapterError>>,
    ) -> Result<T, AdapterError> {
        self.check()?;
        tokio::select! {
            biased;
            _ = self.lost() => Err(lease_lost()),
            r = call => r,
        }
    }
}

fn lease_lost() -> AdapterError {
    AdapterError::transient(
        "this attempt lost its lease on the unit (its process was paused, cut off from the \
         database or too slow to renew it); another attempt takes over",
    )
    .with_code(CODE_LEASE_LOST)
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("held", &self.is_held())
            .field("lost_because", &self.lost_because())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fence_runs_out_unless_renewed_and_never_comes_back() {
        let fence = Fence::until(Instant::now() + Duration::from_secs(10));
        assert!(fence.check().is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        fence.extend(Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(fence.is_held(), "renewed at 5 s, held until 15 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = fence.check().expect_err("ran out at 15 s");
        assert_eq!(err.code.as_deref(), Some(CODE_LEASE_LOST));
        assert!(err.is_transient());
        fence.extend(Instant::now() + Duration::from_secs(60));
        assert!(!fence.is_held(), "a late renewal does not revive a fence");
    }

    #[tokio::test(start_paused = true)]
    async fn lose_wakes_waiters_and_guard_drops_the_call() {
        let fence = Fence::unbounded();
        let waiter = tokio::spawn({
            let f = fence.clone();
            async move {
                f.guard(std::future::pending::<Result<(), AdapterError>>())
                    .await
            }
        });
        tokio::task::yield_now().await;
        fence.lose("test");
        let err = waiter.await.expect("join").expect_err("lost");
        assert_eq!(err.code.as_deref(), Some(CODE_LEASE_LOST));
        assert_eq!(fence.lost_because(), Some("test"));
        assert!(fence.guard(async { Ok(1) }).await.is_err(), "checked first");
    }
}
