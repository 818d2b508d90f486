//! The EC2 plugin: machines on Amazon EC2 (the compute domain), one client per served region.
//!
//! It reads the historical `[ec2]` table (one region, or `[ec2.regions.<name>]` tables; see
//! the `setpoint-ec2` crate) and the deployment's environment variables, and provides a
//! `dyn Compute` per region (and the home region as `compute.default-region`) to the plugins
//! after it; it also registers the adapter's own work kinds (`ec2.ensure-instance`,
//! `ec2.terminate-instance`) in the home region, and the sweep for orphaned machines over every
//! region (the `[orphans]` table; see [`crate::plugins::orphans`]), whose tables it migrates.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_ec2::config::Credentials;
use setpoint_adapter::{BoxFuture, Budgets, Compute};
use setpoint_ec2::{Ec2Compute, Ec2Config, Ec2Regions};

use crate::config::{ConfigError, section_for};
use crate::plugin::{ConfigContext, Plugin, PluginError, PluginMigration, Registrar, Services};
use crate::plugins::orphans::{OrphanConfig, OrphanTask};

/// The EC2 settings: the `[ec2]` table refined by the environment.
#[derive(Debug, Default, Clone)]
pub struct Ec2Settings {
    /// The regions, if EC2 is configured at all.
    pub ec2: Option<Ec2Regions>,
}

impl Ec2Settings {
    /// The settings of the `[ec2]` table `table` (JSON), if any.
    ///
    /// # Errors
    /// Unknown keys (by name) and bad values.
    pub fn from_table(table: Option<&serde_json::Value>) -> Result<Self, ConfigError> {
        let ec2 = table
            .map(|t| serde_json::from_value::<Ec2Regions>(t.clone()))
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("[ec2]: {e}")))?;
        Ok(Self { ec2 })
    }

    /// Applies the EC2 environment variables.
    ///
    /// - `SETPOINT_AWS_REGION` names the region the variables below refine: it creates `[ec2]`
    ///   when absent, renames the region when exactly one is configured, and otherwise must
    ///   name one of the configured regions.
    /// - `SETPOINT_EC2_REGIONS` adds regions: a JSON object of region tables, the keys of
    ///   `[ec2.regions.<name>]` (`{"us-east-1": {"subnet_ids": ["subnet-0abc"],
    ///   "default_image_id": "ami-0abc"}}`). A region it names replaces the file's region of
    ///   that name; it may not name `SETPOINT_AWS_REGION`'s region (configure that one with the
    ///   variables below).
    /// - `SETPOINT_EC2_SUBNET_ID`, `SETPOINT_EC2_SECURITY_GROUP_IDS` (comma lists),
    ///   `SETPOINT_EC2_IMAGE_ID` (`default_image_id`), `SETPOINT_EC2_PLAN_INSTANCE_TYPES`
    ///   (`plan=type,…`: `plans.<plan>.instance_type`) and `SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID`
    ///   (`data_volume.kms_key_id`) refine `SETPOINT_AWS_REGION`'s region, or the only region.
    pub fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let home = get("SETPOINT_AWS_REGION").map(|r| r.trim().to_owned());
        if let Some(region) = &home {
            match &mut self.ec2 {
                None => self.ec2 = Some(Ec2Regions::single(Ec2Config::new(region))),
                Some(ec2) if ec2.get(region).is_some() => {}
                Some(ec2) if ec2.regions().len() == 1 => {
                    if let Some(one) = ec2.only_mut() {
                        one.region = region.clone();
                    }
                }
                Some(ec2) => {
                    return Err(ConfigError::Invalid(format!(
                        "SETPOINT_AWS_REGION={region} names none of the regions [ec2] \
                         configures ({}): name one of them, or add [ec2.regions.{region}]",
                        ec2.names().join(", ")
                    )));
                }
            }
        }
        if let Some(tables) = get(EC2_REGIONS) {
            let configs = Ec2Regions::from_json_tables(&tables)
                .map_err(|e| ConfigError::Invalid(format!("{EC2_REGIONS}: {e}")))?;
            for config in configs {
                if home.as_deref() == Some(config.region.as_str()) {
                    return Err(ConfigError::Invalid(format!(
                        "{EC2_REGIONS} names {0}, which SETPOINT_AWS_REGION already names: \
                         configure {0} either with the SETPOINT_EC2_* variables or in \
                         {EC2_REGIONS}, not both",
                        config.region
                    )));
                }
                match &mut self.ec2 {
                    Some(ec2) => {
                        ec2.insert(config);
                    }
                    None => self.ec2 = Some(Ec2Regions::single(config)),
                }
            }
        }
        for (var, subnets) in [
            ("SETPOINT_EC2_SUBNET_ID", true),
            ("SETPOINT_EC2_SECURITY_GROUP_IDS", false),
        ] {
            let Some(value) = get(var) else { continue };
            let ec2 = ec2_region(&mut self.ec2, var, home.as_deref())?;
            if subnets {
                ec2.subnet_ids = list(value);
            } else {
                ec2.security_group_ids = list(value);
            }
        }
        if let Some(image) = get("SETPOINT_EC2_IMAGE_ID") {
            let ec2 = ec2_region(&mut self.ec2, "SETPOINT_EC2_IMAGE_ID", home.as_deref())?;
            ec2.default_image_id = Some(image.trim().to_owned());
        }
        if let Some(pairs) = get(PLAN_TYPES) {
            let ec2 = ec2_region(&mut self.ec2, PLAN_TYPES, home.as_deref())?;
            for (plan, instance_type) in plan_instance_types(&pairs)? {
                ec2.plans.entry(plan).or_default().instance_type = Some(instance_type);
            }
        }
        if let Some(key) = get(KMS_KEY) {
            let ec2 = ec2_region(&mut self.ec2, KMS_KEY, home.as_deref())?;
            ec2.data_volume.kms_key_id = Some(key.trim().to_owned());
        }
        Ok(())
    }
}

