//! SMTP configuration: where the relay is, how to secure and authenticate the connection, who
//! the messages come from, and how long to wait. The password never appears in `Debug` output,
//! logs or errors.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use setpoint_adapter::Limit;

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain SMTP. Only for a relay on a trusted network (or tests); AUTH over it is refused
    /// unless the relay is on a loopback address or `allow_insecure_auth` is set.
    None,
    /// Plain connection upgraded with `STARTTLS`, which is required: a relay that does not offer
    /// it is a permanent error. Default port 587.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS). Default port 465.
    Tls,
}

impl Security {
    /// The usual port for this kind of connection: 25, 587 or 465.
    pub fn default_port(self) -> u16 {
        match self {
            Security::None => 25,
            Security::Starttls => 587,
            Security::Tls => 465,
        }
    }
}

/// A secret string (the SMTP password). Its `Debug` prints `"***"`; it has no `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The password itself: only for handing it to the SMTP client.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The SMTP relay the mailer sends through, e.g. (TOML)
///
/// ```toml
/// host = "smtp.example.com"
/// security = "starttls"          # none | starttls | tls
/// username = "setpoint"
/// password = "…"                 # better: from the environment or a secret store
/// from = "setpoint <noreply@example.com>"
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// The relay's host name (also the name its TLS certificate must carry) or IP address.
    pub host: String,
    /// The relay's port; defaults to [`Security::default_port`].
    #[serde(default)]
    pub port: Option<u16>,
    /// How the connection is secured; default `starttls`.
    #[serde(default)]
    pub security: Security,
    /// The AUTH user; AUTH (PLAIN, else LOGIN) is used exactly when it is set.
    #[serde(default)]
    pub username: Option<String>,
    /// The AUTH password; required with `username`.
    #[serde(default)]
    pub password: Option<Password>,
    /// Allows AUTH over a connection without TLS to a non-loopback relay (sends the password in
    /// clear text). Default false.
    #[serde(default)]
    pub allow_insecure_auth: bool,
    /// A PEM file of extra root certificates to trust (a private relay's CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The sender, e.g. `setpoint <noreply@example.com>`; also the envelope sender.
    pub from: String,
    /// The right-hand side of every `Message-ID` (`<TOKEN@DOMAIN>`); defaults to the domain of
    /// [`SmtpConfig::from`].
    #[serde(default)]
    pub message_id_domain: Option<String>,
    /// The name sent in `EHLO`; defaults to this machine's host name.
    #[serde(default)]
    pub hello_name: Option<String>,
    /// Limit for connecting, the greeting, `EHLO`, `STARTTLS` and AUTH, in seconds; default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Limit for each of `MAIL FROM`, `RCPT TO` and `DATA`, in seconds; default 30.
    #[serde(default = "default_command_timeout")]
    pub command_timeout_secs: u64,
    /// Limit for sending the message and reading the relay's verdict, in seconds; default 60.
    /// Hitting it leaves the outcome unknown (the relay may have taken the message).
    #[serde(default = "default_data_timeout")]
    pub data_timeout_secs: u64,
    /// The request budget its messages share with every engine (`[smtp.budgets]`).
    #[serde(default)]
    pub budgets: SmtpBudgetsConfig,
}

/// The relay's rate limit as setpoint's shared budget (docs/budgets.md), keyed by the relay's
/// `host:port`.
///
/// ```toml
/// [smtp.budgets]                      # the default
/// send = { rate = 10.0, burst = 20.0 }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpBudgetsConfig {
    /// Messages sent.
    pub send: Limit,
}

/// The default `send` budget: 10 messages per second, burst 20.
pub const DEFAULT_SEND_BUDGET: Limit = Limit::new(10.0, 20.0);

impl Default for SmtpBudgetsConfig {
    fn default() -> Self {
        Self {
            send: DEFAULT_SEND_BUDGET,
        }
    }
}

fn default_connect_timeout() -> u64 {
    10
}
fn default_command_timeout() -> u64 {
    30
}
fn default_data_timeout() -> u64 {
    60
}

