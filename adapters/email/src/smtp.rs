//! [`SmtpMailer`]: the [`Mailer`] that speaks SMTP through lettre, one connection per message.
//!
//! It drives lettre's `AsyncSmtpConnection` step by step instead of the all-in-one
//! `AsyncSmtpTransport`, because at-most-once needs to know *where* a failure happened, and
//! needs a moment between `RCPT TO` and `DATA` to open its journal slot: anything before the
//! relay's verdict on the message data certainly sent nothing, while a broken connection or a
//! timeout after the data went out leaves the outcome unknown. The order of a send, and why,
//! is in the `attempts` module docs.
//!
//! # Replies that ask to wait
//! 4xx replies are transient. When the reply's text asks the client to slow down (`slow down`,
//! `rate limit`, `too many`, `throttl…`, as 421 and 451 replies of busy relays say), the error
//! carries `retry_after` = [`SLOW_DOWN_RETRY`] and counts as throttling (with the engine's shared
//! budgets, the lowered budget's wait replaces that delay); when it says the message was greylisted, it
//! carries [`GREYLIST_RETRY`], the usual greylisting delay, so that the engine's early,
//! short backoff does not spend the unit's attempts on retries the relay is bound to refuse.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use lettre::Address;
use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use setpoint_adapter::failpoint;
use setpoint_adapter::{
    AdapterError, BoxFuture, Budget, BudgetKey, Budgets, Delivery, Fence, IdempotencyToken,
    Journal, MailRequest, Mailer, Unlimited,
};
use tokio::time::timeout;
use tracing::{info, warn};

use crate::attempts::{self, Opened, Plan, Quote};
use crate::config::{ConfigError, Security, SmtpConfig};
use crate::templates::render;

/// The failpoint reached right after the relay accepted a message and before the journal
/// records it (see [`setpoint_adapter::failpoint`]).
pub const FAILPOINT_AFTER_SEND: &str = "email.after-send";

/// The failpoint reached when the relay has accepted sender and recipients, right before the
/// journal slot is begun: a crash here must leave no open slot.
pub const FAILPOINT_BEFORE_BEGIN: &str = "email.before-begin";

/// The `retry_after` of a 4xx reply that asks the client to slow down.
pub const SLOW_DOWN_RETRY: Duration = Duration::from_secs(60);

/// The `retry_after` of a 4xx reply that says the message was greylisted.
pub const GREYLIST_RETRY: Duration = Duration::from_secs(300);

/// AUTH mechanisms tried, in this order, among those the relay offers.
const MECHANISMS: &[Mechanism] = &[Mechanism::Plain, Mechanism::Login];

/// Sends templated notifications over SMTP, at most once per token.
///
/// Each [`Mailer::send`] opens one connection (TLS or STARTTLS and AUTH as configured), runs one
/// SMTP transaction and closes it; nothing is pooled, so a message never waits behind a stale
/// connection. Cheap to clone? No — share it in an `Arc`.
pub struct SmtpMailer {
    config: SmtpConfig,
    from: Mailbox,
    hello: ClientId,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    message_id_domain: String,
    send_budget: Budget,
}

