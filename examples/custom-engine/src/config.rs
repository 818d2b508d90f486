//! The plugin's settings: the `[plugins.webhook]` table of the engine's configuration file and
//! the signing secret from the environment.
//!
//! ```toml
//! [plugins.webhook]
//! url = "https://hooks.example.com/setpoint"   # http or https; no credentials in it
//! timeout = "10s"                              # per POST (default 10s)
//! retention = "720h"                           # how long answered POSTs are kept (default 30 days)
//! ```
//!
//! The secret comes only from `SETPOINT_WEBHOOK_SECRET` (a secrets store injects it), never from
//! the file, and no message or log line ever contains it.

use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use setpoint::config::parse_duration;
use setpoint::plugin::{ConfigContext, PluginError};

use crate::signing::Secret;

/// The variable holding the signing secret.
pub const SECRET_ENV: &str = "SETPOINT_WEBHOOK_SECRET";
/// How long one POST may take unless `timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long answered POSTs are kept unless `retention` says otherwise: 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// `[plugins.webhook]` as written: every key is known, a misspelt one is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    url: String,
    timeout: Option<String>,
    retention: Option<String>,
}

/// The plugin's settings, checked.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Where notifications are POSTed.
    pub url: Url,
    /// The longest one POST may take, connecting included.
    pub timeout: Duration,
    /// How long rows of `webhook_deliveries` are kept. Longer than any unit lives, so that a
    /// retry always finds the record of an earlier accepted POST.
    pub retention: Duration,
    /// The signing secret.
    pub secret: Secret,
}

impl WebhookSettings {
    /// Reads the plugin's table and the environment: `None` when neither is there (the plugin
    /// is then not configured and registers nothing).
    ///
    /// # Errors
    /// [`PluginError::Config`] naming the key or the variable at fault: an unknown key, a
    /// missing `url`, a URL that is not http(s) or carries credentials, a bad duration, a
    /// missing or short secret, or a secret without a table. Never with the secret.
    pub fn read(cx: &ConfigContext<'_>) -> Result<Option<Self>, PluginError> {
        let secret = cx.env(SECRET_ENV);
        if cx.table().is_none() {
            return match secret {
                Some(_) => Err(cx.error(format!(
                    "{SECRET_ENV} is set but the configuration has no [plugins.webhook] table \
                     with the endpoint's url"
                ))),
                None => Ok(None),
            };
        }
        let file: WebhookFile = cx.parse()?;
        // The text is not repeated: it might hold credentials, which are refused below.
        let url = Url::parse(file.url.trim())
            .map_err(|e| cx.error(format!("[plugins.webhook] url is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(
                cx.error("[plugins.webhook] url must be an http:// or https:// URL with a host")
            );
        }
        // A URL is logged and shown in errors; credentials in it would be too.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(cx.error(format!(
                "[plugins.webhook] url must not carry credentials (user:password@); the \
                 endpoint authenticates the engine by the signature made with {SECRET_ENV}"
            )));
        }
        let duration = |key: &str, text: Option<&String>, default: Duration| {
            let Some(text) = text else {
                return Ok(default);
            };
            match parse_duration(text) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(cx.error(format!("[plugins.webhook] {key} must be more than 0"))),
                Err(e) => Err(cx.error(format!("[plugins.webhook] {key}: {e}"))),
            }
        };
        let timeout = duration("timeout", file.timeout.as_ref(), DEFAULT_TIMEOUT)?;
        let retention = duration("retention", file.retention.as_ref(), DEFAULT_RETENTION)?;
        if timeout > Duration::from_secs(300) {
            return Err(cx.error("[plugins.webhook] timeout must be at most 5m"));
        }
        if retention < Duration::from_secs(24 * 3600) {
            return Err(cx.error(
                "[plugins.webhook] retention must be at least 24h: a unit retried later than \
                 that would no longer find that its notification was accepted",
            ));
        }
        let secret = secret.ok_or_else(|| {
            cx.error(format!(
                "[plugins.webhook] is configured but {SECRET_ENV} is not set: the endpoint \
                 checks each notification's signature, made with that secret"
            ))
        })?;
        let secret =
            Secret::new(secret.as_bytes()).map_err(|e| cx.error(format!("{SECRET_ENV}: {e}")))?;
        Ok(Some(Self {
            url,
            timeout,
            retention,
            secret,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    const SECRET: &str = "s3cr3t-value-for-the-tests";

    fn read(
        table: Option<serde_json::Value>,
        secret: Option<&'static str>,
    ) -> Result<Option<WebhookSettings>, String> {
        let env = move |k: &str| {
            (k == SECRET_ENV)
                .then(|| secret.map(str::to_owned))
                .flatten()
        };
        let cx = ConfigContext::new("webhook", table.as_ref(), BTreeMap::new(), &env);
        WebhookSettings::read(&cx).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_a_table_and_the_secret() {
        let s = read(
            Some(json!({"url": "https://hooks.example.com/x", "timeout": "2s"})),
            Some(SECRET),
        )
        .expect("valid")
        .expect("configured");
        assert_eq!(s.url.as_str(), "https://hooks.example.com/x");
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert_eq!(s.retention, DEFAULT_RETENTION);
        assert!(!format!("{s:?}").contains(SECRET));
        assert!(read(None, None).expect("valid").is_none());
    }

    #[test]
    fn refuses_what_is_wrong_by_name_and_never_shows_the_secret() {
        let cases = [
            (
                json!({"url": "https://h.example/x", "timeot": "2s"}),
                "timeot",
            ),
            (json!({"timeout": "2s"}), "url"),
            (json!({"url": "ftp://h.example/x"}), "http:// or https://"),
            (json!({"url": "https://u:pw@h.example/x"}), "credentials"),
            (
                json!({"url": "https://h.example/x", "timeout": "soon"}),
                "timeout",
            ),
            (
                json!({"url": "https://h.example/x", "retention": "1h"}),
                "retention",
            ),
        ];
        for (table, needle) in cases {
            let e = read(Some(table.clone()), Some(SECRET)).expect_err("refused");
            assert!(e.contains(needle), "{table}: {e}");
            assert!(!e.contains(SECRET), "{e}");
        }
        let e = read(Some(json!({"url": "https://h.example/x"})), None).expect_err("no secret");
        assert!(e.contains(SECRET_ENV), "{e}");
        let e =
            read(Some(json!({"url": "https://h.example/x"})), Some("short")).expect_err("short");
        assert!(e.contains("at least 16") && !e.contains("short\""), "{e}");
        let e = read(None, Some(SECRET)).expect_err("secret without a table");
        assert!(
            e.contains("[plugins.webhook]") && !e.contains(SECRET),
            "{e}"
        );
    }
}