/// How an environment variable that refines the EC2 section says to configure it.
const EC2_HOW: &str = "SETPOINT_AWS_REGION or add an [ec2] section";

/// The variable that sets `ec2.plans.<plan>.instance_type` of several plans at once.
const PLAN_TYPES: &str = "SETPOINT_EC2_PLAN_INSTANCE_TYPES";

/// The variable that adds EC2 regions (a JSON object of region tables).
const EC2_REGIONS: &str = "SETPOINT_EC2_REGIONS";

/// The variable that sets the KMS key of the data volumes (`data_volume.kms_key_id`).
const KMS_KEY: &str = "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID";

/// The EC2 region the variable `var` refines: `home` (`SETPOINT_AWS_REGION`), else the only
/// configured region; an error saying how to configure it otherwise.
fn ec2_region<'a>(
    ec2: &'a mut Option<Ec2Regions>,
    var: &str,
    home: Option<&str>,
) -> Result<&'a mut Ec2Config, ConfigError> {
    let regions = section_for(ec2, var, "EC2", EC2_HOW)?;
    let names = regions.names().join(", ");
    let found = match home {
        Some(h) => regions.get_mut(h),
        None => regions.only_mut(),
    };
    found.ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{var} is set but [ec2] configures several regions ({names}): set \
             SETPOINT_AWS_REGION to the one it is for"
        ))
    })
}

/// Parses `plan=type,plan=type` (spaces and empty items ignored).
fn plan_instance_types(value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((plan, ty)) if !plan.trim().is_empty() && !ty.trim().is_empty() => {
                Ok((plan.trim().to_owned(), ty.trim().to_owned()))
            }
            _ => Err(ConfigError::Invalid(format!(
                "{PLAN_TYPES}: {item:?} is not plan=instance-type \
                 (e.g. kvx.small=t3.small,kvx.large=m6i.large)"
            ))),
        })
        .collect()
}

/// The EC2 plugin.
#[derive(Debug, Default)]
pub struct Ec2Plugin {
    settings: Ec2Settings,
    credentials: Option<Credentials>,
    computes: Vec<(String, Arc<Ec2Compute>)>,
    orphans: OrphanConfig,
}

impl Ec2Plugin {
    /// The plugin, configured from the file and the environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plugin with these settings and static credentials (a local stack against moto):
    /// its configuration step then keeps them.
    pub fn with_settings(settings: Ec2Settings, credentials: Option<Credentials>) -> Self {
        Self {
            settings,
            credentials,
            computes: Vec::new(),
            orphans: OrphanConfig::default(),
        }
    }
}

