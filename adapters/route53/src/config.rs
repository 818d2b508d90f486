//! Configuration of the Route 53 adapter (the `[route53]` TOML table) and building the client.
//!
//! Credentials never appear here: they come from the standard AWS chain (environment variables
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the shared profile files, web identity, ECS task
//! role, EC2 instance metadata), or are handed to
//! [`Route53Config::client_with_credentials`] by a test or tool, so a config file can be
//! committed and logged.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_route53::config::ProvideCredentials;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use serde::Deserialize;
use setpoint_adapter::Limit;

/// The region requests are signed for. Route 53 is a global service answered from
/// `us-east-1`.
pub const DEFAULT_REGION: &str = "us-east-1";

/// How the Route 53 adapter reaches Route 53.
///
/// ```toml
/// [route53]
/// endpoint_url = "http://127.0.0.1:5000"   # moto; omit for AWS
/// max_attempts = 3
///
/// [route53.timeouts]
/// connect_ms = 3000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route53Config {
    /// The signing region; Route 53 is global, so the default (`us-east-1`) is right for AWS
    /// (`aws-cn` and GovCloud partitions name their own).
    #[serde(default = "default_region")]
    pub region: String,
    /// Where to send Route 53 calls instead of the public endpoint (moto, a proxy).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Timeouts of one call.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Attempts per API call inside the AWS SDK (its standard retry mode: throttling, 5xx and
    /// transport errors). The engine retries the unit on top. With the engine's shared
    /// budgets a throttle is not resent by the SDK but left to the budget
    /// ([`setpoint_adapter::aws::LeaveThrottlesToBudget`]).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Zones per `ListHostedZones` page (1–100). Finding a zone by its token reads every page,
    /// so keep the default unless testing paging.
    #[serde(default = "default_zones_page_size")]
    pub zones_page_size: u32,
    /// Record sets per `ListResourceRecordSets` page (1–300).
    #[serde(default = "default_records_page_size")]
    pub records_page_size: u32,
    /// The request budget its record changes share with every engine (`budgets`).
    #[serde(default)]
    pub budgets: Route53BudgetsConfig,
}

/// Route 53's request budget as setpoint's shared budget (docs/budgets.md): `change` limits
/// `ChangeResourceRecordSets` (5 per second per account on AWS).
///
/// ```toml
/// [plugins.dns.budgets]               # the defaults
/// # scope = "123456789012"            # the account; default: endpoint_url, else "aws"
/// change = { rate = 5.0, burst = 5.0 }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Route53BudgetsConfig {
    /// What engines share the budget by: the account id.
    pub scope: Option<String>,
    /// `ChangeResourceRecordSets`.
    pub change: Limit,
}

/// The default `change` budget: 5 per second, burst 5.
pub const DEFAULT_CHANGE_BUDGET: Limit = Limit::new(5.0, 5.0);

// The limit is checked finite by `Route53Config::validate`.
impl Eq for Route53BudgetsConfig {}

impl Default for Route53BudgetsConfig {
    fn default() -> Self {
        Self {
            scope: None,
            change: DEFAULT_CHANGE_BUDGET,
        }
    }
}

/// Timeouts of Route 53 calls, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP + TLS connect.
    pub connect_ms: u64,
    /// One HTTP attempt of an API call.
    pub attempt_ms: u64,
    /// One API call including the SDK's retries.
    pub operation_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 3_000,
            attempt_ms: 20_000,
            operation_ms: 60_000,
        }
    }
}

fn default_region() -> String {
    DEFAULT_REGION.to_owned()
}

fn default_max_attempts() -> u32 {
    3
}

fn default_zones_page_size() -> u32 {
    100
}

fn default_records_page_size() -> u32 {
    300
}

