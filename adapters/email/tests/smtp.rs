//! setpoint-email against a real SMTP server (aiosmtpd, started by each test): templated
//! messages, at most once per token across retries and crashes, AUTH, and error classes.

mod common;

use setpoint_adapter::Fence;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use setpoint_adapter::{
    CODE_LEASE_LOST, Entry, ErrorClass, Handler, IdempotencyToken, Journal, MailRequest, Mailer,
    MemoryJournal, OUTCOME_UNKNOWN, WorkContext, typed,
};
use setpoint_email::{GREYLIST_RETRY, Password, SLOW_DOWN_RETRY, SendEmail, SmtpMailer, slot_key};

use common::{
    ConcurrentAttempt, CrashBeforeFinish, LosesFence, ServerOptions, SmtpServer, config_for_port,
    header, journal_value, unused_port,
};

fn ready(to: &str) -> MailRequest {
    serde_json::from_value(json!({
        "to": to,
        "template": "instance-ready",
        "instance_id": "6f1c1b2e-8a9d-4c1e-9f5e-3a2b1c0d9e8f",
        "instance_name": "db-1",
        "endpoint": "10.0.0.7:5432",
    }))
    .unwrap()
}

fn token() -> IdempotencyToken {
    IdempotencyToken::generate()
}

fn sent(value: &Entry) -> Option<bool> {
    match value {
        Entry::Finished(v) => v.get("sent").and_then(|s| s.as_bool()),
        _ => None,
    }
}