impl fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `SmtpConfig`'s Debug hides the password.
        f.debug_struct("SmtpMailer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How an SMTP attempt that did not succeed ended.
enum Failure {
    /// The relay certainly did not take the message.
    NotSent(AdapterError),
    /// The message data went out and no verdict came back: it may have been taken.
    MaybeSent(String),
}

impl SmtpMailer {
    /// Checks `config` and builds a mailer. Connects to nothing.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad field: an invalid sender, half-set credentials, AUTH over
    /// plain text to a remote relay, an unreadable `ca_file`, or a bad `hello_name` /
    /// `message_id_domain`.
    pub fn new(config: SmtpConfig) -> Result<Self, ConfigError> {
        let from: Mailbox = config.from.parse().map_err(|e| ConfigError::BadSender {
            from: config.from.clone(),
            reason: format!("{e}"),
        })?;
        let credentials = match (&config.username, &config.password) {
            (Some(user), Some(password)) => {
                Some(Credentials::new(user.clone(), password.expose().to_owned()))
            }
            (None, None) => None,
            _ => return Err(ConfigError::HalfCredentials),
        };
        if credentials.is_some()
            && config.security == Security::None
            && !config.allow_insecure_auth
            && !config.host_is_loopback()
        {
            return Err(ConfigError::InsecureAuth {
                host: config.host.clone(),
            });
        }
        let tls = match config.security {
            Security::None => None,
            Security::Starttls | Security::Tls => Some(tls_parameters(&config)?),
        };
        let hello = match &config.hello_name {
            None => ClientId::default(),
            Some(name) => {
                check_name("hello_name", name)?;
                match name.parse() {
                    Ok(std::net::IpAddr::V4(ip)) => ClientId::Ipv4(ip),
                    Ok(std::net::IpAddr::V6(ip)) => ClientId::Ipv6(ip),
                    Err(_) => ClientId::Domain(name.clone()),
                }
            }
        };
        let message_id_domain = match &config.message_id_domain {
            Some(domain) => {
                check_name("message_id_domain", domain)?;
                domain.clone()
            }
            None => from.email.domain().to_owned(),
        };
        config
            .budgets
            .send
            .validate()
            .map_err(ConfigError::BadBudget)?;
        Ok(Self {
            send_budget: send_budget(Arc::new(Unlimited), &config),
            config,
            from,
            hello,
            tls,
            credentials,
            message_id_domain,
        })
    }

    /// Draws the messages' tokens from `budgets` (the engine's, shared by every engine), at
    /// the limit of `budgets.send`. Without it nothing is limited.
    pub fn with_budgets(mut self, budgets: Arc<dyn Budgets>) -> Self {
        self.send_budget = send_budget(budgets, &self.config);
        self
    }

    /// The `Message-ID` of every message sent for `token`: `<TOKEN@DOMAIN>`, where DOMAIN is
    /// [`SmtpConfig::message_id_domain`] or the sender's domain. The same token always gives the
    /// same `Message-ID`.
    pub fn message_id(&self, token: &IdempotencyToken) -> String {
        format!("<{token}@{}>", self.message_id_domain)
    }

    /// The message as it goes on the wire, with its envelope.
    fn compose(
        &self,
        token: &IdempotencyToken,
        request: &MailRequest,
        to: Mailbox,
    ) -> Result<(Envelope, Vec<u8>), AdapterError> {
        let rendered = render(&request.template, token.as_str());
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(rendered.subject)
            .message_id(Some(self.message_id(token)))
            .user_agent("setpoint".to_owned())
            .date_now()
            .header(ContentType::TEXT_PLAIN)
            .body(rendered.body)
            .map_err(|e| {
                AdapterError::permanent(format!("cannot compose the message: {e}"))
                    .with_code("invalid-message")
            })?;
        Ok((message.envelope().clone(), message.formatted()))
    }

    /// Connects, secures and authenticates a connection. Any failure here sent nothing.
    async fn connect(&self) -> Result<AsyncSmtpConnection, AdapterError> {
        let cfg = &self.config;
        let port = cfg.effective_port();
        let wrapper = match cfg.security {
            Security::Tls => self.tls.clone(),
            Security::None | Security::Starttls => None,
        };
        let steps = async {
            let mut conn = AsyncSmtpConnection::connect_tokio1(
                (cfg.host.as_str(), port),
                Some(cfg.connect_timeout()),
                &self.hello,
                wrapper,
                None,
            )
            .await
            .map_err(|e| classify(&e, &format!("connecting to {}:{port}", cfg.host)))?;
            if let (Security::Starttls, Some(tls)) = (cfg.security, &self.tls) {
                conn.starttls(tls.clone(), &self.hello)
                    .await
                    .map_err(|e| classify(&e, "STARTTLS"))?;
            }
            if let Some(credentials) = &self.credentials {
                let user = cfg.username.as_deref().unwrap_or_default();
                conn.auth(MECHANISMS, credentials)
                    .await
                    .map_err(|e| classify(&e, &format!("AUTH as {user:?}")))?;
            }
            Ok(conn)
        };
        timeout(cfg.connect_timeout(), steps).await.map_err(|_| {
            AdapterError::transient(format!(
                "connecting to {}:{port} (greeting, EHLO, TLS, AUTH) took longer than {} s",
                cfg.host, cfg.connect_timeout_secs
            ))
            .with_code("smtp-timeout")
        })?
    }

    /// Everything that can fail without sending: a fresh connection (greeting, EHLO, STARTTLS,
    /// AUTH), then `MAIL FROM` and `RCPT TO`. Returns the connection ready for `DATA`.
    async fn prepare(
        &self,
        envelope: &Envelope,
        email: &[u8],
    ) -> Result<AsyncSmtpConnection, AdapterError> {
        let mut conn = self.connect().await?;
        let command_timeout = self.config.command_timeout();

        let mut params = Vec::new();
        let non_ascii_addresses = envelope.to().iter().any(|a| !is_ascii(a))
            || envelope.from().is_some_and(|a| !is_ascii(a));
        if non_ascii_addresses {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(self
                    .abort(
                        conn,
                        AdapterError::permanent(
                            "the address holds non-ASCII characters and the relay does not \
                             offer SMTPUTF8",
                        )
                        .with_code("smtp-utf8-unsupported"),
                    )
                    .await);
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !email.is_ascii() {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }

        let mail = Mail::new(envelope.from().cloned(), params);
        match timeout(command_timeout, conn.command(mail)).await {
            Err(_) => return Err(self.timed_out("MAIL FROM")),
            Ok(Err(e)) => return Err(self.abort(conn, classify(&e, "MAIL FROM")).await),
            Ok(Ok(_)) => {}
        }
        for rcpt in envelope.to() {
            match timeout(
                command_timeout,
                conn.command(Rcpt::new(rcpt.clone(), vec![])),
            )
            .await
            {
                Err(_) => return Err(self.timed_out("RCPT TO")),
                Ok(Err(e)) => {
                    let step = format!("RCPT TO <{rcpt}>");
                    return Err(self.abort(conn, classify(&e, &step)).await);
                }
                Ok(Ok(_)) => {}
            }
        }
        Ok(conn)
    }

    /// `DATA` and the message on a prepared connection. Only a reply to the end of the data
    /// tells what happened to the message.
    async fn deliver(
        &self,
        mut conn: AsyncSmtpConnection,
        email: &[u8],
    ) -> Result<Response, Failure> {
        let command_timeout = self.config.command_timeout();
        match timeout(command_timeout, conn.command(Data)).await {
            Err(_) => return Err(Failure::NotSent(self.timed_out("DATA"))),
            Ok(Err(e)) => {
                return Err(Failure::NotSent(
                    self.abort(conn, classify(&e, "DATA")).await,
                ));
            }
            Ok(Ok(_)) => {}
        }
        match timeout(self.config.data_timeout(), conn.message(email)).await {
            Err(_) => Err(Failure::MaybeSent(format!(
                "no reply to the message data within {} s",
                self.config.data_timeout_secs
            ))),
            Ok(Ok(response)) => {
                // Best effort: the message is taken, a failing QUIT changes nothing.
                let _ = timeout(command_timeout, conn.quit()).await;
                Ok(response)
            }
            Ok(Err(e)) if e.status().is_some() => Err(Failure::NotSent(
                self.abort(conn, classify(&e, "end of message data")).await,
            )),
            Ok(Err(e)) => Err(Failure::MaybeSent(format!(
                "the connection failed after the message data was sent: {e}"
            ))),
        }
    }

    fn timed_out(&self, step: &str) -> AdapterError {
        AdapterError::transient(format!(
            "{step}: no reply within {} s",
            self.config.command_timeout_secs
        ))
        .with_code("smtp-timeout")
    }

    /// Ends a transaction that will send nothing: says QUIT (bounded) and closes the
    /// connection.
    async fn hang_up(&self, mut conn: AsyncSmtpConnection) {
        let _ = timeout(self.config.command_timeout(), conn.abort()).await;
    }

    /// [`SmtpMailer::hang_up`], handing back `error`.
    async fn abort(&self, conn: AsyncSmtpConnection, error: AdapterError) -> AdapterError {
        self.hang_up(conn).await;
        error
    }
}

impl Mailer for SmtpMailer {
    fn send<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a MailRequest,
        journal: &'a dyn Journal,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Delivery, AdapterError>> {
        Box::pin(async move {
            let template = request.template.name();
            // 1. Check the request: a bad address is permanent and touches no journal slot.
            let to: Mailbox = request.to.parse().map_err(|e| {
                AdapterError::permanent(format!(
                    "the recipient {:?} is not a valid e-mail address: {e}",
                    request.to
                ))
                .with_code("invalid-recipient")
            })?;
            let (envelope, email) = self.compose(token, request, to)?;
            let message_id = self.message_id(token);
            let quote = Quote {
                token,
                to: &request.to,
                message_id: &message_id,
                template,
            };

            // 2. Ask the journal, opening nothing: sent before, maybe sent before, or which
            //    slot this attempt may send under.
            let slot = match attempts::plan(journal, &quote).await {
                Ok(Plan::Send { slot }) => slot,
                Ok(Plan::AlreadySent(delivery)) => {
                    info!(%token, template, message_id = %delivery.message_id,
                        "e-mail already sent by an earlier attempt; not sending again");
                    return Ok(delivery);
                }
                Err(e) => {
                    warn!(%token, template, code = ?e.code, error = %e.message,
                        "e-mail not sent");
                    return Err(e);
                }
            };

            // 3. Everything that can fail without sending. A failure records nothing: the
            //    slot stays free for the next attempt. First a token of the relay's budget
            //    (a wait when there is none); a rate reply lowers the shared rate.
            self.send_budget.take().await?;
            let conn = match self.prepare(&envelope, &email).await {
                Ok(conn) => conn,
                Err(error) => {
                    let error = if error.throttled {
                        self.send_budget.throttled(error).await
                    } else {
                        error
                    };
                    warn!(%token, template, class = %error.class, code = ?error.code,
                        error = %error.message, "e-mail not sent; nothing recorded");
                    return Err(error);
                }
            };

            // 4. The last moment to step back without a trace: the fence, then the slot,
            //    committed before the relay sees the message data.
            if let Err(lost) = fence.check() {
                warn!(%token, template, "lost the unit before sending; e-mail not sent");
                return Err(self.abort(conn, lost).await);
            }
            failpoint::hit(FAILPOINT_BEFORE_BEGIN);
            let key = match attempts::open(journal, &quote, slot).await {
                Ok(Opened::Mine { key }) => key,
                Ok(Opened::AlreadySent(delivery)) => {
                    info!(%token, template, message_id = %delivery.message_id,
                        "a concurrent attempt sent the e-mail; not sending again");
                    self.hang_up(conn).await;
                    return Ok(delivery);
                }
                Err(e) => {
                    warn!(%token, template, code = ?e.code, error = %e.message,
                        "e-mail not sent: its journal slot could not be opened");
                    return Err(self.abort(conn, e).await);
                }
            };
            // The slot took a round trip to the journal: look once more, and close the slot
            // as certainly not sent if the unit was lost meanwhile.
            if let Err(lost) = fence.check() {
                self.close_not_sent(journal, token, &key, &lost).await;
                warn!(%token, template, %key, "lost the unit before sending; e-mail not sent");
                return Err(self.abort(conn, lost).await);
            }

            // 5. The message data, and its verdict.
            match self.deliver(conn, &email).await {
                Ok(response) => {
                    let smtp_response = response_text(&response);
                    failpoint::hit(FAILPOINT_AFTER_SEND);
                    // Record the delivery. If this write fails the message is still sent:
                    // report success; a retry of the unit would see the open slot and park.
                    let record = attempts::sent_record(&message_id, &smtp_response);
                    if let Err(e) = journal.finish(&key, &record).await {
                        warn!(%token, %key, error = %e,
                            "e-mail sent but its journal record could not be finished");
                    }
                    info!(%token, template, %message_id, %smtp_response, "e-mail sent");
                    Ok(Delivery {
                        message_id,
                        response: smtp_response,
                        replayed: false,
                    })
                }
                Err(Failure::NotSent(error)) => {
                    // Certainly not sent: close the slot so a retry may send.
                    self.close_not_sent(journal, token, &key, &error).await;
                    // A relay may also refuse the data with a rate reply (some count
                    // messages only once they see them): that lowers the shared rate too.
                    let error = if error.throttled {
                        self.send_budget.throttled(error).await
                    } else {
                        error
                    };
                    warn!(%token, template, class = %error.class, code = ?error.code,
                        error = %error.message, "e-mail not sent");
                    Err(error)
                }
                Err(Failure::MaybeSent(detail)) => {
                    // Leave the slot open: every later attempt must also refuse to send.
                    let error = attempts::outcome_unknown(&quote, &key);
                    warn!(%token, template, %message_id, %detail,
                        "e-mail outcome unknown; parking for an operator");
                    Err(AdapterError {
                        message: format!("{} ({detail})", error.message),
                        ..error
                    })
                }
            }
        })
    }
}

impl SmtpMailer {
    /// Finishes slot `key` as certainly not sent (because of `error`). If the journal cannot
    /// record it, the slot stays open and a retry reports outcome unknown: safe, if needless.
    async fn close_not_sent(
        &self,
        journal: &dyn Journal,
        token: &IdempotencyToken,
        key: &str,
        error: &AdapterError,
    ) {
        let record = attempts::not_sent_record(error);
        if let Err(e) = journal.finish(key, &record).await {
            warn!(%token, %key, error = %e,
                "e-mail not sent, and the journal could not record it; a retry will report \
                 outcome unknown");
        }
    }
}

/// The `smtp/<host:port>/global/send` budget of `config`.
fn send_budget(budgets: Arc<dyn Budgets>, config: &SmtpConfig) -> Budget {
    Budget::new(
        budgets,
        BudgetKey::new(
            "smtp",
            format!("{}:{}", config.host, config.effective_port()),
            "global",
            "send",
        ),
        config.budgets.send,
    )
}

/// How long a 4xx reply asks the client to wait, from its text (see the module docs).
fn wait_hint(reply: &str) -> Option<Duration> {
    let text = reply.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if any(&["greylist", "graylist"]) {
        Some(GREYLIST_RETRY)
    } else if any(&[
        "slow down",
        "rate limit",
        "ratelimit",
        "rate-limit",
        "too many",
        "throttl",
    ]) {
        Some(SLOW_DOWN_RETRY)
    } else {
        None
    }
}

/// Maps a lettre SMTP error met during `step` to an error class: 4xx replies (421 and 451
/// among them), network failures and timeouts are transient — with a `retry_after` when the
/// reply asks to wait ([`wait_hint`]); 5xx replies, TLS failures and client-side refusals (no
/// STARTTLS, no usable AUTH mechanism) are permanent. lettre's errors never carry the password.
fn classify(e: &lettre::transport::smtp::Error, step: &str) -> AdapterError {
    if let Some(code) = e.status() {
        let error = format!("{step}: the relay replied {e}");
        if !e.is_transient() {
            return AdapterError::permanent(error).with_code(format!("smtp-{code}"));
        }
        let transient = AdapterError::transient(error).with_code(format!("smtp-{code}"));
        return match wait_hint(&e.to_string()) {
            // A rate reply (421/451 "slow down", "too many", …): the relay throttles.
            Some(wait) if wait == SLOW_DOWN_RETRY => transient.with_retry_after(wait).throttling(),
            Some(wait) => transient.with_retry_after(wait),
            None => transient,
        };
    }
    if e.is_timeout() {
        AdapterError::transient(format!("{step}: {e}")).with_code("smtp-timeout")
    } else if e.is_tls() || tls_rejected(e) {
        AdapterError::permanent(format!(
            "{step}: TLS failed ({e}); check the relay's certificate, smtp.host and smtp.ca_file"
        ))
        .with_code("smtp-tls")
    } else if e.is_client() {
        AdapterError::permanent(format!("{step}: {e}")).with_code("smtp-unsupported")
    } else {
        AdapterError::transient(format!("{step}: {e}")).with_code("smtp-connection")
    }
}

/// True when a TLS handshake failed on its merits (untrusted or mismatched certificate, protocol
/// mismatch): tokio-rustls reports those as an `io::Error` of kind `InvalidData`, which lettre
/// wraps as a connection error.
fn tls_rejected(e: &lettre::transport::smtp::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// `250 2.0.0 OK …`: the reply's code and its lines joined by spaces.
fn response_text(response: &Response) -> String {
    let lines: Vec<&str> = response.message().collect();
    format!("{} {}", response.code(), lines.join(" "))
        .trim_end()
        .to_owned()
}

fn is_ascii(address: &Address) -> bool {
    let s: &str = address.as_ref();
    s.is_ascii()
}

fn tls_parameters(config: &SmtpConfig) -> Result<TlsParameters, ConfigError> {
    let mut builder = TlsParameters::builder(config.host.clone());
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|e| ConfigError::CaFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let certificate = Certificate::from_pem(&pem).map_err(|e| ConfigError::CaFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().map_err(|e| ConfigError::Tls {
        host: config.host.clone(),
        reason: e.to_string(),
    })
}

fn check_name(field: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName {
            field,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Password;

    #[test]
    fn message_id_derives_from_the_token_and_the_sender_domain() {
        let mailer = SmtpMailer::new(SmtpConfig::new(
            "127.0.0.1",
            "setpoint <noreply@example.org>",
        ))
        .unwrap();
        let token = IdempotencyToken::parse("abc-123").unwrap();
        assert_eq!(mailer.message_id(&token), "<abc-123@example.org>");

        let mut cfg = SmtpConfig::new("127.0.0.1", "noreply@example.org");
        cfg.message_id_domain = Some("setpoint".into());
        let mailer = SmtpMailer::new(cfg).unwrap();
        assert_eq!(mailer.message_id(&token), "<abc-123@setpoint>");
    }

    #[test]
    fn refuses_clear_text_auth_to_a_remote_relay_and_half_credentials() {
        let mut cfg = SmtpConfig::new("smtp.example.com", "a@example.com");
        cfg.security = Security::None;
        cfg.username = Some("u".into());
        cfg.password = Some(Password::new("s3cret-value"));
        let err = SmtpMailer::new(cfg.clone()).unwrap_err();
        assert!(matches!(err, ConfigError::InsecureAuth { .. }));
        assert!(!err.to_string().contains("s3cret-value"));

        cfg.username = None;
        assert!(matches!(
            SmtpMailer::new(cfg).unwrap_err(),
            ConfigError::HalfCredentials
        ));
    }

    #[test]
    fn replies_that_ask_to_wait_carry_a_retry_after() {
        for reply in [
            "4.7.0 Too many connections from 10.0.0.1, slow down",
            "4.7.1 Rate limit exceeded for sender",
            "4.3.2 Message throttled; try again later",
            "4.7.28 Our system has detected an unusual rate of unsolicited mail: too many messages",
            "4.7.0 rate limit exceeded, try again later",
        ] {
            assert_eq!(wait_hint(reply), Some(SLOW_DOWN_RETRY), "{reply}");
        }
        assert_eq!(
            wait_hint("4.7.1 <a@b>: Recipient address rejected: Greylisted for 300 seconds"),
            Some(GREYLIST_RETRY)
        );
        assert_eq!(wait_hint("4.3.0 <a@b>: try again later"), None);
        assert_eq!(wait_hint("4.2.2 mailbox full"), None);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let mut cfg = SmtpConfig::new("127.0.0.1", "a@example.com");
        cfg.security = Security::None;
        cfg.username = Some("u".into());
        cfg.password = Some(Password::new("s3cret-value"));
        let mailer = SmtpMailer::new(cfg).unwrap();
        let debug = format!("{mailer:?}");
        assert!(!debug.contains("s3cret-value"), "{debug}");
    }
}
