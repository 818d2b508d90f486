//! setpoint-email against a real SMTP server (aiosmtpd, started by each test): templated
//! messages, at most once per token across retries and crashes, AUTH, and error classes.

mod common;

use setpoint_adapter::Fence;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use setpoint_adapter::{
    Begun, ErrorClass, Handler, IdempotencyToken, Journal, MailRequest, Mailer, MemoryJournal,
    OUTCOME_UNKNOWN, WorkContext, typed,
};
use setpoint_email::{Password, SendEmail, SmtpMailer, slot_key};

use common::{
    CrashBeforeFinish, ServerOptions, SmtpServer, config_for_port, header, journal_value,
    unused_port,
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

fn sent(value: &Begun) -> Option<bool> {
    match value {
        Begun::Finished(v) => v.get("sent").and_then(|s| s.as_bool()),
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
    let Begun::Finished(v) = record else {
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

    // Attempt 1: nothing listens — connection refused, certainly not sent.
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
        sent(&journal_value(&journal, &slot_key(&token, 1)).await),
        Some(false)
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
        sent(&journal_value(&journal, &slot_key(&token, 2)).await),
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
        Begun::Unknown
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
    assert!(server.messages().is_empty());

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
async fn rejections_5xx_are_permanent_and_recorded_as_not_sent() {
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
    let Begun::Finished(v) = journal_value(&journal, &slot_key(&token, 1)).await else {
        panic!("slot 1 must be finished")
    };
    assert_eq!(v["sent"], json!(false));
    assert_eq!(v["class"], json!("permanent"));
    assert_eq!(v["code"], json!("smtp-550"));

    // 554 after the message data: a definite refusal too, not an unknown outcome.
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
    assert_eq!(
        sent(&journal_value(&journal, &slot_key(&token, 1)).await),
        Some(false)
    );

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
    // Nor in the journal record (which the engine stores and shows).
    let Begun::Finished(v) = journal_value(&journal, &slot_key(&token, 1)).await else {
        panic!("slot 1 must be finished")
    };
    assert!(!v.to_string().contains(secret));
    assert_eq!(v["sent"], json!(false));

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
    // Slot 1 of that token was never begun: begin now says Fresh.
    assert_eq!(
        journal.begin(&slot_key(&bad_token, 1)).await.unwrap(),
        Begun::Fresh
    );
    assert_eq!(server.messages().len(), 1);
}