#[tokio::test]
async fn sends_one_templated_message_whose_message_id_is_the_token() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    let delivery = mailer
        .send(
            &token,
            &ready("Ada <ada@example.com>"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(delivery.message_id, format!("<{token}@setpoint.test>"));
    assert!(
        delivery.response.starts_with("250"),
        "{}",
        delivery.response
    );
    assert!(!delivery.replayed);

    let got = server.with_message_id(&delivery.message_id);
    assert_eq!(got.len(), 1, "exactly one message");
    let m = &got[0];
    assert_eq!(
        header(m, "Subject").as_deref(),
        Some("Your instance \"db-1\" is ready")
    );
    assert_eq!(header(m, "To").as_deref(), Some("Ada <ada@example.com>"));
    assert_eq!(
        header(m, "From").as_deref(),
        Some("setpoint <noreply@setpoint.test>")
    );
    assert!(m.contains("10.0.0.7:5432"), "{m}");
    assert!(
        header(m, "Content-Type").is_some_and(|c| c.starts_with("text/plain")),
        "{m}"
    );

    // The journal holds the delivery under slot 1.
    let record = journal_value(&journal, &slot_key(&token, 1)).await;
    let Entry::Finished(v) = record else {
        panic!("slot 1 must be finished, got {record:?}")
    };
    assert_eq!(v["sent"], json!(true));
    assert_eq!(v["message_id"], json!(delivery.message_id));
    assert!(v["smtp_response"].as_str().unwrap().starts_with("250"));

    // A retry after success sends nothing and reports the first delivery.
    let again = mailer
        .send(
            &token,
            &ready("Ada <ada@example.com>"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.message_id, delivery.message_id);
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn server_down_is_transient_and_the_retry_sends_exactly_once() {
    let port = unused_port();
    let mailer = SmtpMailer::new(config_for_port(port)).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    // Attempt 1: nothing listens — connection refused, certainly not sent, nothing recorded
    // (the slot opens only right before the message data).
    let err = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-connection"));
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Absent
    );

    // Attempt 2: the server is up.
    let server = SmtpServer::start(ServerOptions {
        port: Some(port),
        ..Default::default()
    });
    let delivery = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(!delivery.replayed);
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 1)).await),
        Some(true)
    );

    // Attempt 3 (say the engine lost the completion): nothing more is sent.
    let again = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(server.with_message_id(&delivery.message_id).len(), 1);
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn crash_between_send_and_commit_never_sends_a_second_message() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let durable = MemoryJournal::default();
    let token = token();

    // Attempt 1 sends, then "the process dies" before the journal records the result.
    let first = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &CrashBeforeFinish(&durable),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(server.messages().len(), 1);

    // Every later attempt finds the open slot: outcome unknown, permanent, nothing sent.
    for _ in 0..2 {
        let err = mailer
            .send(
                &token,
                &ready("ada@example.com"),
                &durable,
                &Fence::unbounded(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent, "{err}");
        assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));
        assert!(err.message.contains(&first.message_id), "{err}");
        assert!(
            err.message.contains("check the recipient's mailbox")
                || err.message.contains("Check the recipient's mailbox"),
            "{err}"
        );
    }
    assert_eq!(server.with_message_id(&first.message_id).len(), 1);
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn connection_lost_after_the_data_is_outcome_unknown_and_not_resent() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    // The server stores the message, then drops the connection before its reply.
    let err = mailer
        .send(
            &token,
            &ready("vanish-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Started
    );

    let again = mailer
        .send(
            &token,
            &ready("vanish-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(again.code.as_deref(), Some(OUTCOME_UNKNOWN));
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn operator_resolution_of_an_unknown_outcome_allows_exactly_one_send() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    // An attempt began and died before its SMTP transaction (nothing was sent).
    journal.begin(&slot_key(&token, 1)).await.unwrap();
    let err = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));
    assert!(server.messages().is_empty());

    // The operator saw no message and retries: the engine resolves the open record.
    journal
        .finish(
            &slot_key(&token, 1),
            &json!({"sent": false, "resolved_by": "operator"}),
        )
        .await
        .unwrap();
    mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(
        mailer
            .send(
                &token,
                &ready("ada@example.com"),
                &journal,
                &Fence::unbounded()
            )
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn greylisting_451_is_transient_and_the_retry_sends_once() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    let err = mailer
        .send(
            &token,
            &ready("flaky451-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-451"));
    assert!(err.message.contains("RCPT TO"), "{err}");
    assert_eq!(
        err.retry_after,
        Some(GREYLIST_RETRY),
        "greylisting asks to wait"
    );
    assert!(server.messages().is_empty());
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Absent
    );

    mailer
        .send(
            &token,
            &ready("flaky451-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    mailer
        .send(
            &token,
            &ready("flaky451-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn rejections_5xx_are_permanent_and_never_left_open() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();

    // 550 on RCPT TO.
    let token = token();
    let err = mailer
        .send(
            &token,
            &ready("reject550-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-550"));
    assert_eq!(err.retry_after, None);
    // Refused before the message data: no slot was opened, nothing to record.
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Absent
    );

    // 554 after the message data: a definite refusal too, not an unknown outcome; the slot
    // was open and is finished as not sent.
    let token = self::token();
    let err = mailer
        .send(
            &token,
            &ready("data554-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-554"));
    let Entry::Finished(v) = journal_value(&journal, &slot_key(&token, 1)).await else {
        panic!("slot 1 must be finished")
    };
    assert_eq!(v["sent"], json!(false));
    assert_eq!(v["class"], json!("permanent"));
    assert_eq!(v["code"], json!("smtp-554"));

    // 451 every time stays transient.
    let err = mailer
        .send(
            &self::token(),
            &ready("defer451-ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn auth_plain_and_login_work() {
    for mechanism in ["PLAIN", "LOGIN"] {
        let server = SmtpServer::start(ServerOptions {
            auth: Some(("setpoint".into(), "correct-horse".into())),
            mechanisms: Some(mechanism.into()),
            ..Default::default()
        });
        let mut cfg = server.config();
        cfg.username = Some("setpoint".into());
        cfg.password = Some(Password::new("correct-horse"));
        let mailer = SmtpMailer::new(cfg).unwrap();
        let d = mailer
            .send(
                &token(),
                &ready("ada@example.com"),
                &MemoryJournal::default(),
                &Fence::unbounded(),
            )
            .await
            .unwrap_or_else(|e| panic!("AUTH {mechanism}: {e}"));
        assert_eq!(
            server.with_message_id(&d.message_id).len(),
            1,
            "{mechanism}"
        );
    }
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_permanent_and_never_show_the_password() {
    let server = SmtpServer::start(ServerOptions {
        auth: Some(("setpoint".into(), "correct-horse".into())),
        ..Default::default()
    });
    let secret = "wrong-battery-staple-9431";
    let mut cfg = server.config();
    cfg.username = Some("setpoint".into());
    cfg.password = Some(Password::new(secret));
    let mailer = SmtpMailer::new(cfg.clone()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    let err = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-535"));
    assert!(err.message.contains("AUTH"), "{err}");
    for shown in [
        err.to_string(),
        format!("{err:?}"),
        format!("{mailer:?}"),
        format!("{cfg:?}"),
    ] {
        assert!(!shown.contains(secret), "password leaked: {shown}");
    }
    // Nor in the journal (which the engine stores and shows): AUTH failed before the slot
    // would have opened, so there is no record at all.
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Absent
    );

    // Without credentials the server refuses the transaction (530): permanent.
    let anonymous = SmtpMailer::new(server.config()).unwrap();
    let err = anonymous
        .send(
            &self::token(),
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn the_email_send_handler_runs_units_with_the_context_journal() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = Arc::new(SmtpMailer::new(server.config()).unwrap());
    let handler = typed(SendEmail::new(mailer));
    assert_eq!(handler.kind(), "email.send");
    let journal = Arc::new(MemoryJournal::default());
    let ctx = |token: IdempotencyToken| {
        WorkContext::new(
            7,
            "email.send",
            token,
            1,
            Instant::now() + Duration::from_secs(60),
            journal.clone(),
        )
    };

    let spec = json!({
        "to": "ada@example.com",
        "template": "work-parked",
        "instance_name": "db-1",
        "work_id": 42,
        "kind": "ec2.ensure-instance",
        "reason": "AMI ami-1 does not exist",
    });
    let token = token();
    let c = ctx(token.clone());
    handler.handle(&c, &spec).await.unwrap();
    assert!(c.calls().iter().any(|call| call.starts_with("smtp:send")));
    // The unit runs again (at least once): still one message.
    handler.handle(&ctx(token.clone()), &spec).await.unwrap();
    let got = server.with_message_id(&format!("<{token}@setpoint.test>"));
    assert_eq!(got.len(), 1);
    assert!(
        header(&got[0], "Subject")
            .unwrap()
            .starts_with("Action needed")
    );
    assert!(got[0].contains("setpoint work show 42"));

    // A spec that does not parse, and an address that is not one: permanent, no journal slot.
    let err = handler
        .handle(
            &ctx(self::token()),
            &json!({"to": "a@b", "template": "birthday"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some("invalid-spec"));
    let bad_token = self::token();
    let mut bad = spec.clone();
    bad["to"] = json!("not an address");
    let err = handler
        .handle(&ctx(bad_token.clone()), &bad)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert_eq!(err.code.as_deref(), Some("invalid-recipient"));
    // Slot 1 of that token was never begun.
    assert_eq!(
        journal.look(&slot_key(&bad_token, 1)).await.unwrap(),
        Entry::Absent
    );
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn a_relay_that_refuses_or_drops_the_connection_before_data_leaves_no_slot() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    // The relay answers the first RCPT TO with "421 … slow down" and closes, or hangs up
    // without an answer; each accepts the next time.
    for to in ["slowdown-ada@example.com", "hangup-bob@example.com"] {
        let token = token();
        let err = mailer
            .send(&token, &ready(to), &journal, &Fence::unbounded())
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Transient, "{to}: {err}");
        if to.starts_with("slowdown") {
            assert_eq!(err.code.as_deref(), Some("smtp-421"), "{err}");
            assert_eq!(err.retry_after, Some(SLOW_DOWN_RETRY), "{err}");
        } else {
            assert_eq!(err.code.as_deref(), Some("smtp-connection"), "{err}");
        }
        assert_eq!(
            journal_value(&journal, &slot_key(&token, 1)).await,
            Entry::Absent,
            "{to}: nothing may be left open"
        );

        // The retry sends, under the first slot, exactly once; later attempts replay.
        let delivery = mailer
            .send(&token, &ready(to), &journal, &Fence::unbounded())
            .await
            .unwrap();
        assert!(!delivery.replayed);
        assert_eq!(
            sent(&journal_value(&journal, &slot_key(&token, 1)).await),
            Some(true)
        );
        assert!(
            mailer
                .send(&token, &ready(to), &journal, &Fence::unbounded())
                .await
                .unwrap()
                .replayed
        );
        assert_eq!(
            server.with_message_id(&delivery.message_id).len(),
            1,
            "{to}"
        );
    }
    assert_eq!(server.messages().len(), 2);
}

#[tokio::test]
async fn a_fence_lost_before_the_data_sends_nothing_and_opens_no_slot() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    // The unit is lost after the journal was read: the attempt still talks to the relay
    // (MAIL FROM, RCPT TO), then checks its fence before it opens the slot — and stops.
    let fence = Fence::unbounded();
    let losing = LosesFence {
        inner: &journal,
        fence: fence.clone(),
        on_look: true,
    };
    let err = mailer
        .send(&token, &ready("ada@example.com"), &losing, &fence)
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(CODE_LEASE_LOST), "{err}");
    assert!(server.messages().is_empty());
    assert_eq!(
        journal_value(&journal, &slot_key(&token, 1)).await,
        Entry::Absent
    );

    // The attempt that holds the unit sends once, under slot 1.
    mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 1)).await),
        Some(true)
    );
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn a_fence_lost_while_the_slot_opens_closes_it_as_not_sent() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let journal = MemoryJournal::default();
    let token = token();

    let fence = Fence::unbounded();
    let losing = LosesFence {
        inner: &journal,
        fence: fence.clone(),
        on_look: false,
    };
    let err = mailer
        .send(&token, &ready("ada@example.com"), &losing, &fence)
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(CODE_LEASE_LOST), "{err}");
    assert!(server.messages().is_empty());
    // The slot it had opened is closed as certainly not sent, not left open.
    let Entry::Finished(v) = journal_value(&journal, &slot_key(&token, 1)).await else {
        panic!("slot 1 must be finished")
    };
    assert_eq!(v["sent"], json!(false));
    assert_eq!(v["code"], json!(CODE_LEASE_LOST));

    mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &journal,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 2)).await),
        Some(true)
    );
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn a_slot_taken_by_a_concurrent_attempt_is_answered_from_the_journal() {
    let server = SmtpServer::start(ServerOptions::default());
    let mailer = SmtpMailer::new(server.config()).unwrap();

    // The other attempt delivered the message while this one talked to the relay: this one
    // sends nothing and reports that delivery.
    let journal = MemoryJournal::default();
    let token = token();
    let raced = ConcurrentAttempt::new(
        &journal,
        Some(json!({
            "sent": true, "message_id": "<other@setpoint.test>", "smtp_response": "250 other",
        })),
    );
    let delivery = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &raced,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(delivery.replayed);
    assert_eq!(delivery.response, "250 other");

    // The other attempt began the slot and has not finished: it may be sending right now.
    let journal = MemoryJournal::default();
    let token = self::token();
    let racing = ConcurrentAttempt::new(&journal, None);
    let err = mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &racing,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN), "{err}");

    // The other attempt failed definitely: this one takes the next slot and sends.
    let journal = MemoryJournal::default();
    let token = self::token();
    let failed = ConcurrentAttempt::new(
        &journal,
        Some(json!({"sent": false, "class": "transient", "code": "smtp-451"})),
    );
    mailer
        .send(
            &token,
            &ready("ada@example.com"),
            &failed,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 2)).await),
        Some(true)
    );
    assert_eq!(server.messages().len(), 1, "only the last case sent");
}

