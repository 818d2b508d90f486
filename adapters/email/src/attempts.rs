//! The journal protocol that makes sending at most once per token, while still letting a unit
//! retry after a failure that *certainly* sent nothing.
//!
//! # Keys and values
//! A token owns a sequence of *attempt slots*, journal keys `email:TOKEN:1`, `email:TOKEN:2`, …
//! Each slot goes through [`Journal::begin`] (→ "started") once and [`Journal::finish`] at most
//! once, with one of two values:
//!
//! | value | meaning |
//! |---|---|
//! | `{"sent": true, "message_id": "<…>", "smtp_response": "250 …"}` | the relay accepted the message |
//! | `{"sent": false, "class": "transient"\|"permanent", "code": "smtp-554", "error": "…"}` | the relay certainly did not take it |
//!
//! A slot that stays "started" with no value is an attempt whose outcome is unknown: the process
//! died, or the connection broke, after the slot was begun — immediately before the message
//! data — and before the relay's verdict on it.
//!
//! # The order of an attempt: the slot opens as late as possible
//! 1. [`plan`] walks slot 1, 2, … with [`Journal::look`], which opens nothing, and stops at the
//!    first slot that says something other than "not sent":
//!    - absent — the next free slot: this attempt may try to send under it;
//!    - finished with `"sent": true` — delivered earlier: send nothing, reuse the result;
//!    - started, no value — an attempt may have sent: send nothing, return `outcome-unknown`;
//!    - finished with `"sent": false` — that attempt sent nothing: look at the next slot.
//! 2. The mailer connects and runs greeting, EHLO, STARTTLS, AUTH, `MAIL FROM` and `RCPT TO`.
//!    A failure here records nothing: the slot is still absent, and the next attempt finds it
//!    free again. So a relay that is down, refuses the sender or a recipient, or drops the
//!    connection — or a process that dies — before the message data can never turn into
//!    "outcome unknown".
//! 3. It checks the attempt's fence, then [`open`]s the slot ([`Journal::begin`]), committed
//!    before the relay sees the message data. If a concurrent attempt took the slot since step
//!    1, `begin` says so and this attempt sends nothing: it aborts the SMTP transaction and
//!    answers from what the journal holds (delivered → that delivery; started → outcome
//!    unknown; not sent → it opens the next slot instead).
//! 4. `DATA` and the message; the result finishes the slot: "sent", "not sent" (a refusal of
//!    `DATA` or of the message), or nothing when the verdict never came (outcome unknown).
//!
//! So at most one slot of a token is ever open, an open slot always means "the message data
//! may have gone out", and a definite failure never turns into "outcome unknown".
//!
//! # Operator retry after "outcome unknown"
//! An operator who finds that the message did *not* arrive resolves the open slot by finishing
//! it with `{"sent": false, "resolved_by": "operator"}` (the engine's `work retry` does this for
//! the unit's unfinished journal records); the next attempt then takes the next slot and sends
//! once. If the message did arrive, the operator cancels the unit.

use serde_json::{Value, json};
use setpoint_adapter::{
    AdapterError, Begun, Delivery, Entry, IdempotencyToken, Journal, OUTCOME_UNKNOWN,
};

/// At most this many slots per token: a unit that failed definitely this many times (after its
/// slot was open) is parked.
pub const MAX_ATTEMPT_SLOTS: u32 = 100;

/// The journal key of attempt slot `n` (from 1) of `token`: `email:TOKEN:N`.
pub fn slot_key(token: &IdempotencyToken, n: u32) -> String {
    format!("email:{token}:{n}")
}

/// What the journal allows this attempt to do, as read before any slot is opened.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Every earlier slot certainly sent nothing; slot `slot` is free: this attempt may try to
    /// send under it (once [`open`] begins it).
    Send {
        /// The first free slot.
        slot: u32,
    },
    /// An earlier attempt delivered the message.
    AlreadySent(Delivery),
}