impl Plugin for Ec2Plugin {
    fn name(&self) -> &str {
        "ec2"
    }

    fn legacy_tables(&self) -> &[&'static str] {
        &["ec2", "orphans"]
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        let err = |e: ConfigError| cx.error(e.to_string());
        if self.settings.ec2.is_none() {
            let table = cx.legacy("ec2").or(cx.table());
            self.settings = Ec2Settings::from_table(table).map_err(err)?;
        }
        self.settings.apply_env(&|k| cx.env(k)).map_err(err)?;
        if let Some(ec2) = &self.settings.ec2 {
            ec2.validate().map_err(|e| cx.error(e.to_string()))?;
        }
        self.orphans =
            OrphanConfig::from_table(cx.legacy("orphans")).map_err(|e| cx.error(e.to_string()))?;
        Ok(())
    }

    fn provide<'a>(
        &'a mut self,
        services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            let Some(regions) = self.settings.ec2.clone() else {
                return Ok(());
            };
            let fail = |e: &dyn std::fmt::Display| PluginError::Start {
                plugin: "ec2".into(),
                message: e.to_string(),
            };
            for config in regions.regions().iter().cloned() {
                let region = config.region.clone();
                let compute = match &self.credentials {
                    Some(creds) => {
                        let client = config
                            .client_with_credentials(creds.clone())
                            .await
                            .map_err(|e| fail(&e))?;
                        Ec2Compute::from_client(client, config)
                    }
                    None => Ec2Compute::connect(config).await.map_err(|e| fail(&e))?,
                };
                // Every engine on the database shares the calls' budgets (docs/budgets.md).
                let compute = match services.get::<dyn Budgets>(crate::plugin::BUDGETS) {
                    Some(budgets) => compute.with_budgets(budgets),
                    None => compute,
                };
                let compute = Arc::new(compute);
                services.provide::<dyn Compute>(region.clone(), compute.clone());
                self.computes.push((region, compute));
            }
            if let Some((home, _)) = self.computes.first() {
                services.provide::<String>("compute.default-region", Arc::new(home.clone()));
            }
            Ok(())
        })
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        if let Some((_, home)) = self.computes.first() {
            for handler in setpoint_ec2::handlers::handlers(home) {
                r.handler_arc(handler)?;
            }
        }
        if !self.computes.is_empty() && self.orphans.interval.is_some() {
            let computes: BTreeMap<String, Arc<dyn Compute>> = self
                .computes
                .iter()
                .map(|(region, c)| (region.clone(), c.clone() as Arc<dyn Compute>))
                .collect();
            r.background(Arc::new(OrphanTask::new(computes, self.orphans.clone())));
        }
        Ok(())
    }

    fn migrations(&self) -> Vec<PluginMigration> {
        crate::plugins::orphans::store::migrations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned().filter(|v| !v.trim().is_empty())
    }

    /// The settings of the `[ec2]` table of configuration file `text`.
    fn settings(text: &str) -> Ec2Settings {
        let file: toml::Table = toml::from_str(text).expect("toml");
        let table = file
            .get("ec2")
            .map(|t| serde_json::to_value(t).expect("json"));
        Ec2Settings::from_table(table.as_ref()).expect("settings")
    }

    #[test]
    fn ec2_image_from_the_environment() {
        let mut f = Ec2Settings::default();
        f.apply_env(&vars(&[
            ("SETPOINT_AWS_REGION", "eu-west-1"),
            ("SETPOINT_EC2_IMAGE_ID", " ami-0123456789abcdef0 "),
        ]))
        .expect("env");
        assert_eq!(
            f.ec2
                .expect("ec2")
                .only()
                .expect("one region")
                .default_image_id
                .as_deref(),
            Some("ami-0123456789abcdef0")
        );
    }

    #[test]
    fn refining_ec2_that_is_not_configured_is_refused() {
        let mut f = Ec2Settings::default();
        let err = f
            .apply_env(&vars(&[("SETPOINT_EC2_IMAGE_ID", "ami-1")]))
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("SETPOINT_EC2_IMAGE_ID is set but EC2 is not configured"),
            "{err}"
        );
    }

    /// Regions from the environment: SETPOINT_EC2_REGIONS adds regions (JSON region tables),
    /// SETPOINT_AWS_REGION names the one the single-region variables refine.
    #[test]
    fn ec2_regions_from_the_environment() {
        let extra = r#"{"us-east-1": {"subnet_ids": ["subnet-east"],
            "security_group_ids": ["sg-east"], "default_image_id": "ami-east",
            "plans": {"kvx.small": {"instance_type": "t3.small"}},
            "data_volume": {"kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/east"}}}"#;
        let mut f = Ec2Settings::default();
        f.apply_env(&vars(&[
            ("SETPOINT_AWS_REGION", "eu-west-1"),
            ("SETPOINT_EC2_SUBNET_ID", "subnet-west"),
            ("SETPOINT_EC2_IMAGE_ID", "ami-west"),
            ("SETPOINT_EC2_PLAN_INSTANCE_TYPES", "kvx.small=t3.small"),
            (
                "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID",
                "arn:aws:kms:eu-west-1:123456789012:key/west",
            ),
            ("SETPOINT_EC2_REGIONS", extra),
        ]))
        .expect("env");
        let ec2 = f.ec2.expect("ec2");
        assert_eq!(ec2.names(), ["eu-west-1", "us-east-1"]);
        let west = ec2.get("eu-west-1").expect("home region");
        assert_eq!(west.subnet_ids, ["subnet-west"]);
        assert_eq!(west.default_image_id.as_deref(), Some("ami-west"));
        assert!(
            west.data_volume
                .kms_key_id
                .as_deref()
                .unwrap()
                .ends_with("key/west")
        );
        let east = ec2.get("us-east-1").expect("added region");
        assert_eq!(
            east.subnet_ids,
            ["subnet-east"],
            "the home variables leave it alone"
        );
        assert_eq!(east.security_group_ids, ["sg-east"]);
        assert_eq!(
            east.plans["kvx.small"].instance_type.as_deref(),
            Some("t3.small")
        );
        assert!(
            east.data_volume
                .kms_key_id
                .as_deref()
                .unwrap()
                .ends_with("key/east")
        );
        ec2.validate().expect("valid");

        // Over a file with several regions: SETPOINT_AWS_REGION picks the one to refine.
        let file = "[ec2.regions.eu-west-1]\n[ec2.regions.us-west-2]\n";
        let mut f = settings(file);
        f.apply_env(&vars(&[
            ("SETPOINT_AWS_REGION", "us-west-2"),
            ("SETPOINT_EC2_IMAGE_ID", "ami-2"),
        ]))
        .expect("env");
        let ec2 = f.ec2.expect("ec2");
        assert_eq!(
            ec2.get("us-west-2").unwrap().default_image_id.as_deref(),
            Some("ami-2")
        );
        assert_eq!(ec2.get("eu-west-1").unwrap().default_image_id, None);

        for (file, pairs, want) in [
            // Which of several regions a variable refines must be said.
            (
                file,
                vec![("SETPOINT_EC2_IMAGE_ID", "ami-1")],
                "set SETPOINT_AWS_REGION",
            ),
            // A home region that is none of several configured ones.
            (
                file,
                vec![("SETPOINT_AWS_REGION", "ap-south-1")],
                "names none of the regions [ec2] configures (eu-west-1, us-west-2)",
            ),
            // One region configured in two ways.
            (
                "",
                vec![
                    ("SETPOINT_AWS_REGION", "us-east-1"),
                    ("SETPOINT_EC2_REGIONS", extra),
                ],
                "not both",
            ),
            (
                "",
                vec![("SETPOINT_EC2_REGIONS", r#"{"us-east-1": {"subnet": "x"}}"#)],
                "SETPOINT_EC2_REGIONS: ec2.regions.us-east-1: unknown field `subnet`",
            ),
            (
                "",
                vec![("SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID", "k")],
                "SETPOINT_EC2_DATA_VOLUME_KMS_KEY_ID is set but EC2 is not configured",
            ),
        ] {
            let mut f = settings(file);
            let err = f.apply_env(&vars(&pairs)).expect_err(want).to_string();
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
    }
}
