//! The KVX kind (`kvx.instance`): a machine per instance (the compute domain, EC2 by default),
//! Kubernetes objects fronting it with its credentials (the cluster domain), and mails to its
//! owner (the mail domain) — declared as chains of steps like any plugin's kind.
//!
//! | chain                | steps (work kinds)                                                          |
//! |----------------------|-----------------------------------------------------------------------------|
//! | create               | machine (`kvx.create.ec2`) → cluster (`kvx.create.k8s`) ⇢ notify |
//! | update               | machine: resize (`kvx.update.ec2`) → cluster (`kvx.update.k8s`) ⇢ notify     |
//! | delete               | cluster (`kvx.delete.k8s`) → machine (`kvx.delete.ec2`) ⇢ notify             |
//! | observe (drift)      | `kvx.observe`: the machine gone → `heal` (or marked, per the drift action)  |
//! | heal                 | machine (`kvx.heal.ec2`) → cluster (`kvx.heal.k8s`)                          |
//! | rotate-credentials   | cluster (`kvx.rotate.k8s`), with new credentials                             |
//!
//! ⇢ marks a step beside the instance: the instance is READY (or DELETED) as soon as the step
//! before it ends; the mail's fate shows in the `Notified` condition. The work kinds of the
//! previous release are kept, so its queued units run here unchanged.
//!
//! The machine and the Kubernetes objects live in the instance's region: the compute and the
//! cluster serving that region run its steps. Machines recorded before regions were served
//! live in the engine's default region.

mod cluster;
mod machine;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use setpoint_adapter::{
    AdapterError, Cluster, Compute, IdempotencyToken, Mailer, ResourceKind, StepDecl,
};

pub use machine::Machine;

use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};

/// The kind's name.
pub const KIND: &str = "kvx.instance";
/// The kind's collection (`tenants/{t}/instances/{name}`).
pub const COLLECTION: &str = "instances";

/// The condition of the machine.
pub const MACHINE_AVAILABLE: &str = "MachineAvailable";
/// The condition of the Kubernetes objects.
pub const SYNCED: &str = "Synced";
/// The condition of the instance as a whole.
pub const READY: &str = crate::kinds::conditions::READY;
/// The condition of the last notification to the owner.
pub const NOTIFIED: &str = "Notified";
/// The condition of the last drift check, set when one could not finish.
pub const DRIFT_CHECKED: &str = "DriftChecked";

/// The plans an instance may have.
pub const PLANS: &[&str] = &["kvx.small", "kvx.medium", "kvx.large"];

/// The desired spec of a KVX instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvxSpec {
    /// The plan, e.g. `kvx.small`.
    #[serde(default)]
    pub plan: String,
    /// The region.
    #[serde(default)]
    pub region: String,
    /// The data volume's size in GiB.
    #[serde(default)]
    pub size_gb: i64,
    /// Who gets the notifications.
    #[serde(default)]
    pub owner_email: String,
}

/// What the drift check does when an instance's machine was terminated behind setpoint's back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftAction {
    /// Launch a new machine and point the Kubernetes objects at it.
    #[default]
    Heal,
    /// Only record it: `MachineAvailable` and `Ready` become `False`.
    Mark,
}

impl std::str::FromStr for DriftAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "heal" => Ok(Self::Heal),
            "mark" => Ok(Self::Mark),
            other => Err(format!("drift action must be heal or mark, not {other:?}")),
        }
    }
}

/// How the KVX steps behave.
#[derive(Debug, Clone)]
pub struct KvxConfig {
    /// What to do about a machine terminated behind setpoint's back.
    pub drift: DriftAction,
    /// How long a machine step waits for its machine to run before the unit retries.
    pub machine_wait: Duration,
}

impl Default for KvxConfig {
    fn default() -> Self {
        Self {
            drift: DriftAction::Heal,
            machine_wait: Duration::from_secs(60),
        }
    }
}

/// The `[plugins.kvx]` table (each key overrides the `[workflows]` table's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvxFile {
    drift: Option<DriftAction>,
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    machine_wait: Option<Duration>,
}

/// What every KVX step shares: the adapters by region, and the settings.
pub(crate) struct Kvx {
    computes: BTreeMap<String, Arc<dyn Compute>>,
    clusters: BTreeMap<String, Arc<dyn Cluster>>,
    mailer: Arc<dyn Mailer>,
    default_region: String,
    config: KvxConfig,
}

impl Kvx {
    fn serves(&self, region: &str) -> bool {
        self.computes.contains_key(region)
    }

    fn compute(&self, region: &str) -> Result<&Arc<dyn Compute>, AdapterError> {
        self.computes
            .get(region)
            .ok_or_else(|| not_served(region, &self.computes))
    }