/// A configuration the adapter cannot start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `region` is empty.
    #[error("route53.region must not be empty (Route 53 signs for \"us-east-1\")")]
    MissingRegion,
    /// `endpoint_url` is not an http(s) URL.
    #[error("route53.endpoint_url must start with http:// or https:// (got {0:?})")]
    BadEndpoint(String),
    /// A timeout, `max_attempts` or a page size is zero.
    #[error("route53.{0} must be greater than zero")]
    Zero(&'static str),
    /// The `change` budget's rate or burst is unusable.
    #[error("route53.budgets.change: {0}")]
    BadBudget(String),
    /// A page size is above what Route 53 accepts.
    #[error("route53.{0} must be at most {1}")]
    TooLarge(&'static str, u32),
}

impl Default for Route53Config {
    fn default() -> Self {
        Self {
            region: default_region(),
            endpoint_url: None,
            timeouts: TimeoutsConfig::default(),
            max_attempts: default_max_attempts(),
            zones_page_size: default_zones_page_size(),
            records_page_size: default_records_page_size(),
            budgets: Route53BudgetsConfig::default(),
        }
    }
}

impl Route53Config {
    /// Checks what can be checked without calling AWS.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.region.trim().is_empty() {
            return Err(ConfigError::MissingRegion);
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::BadEndpoint(url.clone()));
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.attempt_ms", t.attempt_ms),
            ("timeouts.operation_ms", t.operation_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("zones_page_size", u64::from(self.zones_page_size)),
            ("records_page_size", u64::from(self.records_page_size)),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        self.budgets
            .change
            .validate()
            .map_err(ConfigError::BadBudget)?;
        if self.zones_page_size > 100 {
            return Err(ConfigError::TooLarge("zones_page_size", 100));
        }
        if self.records_page_size > 300 {
            return Err(ConfigError::TooLarge("records_page_size", 300));
        }
        Ok(())
    }

    /// A Route 53 client using the standard AWS credential chain.
    ///
    /// # Errors
    /// [`ConfigError`] if [`Route53Config::validate`] fails. Missing credentials are not
    /// detected here: the first call fails with a permanent error that says so.
    pub async fn client(&self) -> Result<aws_sdk_route53::Client, ConfigError> {
        self.build_client(None::<aws_sdk_route53::config::Credentials>)
            .await
    }

    /// A Route 53 client with explicit credentials instead of the standard chain (tests,
    /// tools).
    ///
    /// # Errors
    /// [`ConfigError`] if [`Route53Config::validate`] fails.
    pub async fn client_with_credentials(
        &self,
        credentials: impl ProvideCredentials + 'static,
    ) -> Result<aws_sdk_route53::Client, ConfigError> {
        self.build_client(Some(credentials)).await
    }

    async fn build_client(
        &self,
        credentials: Option<impl ProvideCredentials + 'static>,
    ) -> Result<aws_sdk_route53::Client, ConfigError> {
        self.validate()?;
        // rustls with ring, hyper 1: no aws-lc-sys, no hyper 0.14 (see shared/BUILD.md).
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let t = &self.timeouts;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .region(Region::new(self.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(t.connect_ms))
                    .operation_attempt_timeout(Duration::from_millis(t.attempt_ms))
                    .operation_timeout(Duration::from_millis(t.operation_ms))
                    .build(),
            );
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        Ok(aws_sdk_route53::Client::new(&loader.load().await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_toml_with_defaults() {
        let c: Route53Config = toml::from_str(
            r#"
            endpoint_url = "http://127.0.0.1:5000"
            max_attempts = 3
            [timeouts]
            connect_ms = 3000
            "#,
        )
        .unwrap();
        assert_eq!(c.region, DEFAULT_REGION);
        assert_eq!(c.timeouts.attempt_ms, 20_000);
        assert_eq!(c.zones_page_size, 100);
        c.validate().unwrap();
        assert_eq!(
            toml::from_str::<Route53Config>("").unwrap(),
            Route53Config::default()
        );
        assert!(toml::from_str::<Route53Config>("secret_access_key = \"k\"").is_err());
    }

    #[test]
    fn validate_names_the_setting() {
        let mut c = Route53Config {
            region: " ".into(),
            ..Route53Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::MissingRegion));
        c.region = DEFAULT_REGION.into();
        c.endpoint_url = Some("127.0.0.1:5000".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadEndpoint(_))));
        c.endpoint_url = None;
        c.records_page_size = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("records_page_size")));
        c.records_page_size = 301;
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooLarge("records_page_size", 300))
        );
    }
}
