//! Configuration of the EC2 adapter (the engine's `[ec2]` TOML table) and building the client.
//!
//! Credentials never appear here: they come from the standard AWS chain (environment
//! variables `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the shared profile files, web identity,
//! ECS task role, EC2 instance metadata), so a config file can be committed and logged.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::ProvideCredentials;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use serde::Deserialize;
use setpoint_adapter::Limit;

/// The instance type used when neither the spec nor the plan names one.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";

/// The device name of the data volume unless `data_volume.device_name` says otherwise.
pub const DEFAULT_DATA_VOLUME_DEVICE: &str = "/dev/sdf";

/// The EBS volume type of the data volume unless `data_volume.volume_type` says otherwise.
pub const DEFAULT_DATA_VOLUME_TYPE: &str = "gp3";

/// EBS volume types a data volume may have: those that need nothing but a size (`io1` and `io2`
/// need provisioned IOPS, which the adapter does not set).
const DATA_VOLUME_TYPES: [&str; 5] = ["gp3", "gp2", "st1", "sc1", "standard"];

/// Device names AMIs use for their root volume: a data volume there would replace the root
/// volume's mapping instead of adding a disk.
const ROOT_DEVICES: [&str; 4] = ["/dev/sda1", "/dev/sda", "/dev/xvda", "xvda"];

/// How the EC2 adapter reaches EC2 and what it launches.
///
/// ```toml
/// [ec2]
/// region = "eu-west-1"
/// endpoint_url = "http://127.0.0.1:5000"   # moto, or a VPC endpoint; omit for AWS
/// subnet_ids = ["subnet-0abc", "subnet-0def"]
/// security_group_ids = ["sg-0123"]
/// default_image_id = "ami-0aaa"
///
/// [ec2.plans."kvx.small"]
/// instance_type = "t3.small"
/// [ec2.plans."kvx.large"]
/// image_id = "ami-0bbb"
/// instance_type = "m6i.large"
///
/// [ec2.data_volume]               # the defaults
/// device_name = "/dev/sdf"
/// volume_type = "gp3"
/// encrypted = true
///
/// [ec2.timeouts]
/// connect_ms = 3000
/// ```
///
/// One `Ec2Config` is one region; [`Ec2Regions`](crate::Ec2Regions) reads either this form or
/// one `[ec2.regions.<name>]` table per region.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    /// The AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// Where to send EC2 calls instead of the public regional endpoint (moto, a VPC endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The AMI used when neither the spec nor its plan names one.
    #[serde(default)]
    pub default_image_id: Option<String>,
    /// The instance type used when neither the spec nor its plan names one.
    #[serde(default = "default_instance_type")]
    pub default_instance_type: String,
    /// Image and instance type per KVX plan (`kvx.small`, `kvx.medium`, `kvx.large`, …).
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// Subnets to launch into. A unit's subnet is picked from this list by its token (a stable
    /// hash), so every retry of a token lands in the same subnet and AZ, as EC2 client tokens
    /// require. Empty: EC2 picks the default subnet (fine for moto, not recommended for AWS).
    /// Changing the list while units are in flight may move a retry; pin `subnet_id` in the
    /// spec when that matters.
    #[serde(default)]
    pub subnet_ids: Vec<String>,
    /// Security groups for every launched instance. Empty: the VPC's default group.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Whether `ensure` polls until the instance is `running` (within the unit's deadline).
    /// When false it returns right after launching or adopting.
    #[serde(default = "default_true")]
    pub wait_for_running: bool,
    /// The data volume added to a launch that asks for one (`data_volume_gb`).
    #[serde(default)]
    pub data_volume: DataVolumeConfig,
    /// Timeouts and polling.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Attempts per API call inside the AWS SDK (its standard retry mode: throttling, 5xx and
    /// transport errors, with the same `ClientToken`). The engine retries the unit on top.
    /// With the engine's shared budgets a throttle is not resent by the SDK but left to the
    /// budget ([`setpoint_adapter::aws::LeaveThrottlesToBudget`]).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The request budgets this region's calls share with every engine (`[ec2.budgets]`).
    #[serde(default)]
    pub budgets: Ec2BudgetsConfig,
}

