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
//! | `{"sent": false, "class": "transient"\|"permanent", "code": "smtp-451", "error": "…"}` | the relay certainly did not take it |
//!
//! A slot that stays "started" with no value is an attempt whose outcome is unknown: the process
//! died, or the connection broke after the message data was sent, before the relay's verdict.
//!
//! # Walking the slots
//! Before a transaction, [`claim`] calls `begin` on slot 1, 2, … and stops at the first slot
//! that says something other than "not sent":
//! - [`Begun::Fresh`] — this attempt owns the slot now: send.
//! - [`Begun::Finished`] with `"sent": true` — delivered earlier: send nothing, reuse the result.
//! - [`Begun::Unknown`] — an attempt may have sent: send nothing, return `outcome-unknown`.
//! - [`Begun::Finished`] with `"sent": false` — that attempt sent nothing: look at the next slot.
//!
//! So every slot is begun before its transaction, at most one slot of a token is ever open, and
//! a definite failure never turns into "outcome unknown".
//!
//! # Operator retry after "outcome unknown"
//! An operator who finds that the message did *not* arrive resolves the open slot by finishing
//! it with `{"sent": false, "resolved_by": "operator"}` (the engine's `work retry` does this for
//! the unit's unfinished journal records); the next attempt then takes the next slot and sends
//! once. If the message did arrive, the operator cancels the unit.

use serde_json::{Value, json};
use setpoint_adapter::{AdapterError, Begun, Delivery, IdempotencyToken, Journal, OUTCOME_UNKNOWN};

/// At most this many slots per token: a unit that failed definitely this many times is parked.
pub const MAX_ATTEMPT_SLOTS: u32 = 100;

/// The journal key of attempt slot `n` (from 1) of `token`: `email:TOKEN:N`.
pub fn slot_key(token: &IdempotencyToken, n: u32) -> String {
    format!("email:{token}:{n}")
}

/// What the journal allows this attempt to do.
#[derive(Debug)]
pub(crate) enum Claim {
    /// This attempt owns the slot under `key` (begun, now "started"): it may send.
    Send {
        /// The slot's journal key.
        key: String,
    },
    /// An earlier attempt delivered the message.
    AlreadySent(Delivery),
}

/// Facts quoted in the outcome-unknown message.
pub(crate) struct Quote<'a> {
    pub token: &'a IdempotencyToken,
    pub to: &'a str,
    pub message_id: &'a str,
    pub template: &'a str,
}

/// Walks the slots of `token` (see the module docs) and says whether this attempt may send.
///
/// # Errors
/// - permanent `outcome-unknown` when a slot is open (started without a result);
/// - permanent `journal-corrupt` when a slot holds a value this protocol never writes;
/// - permanent `too-many-attempts` after [`MAX_ATTEMPT_SLOTS`] definite failures;
/// - whatever the journal returns when it cannot be read or written.
pub(crate) async fn claim(journal: &dyn Journal, quote: &Quote<'_>) -> Result<Claim, AdapterError> {
    for n in 1..=MAX_ATTEMPT_SLOTS {
        let key = slot_key(quote.token, n);
        match journal.begin(&key).await? {
            Begun::Fresh => return Ok(Claim::Send { key }),
            Begun::Unknown => return Err(outcome_unknown(quote, &key)),
            Begun::Finished(value) => match value.get("sent").and_then(Value::as_bool) {
                Some(false) => continue,
                Some(true) => {
                    let text = |field: &str| {
                        value
                            .get(field)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned()
                    };
                    return Ok(Claim::AlreadySent(Delivery {
                        message_id: text("message_id"),
                        response: text("smtp_response"),
                        replayed: true,
                    }));
                }
                None => {
                    return Err(AdapterError::permanent(format!(
                        "the e-mail journal record {key} holds {value}, which is not a record of \
                         this adapter; fix or remove it, then retry the unit"
                    ))
                    .with_code("journal-corrupt"));
                }
            },
        }
    }
    Err(AdapterError::permanent(format!(
        "sending {} to {} failed {MAX_ATTEMPT_SLOTS} times without sending; fix the cause (see \
         the unit's earlier errors), then retry the unit",
        quote.template, quote.to
    ))
    .with_code("too-many-attempts"))
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
        "outcome unknown: an earlier attempt to send the {template} e-mail to {to} (Message-ID \
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
    async fn walks_past_definite_failures_and_stops_at_open_or_sent_slots() {
        let journal = MemoryJournal::default();
        let token = IdempotencyToken::parse("t").unwrap();
        let q = quote(&token);

        let Claim::Send { key } = claim(&journal, &q).await.unwrap() else {
            panic!("first claim must send")
        };
        assert_eq!(key, "email:t:1");
        // A second claim while slot 1 is open: outcome unknown.
        let err = claim(&journal, &q).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent);
        assert_eq!(err.code.as_deref(), Some(OUTCOME_UNKNOWN));

        // Slot 1 failed definitely: the next claim gets slot 2.
        let failure = AdapterError::transient("451").with_code("smtp-451");
        journal
            .finish(&key, &not_sent_record(&failure))
            .await
            .unwrap();
        let Claim::Send { key } = claim(&journal, &q).await.unwrap() else {
            panic!("claim after a definite failure must send")
        };
        assert_eq!(key, "email:t:2");

        journal
            .finish(&key, &sent_record("<t@example.com>", "250 OK"))
            .await
            .unwrap();
        let Claim::AlreadySent(d) = claim(&journal, &q).await.unwrap() else {
            panic!("claim after delivery must not send")
        };
        assert!(d.replayed);
        assert_eq!(d.response, "250 OK");
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
        let err = claim(&journal, &quote(&token)).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("journal-corrupt"));
    }
}
