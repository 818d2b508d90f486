//! setpoint-email over STARTTLS and implicit TLS, against aiosmtpd with a throw-away CA: the
//! relay's certificate is checked, AUTH runs inside TLS, and TLS problems are permanent.

mod common;

use serde_json::json;
use setpoint_adapter::Fence;
use setpoint_adapter::{ErrorClass, IdempotencyToken, MailRequest, Mailer, MemoryJournal};
use setpoint_email::{Password, Security, SmtpMailer};

use common::{ServerOptions, SmtpServer, scratch_dir, test_certificates};

fn deleted() -> MailRequest {
    serde_json::from_value(json!({
        "to": "ada@example.com",
        "template": "instance-deleted",
        "instance_id": "6f1c1b2e-8a9d-4c1e-9f5e-3a2b1c0d9e8f",
        "instance_name": "db-1",
    }))
    .unwrap()
}

#[tokio::test]
async fn starttls_with_auth_delivers_and_an_untrusted_certificate_is_permanent() {
    let certs = scratch_dir();
    let (ca, cert, key) = test_certificates(&certs);
    let server = SmtpServer::start(ServerOptions {
        auth: Some(("setpoint".into(), "correct-horse".into())),
        tls: Some((cert, key)),
        ..Default::default()
    });
    let mut cfg = server.config();
    cfg.security = Security::Starttls;
    cfg.username = Some("setpoint".into());
    cfg.password = Some(Password::new("correct-horse"));
    cfg.ca_file = Some(ca);
    let d = SmtpMailer::new(cfg.clone())
        .unwrap()
        .send(
            &IdempotencyToken::generate(),
            &deleted(),
            &MemoryJournal::default(),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    let got = server.with_message_id(&d.message_id);
    assert_eq!(got.len(), 1);
    assert_eq!(
        common::header(&got[0], "Subject").as_deref(),
        Some("Your instance \"db-1\" has been deleted")
    );

    // Without the private CA the certificate is not trusted: permanent, nothing sent.
    cfg.ca_file = None;
    let err = SmtpMailer::new(cfg.clone())
        .unwrap()
        .send(
            &IdempotencyToken::generate(),
            &deleted(),
            &MemoryJournal::default(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("smtp-tls"));

    // Plain SMTP to a relay that requires STARTTLS: refused (530), permanent.
    cfg.security = Security::None;
    let err = SmtpMailer::new(cfg)
        .unwrap()
        .send(
            &IdempotencyToken::generate(),
            &deleted(),
            &MemoryJournal::default(),
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(server.messages().len(), 1);
    let _ = std::fs::remove_dir_all(certs);
}

#[tokio::test]
async fn implicit_tls_delivers() {
    let certs = scratch_dir();
    let (ca, cert, key) = test_certificates(&certs);
    let server = SmtpServer::start(ServerOptions {
        tls: Some((cert, key)),
        implicit_tls: true,
        ..Default::default()
    });
    let mut cfg = server.config();
    cfg.security = Security::Tls;
    cfg.ca_file = Some(ca);
    let d = SmtpMailer::new(cfg)
        .unwrap()
        .send(
            &IdempotencyToken::generate(),
            &deleted(),
            &MemoryJournal::default(),
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(server.with_message_id(&d.message_id).len(), 1);
    let _ = std::fs::remove_dir_all(certs);
}
