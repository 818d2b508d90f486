//! The DNS plugin: the `dns.zone` kind, a hosted zone and its records on AWS Route 53, over
//! the `setpoint-route53` adapter — a second kind of resource, written the way a platform
//! team writes one: a declaration, four steps, a configuration table.
//!
//! | chain   | steps (work kinds)                                                   |
//! |---------|----------------------------------------------------------------------|
//! | create  | zone (`dns.zone.create.zone`) → records (`dns.zone.create.records`)  |
//! | update  | records (`dns.zone.update.records`)                                  |
//! | delete  | delete: records, then the zone (`dns.zone.delete`)                   |
//! | observe | `dns.zone.observe`: drift (a record changed or gone) → `repair`      |
//! | repair  | zone (`dns.zone.repair.zone`) → records (`dns.zone.repair.records`)   |
//!
//! The create's zone is made with a `CallerReference` derived from the resource, so every
//! attempt of the create (and a delete that comes before the zone's id was recorded) finds the
//! same zone. Configured by `[plugins.dns]` (the adapter's `Route53Config`: `region`,
//! `endpoint_url`, …); without that table the kind is not declared.

use std::sync::Arc;

use serde_json::{Value, json};
use setpoint_adapter::{
    AdapterError, BoxFuture, ConditionStatus, IdempotencyToken, ResourceKind, Step, StepDecl,
    StepInput, StepResult, Then, WorkContext,
};
use setpoint_route53::{
    Drift, Route53Config, Route53Dns, ZoneInfo, ZoneRef, ZoneRequest, ZoneSpec,
};

use crate::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};

/// The kind's name.
pub const KIND: &str = "dns.zone";
/// The condition of the zone's records.
pub const SYNCED: &str = "Synced";
/// The condition of the resource as a whole.
pub const READY: &str = crate::kinds::conditions::READY;

/// The declaration of `dns.zone`.
pub fn kind() -> ResourceKind {
    let record = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["name", "type", "values"],
        "properties": {
            "name": { "type": "string", "maxLength": 253,
                      "description": "@ for the apex, a name relative to the zone, or an absolute one in it" },
            "type": { "enum": ["A", "AAAA", "CNAME", "TXT", "MX"] },
            "ttl": { "type": "integer", "minimum": 1, "maximum": 604800 },
            "values": { "type": "array", "minItems": 1, "maxItems": 100, "uniqueItems": true,
                        "items": { "type": "string", "minLength": 1, "maxLength": 4000 } },
            "set_identifier": { "type": "string", "pattern": "^[a-z0-9-]{1,40}$" },
            "weight": { "type": "integer", "minimum": 0, "maximum": 255 }
        }
    });
    ResourceKind::new(KIND, "zones")
        .describe("A hosted zone and its records on AWS Route 53")
        .schema(
            1,
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "additionalProperties": false,
                "required": ["name"],
                "properties": {
                    "name": { "type": "string", "minLength": 1, "maxLength": 253,
                              "description": "the zone's domain; set at create" },
                    "comment": { "type": "string", "maxLength": 256 },
                    "records": { "type": "array", "maxItems": 500, "items": record }
                }
            }),
        )
        .immutable(["name"])
        .check(
            |_, new| match serde_json::from_value::<ZoneSpec>(new.clone()) {
                Ok(spec) => match spec.validate() {
                    Ok(()) => Vec::new(),
                    Err(invalid) => invalid
                        .0
                        .into_iter()
                        .map(|v| (v.field, v.description))
                        .collect(),
                },
                Err(e) => vec![(String::new(), e.to_string())],
            },
        )
        .create([
            StepDecl::new("zone", "dns.zone.create.zone"),
            StepDecl::new("records", "dns.zone.create.records"),
        ])
        .update([StepDecl::new("records", "dns.zone.update.records")])
        .delete([StepDecl::new("delete", "dns.zone.delete")])
        .observe(
            StepDecl::new("observe", "dns.zone.observe")
                .output("drift")
                .beside("DriftChecked"),
        )
        .chain(
            "repair",
            [
                StepDecl::new("zone", "dns.zone.repair.zone"),
                StepDecl::new("records", "dns.zone.repair.records"),
            ],
        )
}

