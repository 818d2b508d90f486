//! Real crashes at the e-mail adapter's failpoints: a child process (this test binary) sends
//! with a file-backed journal and is SIGKILLed at the failpoint.
//!
//! - `email.after-send`: right after the relay accepted the message, before the journal
//!   recorded it. The retry in the parent sends nothing and reports `outcome-unknown`.
//! - `email.before-begin`: after the relay accepted sender and recipient, right before the
//!   journal slot opens. Nothing was sent and nothing is left open: the retry sends once.

mod common;

use setpoint_adapter::Fence;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Map, Value, json};
use setpoint_adapter::{
    AdapterError, Begun, BoxFuture, Entry, ErrorClass, IdempotencyToken, Journal, MailRequest,
    Mailer, OUTCOME_UNKNOWN, failpoint,
};
use setpoint_email::{FAILPOINT_AFTER_SEND, FAILPOINT_BEFORE_BEGIN, SmtpMailer, slot_key};

use common::{ServerOptions, SmtpServer, config_for_port, scratch_dir};

/// A journal in a JSON file (`{key: null | result}`), rewritten atomically on every change: it
/// survives the child's death like the engine's PostgreSQL journal does.
struct FileJournal(PathBuf);

impl FileJournal {
    fn load(&self) -> Map<String, Value> {
        std::fs::read(&self.0)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn store(&self, map: &Map<String, Value>) -> Result<(), AdapterError> {
        let tmp = self.0.with_extension("tmp");
        let bytes = serde_json::to_vec(map).map_err(|e| AdapterError::transient(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| AdapterError::transient(e.to_string()))?;
        std::fs::rename(&tmp, &self.0).map_err(|e| AdapterError::transient(e.to_string()))
    }
}

impl Journal for FileJournal {
    fn look<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Entry, AdapterError>> {
        Box::pin(async move {
            Ok(match self.load().get(key) {
                None => Entry::Absent,
                Some(Value::Null) => Entry::Started,
                Some(v) => Entry::Finished(v.clone()),
            })
        })
    }

    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            let mut map = self.load();
            Ok(match map.get(key) {
                None => {
                    map.insert(key.to_owned(), Value::Null);
                    self.store(&map)?;
                    Begun::Fresh
                }
                Some(Value::Null) => Begun::Unknown,
                Some(v) => Begun::Finished(v.clone()),
            })
        })
    }

    fn finish<'a>(
        &'a self,
        key: &'a str,
        result: &'a Value,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let mut map = self.load();
            map.insert(key.to_owned(), result.clone());
            self.store(&map)
        })
    }
}

fn request() -> MailRequest {
    serde_json::from_value(json!({
        "to": "ada@example.com",
        "template": "instance-ready",
        "instance_id": "6f1c1b2e-8a9d-4c1e-9f5e-3a2b1c0d9e8f",
        "instance_name": "db-1",
    }))
    .unwrap()
}

/// The child's side: only runs when a parent test starts it (ignored otherwise).
#[tokio::test]
#[ignore = "run by the crash tests below in a child process"]
async fn child_sends_until_the_failpoint() {
    let (Ok(port), Ok(journal), Ok(token), Ok(failpoint)) = (
        std::env::var("EMAIL_CRASH_PORT"),
        std::env::var("EMAIL_CRASH_JOURNAL"),
        std::env::var("EMAIL_CRASH_TOKEN"),
        std::env::var("SETPOINT_FAILPOINTS"),
    ) else {
        return;
    };
    let mailer = SmtpMailer::new(config_for_port(port.parse().unwrap())).unwrap();
    let token = IdempotencyToken::parse(token).unwrap();
    let journal = FileJournal(journal.into());
    // Blocks forever at the failpoint.
    let _ = mailer
        .send(&token, &request(), &journal, &Fence::unbounded())
        .await;
    panic!("the failpoint {failpoint} was not reached");
}

/// Runs the child against `server` until it reaches `failpoint`, then kills it. Returns its
/// journal.
fn crash_child_at(
    failpoint: &str,
    server: &SmtpServer,
    dir: &std::path::Path,
    token: &IdempotencyToken,
) -> FileJournal {
    let journal_path = dir.join("journal.json");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_sends_until_the_failpoint",
            "--ignored",
            "--nocapture",
        ])
        .env("SETPOINT_FAILPOINTS", failpoint)
        .env("EMAIL_CRASH_PORT", server.port.to_string())
        .env("EMAIL_CRASH_JOURNAL", &journal_path)
        .env("EMAIL_CRASH_TOKEN", token.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = failpoint::marker(failpoint);
    let mut seen = Vec::new();
    let mut reached = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains(&marker) {
            reached = true;
            break;
        }
        seen.push(line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        reached,
        "the child must reach {failpoint}; its stderr: {seen:#?}"
    );
    FileJournal(journal_path)
}

#[tokio::test]
async fn killed_after_send_then_retried_sends_nothing_more() {
    let server = SmtpServer::start(ServerOptions::default());
    let dir = scratch_dir();
    let token = IdempotencyToken::generate();
    let journal = crash_child_at(FAILPOINT_AFTER_SEND, &server, &dir, &token);
    assert_eq!(
        server.messages().len(),
        1,
        "the child must have sent before the failpoint"
    );

    // The journal shows an attempt begun with no result; the retry must not send.
    assert_eq!(journal.load().get(&slot_key(&token, 1)), Some(&Value::Null));
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let err = mailer
        .send(&token, &request(), &journal, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));
    assert_eq!(server.messages().len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn killed_before_the_slot_opens_then_retried_sends_once() {
    let server = SmtpServer::start(ServerOptions::default());
    let dir = scratch_dir();
    let token = IdempotencyToken::generate();
    let journal = crash_child_at(FAILPOINT_BEFORE_BEGIN, &server, &dir, &token);

    // The relay had accepted sender and recipient; the process died before the message data
    // and before its slot opened: nothing sent, nothing left open.
    assert!(server.messages().is_empty());
    assert_eq!(
        journal.look(&slot_key(&token, 1)).await.unwrap(),
        Entry::Absent
    );
    let mailer = SmtpMailer::new(server.config()).unwrap();
    let delivery = mailer
        .send(&token, &request(), &journal, &Fence::unbounded())
        .await
        .unwrap();
    assert!(!delivery.replayed);
    assert!(matches!(
        journal.look(&slot_key(&token, 1)).await.unwrap(),
        Entry::Finished(v) if v["sent"] == serde_json::json!(true)
    ));
    assert_eq!(server.with_message_id(&delivery.message_id).len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}
