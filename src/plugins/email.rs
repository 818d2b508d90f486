//! The e-mail plugin: notifications over SMTP (the mail domain).
//!
//! It reads the historical `[smtp]` table (see the `setpoint-email` crate) and the
//! deployment's environment variables (`SETPOINT_SMTP_URL`, `SETPOINT_EMAIL_FROM`), and
//! provides a `dyn Mailer` (`default`) to the plugins after it; it also registers the
//! adapter's own work kind (`email.send`).

use std::sync::Arc;

use setpoint_adapter::{BoxFuture, Mailer};
use setpoint_email::{Password, Security, SmtpConfig, SmtpMailer};

use crate::config::ConfigError;
use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};

/// The SMTP settings: the `[smtp]` table refined by the environment.
#[derive(Debug, Default, Clone)]
pub struct SmtpSettings {
    /// The relay, if e-mail is configured at all.
    pub smtp: Option<SmtpConfig>,
}

impl SmtpSettings {
    /// The settings of the `[smtp]` table `table` (JSON), if any.
    ///
    /// # Errors
    /// Unknown keys (by name) and bad values.
    pub fn from_table(table: Option<&serde_json::Value>) -> Result<Self, ConfigError> {
        let smtp = table
            .map(|t| serde_json::from_value::<SmtpConfig>(t.clone()))
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("[smtp]: {e}")))?;
        Ok(Self { smtp })
    }

    /// Applies the e-mail environment variables: `SETPOINT_SMTP_URL` (host, port, security
    /// and AUTH of `[smtp]`, creating it when absent) and `SETPOINT_EMAIL_FROM` (`smtp.from`).
    ///
    /// # Errors
    /// A malformed URL, or a URL without a sender; never with the password.
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let from = get("SETPOINT_EMAIL_FROM");
        if let Some(url) = get("SETPOINT_SMTP_URL") {
            let endpoint = SmtpEndpoint::parse(&url)?;
            let smtp = match self.smtp.take() {
                Some(s) => s,
                None => {
                    let sender = from.clone().ok_or_else(|| {
                        ConfigError::Invalid(
                            "SETPOINT_SMTP_URL is set but there is no sender: set \
                             SETPOINT_EMAIL_FROM or smtp.from"
                                .into(),
                        )
                    })?;
                    SmtpConfig::new(endpoint.host.clone(), sender)
                }
            };
            self.smtp = Some(endpoint.apply(smtp));
        }
        if let (Some(from), Some(smtp)) = (from, self.smtp.as_mut()) {
            smtp.from = from;
        }
        Ok(())
    }
}

/// An SMTP relay as given by `SETPOINT_SMTP_URL`:
/// `smtp://[user[:password]@]host[:port][?security=none|starttls|tls]` (default STARTTLS) or
/// `smtps://…` (TLS from the first byte). User and password are percent-decoded. `Debug` and
/// every error leave the password out.
#[derive(Debug, Clone)]
pub struct SmtpEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// Port; `None` for the security's usual port.
    pub port: Option<u16>,
    /// How the connection is secured.
    pub security: Security,
    /// The AUTH user.
    pub username: Option<String>,
    /// The AUTH password.
    pub password: Option<Password>,
}

impl SmtpEndpoint {
    /// Parses an SMTP URL.
    ///
    /// # Errors
    /// When it is not of the form above. The message never contains the password.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::Invalid(format!(
                "SETPOINT_SMTP_URL is not smtp://[user[:password]@]host[:port] or \
                 smtps://…: {why}"
            ))
        };
        let (scheme, rest) = url
            .trim()
            .split_once("://")
            .ok_or_else(|| bad("no scheme"))?;
        let mut security = match scheme.to_ascii_lowercase().as_str() {
            "smtp" => Security::Starttls,
            "smtps" => Security::Tls,
            _ => return Err(bad("the scheme must be smtp or smtps")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_decode(user).ok_or_else(|| bad("bad escape in the user"))?;
                let pass = pass
                    .map(|p| percent_decode(p).ok_or_else(|| bad("bad escape in the password")))
                    .transpose()?;
                if user.is_empty() {
                    return Err(bad("empty user"));
                }
                (Some(user), pass.map(Password::new))
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in host"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))
            })
            .transpose()?;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("security", v)) => {
                    security = match v {
                        "none" => Security::None,
                        "starttls" => Security::Starttls,
                        "tls" => Security::Tls,
                        _ => return Err(bad("security must be none, starttls or tls")),
                    }
                }
                _ => return Err(bad("the only query parameter is security")),
            }
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            security,
            username,
            password,
        })
    }

    /// `config` with this relay's host, port, security and AUTH.
    pub fn apply(self, mut config: SmtpConfig) -> SmtpConfig {
        config.host = self.host;
        config.port = self.port;
        config.security = self.security;
        config.username = self.username;
        config.password = self.password;
        config
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The e-mail plugin.
#[derive(Default)]
pub struct EmailPlugin {
    settings: SmtpSettings,
    mailer: Option<Arc<dyn Mailer>>,
}

impl EmailPlugin {
    /// The plugin, configured from the file and the environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plugin with these settings (a local stack): its configuration step keeps them.
    pub fn with_settings(settings: SmtpSettings) -> Self {
        Self {
            settings,
            mailer: None,
        }
    }
}

impl Plugin for EmailPlugin {
    fn name(&self) -> &str {
        "email"
    }

    fn legacy_tables(&self) -> &[&'static str] {
        &["smtp"]
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        let err = |e: ConfigError| cx.error(e.to_string());
        if self.settings.smtp.is_none() {
            let table = cx.legacy("smtp").or(cx.table());
            self.settings = SmtpSettings::from_table(table).map_err(err)?;
        }
        self.settings.apply_env(&|k| cx.env(k)).map_err(err)
    }

    fn provide<'a>(
        &'a mut self,
        services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            let Some(config) = self.settings.smtp.clone() else {
                return Ok(());
            };
            let mailer = SmtpMailer::new(config).map_err(|e| PluginError::Start {
                plugin: "email".into(),
                message: e.to_string(),
            })?;
            // Every engine on the database shares the relay's budget (docs/budgets.md).
            let mailer = match services.get::<dyn setpoint_adapter::Budgets>(crate::plugin::BUDGETS)
            {
                Some(budgets) => mailer.with_budgets(budgets),
                None => mailer,
            };
            let mailer: Arc<dyn Mailer> = Arc::new(mailer);
            services.provide::<dyn Mailer>("default", mailer.clone());
            self.mailer = Some(mailer);
            Ok(())
        })
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        if let Some(mailer) = &self.mailer {
            r.handler(setpoint_adapter::typed(setpoint_email::SendEmail::new(
                mailer.clone(),
            )))?;
        }
        Ok(())
    }
}