    fn cluster(&self, region: &str) -> Result<&Arc<dyn Cluster>, AdapterError> {
        self.clusters
            .get(region)
            .or_else(|| self.clusters.get("*"))
            .ok_or_else(|| not_served(region, &self.clusters))
    }
}

fn not_served<T: ?Sized>(region: &str, by: &BTreeMap<String, Arc<T>>) -> AdapterError {
    AdapterError::permanent(format!(
        "region {region} is not served by this engine (it serves {}); deploy an engine \
         configured for it, then retry the unit",
        by.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
    .with_code("region-not-served")
}

/// Calls an adapter for the unit in `ctx` with `token` (the unit's own, or the one that
/// launched the machine): the call is listed in the unit's history and counted in the metrics.
pub(crate) async fn call<T>(
    ctx: &setpoint_adapter::WorkContext,
    token: &IdempotencyToken,
    adapter: &'static str,
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, AdapterError>>,
) -> Result<T, AdapterError> {
    // Recorded before the call: an attempt that fails or times out made it all the same.
    ctx.record_call(format!("{adapter}:{operation} token={token}"));
    crate::metrics::adapter_call(adapter, operation, call).await
}

/// The declaration of the KVX kind.
pub fn kind() -> ResourceKind {
    ResourceKind::new(KIND, COLLECTION)
        .describe("A KVX store: a machine with a data volume, fronted by Kubernetes objects")
        .schema(
            1,
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "additionalProperties": false,
                "required": ["plan", "region", "size_gb", "owner_email"],
                "properties": {
                    "plan": { "enum": PLANS, "description": "the machine's size class" },
                    "region": {
                        "type": "string", "pattern": "^[a-z]{2}(-[a-z]+)+-[0-9]$",
                        "description": "where the machine runs; set at create"
                    },
                    "size_gb": {
                        "type": "integer", "minimum": 1, "maximum": 16384,
                        "description": "the data volume in GiB; it may grow, never shrink"
                    },
                    "owner_email": {
                        "type": "string", "format": "email", "maxLength": 254,
                        "description": "who is told about the instance's life cycle"
                    }
                }
            }),
        )
        .immutable(["region"])
        .check(|old, new| {
            let size = |v: &serde_json::Value| v.get("size_gb").and_then(serde_json::Value::as_i64);
            match (old.and_then(size), size(new)) {
                (Some(was), Some(now)) if now < was => vec![(
                    "size_gb".to_owned(),
                    format!(
                        "can only grow: the data volume has {was} GiB, and a volume cannot \
                         shrink (create a new instance and move the data to make it smaller)"
                    ),
                )],
                _ => Vec::new(),
            }
        })
        .with_secret_outputs()
        .create([
            StepDecl::new("machine", "kvx.create.ec2"),
            StepDecl::new("cluster", "kvx.create.k8s"),
            StepDecl::new("notify", "kvx.create.notify")
                .output("ready_mail")
                .beside(NOTIFIED),
        ])
        .update([
            StepDecl::new("machine", "kvx.update.ec2"),
            StepDecl::new("cluster", "kvx.update.k8s"),
            StepDecl::new("notify", "kvx.update.notify")
                .output("ready_mail")
                .beside(NOTIFIED),
        ])
        .delete([
            StepDecl::new("cluster", "kvx.delete.k8s"),
            StepDecl::new("machine", "kvx.delete.ec2"),
            StepDecl::new("notify", "kvx.delete.notify")
                .output("deleted_mail")
                .beside(NOTIFIED),
        ])
        .observe(
            // One DescribeInstances filter takes 200 launch tokens.
            StepDecl::new("observe", "kvx.observe")
                .output("machine")
                .beside(DRIFT_CHECKED)
                .batched(200),
        )
        .chain(
            "heal",
            [
                StepDecl::new("machine", "kvx.heal.ec2"),
                StepDecl::new("cluster", "kvx.heal.k8s"),
            ],
        )
        .chain(
            "rotate-credentials",
            [StepDecl::new("cluster", "kvx.rotate.k8s")],
        )
}

/// Whether the KVX kind can be declared with these adapters: all three (`Ok(true)`), none
/// (`Ok(false)`: the kind is off, and the API runs its stand-in kinds), or some, which is
/// refused with a message naming what is given and what is missing.
///
/// # Errors
/// [`PluginError::Config`] when only some are configured.
pub fn check_complete(compute: bool, cluster: bool, mailer: bool) -> Result<bool, PluginError> {
    let sections = [("ec2", compute), ("kubernetes", cluster), ("smtp", mailer)];
    if sections.iter().all(|(_, on)| *on) {
        return Ok(true);
    }
    if sections.iter().all(|(_, on)| !*on) {
        return Ok(false);
    }
    let names = |want: bool| {
        sections
            .iter()
            .filter(|(_, on)| *on == want)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join("], [")
    };
    Err(PluginError::Config {
        plugin: "kvx".into(),
        message: format!(
            "incomplete adapter configuration: [{}] given but [{}] missing. The KVX kind needs \
             all of [ec2], [kubernetes] and [smtp] (in the configuration file, or through \
             SETPOINT_AWS_REGION / SETPOINT_KUBERNETES_URL / SETPOINT_SMTP_URL with \
             SETPOINT_EMAIL_FROM); configure none of them to run only the setpoint.noop kind",
            names(true),
            names(false)
        ),
    })
}