impl SmtpConfig {
    /// A configuration for `host` and sender `from` with every other field at its default.
    pub fn new(host: impl Into<String>, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port: None,
            security: Security::default(),
            username: None,
            password: None,
            allow_insecure_auth: false,
            ca_file: None,
            from: from.into(),
            message_id_domain: None,
            hello_name: None,
            connect_timeout_secs: default_connect_timeout(),
            command_timeout_secs: default_command_timeout(),
            data_timeout_secs: default_data_timeout(),
            budgets: SmtpBudgetsConfig::default(),
        }
    }

    /// The port to connect to: [`SmtpConfig::port`] or the security's default.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(self.security.default_port())
    }

    /// True when `host` is a loopback address or `localhost`.
    pub(crate) fn host_is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs.max(1))
    }
    pub(crate) fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs.max(1))
    }
    pub(crate) fn data_timeout(&self) -> Duration {
        Duration::from_secs(self.data_timeout_secs.max(1))
    }
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.effective_port())
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("allow_insecure_auth", &self.allow_insecure_auth)
            .field("ca_file", &self.ca_file)
            .field("from", &self.from)
            .field("message_id_domain", &self.message_id_domain)
            .field("hello_name", &self.hello_name)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("command_timeout_secs", &self.command_timeout_secs)
            .field("data_timeout_secs", &self.data_timeout_secs)
            .finish()
    }
}

/// Why an [`SmtpConfig`] cannot be used. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `send` budget's rate or burst is unusable.
    #[error("smtp.budgets.send: {0}")]
    BadBudget(String),
    /// `from` is not a mailbox.
    #[error("smtp.from {from:?} is not a valid sender address: {reason}")]
    BadSender {
        /// The configured value.
        from: String,
        /// The parser's complaint.
        reason: String,
    },
    /// `username` and `password` must be set together.
    #[error("smtp.username and smtp.password must be set together")]
    HalfCredentials,
    /// AUTH would send the password in clear text to a remote host.
    #[error(
        "smtp.security is \"none\" but credentials are set and {host} is not a loopback address: \
         the password would cross the network in clear text; use starttls or tls, or set \
         allow_insecure_auth"
    )]
    InsecureAuth {
        /// The configured relay host.
        host: String,
    },
    /// `ca_file` cannot be read or holds no usable certificate.
    #[error("smtp.ca_file {path}: {reason}")]
    CaFile {
        /// The configured path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// TLS parameters could not be built for `host`.
    #[error("cannot set up TLS for {host}: {reason}")]
    Tls {
        /// The configured relay host.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// `hello_name` or `message_id_domain` holds characters that do not belong in SMTP.
    #[error("smtp.{field} {value:?} must be a domain name or address literal")]
    BadName {
        /// The field's name.
        field: &'static str,
        /// The configured value.
        value: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_with_defaults_and_hides_the_password() {
        let cfg: SmtpConfig = serde_json::from_value(serde_json::json!({
            "host": "smtp.example.com",
            "username": "u",
            "password": "hunter2-secret",
            "from": "setpoint <noreply@example.com>",
        }))
        .unwrap();
        assert_eq!(cfg.security, Security::Starttls);
        assert_eq!(cfg.effective_port(), 587);
        assert_eq!(cfg.connect_timeout_secs, 10);
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn rejects_unknown_fields_and_security_modes() {
        let unknown = serde_json::json!({"host": "h", "from": "a@b", "pasword": "x"});
        assert!(serde_json::from_value::<SmtpConfig>(unknown).is_err());
        let bad = serde_json::json!({"host": "h", "from": "a@b", "security": "ssl"});
        assert!(serde_json::from_value::<SmtpConfig>(bad).is_err());
    }

    #[test]
    fn knows_loopback_hosts() {
        for (host, lo) in [
            ("127.0.0.1", true),
            ("localhost", true),
            ("::1", true),
            ("[::1]", true),
            ("smtp.example.com", false),
            ("10.0.0.1", false),
        ] {
            assert_eq!(
                SmtpConfig::new(host, "a@b").host_is_loopback(),
                lo,
                "{host}"
            );
        }
    }
}