/// The `CallerReference` of the zone a resource's create makes: derived from the resource, so
/// every attempt of the create, and a delete before the zone's id was recorded, names it.
fn create_reference(resource: uuid::Uuid) -> Result<IdempotencyToken, AdapterError> {
    IdempotencyToken::parse(format!("zone-{}", resource.simple()))
        .map_err(|e| AdapterError::permanent(format!("cannot name the zone's reference: {e}")))
}

fn request(input: &StepInput) -> Result<ZoneRequest, AdapterError> {
    Ok(ZoneRequest {
        resource_id: input.resource.id,
        tenant: input.resource.tenant.clone(),
        spec: input.spec()?,
    })
}

/// The zone the resource's outputs name, or the create's reference.
fn zone_ref(input: &StepInput) -> Result<ZoneRef, AdapterError> {
    let zone: Option<ZoneInfo> = input.output("zone");
    Ok(match zone {
        Some(z) => ZoneRef::id(z.id),
        None => ZoneRef::created_by(create_reference(input.resource.id)?),
    })
}

/// What the DNS steps share.
struct Dns {
    client: Route53Dns,
}

/// Which step.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Make (or find) the zone: with the create's reference, or, repairing, this unit's token.
    Zone { repair: bool },
    /// Bring the records to the spec.
    Records,
    /// Records, then the zone.
    Delete,
    /// Look for drift.
    Observe,
}

struct DnsStep {
    dns: Arc<Dns>,
    op: Op,
}

impl Step for DnsStep {
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            let client = &self.dns.client;
            match self.op {
                Op::Zone { repair } => {
                    let reference = if repair {
                        ctx.token.clone()
                    } else {
                        create_reference(input.resource.id)?
                    };
                    ctx.record_call(format!("route53:ensure_zone token={reference}"));
                    let zone = client
                        .ensure_zone(&reference, &request(input)?, &ctx.fence)
                        .await?;
                    Ok(StepResult::next().output(json!(zone)).condition(
                        READY,
                        ConditionStatus::False,
                        "Provisioning",
                        format!("zone {} exists; writing its records", zone.name),
                    ))
                }
                Op::Records => {
                    ctx.record_call(format!("route53:sync_records token={}", ctx.token));
                    let done = client
                        .sync_records(&ctx.token, &zone_ref(input)?, &request(input)?, &ctx.fence)
                        .await?;
                    Ok(StepResult::next()
                        .output(json!(done))
                        .condition(
                            SYNCED,
                            ConditionStatus::True,
                            "Applied",
                            format!(
                                "the zone's records match generation {}",
                                input.resource.generation
                            ),
                        )
                        .condition(
                            READY,
                            ConditionStatus::True,
                            "Available",
                            "the zone serves its records",
                        ))
                }
                Op::Delete => {
                    ctx.record_call(format!("route53:delete_zone token={}", ctx.token));
                    let done = client
                        .delete_zone(&ctx.token, &zone_ref(input)?, input.resource.id, &ctx.fence)
                        .await?;
                    Ok(StepResult::next().output(json!(done)).condition(
                        READY,
                        ConditionStatus::False,
                        "Deleted",
                        "the zone is gone",
                    ))
                }
                Op::Observe => {
                    ctx.record_call(format!("route53:observe_zone token={}", ctx.token));
                    let seen = client
                        .observe_zone(&ctx.token, &zone_ref(input)?, &request(input)?)
                        .await?;
                    if seen.drift.is_empty() {
                        return Ok(StepResult::next()
                            .output(json!({ "drift": [], "checked_at": chrono::Utc::now() }))
                            .condition(
                                SYNCED,
                                ConditionStatus::True,
                                "Applied",
                                "no drift found",
                            ));
                    }
                    let missing = seen.drift.iter().any(|d| matches!(d, Drift::ZoneMissing));
                    let what: Vec<Value> = seen.drift.iter().map(|d| json!(d)).collect();
                    Ok(StepResult::next()
                        .output(json!({ "drift": what, "checked_at": chrono::Utc::now() }))
                        .condition(
                            SYNCED,
                            ConditionStatus::False,
                            if missing {
                                "ZoneMissing"
                            } else {
                                "RecordsDrifted"
                            },
                            format!("{} difference(s) from the spec; repairing", what.len()),
                        )
                        .then(Then::Chain("repair".into())))
                }
            }
        })
    }
}