/// Counts the throttles reported to it; grants every token.
#[derive(Default)]
struct CountingBudgets {
    throttles: std::sync::Mutex<Vec<String>>,
}

impl setpoint_adapter::Budgets for CountingBudgets {
    fn take<'a>(
        &'a self,
        _key: &'a setpoint_adapter::BudgetKey,
        _limit: setpoint_adapter::Limit,
    ) -> setpoint_adapter::BoxFuture<'a, Result<(), setpoint_adapter::AdapterError>> {
        Box::pin(async { Ok(()) })
    }

    fn throttled<'a>(
        &'a self,
        key: &'a setpoint_adapter::BudgetKey,
        _limit: setpoint_adapter::Limit,
    ) -> setpoint_adapter::BoxFuture<'a, Duration> {
        self.throttles.lock().unwrap().push(key.to_string());
        Box::pin(async { Duration::from_millis(700) })
    }
}

#[tokio::test]
async fn a_rate_reply_to_the_message_data_lowers_the_budget_and_the_retry_sends_once() {
    let server = SmtpServer::start(ServerOptions::default());
    let budgets = Arc::new(CountingBudgets::default());
    let mailer = SmtpMailer::new(server.config())
        .unwrap()
        .with_budgets(budgets.clone());
    let journal = MemoryJournal::default();
    let token = token();
    let to = "rate451-ada@example.com";

    // "451 4.7.0 rate limit exceeded" to the end of the data: certainly not sent, a throttle
    // reported to the relay's budget, and a wait of the budget's length.
    let err = mailer
        .send(&token, &ready(to), &journal, &Fence::unbounded())
        .await
        .unwrap_err();
    assert!(err.throttled, "{err:?}");
    assert_eq!(err.code.as_deref(), Some("smtp-451"), "{err}");
    assert_eq!(err.retry_after, Some(Duration::from_millis(700)), "{err}");
    let throttles = budgets.throttles.lock().unwrap().clone();
    assert_eq!(throttles.len(), 1, "{throttles:?}");
    assert!(throttles[0].starts_with("smtp/"), "{throttles:?}");
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 1)).await),
        Some(false),
        "the slot is closed as not sent"
    );
    assert!(server.messages().is_empty());

    // The retry sends, once.
    let delivery = mailer
        .send(&token, &ready(to), &journal, &Fence::unbounded())
        .await
        .unwrap();
    assert!(!delivery.replayed);
    assert_eq!(server.with_message_id(&delivery.message_id).len(), 1);
    assert_eq!(budgets.throttles.lock().unwrap().len(), 1);
}
