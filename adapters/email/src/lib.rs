//! # setpoint-email: notifications over SMTP, at most once per unit of work
//!
//! Sends setpoint's notifications (instance ready, instance deleted, work parked) to an
//! instance's owner through an SMTP relay, with lettre. Plain SMTP cannot be made idempotent,
//! so every send goes through the unit's durable journal: a message is sent at most once per
//! idempotency token, a failure that certainly sent nothing may be retried, and an attempt that
//! may have sent parks the unit as `outcome-unknown` for an operator. The journal slot opens
//! as late as possible — after connecting, authenticating and the relay's acceptance of sender
//! and recipients, immediately before the message data — so only an attempt that may really
//! have sent can leave it open. The `Message-ID` is `<TOKEN@DOMAIN>`.
//!
//! # Layout
//! - `config` — [`SmtpConfig`]: relay, security (`none | starttls | tls`), AUTH, sender,
//!   timeouts; the [`Password`] never shows in `Debug`, logs or errors.
//! - `smtp` — [`SmtpMailer`], the [`setpoint_adapter::Mailer`] over SMTP, and the error classes.
//! - `attempts` — the journal protocol: keys `email:TOKEN:N` and their values
//!   ([`slot_key`]), and the order of an attempt (read the slots, prepare the transaction,
//!   open the slot, send).
//! - `templates` — subject and plain-text body of each template.
//! - `handler` — [`SendEmail`], the `email.send` work kind.
//!
//! ```no_run
//! use std::sync::Arc;
//! use setpoint_email::{SendEmail, SmtpConfig, SmtpMailer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config: SmtpConfig = serde_json::from_str(
//!     r#"{"host": "smtp.example.com", "from": "setpoint <noreply@example.com>"}"#,
//! )?;
//! let handler = setpoint_adapter::typed(SendEmail::new(Arc::new(SmtpMailer::new(config)?)));
//! # let _ = handler;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod attempts;
mod config;
mod handler;
mod smtp;
mod templates;

pub use attempts::{MAX_ATTEMPT_SLOTS, slot_key};
pub use config::{
    ConfigError, DEFAULT_SEND_BUDGET, Password, Security, SmtpBudgetsConfig, SmtpConfig,
};
pub use handler::SendEmail;
pub use smtp::{
    FAILPOINT_AFTER_SEND, FAILPOINT_BEFORE_BEGIN, GREYLIST_RETRY, SLOW_DOWN_RETRY, SmtpMailer,
};
pub use templates::{Rendered, render};