/// What [`open`] found when it began a slot.
#[derive(Debug)]
pub(crate) enum Opened {
    /// This attempt owns the slot under `key` (begun, now "started"): it may send.
    Mine {
        /// The slot's journal key.
        key: String,
    },
    /// A concurrent attempt delivered the message in the meantime.
    AlreadySent(Delivery),
}

/// Facts quoted in the outcome-unknown message.
pub(crate) struct Quote<'a> {
    pub token: &'a IdempotencyToken,
    pub to: &'a str,
    pub message_id: &'a str,
    pub template: &'a str,
}

/// Walks the slots of `token` without opening any (see the module docs, step 1) and says
/// whether this attempt may try to send, and under which slot.
///
/// # Errors
/// - permanent `outcome-unknown` when a slot is open (started without a result);
/// - permanent `journal-corrupt` when a slot holds a value this protocol never writes;
/// - permanent `too-many-attempts` after [`MAX_ATTEMPT_SLOTS`] definite failures;
/// - whatever the journal returns when it cannot be read.
pub(crate) async fn plan(journal: &dyn Journal, quote: &Quote<'_>) -> Result<Plan, AdapterError> {
    for n in 1..=MAX_ATTEMPT_SLOTS {
        let key = slot_key(quote.token, n);
        match journal.look(&key).await? {
            Entry::Absent => return Ok(Plan::Send { slot: n }),
            Entry::Started => return Err(outcome_unknown(quote, &key)),
            Entry::Finished(value) => {
                if let Some(delivery) = delivered(&key, &value)? {
                    return Ok(Plan::AlreadySent(delivery));
                }
            }
        }
    }
    Err(too_many_attempts(quote))
}

/// Begins slot `from` (or, when concurrent attempts finished it and the ones after it as "not
/// sent", the next free one): the last step before the message data (module docs, step 3).
///
/// # Errors
/// As [`plan`], for what a concurrent attempt recorded since; and whatever the journal returns
/// when it cannot be written.
pub(crate) async fn open(
    journal: &dyn Journal,
    quote: &Quote<'_>,
    from: u32,
) -> Result<Opened, AdapterError> {
    for n in from..=MAX_ATTEMPT_SLOTS {
        let key = slot_key(quote.token, n);
        match journal.begin(&key).await? {
            Begun::Fresh => return Ok(Opened::Mine { key }),
            Begun::Unknown => return Err(outcome_unknown(quote, &key)),
            Begun::Finished(value) => {
                if let Some(delivery) = delivered(&key, &value)? {
                    return Ok(Opened::AlreadySent(delivery));
                }
            }
        }
    }
    Err(too_many_attempts(quote))
}

