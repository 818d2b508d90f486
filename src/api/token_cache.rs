//! Bearer token lookups, with what keeps them from reaching the database again and again.
//!
//! - **Known tokens** (a row exists, revoked or expired ones included) are kept for
//!   [`TokenLimits::known_ttl`] (5 s): a revoked token stops working within that time. A known
//!   token whose entry is older is checked again; that check is not charged to the budget, so a
//!   flood of made-up tokens cannot lock out the tokens in use.
//! - **Unknown tokens** (no row) are kept for [`TokenLimits::unknown_ttl`] (60 s), in a cache of
//!   their own, so that a flood of them cannot push the known ones out. A repeated unknown
//!   token costs no database work while it is kept. Tokens are 256-bit random values made by
//!   the server, so no one can hold a real token before it exists: keeping "unknown" for a
//!   minute refuses nothing that should pass.
//! - **The budget**: looking up a token in neither cache takes one permit from a token bucket
//!   shared by the whole process ([`TokenLimits::lookups_per_second`], with a burst of
//!   [`TokenLimits::lookup_burst`]). Beyond it the call is refused at once, without touching
//!   the database. The budget is global, not per client address: behind a load balancer every
//!   client has the balancer's address.
//! - **One lookup per token at a time**: concurrent calls with the same uncached token wait for
//!   the first one's answer instead of asking the database too.
//!
//! Both caches are bounded in entries (quick_cache, which evicts what is seldom used first);
//! the bucket arithmetic is governor's. Time is tokio's, so tests run it paused.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use quick_cache::sync::Cache;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::store::StoreError;
use crate::store::tokens::{TokenRow, token_get_by_hash};

/// A token's key in the caches: the sha256 of its text (the token itself is never kept).
pub type TokenHash = [u8; 32];

/// The limits of token lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimits {
    /// How long a known token is trusted without asking the database again.
    pub known_ttl: Duration,
    /// Most known tokens kept.
    pub known_capacity: usize,
    /// How long an unknown token is refused without asking the database again.
    pub unknown_ttl: Duration,
    /// Most unknown tokens kept.
    pub unknown_capacity: usize,
    /// Lookups of tokens in neither cache per second, for the whole process.
    pub lookups_per_second: u32,
    /// How many such lookups may come at once after a quiet time.
    pub lookup_burst: u32,
}

/// Default [`TokenLimits::known_ttl`].
pub const DEFAULT_KNOWN_TTL: Duration = Duration::from_secs(5);
/// Default [`TokenLimits::unknown_ttl`].
pub const DEFAULT_UNKNOWN_TTL: Duration = Duration::from_secs(60);
/// Default [`TokenLimits::unknown_capacity`] (about 100 bytes each).
pub const DEFAULT_UNKNOWN_CAPACITY: usize = 65_536;
/// Default [`TokenLimits::lookups_per_second`].
pub const DEFAULT_LOOKUPS_PER_SECOND: u32 = 100;
/// Default [`TokenLimits::lookup_burst`].
pub const DEFAULT_LOOKUP_BURST: u32 = 200;

impl Default for TokenLimits {
    fn default() -> Self {
        Self {
            known_ttl: DEFAULT_KNOWN_TTL,
            known_capacity: 10_000,
            unknown_ttl: DEFAULT_UNKNOWN_TTL,
            unknown_capacity: DEFAULT_UNKNOWN_CAPACITY,
            lookups_per_second: DEFAULT_LOOKUPS_PER_SECOND,
            lookup_burst: DEFAULT_LOOKUP_BURST,
        }
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The token's row (it may be revoked or expired: the caller decides).
    Known(TokenRow),
    /// No such token.
    Unknown,
}

/// Why a lookup has no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The budget of lookups is spent; nothing was asked.
    #[error("too many unknown tokens are being checked")]
    OverBudget,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where tokens are looked up: the `api_tokens` table, or a test's stand-in.
pub trait TokenSource: Send + Sync + 'static {
    /// The row of the token whose hash is `hash`, if any.
    fn token(
        &self,
        hash: TokenHash,
    ) -> Pin<Box<dyn Future<Output = Result<Option<TokenRow>, StoreError>> + Send + '_>>;
}

impl TokenSource for PgPool {
    fn token(
        &self,
        hash: TokenHash,
    ) -> Pin<Box<dyn Future<Output = Result<Option<TokenRow>, StoreError>> + Send + '_>> {
        Box::pin(async move {
            let mut conn = self.acquire().await?;
            token_get_by_hash(&mut conn, &hash).await
        })
    }
}

