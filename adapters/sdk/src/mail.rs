//! The mail domain: the notifications setpoint sends to people, and the [`Mailer`] trait a mail
//! provider implements (`setpoint-email` does it over SMTP).
//!
//! # Rules every [`Mailer`] keeps
//! - **At most once per token.** Plain SMTP has no idempotency key, so a mailer records the
//!   attempt in the unit's [`Journal`] *before* the message data and its result after it. A
//!   second call with the same token never sends a second message: it returns the first
//!   [`Delivery`] when the journal holds one, and it does not send when an earlier attempt began
//!   and recorded nothing (it may have sent).
//! - **The record opens as late as possible.** A mailer reads the journal first
//!   ([`Journal::look`]), does everything that can fail without sending (connecting, TLS,
//!   authenticating, the peer's checks of sender and recipients), and only then begins its
//!   record, immediately before the message data. A failure or a crash before that point leaves
//!   no record, so it can never turn into "outcome unknown".
//! - **Outcome unknown is permanent.** In that last case the mailer returns a permanent
//!   [`AdapterError`] with code [`OUTCOME_UNKNOWN`]: the engine parks the unit and an operator
//!   checks the recipient's mailbox for the `Message-ID`, then cancels the unit (it arrived) or
//!   retries it with a fresh journal record (it did not).
//! - **A definite failure is retryable.** When the peer *certainly* did not take the message
//!   (connection refused, a 4xx/5xx reply before or to the end of the message data), a later
//!   attempt may send: before the record is begun nothing needs recording, after it the mailer
//!   finishes the record as "not sent". It returns a transient error for 4xx replies and
//!   network failures, a permanent one for 5xx replies and bad configuration.
//! - **Fenced.** The mailer calls [`Fence::check`] on its `fence` immediately before it begins
//!   the journal record, so an attempt that lost its unit neither opens a record nor sends the
//!   message data.
//! - **The `Message-ID` derives from the token**, so the same unit always carries the same
//!   `Message-ID` and a duplicate, should one ever slip through a provider, is recognisable.
//!
//! [`NopMailer`] and [`MailerFns`] are test doubles for code that only needs *a* mailer.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::AdapterError;
use crate::fence::Fence;
use crate::handler::BoxFuture;
use crate::journal::Journal;
use crate::token::IdempotencyToken;

/// The [`AdapterError::code`] of a send whose earlier attempt may or may not have delivered the
/// message. Always [`crate::ErrorClass::Permanent`]: retrying blindly could send it twice.
pub const OUTCOME_UNKNOWN: &str = "outcome-unknown";

/// One notification to send: who gets it and what it says.
///
/// As a work spec (kind `email.send`) it is a flat JSON object: `to`, `template` (the
/// template's kebab-case name) and the template's fields, e.g.
/// `{"to": "ada@example.com", "template": "instance-ready", "instance_id": "…",
/// "instance_name": "db-1", "endpoint": "10.0.0.7:5432"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRequest {
    /// The recipient's address (the instance owner), e.g. `ada@example.com` or
    /// `Ada Lovelace <ada@example.com>`.
    pub to: String,
    /// Which message, with its facts.
    #[serde(flatten)]
    pub template: Template,
}

/// The messages setpoint sends. Each variant carries what its text needs; the mailer owns the
/// wording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "template", rename_all = "kebab-case")]
pub enum Template {
    /// The instance was created (or updated) and is ready to use.
    InstanceReady {
        /// The instance's id.
        instance_id: Uuid,
        /// The instance's name, unique within its tenant.
        instance_name: String,
        /// Where to connect, when the instance has an endpoint.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
    /// The instance and everything setpoint made for it are gone.
    InstanceDeleted {
        /// The instance's id.
        instance_id: Uuid,
        /// The instance's name.
        instance_name: String,
    },
    /// A unit of work on the instance failed permanently and waits for an operator.
    WorkParked {
        /// The instance the unit works on, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_id: Option<Uuid>,
        /// The instance's name, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_name: Option<String>,
        /// The parked unit's id (`setpoint work show ID`).
        work_id: i64,
        /// The parked unit's kind, e.g. `ec2.ensure-instance`.
        kind: String,
        /// Why it was parked: the adapter's error message.
        reason: String,
    },
}

impl Template {
    /// The template's name as it appears in specs and logs, e.g. `instance-ready`.
    pub fn name(&self) -> &'static str {
        match self {
            Template::InstanceReady { .. } => "instance-ready",
            Template::InstanceDeleted { .. } => "instance-deleted",
            Template::WorkParked { .. } => "work-parked",
        }
    }
}