/// The KVX plugin: declares the kind over the compute, cluster and mail services that the
/// adapter plugins before it provide (`dyn Compute` per region, `dyn Cluster` per region or
/// `*`, `dyn Mailer` as `default`).
#[derive(Debug, Default)]
pub struct KvxPlugin {
    config: KvxConfig,
}

impl KvxPlugin {
    /// The plugin with `config` (from the `[workflows]` table and flags).
    pub fn new(config: KvxConfig) -> Self {
        Self { config }
    }
}

impl Plugin for KvxPlugin {
    fn name(&self) -> &str {
        "kvx"
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        let file: KvxFile = cx.parse()?;
        if let Some(d) = file.drift {
            self.config.drift = d;
        }
        if let Some(w) = file.machine_wait {
            self.config.machine_wait = w;
        }
        Ok(())
    }

    fn register(&self, services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        let computes = services.all::<dyn Compute>();
        let clusters = services.all::<dyn Cluster>();
        let mailer = services.get::<dyn Mailer>("default");
        if !check_complete(!computes.is_empty(), !clusters.is_empty(), mailer.is_some())? {
            return Ok(());
        }
        let Some(mailer) = mailer else {
            return Ok(());
        };
        let default_region = services
            .get::<String>("compute.default-region")
            .map(|r| (*r).clone())
            .or_else(|| computes.keys().next().cloned())
            .unwrap_or_default();
        let kvx = Arc::new(Kvx {
            computes: computes.clone(),
            clusters: clusters.clone(),
            mailer,
            default_region,
            config: self.config.clone(),
        });
        for region in computes.keys() {
            if clusters.contains_key(region) || clusters.contains_key("*") {
                r.region(region.clone());
            }
        }
        r.kind(kind())?;
        use cluster::{ApplyCluster, ApplyMode, DeleteCluster, Mail, Notify};
        use machine::{MachineStep, Mode, ObserveBatch};
        let machine = |mode| {
            Arc::new(MachineStep {
                kvx: kvx.clone(),
                mode,
            })
        };
        let apply = |mode| {
            Arc::new(ApplyCluster {
                kvx: kvx.clone(),
                mode,
            })
        };
        let notify = |mail| {
            Arc::new(Notify {
                kvx: kvx.clone(),
                mail,
            })
        };
        r.step("kvx.create.ec2", machine(Mode::Create))?;
        r.step("kvx.create.k8s", apply(ApplyMode::Change))?;
        r.step("kvx.create.notify", notify(Mail::Ready))?;
        r.step("kvx.update.ec2", machine(Mode::Update))?;
        r.step("kvx.update.k8s", apply(ApplyMode::Change))?;
        r.step("kvx.update.notify", notify(Mail::Ready))?;
        r.step(
            "kvx.delete.k8s",
            Arc::new(DeleteCluster { kvx: kvx.clone() }),
        )?;
        r.step("kvx.delete.ec2", machine(Mode::Delete))?;
        r.step("kvx.delete.notify", notify(Mail::Deleted))?;
        r.batch_step(
            "kvx.observe",
            Arc::new(ObserveBatch {
                step: MachineStep {
                    kvx: kvx.clone(),
                    mode: Mode::Observe,
                },
            }),
        )?;
        r.step("kvx.heal.ec2", machine(Mode::Heal))?;
        r.step("kvx.heal.k8s", apply(ApplyMode::Heal))?;
        r.step("kvx.rotate.k8s", apply(ApplyMode::Rotate))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::KindCatalog;

    #[test]
    fn the_kvx_declaration_is_valid_and_checks_specs() {
        let mut c = KindCatalog::new();
        c.add(kind()).expect("valid");
        let k = c.get(KIND).expect("kind");
        let ok = json!({"plan": "kvx.small", "region": "us-west-2", "size_gb": 10,
                        "owner_email": "ops@example.com"});
        assert!(k.validate(&ok).is_empty(), "{:?}", k.validate(&ok));
        let bad = json!({"plan": "kvx.huge", "region": "mars", "size_gb": 0, "colour": 1});
        let paths: Vec<String> = k.validate(&bad).into_iter().map(|v| v.path).collect();
        assert_eq!(
            paths,
            ["colour", "owner_email", "plan", "region", "size_gb"]
        );
        assert_eq!(
            c.position("kvx.update.k8s").map(|p| p.chain.as_str()),
            Some("update")
        );
    }
}