/// governor's clock on tokio's time (which tests can pause): the time since the limiter was
/// made.
#[derive(Debug, Clone)]
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }
}

// `Duration` is a `Reference` (governor implements it); this only checks that at compile time.
const _: fn() = || {
    fn is_reference<R: Reference>() {}
    is_reference::<Duration>();
};

type Budget = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// Token lookups through the two caches and the budget; see the module documentation.
pub struct TokenCache<S = PgPool> {
    source: S,
    limits: TokenLimits,
    known: Cache<TokenHash, (TokenRow, Instant)>,
    /// Also the place where concurrent lookups of one token wait for the first (its
    /// placeholder guard).
    unknown: Cache<TokenHash, Instant>,
    budget: Budget,
}

impl<S> std::fmt::Debug for TokenCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("limits", &self.limits)
            .field("known", &self.known.len())
            .field("unknown", &self.unknown.len())
            .finish_non_exhaustive()
    }
}

impl<S: TokenSource> TokenCache<S> {
    /// Lookups in `source` within `limits` (zero capacities and rates count as one).
    pub fn new(source: S, limits: TokenLimits) -> Self {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(limits.lookups_per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(limits.lookup_burst).unwrap_or(one));
        Self {
            source,
            known: Cache::new(limits.known_capacity.max(1)),
            unknown: Cache::new(limits.unknown_capacity.max(1)),
            budget: RateLimiter::direct_with_clock(
                quota,
                TokioClock {
                    start: Instant::now(),
                },
            ),
            limits,
        }
    }

    /// What is known about the token whose hash is `hash`.
    ///
    /// # Errors
    /// [`LookupError::OverBudget`] when the token is in neither cache and the budget is spent;
    /// database errors.
    pub async fn lookup(&self, hash: &TokenHash) -> Result<Lookup, LookupError> {
        if let Some((row, checked)) = self.known.get(hash) {
            if checked.elapsed() < self.limits.known_ttl {
                return Ok(Lookup::Known(row));
            }
            // A token in use: checked again, outside the budget.
            return self.ask(hash).await;
        }
        // At most a few rounds: an expired entry is removed, and a guard handed over by a call
        // that found the token known sends this one back to the known cache.
        for _ in 0..4 {
            match self.unknown.get_value_or_guard_async(hash).await {
                Ok(at) if at.elapsed() < self.limits.unknown_ttl => return Ok(Lookup::Unknown),
                Ok(_) => {
                    self.unknown.remove(hash);
                }
                Err(guard) => {
                    // Another call may have found it known while this one waited.
                    if let Some((row, checked)) = self.known.get(hash)
                        && checked.elapsed() < self.limits.known_ttl
                    {
                        return Ok(Lookup::Known(row));
                    }
                    if self.budget.check().is_err() {
                        crate::metrics::api_token_lookup_refused();
                        return Err(LookupError::OverBudget);
                    }
                    let found = self.ask(hash).await?;
                    if found == Lookup::Unknown {
                        let _ = guard.insert(Instant::now());
                    }
                    return Ok(found);
                }
            }
        }
        Err(LookupError::OverBudget)
    }

