//! The `webhook.notify` handler alone, in this process, against a real PostgreSQL and a real
//! receiver: the paths an engine run does not reach on demand. A unit whose notification was
//! already accepted (its completion was lost) sends nothing again, an attempt that lost its
//! unit's lease sends nothing at all, and rows past their retention are deleted.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use custom_engine::config::WebhookSettings;
use custom_engine::deliveries::{self, NewDelivery};
use custom_engine::notify::{Notify, NotifySpec};
use custom_engine::signing::{Secret, idempotency_key};
use serde_json::json;
use setpoint_adapter::{
    CODE_LEASE_LOST, Fence, IdempotencyToken, MemoryJournal, TypedHandler, WorkContext,
};
use sqlx::PgPool;

async fn handler(pool: &PgPool, receiver: &Receiver) -> Notify {
    for m in deliveries::migrations() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql))
            .execute(pool)
            .await
            .expect("the plugin's migration");
    }
    let settings = WebhookSettings {
        url: receiver.url().parse().expect("url"),
        timeout: Duration::from_secs(2),
        retention: Duration::from_secs(30 * 24 * 3600),
        secret: Secret::new(SECRET.as_bytes()).expect("secret"),
    };
    let client = reqwest::Client::builder()
        .timeout(settings.timeout)
        .build()
        .expect("client");
    Notify::new(client, &settings, pool.clone())
}

fn context(work_id: i64, token: &IdempotencyToken) -> WorkContext {
    WorkContext::new(
        work_id,
        "webhook.notify",
        token.clone(),
        1,
        Instant::now() + Duration::from_secs(60),
        Arc::new(MemoryJournal::default()),
    )
}

fn spec(event: &str) -> NotifySpec {
    serde_json::from_value(json!({"event": event})).expect("spec")
}

#[tokio::test]
async fn an_accepted_notification_is_found_and_not_sent_again() {
    let db = db().await;
    let receiver = Receiver::start().await;
    let notify = handler(&db.pool, &receiver).await;
    let token = IdempotencyToken::generate();
    let key = idempotency_key(&token);

    // The first attempt's POST was accepted and recorded; its completion never committed.
    notify
        .run(&context(7, &token), spec("instance.ready"))
        .await
        .expect("first attempt");
    assert_eq!(receiver.with_key(key.as_str()).len(), 1);

    // Its retry finds the record and is done without a second POST.
    let mut retry = context(7, &token);
    retry.attempt = 2;
    notify
        .run(&retry, spec("instance.ready"))
        .await
        .expect("the retry");
    assert_eq!(receiver.with_key(key.as_str()).len(), 1, "sent again");

    // The same holds for a record written by another engine process.
    let other = IdempotencyToken::generate();
    deliveries::record(
        &db.pool,
        &NewDelivery {
            work_id: 8,
            token: other.as_str(),
            idempotency_key: idempotency_key(&other).as_str(),
            tenant: None,
            event: "instance.ready",
            attempt: 1,
            status_code: 204,
        },
    )
    .await
    .expect("record");
    notify
        .run(&context(8, &other), spec("instance.ready"))
        .await
        .expect("found");
    assert!(
        receiver
            .with_key(idempotency_key(&other).as_str())
            .is_empty()
    );
}

#[tokio::test]
async fn an_attempt_that_lost_its_unit_sends_nothing() {
    let db = db().await;
    let receiver = Receiver::start().await;
    let notify = handler(&db.pool, &receiver).await;
    let token = IdempotencyToken::generate();
    let fence = Fence::unbounded();
    fence.lose("the lease ran out");
    let ctx = context(9, &token).with_fence(fence);
    let e = notify
        .run(&ctx, spec("instance.ready"))
        .await
        .expect_err("fenced off");
    assert_eq!(e.code.as_deref(), Some(CODE_LEASE_LOST), "{e}");
    assert!(receiver.all().is_empty(), "a request was sent");
    assert!(
        deliveries::accepted(&db.pool, token.as_str())
            .await
            .expect("read")
            .is_none()
    );
}

#[tokio::test]
async fn a_delivery_deletes_rows_past_their_retention() {
    let db = db().await;
    let receiver = Receiver::start().await;
    let notify = handler(&db.pool, &receiver).await;
    sqlx::query(
        "INSERT INTO webhook_deliveries
                (work_id, token, idempotency_key, event, attempt, status_code, answered_at)
         VALUES (1, 'old', 'old-key', 'e', 1, 503, now() - interval '31 days'),
                (2, 'recent', 'recent-key', 'e', 1, 503, now() - interval '29 days')",
    )
    .execute(&db.pool)
    .await
    .expect("old rows");
    notify
        .run(
            &context(3, &IdempotencyToken::generate()),
            spec("instance.ready"),
        )
        .await
        .expect("delivered");
    let left: Vec<String> = sqlx::query_scalar("SELECT token FROM webhook_deliveries ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("rows");
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(left[0], "recent", "the 31-day-old row is gone: {left:?}");
}
