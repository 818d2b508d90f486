//! [`Ec2Regions`]: the engine's `[ec2]` table, which configures one region or several.
//!
//! Two forms are accepted and never mixed:
//!
//! ```toml
//! # One region: its name and its settings in [ec2] itself (the original form).
//! [ec2]
//! region = "eu-west-1"
//! subnet_ids = ["subnet-0abc"]
//! ```
//!
//! ```toml
//! # Several regions: one table per region, named by the region, nothing else in [ec2].
//! [ec2.regions.eu-west-1]
//! subnet_ids = ["subnet-0abc"]
//! default_image_id = "ami-0aaa"
//! [ec2.regions.us-east-1]
//! subnet_ids = ["subnet-0def"]
//! default_image_id = "ami-0bbb"
//! endpoint_url = "http://127.0.0.1:5000"
//! ```
//!
//! A region table takes every key of the one-region form except `region` (its name is the
//! table's). Unknown keys are refused by name, in either form. Each region becomes one
//! [`Ec2Config`], and one [`Ec2Compute`](crate::Ec2Compute) serves one region: an engine that
//! serves several regions holds one per region.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::{Map, Value};

use crate::config::{ConfigError, Ec2Config};

/// The key of the several-regions form.
const REGIONS_KEY: &str = "regions";

/// The regions an `[ec2]` table configures, each an [`Ec2Config`], in region-name order for the
/// several-regions form. Never empty, never one region twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Regions {
    regions: Vec<Ec2Config>,
}

impl Ec2Regions {
    /// One region.
    pub fn single(config: Ec2Config) -> Self {
        Self {
            regions: vec![config],
        }
    }

    /// Several regions, kept in the given order.
    ///
    /// # Errors
    /// [`ConfigError::Regions`] when `configs` is empty or names a region twice.
    pub fn from_configs(configs: Vec<Ec2Config>) -> Result<Self, ConfigError> {
        if configs.is_empty() {
            return Err(ConfigError::Regions(
                "[ec2] configures no region: set ec2.region, or add [ec2.regions.<name>] tables"
                    .into(),
            ));
        }
        for (i, c) in configs.iter().enumerate() {
            if configs[..i]
                .iter()
                .any(|earlier| earlier.region == c.region)
            {
                return Err(ConfigError::Regions(format!(
                    "region {} is configured twice",
                    c.region
                )));
            }
        }
        Ok(Self { regions: configs })
    }

    /// Parses a JSON object of region tables, `{"eu-west-1": {"subnet_ids": [...]}, ...}`: the
    /// several-regions form as an environment variable carries it (Terraform's `jsonencode`).
    ///
    /// # Errors
    /// [`ConfigError::Regions`] naming the region and key at fault.
    pub fn from_json_tables(text: &str) -> Result<Vec<Ec2Config>, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            ConfigError::Regions(format!("not a JSON object of region tables: {e}"))
        })?;
        let Value::Object(tables) = value else {
            return Err(ConfigError::Regions(
                "not a JSON object of region tables (e.g. {\"eu-west-1\": {\"subnet_ids\": \
                 [\"subnet-0abc\"]}})"
                    .into(),
            ));
        };
        region_tables(tables).map_err(ConfigError::Regions)
    }

    /// Every configured region.
    pub fn regions(&self) -> &[Ec2Config] {
        &self.regions
    }

    /// The names of the configured regions.
    pub fn names(&self) -> Vec<&str> {
        self.regions.iter().map(|c| c.region.as_str()).collect()
    }

    /// The region named `region`.
    pub fn get(&self, region: &str) -> Option<&Ec2Config> {
        self.regions.iter().find(|c| c.region == region)
    }

    /// The region named `region`, to change.
    pub fn get_mut(&mut self, region: &str) -> Option<&mut Ec2Config> {
        self.regions.iter_mut().find(|c| c.region == region)
    }

    /// The region when exactly one is configured.
    pub fn only(&self) -> Option<&Ec2Config> {
        match self.regions.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The region when exactly one is configured, to change.
    pub fn only_mut(&mut self) -> Option<&mut Ec2Config> {
        match self.regions.as_mut_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Adds `config`, replacing the region of the same name if there is one (and returning it).
    pub fn insert(&mut self, config: Ec2Config) -> Option<Ec2Config> {
        match self.get_mut(&config.region) {
            Some(existing) => Some(std::mem::replace(existing, config)),
            None => {
                self.regions.push(config);
                None
            }
        }
    }

    /// Checks every region ([`Ec2Config::validate`]).
    ///
    /// # Errors
    /// The first region's [`ConfigError`], with the region named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for c in &self.regions {
            c.validate().map_err(|e| match e {
                ConfigError::MissingRegion | ConfigError::BadRegion(_) => e,
                e if self.regions.len() > 1 => {
                    ConfigError::Regions(format!("ec2.regions.{}: {e}", c.region))
                }
                e => e,
            })?;
        }
        Ok(())
    }

    /// The configured regions, to build one [`Ec2Compute`](crate::Ec2Compute) each.
    pub fn into_configs(self) -> Vec<Ec2Config> {
        self.regions
    }
}