/// A message the peer accepted for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The message's `Message-ID`, angle brackets included (e.g. `<TOKEN@example.com>`).
    pub message_id: String,
    /// The peer's acceptance reply, e.g. `250 2.0.0 OK queued as 1234`.
    pub response: String,
    /// True when this call sent nothing because an earlier attempt with the same token had
    /// already delivered the message (the values above are that attempt's).
    pub replayed: bool,
}

/// Sends notifications, at most once per token (see the module docs for the rules).
///
/// Object safe: the engine holds an `Arc<dyn Mailer>`.
pub trait Mailer: Send + Sync {
    /// Sends `request` unless an earlier call with the same `token` sent it or may have sent
    /// it. Called by the `email.send` handler with the unit's token and the unit's
    /// [`crate::WorkContext::journal`].
    ///
    /// It writes to `journal` under keys derived from `token` only, and to nothing else but the
    /// peer.
    ///
    /// # Errors
    /// - permanent, code [`OUTCOME_UNKNOWN`]: an earlier attempt may have sent the message;
    ///   nothing was sent now.
    /// - transient: nothing was sent and a retry may succeed (peer unreachable, 4xx reply).
    /// - permanent: nothing was sent and a retry cannot succeed as is (5xx reply, bad address,
    ///   wrong credentials).
    fn send<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a MailRequest,
        journal: &'a dyn Journal,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Delivery, AdapterError>>;
}

/// A [`Mailer`] that sends nothing and touches no journal: every call reports a delivery with
/// `Message-ID` `<TOKEN@nop.invalid>`. For engine tests that do not exercise mail.
#[derive(Debug, Clone, Copy, Default)]
pub struct NopMailer;

impl Mailer for NopMailer {
    fn send<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        _request: &'a MailRequest,
        _journal: &'a dyn Journal,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Delivery, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(Delivery {
                message_id: format!("<{token}@nop.invalid>"),
                response: "250 nop".to_owned(),
                replayed: false,
            })
        })
    }
}

type SendFn =
    dyn Fn(&IdempotencyToken, &MailRequest) -> Result<Delivery, AdapterError> + Send + Sync;

/// A [`Mailer`] test double backed by a closure; without one it behaves like [`NopMailer`].
/// For engine tests that script the mailer's answers (a transient failure, `outcome-unknown`).
/// It does not use the journal: the closure decides everything.
#[derive(Clone, Default)]
pub struct MailerFns {
    send: Option<Arc<SendFn>>,
}

impl fmt::Debug for MailerFns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailerFns")
            .field("send", &self.send.is_some())
            .finish()
    }
}

impl MailerFns {
    /// A double that behaves like [`NopMailer`] until a closure is set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what [`Mailer::send`] does.
    pub fn on_send(
        mut self,
        f: impl Fn(&IdempotencyToken, &MailRequest) -> Result<Delivery, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.send = Some(Arc::new(f));
        self
    }
}

impl Mailer for MailerFns {
    fn send<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a MailRequest,
        journal: &'a dyn Journal,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Delivery, AdapterError>> {
        match &self.send {
            Some(f) => {
                let out = fence.check().and_then(|()| f(token, request));
                Box::pin(async move { out })
            }
            None => NopMailer.send(token, request, journal, fence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_json_is_flat_with_a_kebab_case_template_name() {
        let json = serde_json::json!({
            "to": "ada@example.com",
            "template": "work-parked",
            "work_id": 7,
            "kind": "ec2.ensure-instance",
            "reason": "AMI ami-1 does not exist",
        });
        let request: MailRequest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(request.template.name(), "work-parked");
        assert_eq!(serde_json::to_value(&request).unwrap(), json);

        let bad = serde_json::json!({"to": "a@b", "template": "birthday"});
        assert!(serde_json::from_value::<MailRequest>(bad).is_err());
    }

    #[tokio::test]
    async fn doubles_are_object_safe_mailers() {
        let request: MailRequest = serde_json::from_value(serde_json::json!({
            "to": "a@example.com", "template": "instance-deleted",
            "instance_id": Uuid::nil(), "instance_name": "db-1",
        }))
        .unwrap();
        let token = IdempotencyToken::parse("t-1").unwrap();
        let journal = crate::MemoryJournal::default();
        let nop: Box<dyn Mailer> = Box::new(NopMailer);
        let d = nop
            .send(&token, &request, &journal, &Fence::unbounded())
            .await
            .unwrap();
        assert_eq!(d.message_id, "<t-1@nop.invalid>");

        let failing: Box<dyn Mailer> = Box::new(
            MailerFns::new().on_send(|_, _| Err(AdapterError::transient("451 try later"))),
        );
        assert!(
            failing
                .send(&token, &request, &journal, &Fence::unbounded())
                .await
                .unwrap_err()
                .is_transient()
        );
    }
}
