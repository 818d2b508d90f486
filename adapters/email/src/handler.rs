//! The `email.send` work kind: a unit whose spec is a [`MailRequest`], run through any
//! [`Mailer`] with the unit's token and journal.

use std::sync::Arc;

use setpoint_adapter::{AdapterError, MailRequest, Mailer, Outcome, TypedHandler, WorkContext};

/// Runs `email.send` units: sends the spec's message once per unit token.
///
/// Spec (JSON): `{"to": "ada@example.com", "template": "instance-ready" | "instance-deleted" |
/// "work-parked", …the template's fields}` (see [`setpoint_adapter::Template`]). A spec that does
/// not parse is parked as `invalid-spec`. Success records nothing on the resource; the unit's
/// history holds the adapter call. Register it with `setpoint_adapter::typed(SendEmail::new(…))`.
#[derive(Clone)]
pub struct SendEmail {
    mailer: Arc<dyn Mailer>,
}

impl SendEmail {
    /// A handler sending through `mailer` (usually an [`crate::SmtpMailer`]).
    pub fn new(mailer: Arc<dyn Mailer>) -> Self {
        Self { mailer }
    }
}

impl std::fmt::Debug for SendEmail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendEmail").finish_non_exhaustive()
    }
}

impl TypedHandler for SendEmail {
    type Spec = MailRequest;
    const KIND: &'static str = "email.send";

    async fn run(&self, ctx: &WorkContext, spec: MailRequest) -> Result<Outcome, AdapterError> {
        ctx.record_call(format!("smtp:send {}", spec.template.name()));
        self.mailer
            .send(&ctx.token, &spec, ctx.journal.as_ref(), &ctx.fence)
            .await?;
        Ok(Outcome::done())
    }
}