impl<'de> Deserialize<'de> for Ec2Regions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a JSON value: which form it is depends on the keys present, and each region
        // table is then read with Ec2Config's own rules (unknown keys refused by name).
        let table = Map::<String, Value>::deserialize(deserializer)?;
        parse_table(table).map_err(de::Error::custom)
    }
}

/// Reads an `[ec2]` table in either form.
fn parse_table(mut table: Map<String, Value>) -> Result<Ec2Regions, String> {
    let Some(regions) = table.remove(REGIONS_KEY) else {
        let config: Ec2Config =
            serde_json::from_value(Value::Object(table)).map_err(|e| e.to_string())?;
        return Ok(Ec2Regions::single(config));
    };
    if !table.is_empty() {
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        return Err(format!(
            "[ec2] mixes the one-region form (ec2.region and its settings in [ec2]) with the \
             several-regions form ([ec2.regions.<name>] tables): found {} beside \
             ec2.regions. Use one form: move these settings into each [ec2.regions.<name>] \
             table, or drop ec2.regions",
            keys.join(", ")
        ));
    }
    let Value::Object(tables) = regions else {
        return Err("ec2.regions must be a table of [ec2.regions.<name>] tables".into());
    };
    let configs = region_tables(tables)?;
    Ec2Regions::from_configs(configs).map_err(|e| e.to_string())
}