    /// Asks the source, and files the answer in the right cache.
    async fn ask(&self, hash: &TokenHash) -> Result<Lookup, LookupError> {
        let row = match self.source.token(*hash).await {
            Ok(row) => row,
            Err(e) => {
                crate::metrics::api_token_lookup("error");
                return Err(e.into());
            }
        };
        match row {
            Some(row) => {
                crate::metrics::api_token_lookup("found");
                self.known.insert(*hash, (row.clone(), Instant::now()));
                Ok(Lookup::Known(row))
            }
            None => {
                crate::metrics::api_token_lookup("unknown");
                self.known.remove(hash);
                self.unknown.insert(*hash, Instant::now());
                Ok(Lookup::Unknown)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use chrono::Utc;

    use super::*;

    /// A source with the tokens `known` holds, counting its lookups, each taking `delay`.
    #[derive(Clone, Default)]
    struct Fake {
        known: Arc<std::sync::Mutex<HashMap<TokenHash, TokenRow>>>,
        asked: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl Fake {
        fn add(&self, n: u8) {
            let row = TokenRow {
                id: i64::from(n),
                tenant: "acme".into(),
                admin: false,
                created_at: Utc::now(),
                expires_at: None,
                revoked_at: None,
                kinds: None,
            };
            self.known.lock().unwrap().insert([n; 32], row);
        }

        fn remove(&self, n: u8) {
            self.known.lock().unwrap().remove(&[n; 32]);
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Fake {
        fn token(
            &self,
            hash: TokenHash,
        ) -> Pin<Box<dyn Future<Output = Result<Option<TokenRow>, StoreError>> + Send + '_>>
        {
            Box::pin(async move {
                self.asked.fetch_add(1, Ordering::SeqCst);
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                Ok(self.known.lock().unwrap().get(&hash).cloned())
            })
        }
    }

    fn limits() -> TokenLimits {
        TokenLimits {
            known_ttl: Duration::from_secs(5),
            known_capacity: 100,
            unknown_ttl: Duration::from_secs(60),
            unknown_capacity: 100,
            lookups_per_second: 10,
            lookup_burst: 20,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unknown_token_is_asked_once_until_its_entry_expires() {
        let fake = Fake::default();
        let cache = TokenCache::new(fake.clone(), limits());
        for _ in 0..50 {
            assert_eq!(cache.lookup(&[9; 32]).await.unwrap(), Lookup::Unknown);
        }
        assert_eq!(fake.asked(), 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        cache.lookup(&[9; 32]).await.unwrap();
        assert_eq!(fake.asked(), 1, "still kept after 59 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.lookup(&[9; 32]).await.unwrap();
        assert_eq!(fake.asked(), 2, "asked again once its minute is over");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_lookups_of_one_token_ask_once() {
        let fake = Fake {
            delay: Duration::from_millis(10),
            ..Fake::default()
        };
        fake.add(1);
        let cache = Arc::new(TokenCache::new(fake.clone(), limits()));
        for hash in [[1u8; 32], [2u8; 32]] {
            let calls: Vec<_> = (0..30)
                .map(|_| {
                    let cache = cache.clone();
                    tokio::spawn(async move { cache.lookup(&hash).await.unwrap() })
                })
                .collect();
            for call in calls {
                let found = call.await.unwrap();
                assert_eq!(found == Lookup::Unknown, hash == [2; 32]);
            }
        }
        assert_eq!(fake.asked(), 2, "one question per token");
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_token_is_checked_again_after_its_ttl_and_a_deleted_one_becomes_unknown() {
        let fake = Fake::default();
        fake.add(1);
        let cache = TokenCache::new(fake.clone(), limits());
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        assert_eq!(fake.asked(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        fake.remove(1);
        assert_eq!(cache.lookup(&[1; 32]).await.unwrap(), Lookup::Unknown);
        assert_eq!(cache.lookup(&[1; 32]).await.unwrap(), Lookup::Unknown);
        assert_eq!(fake.asked(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refuses_new_tokens_without_asking_and_refills_with_time() {
        let fake = Fake::default();
        fake.add(1);
        let cache = TokenCache::new(fake.clone(), limits());
        // The known token first (it then never needs the budget again).
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        let mut refused = 0;
        for n in 0..60u8 {
            match cache.lookup(&[n + 100; 32]).await {
                Ok(Lookup::Unknown) => {}
                Err(LookupError::OverBudget) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        // A burst of 20 (the known token took one): 19 new tokens were asked, the rest not.
        assert_eq!(fake.asked(), 20);
        assert_eq!(refused, 41);
        // A token already asked about costs no budget, and a known one whose entry is stale
        // is checked again outside the budget.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        assert_eq!(cache.lookup(&[100; 32]).await.unwrap(), Lookup::Unknown);
        assert_eq!(fake.asked(), 21);
        // 10 per second: after 6 s of quiet (minus the recheck, which took none), 20 fit again
        // (the burst), but not 21.
        let mut asked_now = 0;
        for n in 0..21u8 {
            if cache.lookup(&[n + 200; 32]).await.is_ok() {
                asked_now += 1;
            }
        }
        assert_eq!(asked_now, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_caches_hold_at_most_their_capacity_and_unknown_ones_never_push_out_known_ones() {
        let fake = Fake::default();
        fake.add(1);
        let cache = TokenCache::new(
            fake.clone(),
            TokenLimits {
                lookups_per_second: 1000,
                lookup_burst: 1000,
                ..limits()
            },
        );
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        for n in 2..=255u8 {
            assert_eq!(cache.lookup(&[n; 32]).await.unwrap(), Lookup::Unknown);
        }
        assert!(cache.unknown.len() <= 100, "{}", cache.unknown.len());
        assert_eq!(fake.asked(), 255);
        assert!(matches!(cache.lookup(&[1; 32]).await, Ok(Lookup::Known(_))));
        assert_eq!(fake.asked(), 255, "the known token is still kept");
    }
}
