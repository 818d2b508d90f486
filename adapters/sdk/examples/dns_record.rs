//! A complete, small adapter: DNS records for a made-up provider, written against the SDK only.
//!
//! Run it with `cargo run -p setpoint-adapter --example dns_record`. It shows the four things
//! every setpoint adapter does:
//! 1. a typed spec and a work kind (`dns.ensure-record`), via [`TypedHandler`];
//! 2. **observe before act**: look for a record an earlier attempt made with this unit's token
//!    (the provider keeps the token as a record comment, as EC2 keeps it as a tag) and adopt it;
//! 3. errors classified as transient (rate limit → retry later) or permanent (invalid name →
//!    park for an operator), with a message a person can act on;
//! 4. an [`Outcome`] with the observed state the engine records on the resource.
//!
//! `main` runs the unit twice with the same token, as the engine does after a crash between the
//! provider call and the completion, and shows that the second run adopts the first record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use setpoint_adapter::{
    AdapterError, Handler, IdempotencyToken, MemoryJournal, Outcome, TypedHandler, WorkContext,
    typed,
};

/// One record as the provider stores it.
#[derive(Debug, Clone)]
struct Record {
    id: String,
    name: String,
    address: String,
    /// Free text the provider keeps with the record; we store the idempotency token in it.
    comment: String,
}

/// Why the provider refused a call (its own error type, before classification).
#[derive(Debug)]
enum ProviderError {
    RateLimited { retry_after: Duration },
    InvalidName(String),
}

/// An in-memory stand-in for a DNS provider's API.
#[derive(Default)]
struct FakeDnsProvider {
    records: Mutex<Vec<Record>>,
    /// How many of the next calls fail with a rate limit (to show a transient error).
    rate_limit_next: Mutex<u32>,
}

impl FakeDnsProvider {
    fn check_rate_limit(&self) -> Result<(), ProviderError> {
        let mut left = self.rate_limit_next.lock().map_err(|_| rate_limited())?;
        if *left > 0 {
            *left -= 1;
            return Err(rate_limited());
        }
        Ok(())
    }

    /// Lists records whose comment equals `comment` (the provider's search API).
    fn find_by_comment(&self, comment: &str) -> Result<Vec<Record>, ProviderError> {
        self.check_rate_limit()?;
        let records = self.records.lock().map_err(|_| rate_limited())?;
        Ok(records
            .iter()
            .filter(|r| r.comment == comment)
            .cloned()
            .collect())
    }

    /// Creates a record. Like most real APIs, calling it twice makes two records.
    fn create(&self, name: &str, address: &str, comment: &str) -> Result<Record, ProviderError> {
        self.check_rate_limit()?;
        if name.is_empty() || name.contains(' ') || !name.ends_with('.') {
            return Err(ProviderError::InvalidName(name.to_owned()));
        }
        let mut records = self.records.lock().map_err(|_| rate_limited())?;
        let record = Record {
            id: format!("rec-{}", records.len() + 1),
            name: name.to_owned(),
            address: address.to_owned(),
            comment: comment.to_owned(),
        };
        records.push(record.clone());
        Ok(record)
    }
}

fn rate_limited() -> ProviderError {
    ProviderError::RateLimited {
        retry_after: Duration::from_secs(2),
    }
}

/// The one place where provider errors become transient or permanent.
fn classify(err: ProviderError) -> AdapterError {
    match err {
        ProviderError::RateLimited { retry_after } => {
            AdapterError::transient("the DNS provider is rate limiting us; retrying later")
                .with_code("rate-limited")
                .with_retry_after(retry_after)
        }
        ProviderError::InvalidName(name) => AdapterError::permanent(format!(
            "{name:?} is not a valid fully-qualified record name (it must end with '.' and have \
             no spaces); fix the spec and retry the unit"
        ))
        .with_code("invalid-name"),
    }
}

/// The spec of a `dns.ensure-record` unit, as the workflow enqueues it.
#[derive(Debug, Deserialize)]
struct EnsureRecordSpec {
    name: String,
    address: String,
}

/// The handler: ensures one A record per token.
struct EnsureRecord {
    provider: Arc<FakeDnsProvider>,
}

impl EnsureRecord {
    fn comment(token: &IdempotencyToken) -> String {
        format!("setpoint:token={token}")
    }
}

impl TypedHandler for EnsureRecord {
    type Spec = EnsureRecordSpec;
    const KIND: &'static str = "dns.ensure-record";

    async fn run(
        &self,
        ctx: &WorkContext,
        spec: EnsureRecordSpec,
    ) -> Result<Outcome, AdapterError> {
        let comment = Self::comment(&ctx.token);

        // Observe: did an earlier attempt of this unit already create the record?
        let found = self.provider.find_by_comment(&comment).map_err(classify)?;
        let (record, adopted) = match found.into_iter().next() {
            Some(record) => (record, true),
            // Act: only now create, carrying the token so the next attempt can find it.
            None => {
                ctx.record_call("dns:CreateRecord");
                let record = self
                    .provider
                    .create(&spec.name, &spec.address, &comment)
                    .map_err(classify)?;
                (record, false)
            }
        };

        Ok(Outcome::done().observed(json!({
            "dns_record_id": record.id,
            "dns_name": record.name,
            "dns_address": record.address,
            "dns_adopted": adopted,
        })))
    }
}

fn context(token: &IdempotencyToken, attempt: i32) -> WorkContext {
    WorkContext::new(
        1,
        EnsureRecord::KIND,
        token.clone(),
        attempt,
        Instant::now() + Duration::from_secs(30),
        Arc::new(MemoryJournal::default()),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let provider = Arc::new(FakeDnsProvider::default());
    // The engine sees handlers as `dyn Handler`, keyed by kind; `typed` adapts ours.
    let handler: Box<dyn Handler> = Box::new(typed(EnsureRecord {
        provider: provider.clone(),
    }));
    let spec = json!({ "name": "db.example.com.", "address": "10.0.0.7" });
    let token = IdempotencyToken::generate();

    // Attempt 1 is rate limited: a transient error, which the engine retries after a backoff.
    *provider.rate_limit_next.lock().map_err(|_| "lock")? = 1;
    let err = handler
        .handle(&context(&token, 1), &spec)
        .await
        .err()
        .ok_or("attempt 1 should be rate limited")?;
    println!("attempt 1: {err} (transient: {})", err.is_transient());

    // Attempt 2 creates the record. Pretend the worker then crashed before the engine committed
    // the completion: the engine will run the unit again with the same token.
    let first = handler.handle(&context(&token, 2), &spec).await?;
    println!("attempt 2: {}", first.observed.clone().unwrap_or_default());

    // Attempt 3 (same token) finds the record by its token and adopts it: no duplicate.
    let second = handler.handle(&context(&token, 3), &spec).await?;
    println!("attempt 3: {}", second.observed.clone().unwrap_or_default());

    let count: HashMap<String, usize> =
        provider
            .records
            .lock()
            .map_err(|_| "lock")?
            .iter()
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r.name.clone()).or_default() += 1;
                m
            });
    println!("records at the provider: {count:?}");
    assert_eq!(count.get("db.example.com."), Some(&1), "exactly one record");

    // A bad name is permanent: the engine parks the unit for an operator instead of retrying.
    let bad = json!({ "name": "not a name", "address": "10.0.0.8" });
    let err = handler
        .handle(&context(&IdempotencyToken::generate(), 1), &bad)
        .await
        .err()
        .ok_or("a bad name should fail")?;
    println!("bad spec: {err} (transient: {})", err.is_transient());
    assert!(!err.is_transient());
    Ok(())
}