/// EC2's request-rate buckets as setpoint's shared budgets (docs/budgets.md), per account and
/// region: `[ec2.budgets]` with `scope` and one `{ rate, burst }` table per class.
///
/// ```toml
/// [ec2.budgets]                       # the defaults
/// # scope = "123456789012"            # the account; default: endpoint_url, else "aws"
/// run_instances = { rate = 2.0, burst = 5.0 }
/// mutating = { rate = 5.0, burst = 50.0 }
/// describe = { rate = 20.0, burst = 100.0 }
/// ```
///
/// The defaults stay under EC2's published buckets (RunInstances' resource bucket refills 2
/// per second; mutating and describe calls refill 5 and 20 per second in the smallest
/// accounts), leaving a margin for the account's other callers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2BudgetsConfig {
    /// What engines share a budget by: the account id. Engines that name the same scope and
    /// region share one bucket per class.
    pub scope: Option<String>,
    /// `RunInstances`.
    pub run_instances: Limit,
    /// Other calls that change something: Stop/Start/TerminateInstances,
    /// ModifyInstanceAttribute, ModifyVolume.
    pub mutating: Limit,
    /// DescribeInstances, DescribeVolumes, DescribeVolumesModifications.
    pub describe: Limit,
}

/// The default `run_instances` budget: 2 per second, burst 5.
pub const DEFAULT_RUN_INSTANCES_BUDGET: Limit = Limit::new(2.0, 5.0);
/// The default `mutating` budget: 5 per second, burst 50.
pub const DEFAULT_MUTATING_BUDGET: Limit = Limit::new(5.0, 50.0);
/// The default `describe` budget: 20 per second, burst 100.
pub const DEFAULT_DESCRIBE_BUDGET: Limit = Limit::new(20.0, 100.0);

// Every limit is checked finite by `Ec2Config::validate`.
impl Eq for Ec2BudgetsConfig {}

impl Default for Ec2BudgetsConfig {
    fn default() -> Self {
        Self {
            scope: None,
            run_instances: DEFAULT_RUN_INSTANCES_BUDGET,
            mutating: DEFAULT_MUTATING_BUDGET,
            describe: DEFAULT_DESCRIBE_BUDGET,
        }
    }
}

impl Ec2BudgetsConfig {
    /// The scope of the keys: `scope`, else the endpoint URL, else `aws`.
    pub fn scope_for(&self, endpoint_url: Option<&str>) -> String {
        self.scope
            .clone()
            .or_else(|| endpoint_url.map(str::to_owned))
            .unwrap_or_else(|| "aws".to_owned())
    }

    /// Checks every limit.
    ///
    /// # Errors
    /// [`ConfigError::BadBudget`] naming the class.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (class, limit) in [
            ("run_instances", self.run_instances),
            ("mutating", self.mutating),
            ("describe", self.describe),
        ] {
            limit
                .validate()
                .map_err(|problem| ConfigError::BadBudget { class, problem })?;
        }
        Ok(())
    }
}

/// Image and instance type of one KVX plan; each falls back to the `default_*` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The AMI id for this plan.
    #[serde(default)]
    pub image_id: Option<String>,
    /// The instance type for this plan, e.g. `t3.small`.
    #[serde(default)]
    pub instance_type: Option<String>,
}

/// How the data volume of a launch is made (an EBS volume in `RunInstances`' block device
/// mappings). Its size comes from the request; it is always deleted with the instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataVolumeConfig {
    /// The device name the instance sees it under (default `/dev/sdf`); also how the adapter
    /// finds it again in the instance's block device mappings, so changing it later hides the
    /// data volumes of machines already launched.
    pub device_name: String,
    /// The EBS volume type (default `gp3`): `gp3`, `gp2`, `st1`, `sc1` or `standard`.
    pub volume_type: String,
    /// Whether the volume is encrypted (default true). Sent explicitly, so the account's
    /// "encryption by default" setting does not decide it.
    pub encrypted: bool,
    /// The KMS key (id, ARN or alias) that encrypts it; the account's default EBS key when
    /// absent. The engine's IAM identity needs grants on it (see the Terraform module).
    pub kms_key_id: Option<String>,
}