/// The DNS plugin.
#[derive(Default)]
pub struct DnsPlugin {
    config: Option<Route53Config>,
    credentials: Option<aws_sdk_route53::config::Credentials>,
    dns: Option<Arc<Dns>>,
}

impl DnsPlugin {
    /// The plugin, configured by `[plugins.dns]`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The plugin with this configuration and static credentials (a local stack against
    /// moto): its configuration step keeps them.
    pub fn with_config(
        config: Route53Config,
        credentials: Option<aws_sdk_route53::config::Credentials>,
    ) -> Self {
        Self {
            config: Some(config),
            credentials,
            dns: None,
        }
    }
}

impl Plugin for DnsPlugin {
    fn name(&self) -> &str {
        "dns"
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        if self.config.is_none() && cx.table().is_some() {
            let config: Route53Config = cx.parse()?;
            config.validate().map_err(|e| cx.error(e.to_string()))?;
            self.config = Some(config);
        }
        Ok(())
    }

    fn provide<'a>(
        &'a mut self,
        services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            let Some(config) = self.config.clone() else {
                return Ok(());
            };
            let fail = |e: &dyn std::fmt::Display| PluginError::Start {
                plugin: "dns".into(),
                message: e.to_string(),
            };
            let client = match &self.credentials {
                Some(c) => {
                    let client = config
                        .client_with_credentials(c.clone())
                        .await
                        .map_err(|e| fail(&e))?;
                    Route53Dns::from_client(client, config)
                }
                None => Route53Dns::connect(config).await.map_err(|e| fail(&e))?,
            };
            // Every engine on the database shares the changes' budget (docs/budgets.md).
            let client = match services.get::<dyn setpoint_adapter::Budgets>(crate::plugin::BUDGETS)
            {
                Some(budgets) => client.with_budgets(budgets),
                None => client,
            };
            self.dns = Some(Arc::new(Dns { client }));
            Ok(())
        })
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        let Some(dns) = &self.dns else {
            return Ok(());
        };
        r.kind(kind())?;
        let step = |op| {
            Arc::new(DnsStep {
                dns: dns.clone(),
                op,
            })
        };
        r.step("dns.zone.create.zone", step(Op::Zone { repair: false }))?;
        r.step("dns.zone.create.records", step(Op::Records))?;
        r.step("dns.zone.update.records", step(Op::Records))?;
        r.step("dns.zone.delete", step(Op::Delete))?;
        r.step("dns.zone.observe", step(Op::Observe))?;
        r.step("dns.zone.repair.zone", step(Op::Zone { repair: true }))?;
        r.step("dns.zone.repair.records", step(Op::Records))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::KindCatalog;

    #[test]
    fn the_zone_declaration_checks_specs_with_the_adapters_rules() {
        let mut c = KindCatalog::new();
        c.add(kind()).expect("valid");
        let k = c.get(KIND).expect("kind");
        let ok = json!({"name": "example.com", "records": [
            {"name": "www", "type": "A", "ttl": 60, "values": ["192.0.2.1"]}]});
        assert!(
            k.check_spec(None, &ok).is_empty(),
            "{:?}",
            k.check_spec(None, &ok)
        );
        let bad = json!({"name": "example.com", "records": [
            {"name": "www", "type": "A", "values": ["not-an-ip"]}], "colour": 1});
        let v = k.check_spec(None, &bad);
        assert_eq!(v[0].path, "colour", "{v:?}");
        let bad_value = json!({"name": "example.com", "records": [
            {"name": "www", "type": "A", "values": ["not-an-ip"]}]});
        let v = k.check_spec(None, &bad_value);
        assert!(v.iter().any(|v| v.path.starts_with("records[0]")), "{v:?}");
        let renamed = json!({"name": "other.com"});
        let v = k.check_spec(Some(&json!({"name": "example.com"})), &renamed);
        assert_eq!(v[0].path, "name");
    }
}