/// Reads `{name: table}` into one [`Ec2Config`] per region, in name order.
fn region_tables(tables: Map<String, Value>) -> Result<Vec<Ec2Config>, String> {
    if tables.is_empty() {
        return Err("ec2.regions is empty: add one [ec2.regions.<name>] table per region".into());
    }
    let sorted: BTreeMap<String, Value> = tables.into_iter().collect();
    let mut configs = Vec::with_capacity(sorted.len());
    for (name, value) in sorted {
        let Value::Object(mut settings) = value else {
            return Err(format!(
                "ec2.regions.{name} must be a table of that region's settings"
            ));
        };
        if settings.contains_key("region") {
            return Err(format!(
                "ec2.regions.{name}: remove `region`; the table's name is the region"
            ));
        }
        settings.insert("region".into(), Value::String(name.clone()));
        let config: Ec2Config = serde_json::from_value(Value::Object(settings))
            .map_err(|e| format!("ec2.regions.{name}: {e}"))?;
        configs.push(config);
    }
    Ok(configs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Ec2Regions, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            ec2: Ec2Regions,
        }
        toml::from_str::<File>(text)
            .map(|f| f.ec2)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_one_region_form_is_one_region() {
        let r = parse(
            "[ec2]\nregion = \"eu-west-1\"\nsubnet_ids = [\"subnet-a\"]\n\
             [ec2.plans.\"kvx.small\"]\ninstance_type = \"t3.small\"\n",
        )
        .unwrap();
        let one = r.only().unwrap();
        assert_eq!(one.region, "eu-west-1");
        assert_eq!(one.subnet_ids, ["subnet-a"]);
        assert_eq!(
            one.plans["kvx.small"].instance_type.as_deref(),
            Some("t3.small")
        );
        r.validate().unwrap();
        assert_eq!(r, Ec2Regions::single(one.clone()));
    }

    #[test]
    fn the_several_regions_form_is_one_config_per_region_in_name_order() {
        let r = parse(
            r#"
            [ec2.regions.us-east-1]
            subnet_ids = ["subnet-east"]
            default_image_id = "ami-east"
            endpoint_url = "http://127.0.0.1:5000"
            [ec2.regions.us-east-1.plans."kvx.small"]
            image_id = "ami-east-small"
            instance_type = "t3.small"
            [ec2.regions.eu-west-1]
            subnet_ids = ["subnet-west"]
            security_group_ids = ["sg-west"]
            default_image_id = "ami-west"
            [ec2.regions.eu-west-1.data_volume]
            kms_key_id = "alias/west"
            "#,
        )
        .unwrap();
        assert_eq!(r.names(), ["eu-west-1", "us-east-1"]);
        assert!(r.only().is_none());
        let west = r.get("eu-west-1").unwrap();
        assert_eq!(west.subnet_ids, ["subnet-west"]);
        assert_eq!(west.security_group_ids, ["sg-west"]);
        assert_eq!(west.endpoint_url, None);
        assert_eq!(west.data_volume.kms_key_id.as_deref(), Some("alias/west"));
        let east = r.get("us-east-1").unwrap();
        assert_eq!(east.default_image_id.as_deref(), Some("ami-east"));
        assert_eq!(east.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            east.plans["kvx.small"].image_id.as_deref(),
            Some("ami-east-small")
        );
        assert_eq!(
            east.timeouts,
            Ec2Config::new("x").timeouts,
            "defaults per region"
        );
        r.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_by_name_in_either_form() {
        let e = parse("[ec2]\nregion = \"eu-west-1\"\nsubnet_id = \"subnet-a\"\n").unwrap_err();
        assert!(e.contains("unknown field `subnet_id`"), "{e}");
        let e = parse("[ec2.regions.eu-west-1]\nsubnet_id = \"subnet-a\"\n").unwrap_err();
        assert!(e.contains("ec2.regions.eu-west-1"), "{e}");
        assert!(e.contains("unknown field `subnet_id`"), "{e}");
        let e = parse("[ec2.regions.eu-west-1.data_volume]\nsize_gb = 3\n").unwrap_err();
        assert!(e.contains("unknown field `size_gb`"), "{e}");
    }

    #[test]
    fn mixing_the_forms_is_refused_with_the_keys_at_fault() {
        let e = parse(
            "[ec2]\nregion = \"eu-west-1\"\nsubnet_ids = [\"subnet-a\"]\n\
             [ec2.regions.us-east-1]\ndefault_image_id = \"ami-1\"\n",
        )
        .unwrap_err();
        assert!(e.contains("mixes the one-region form"), "{e}");
        assert!(e.contains("region, subnet_ids"), "{e}");
        // A shared setting beside the region tables is a mix too: each region has its own.
        let e = parse("[ec2]\nmax_attempts = 5\n[ec2.regions.us-east-1]\n").unwrap_err();
        assert!(e.contains("found max_attempts"), "{e}");
        // The table's name is the region; a `region` key inside it would contradict it.
        let e = parse("[ec2.regions.us-east-1]\nregion = \"eu-west-1\"\n").unwrap_err();
        assert!(e.contains("the table's name is the region"), "{e}");
        let e = parse("[ec2]\nregions = {}\n").unwrap_err();
        assert!(e.contains("ec2.regions is empty"), "{e}");
        let e = parse("[ec2]\nregions = 3\n").unwrap_err();
        assert!(e.contains("must be a table"), "{e}");
        // Neither form: the one-region form's error names the missing key.
        let e = parse("[ec2]\nsubnet_ids = []\n").unwrap_err();
        assert!(e.contains("missing field `region`"), "{e}");
    }

    #[test]
    fn validation_names_the_region_at_fault() {
        let r = parse(
            "[ec2.regions.eu-west-1]\n[ec2.regions.us-east-1]\nendpoint_url = \"localhost:5000\"\n",
        )
        .unwrap();
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("ec2.regions.us-east-1"), "{e}");
        assert!(e.contains("endpoint_url"), "{e}");
        let r = parse("[ec2.regions.eu_west_1]\n").unwrap();
        assert_eq!(
            r.validate(),
            Err(ConfigError::BadRegion("eu_west_1".into()))
        );
    }

    #[test]
    fn json_tables_and_building_by_hand() {
        let configs = Ec2Regions::from_json_tables(
            r#"{"us-west-2": {"subnet_ids": ["subnet-b"], "default_image_id": "ami-b",
                "plans": {"kvx.small": {"instance_type": "t3.small"}},
                "data_volume": {"kms_key_id": null}}}"#,
        )
        .unwrap();
        assert_eq!(configs.len(), 1);
        assert_eq!(configs[0].region, "us-west-2");
        assert_eq!(configs[0].data_volume.kms_key_id, None);
        let e = Ec2Regions::from_json_tables(r#"{"us-west-2": {"subnet": "x"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ec2.regions.us-west-2") && e.contains("`subnet`"),
            "{e}"
        );
        assert!(Ec2Regions::from_json_tables("[1]").is_err());
        assert!(Ec2Regions::from_json_tables("{").is_err());

        let mut r = Ec2Regions::single(Ec2Config::new("eu-west-1"));
        assert!(r.insert(configs[0].clone()).is_none());
        assert_eq!(r.names(), ["eu-west-1", "us-west-2"]);
        let mut replacement = Ec2Config::new("us-west-2");
        replacement.max_attempts = 9;
        assert!(r.insert(replacement).is_some());
        assert_eq!(r.get("us-west-2").unwrap().max_attempts, 9);
        assert!(Ec2Regions::from_configs(Vec::new()).is_err());
        let twice = vec![Ec2Config::new("eu-west-1"), Ec2Config::new("eu-west-1")];
        assert!(
            Ec2Regions::from_configs(twice)
                .unwrap_err()
                .to_string()
                .contains("configured twice")
        );
    }
}