impl Default for DataVolumeConfig {
    fn default() -> Self {
        Self {
            device_name: DEFAULT_DATA_VOLUME_DEVICE.to_owned(),
            volume_type: DEFAULT_DATA_VOLUME_TYPE.to_owned(),
            encrypted: true,
            kms_key_id: None,
        }
    }
}

/// Timeouts of EC2 calls and of waiting for `running`, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP + TLS connect.
    pub connect_ms: u64,
    /// One HTTP attempt of an API call.
    pub attempt_ms: u64,
    /// One API call including the SDK's retries.
    pub operation_ms: u64,
    /// First pause between polls while waiting for `running`; doubles up to `poll_max_ms`.
    pub poll_initial_ms: u64,
    /// Longest pause between polls.
    pub poll_max_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 3_000,
            attempt_ms: 20_000,
            operation_ms: 60_000,
            poll_initial_ms: 1_000,
            poll_max_ms: 10_000,
        }
    }
}

fn default_instance_type() -> String {
    DEFAULT_INSTANCE_TYPE.to_owned()
}

fn default_true() -> bool {
    true
}

fn default_max_attempts() -> u32 {
    3
}

/// A configuration the adapter cannot start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `region` is empty.
    #[error("ec2.region must be set (e.g. \"eu-west-1\")")]
    MissingRegion,
    /// `region` is not a region code.
    #[error("{0:?} is not an AWS region code (e.g. \"eu-west-1\", \"us-gov-west-1\")")]
    BadRegion(String),
    /// A `data_volume` setting is unusable.
    #[error("ec2.data_volume.{setting}: {problem}")]
    BadDataVolume {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The `[ec2]` table configures no region, or one region twice.
    #[error("{0}")]
    Regions(String),
    /// `endpoint_url` is not an http(s) URL.
    #[error("ec2.endpoint_url must start with http:// or https:// (got {0:?})")]
    BadEndpoint(String),
    /// A budget's rate or burst is unusable.
    #[error("ec2.budgets.{class}: {problem}")]
    BadBudget {
        /// The class.
        class: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A timeout is zero or `max_attempts` is zero.
    #[error("ec2.{0} must be greater than zero")]
    Zero(&'static str),
}

impl Ec2Config {
    /// A configuration for `region` with every other setting at its default.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            default_image_id: None,
            default_instance_type: default_instance_type(),
            plans: BTreeMap::new(),
            subnet_ids: Vec::new(),
            security_group_ids: Vec::new(),
            wait_for_running: true,
            data_volume: DataVolumeConfig::default(),
            timeouts: TimeoutsConfig::default(),
            max_attempts: default_max_attempts(),
            budgets: Ec2BudgetsConfig::default(),
        }
    }

    /// Checks what can be checked without calling AWS.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the setting to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.region.trim().is_empty() {
            return Err(ConfigError::MissingRegion);
        }
        if !is_region_code(&self.region) {
            return Err(ConfigError::BadRegion(self.region.clone()));
        }
        self.data_volume.validate()?;
        self.budgets.validate()?;
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
            ("timeouts.poll_initial_ms", t.poll_initial_ms),
            ("timeouts.poll_max_ms", t.poll_max_ms),
            ("max_attempts", u64::from(self.max_attempts)),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }

    /// An EC2 client using the standard AWS credential chain.
    ///
    /// # Errors
    /// [`ConfigError`] if [`Ec2Config::validate`] fails. Missing credentials are not detected
    /// here: the first call fails with a permanent error that says so.
    pub async fn client(&self) -> Result<aws_sdk_ec2::Client, ConfigError> {
        self.build_client(None::<aws_sdk_ec2::config::Credentials>)
            .await
    }

    /// An EC2 client with explicit credentials instead of the standard chain (tests, tools).
    ///
    /// # Errors
    /// [`ConfigError`] if [`Ec2Config::validate`] fails.
    pub async fn client_with_credentials(
        &self,
        credentials: impl ProvideCredentials + 'static,
    ) -> Result<aws_sdk_ec2::Client, ConfigError> {
        self.build_client(Some(credentials)).await
    }

    async fn build_client(
        &self,
        credentials: Option<impl ProvideCredentials + 'static>,
    ) -> Result<aws_sdk_ec2::Client, ConfigError> {
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
        Ok(aws_sdk_ec2::Client::new(&loader.load().await))
    }

    /// The subnet for a unit: the spec's pin, else one of `subnet_ids` chosen by a stable
    /// hash of the token (FNV-1a, fixed across releases), else none (EC2's default subnet).
    pub fn subnet_for(&self, token: &str, pinned: Option<&str>) -> Option<String> {
        if let Some(p) = pinned {
            return Some(p.to_owned());
        }
        if self.subnet_ids.is_empty() {
            return None;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let i = (h % self.subnet_ids.len() as u64) as usize;
        self.subnet_ids.get(i).cloned()
    }
}