/// A finished slot's value: the delivery it records, or `None` when it certainly sent nothing.
fn delivered(key: &str, value: &Value) -> Result<Option<Delivery>, AdapterError> {
    match value.get("sent").and_then(Value::as_bool) {
        Some(false) => Ok(None),
        Some(true) => {
            let text = |field: &str| {
                value
                    .get(field)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            Ok(Some(Delivery {
                message_id: text("message_id"),
                response: text("smtp_response"),
                replayed: true,
            }))
        }
        None => Err(AdapterError::permanent(format!(
            "the e-mail journal record {key} holds {value}, which is not a record of this \
             adapter; fix or remove it, then retry the unit"
        ))
        .with_code("journal-corrupt")),
    }
}

fn too_many_attempts(quote: &Quote<'_>) -> AdapterError {
    AdapterError::permanent(format!(
        "sending {} to {} failed {MAX_ATTEMPT_SLOTS} times without sending; fix the cause (see \
         the unit's earlier errors), then retry the unit",
        quote.template, quote.to
    ))
    .with_code("too-many-attempts")
}

/// The record of a delivered message.
pub(crate) fn sent_record(message_id: &str, smtp_response: &str) -> Value {
    json!({"sent": true, "message_id": message_id, "smtp_response": smtp_response})
}

/// The record of an attempt that certainly sent nothing.
pub(crate) fn not_sent_record(error: &AdapterError) -> Value {
    json!({
        "sent": false,
        "class": error.class.as_str(),
        "code": error.code,
        "error": error.message,
    })
}

/// The permanent error for an attempt whose outcome cannot be known, with what the operator
/// should do.
pub(crate) fn outcome_unknown(quote: &Quote<'_>, key: &str) -> AdapterError {
    AdapterError::permanent(format!(
        "outcome unknown: another attempt to send the {template} e-mail to {to} (Message-ID \
         {mid}, journal record {key}) started and recorded no result, so it may or may not have \
         been sent; nothing was sent now. Check the recipient's mailbox or the relay's log for \
         Message-ID {mid}: if it arrived, cancel this unit; if not, retry it and it is sent once.",
        template = quote.template,
        to = quote.to,
        mid = quote.message_id,
    ))
    .with_code(OUTCOME_UNKNOWN)
}

#[cfg(test)]
mod tests {
    use setpoint_adapter::{ErrorClass, MemoryJournal};

    use super::*;

    fn quote(token: &IdempotencyToken) -> Quote<'_> {
        Quote {
            token,
            to: "ada@example.com",
            message_id: "<t@example.com>",
            template: "instance-ready",
        }
    }

    #[tokio::test]
    async fn plans_without_opening_and_opens_only_when_asked() {
        let journal = MemoryJournal::default();
        let token = IdempotencyToken::parse("t").unwrap();
        let q = quote(&token);

        // Planning opens nothing, however often it runs.
        for _ in 0..2 {
            let Plan::Send { slot } = plan(&journal, &q).await.unwrap() else {
                panic!("a fresh token must be sendable")
            };
            assert_eq!(slot, 1);
        }
        assert_eq!(journal.look("email:t:1").await.unwrap(), Entry::Absent);

        let Opened::Mine { key } = open(&journal, &q, 1).await.unwrap() else {
            panic!("slot 1 is free")
        };
        assert_eq!(key, "email:t:1");
        // While slot 1 is open, both a plan and a concurrent open say outcome unknown.
        let err = plan(&journal, &q).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent);
        assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));
        let err = open(&journal, &q, 1).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));

        // Slot 1 failed definitely: the next plan offers slot 2.
        let failure = AdapterError::permanent("554").with_code("smtp-554");
        journal
            .finish(&key, &not_sent_record(&failure))
            .await
            .unwrap();
        let Plan::Send { slot } = plan(&journal, &q).await.unwrap() else {
            panic!("a plan after a definite failure must send")
        };
        assert_eq!(slot, 2);
        // An attempt that planned slot 1 before that failure opens slot 2 instead.
        let Opened::Mine { key } = open(&journal, &q, 1).await.unwrap() else {
            panic!("slot 2 is free")
        };
        assert_eq!(key, "email:t:2");

        journal
            .finish(&key, &sent_record("<t@example.com>", "250 OK"))
            .await
            .unwrap();
        let Plan::AlreadySent(d) = plan(&journal, &q).await.unwrap() else {
            panic!("a plan after delivery must not send")
        };
        assert!(d.replayed);
        assert_eq!(d.response, "250 OK");
        // A concurrent attempt that planned before the delivery learns of it when it opens.
        let Opened::AlreadySent(d) = open(&journal, &q, 2).await.unwrap() else {
            panic!("an open after delivery must not send")
        };
        assert_eq!(d.message_id, "<t@example.com>");
    }

    #[tokio::test]
    async fn a_foreign_value_is_not_taken_for_permission() {
        let journal = MemoryJournal::default();
        let token = IdempotencyToken::parse("t").unwrap();
        journal.begin("email:t:1").await.unwrap();
        journal
            .finish("email:t:1", &json!({"ok": 1}))
            .await
            .unwrap();
        let err = plan(&journal, &quote(&token)).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("journal-corrupt"));
        let err = open(&journal, &quote(&token), 1).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("journal-corrupt"));
    }
}