impl DataVolumeConfig {
    /// Checks the settings AWS would otherwise refuse at the first launch, or silently misuse.
    ///
    /// # Errors
    /// [`ConfigError::BadDataVolume`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, problem: String| Err(ConfigError::BadDataVolume { setting, problem });
        let device = self.device_name.trim();
        if device.is_empty() || device.contains(char::is_whitespace) {
            return bad(
                "device_name",
                format!(
                    "{:?} is not a device name such as /dev/sdf",
                    self.device_name
                ),
            );
        }
        if ROOT_DEVICES.contains(&device) {
            return bad(
                "device_name",
                format!(
                    "{device} is where images keep their root volume; choose another device \
                     (e.g. /dev/sdf)"
                ),
            );
        }
        if !DATA_VOLUME_TYPES.contains(&self.volume_type.as_str()) {
            return bad(
                "volume_type",
                format!(
                    "{:?} is not one of {} (io1 and io2 need provisioned IOPS, which setpoint \
                     does not set)",
                    self.volume_type,
                    DATA_VOLUME_TYPES.join(", ")
                ),
            );
        }
        match &self.kms_key_id {
            Some(k) if k.trim().is_empty() => bad("kms_key_id", "is empty; omit it".into()),
            Some(_) if !self.encrypted => bad(
                "kms_key_id",
                "is set but encrypted = false: a key only encrypts an encrypted volume".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// True for AWS region codes: two letters, one or more words, a number (`eu-west-1`,
/// `us-gov-west-1`, `ap-southeast-4`).
pub(crate) fn is_region_code(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_toml() {
        let text = r#"
            region = "eu-west-1"
            endpoint_url = "http://127.0.0.1:5000"
            subnet_ids = ["subnet-a", "subnet-b"]
            security_group_ids = ["sg-1"]
            default_image_id = "ami-0aaa"
            [plans."kvx.small"]
            instance_type = "t3.small"
            [plans."kvx.large"]
            image_id = "ami-0bbb"
            instance_type = "m6i.large"
            [timeouts]
            connect_ms = 1000
        "#;
        let c: Ec2Config = toml::from_str(text).unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(
            c.plans["kvx.small"].instance_type.as_deref(),
            Some("t3.small")
        );
        assert_eq!(c.timeouts.connect_ms, 1000);
        assert_eq!(c.timeouts.attempt_ms, 20_000);
        assert!(c.wait_for_running);
        assert_eq!(c.default_instance_type, DEFAULT_INSTANCE_TYPE);
        c.validate().unwrap();
        assert!(toml::from_str::<Ec2Config>("region = \"x\"\nsecret_key = \"k\"").is_err());
        assert_eq!(c.data_volume, DataVolumeConfig::default());
        assert_eq!(c.data_volume.device_name, "/dev/sdf");
        assert!(c.data_volume.encrypted);

        let c: Ec2Config = toml::from_str(
            "region = \"us-east-1\"\n[data_volume]\ndevice_name = \"/dev/sdg\"\n\
             kms_key_id = \"alias/setpoint\"\n",
        )
        .unwrap();
        assert_eq!(c.data_volume.device_name, "/dev/sdg");
        assert_eq!(c.data_volume.volume_type, "gp3");
        assert_eq!(c.data_volume.kms_key_id.as_deref(), Some("alias/setpoint"));
        c.validate().unwrap();
        let e = toml::from_str::<Ec2Config>("region = \"us-east-1\"\n[data_volume]\nsize = 3\n")
            .unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
    }

    #[test]
    fn data_volume_settings_are_checked_by_name() {
        let check = |f: fn(&mut DataVolumeConfig)| {
            let mut c = Ec2Config::new("us-east-1");
            f(&mut c.data_volume);
            c.validate()
        };
        for (f, setting) in [
            (
                (|d: &mut DataVolumeConfig| d.device_name = "/dev/xvda".into())
                    as fn(&mut DataVolumeConfig),
                "device_name",
            ),
            (|d| d.device_name = " ".into(), "device_name"),
            (|d| d.volume_type = "io2".into(), "volume_type"),
            (
                |d| {
                    d.encrypted = false;
                    d.kms_key_id = Some("k".into());
                },
                "kms_key_id",
            ),
        ] {
            match check(f) {
                Err(ConfigError::BadDataVolume {
                    setting: s,
                    problem,
                }) => {
                    assert_eq!(s, setting, "{problem}");
                }
                other => panic!("{setting}: {other:?}"),
            }
        }
        check(|d| d.encrypted = false).unwrap();
    }

    #[test]
    fn region_codes() {
        for ok in [
            "eu-west-1",
            "us-gov-west-1",
            "ap-southeast-4",
            "il-central-1",
        ] {
            assert!(is_region_code(ok), "{ok}");
        }
        for bad in [
            "x",
            "eu_west_1",
            "EU-west-1",
            "eu-west",
            "eu--1",
            "europe-west-1",
            "eu-west-1a",
        ] {
            assert!(!is_region_code(bad), "{bad}");
        }
        assert_eq!(
            Ec2Config::new("eu-west-1a").validate(),
            Err(ConfigError::BadRegion("eu-west-1a".into()))
        );
    }

    #[test]
    fn validate_names_the_setting() {
        assert_eq!(
            Ec2Config::new(" ").validate(),
            Err(ConfigError::MissingRegion)
        );
        let mut c = Ec2Config::new("us-east-1");
        c.endpoint_url = Some("127.0.0.1:5000".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadEndpoint(_))));
        let mut c = Ec2Config::new("us-east-1");
        c.timeouts.poll_max_ms = 0;
        assert_eq!(c.validate(), Err(ConfigError::Zero("timeouts.poll_max_ms")));
    }

    #[test]
    fn subnet_is_stable_per_token_and_pins_win() {
        let mut c = Ec2Config::new("us-east-1");
        assert_eq!(c.subnet_for("tok", None), None);
        c.subnet_ids = vec!["subnet-a".into(), "subnet-b".into(), "subnet-c".into()];
        let first = c.subnet_for("tok-1", None);
        for _ in 0..10 {
            assert_eq!(c.subnet_for("tok-1", None), first);
        }
        let spread: std::collections::BTreeSet<_> = (0..50)
            .filter_map(|i| c.subnet_for(&format!("tok-{i}"), None))
            .collect();
        assert!(spread.len() > 1, "tokens spread over subnets");
        assert_eq!(
            c.subnet_for("tok-1", Some("subnet-z")).as_deref(),
            Some("subnet-z")
        );
    }
}
