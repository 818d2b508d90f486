//! `setpoint resources …`: resources of any kind through `ResourceService`, with the same
//! live progress and `--json` as `setpoint instances`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Map, Value};
use tonic::codec::Streaming;
use tonic::transport::Channel;

use super::progress::{self, Watched};
use super::{Client, ClientArgs, ClientError, json_error, new_request_id};
use crate::api::convert::{json_to_struct, struct_to_json};
use crate::api::proto::resource_service_client::ResourceServiceClient;
use crate::api::proto::{
    CreateResourceRequest, DeleteResourceRequest, GetConnectionDetailsRequest, GetResourceRequest,
    ListKindsRequest, ListResourcesRequest, Resource, ResourceStatus, UpdateResourceRequest,
    WatchResourceRequest,
};

/// `setpoint resources …`.
#[derive(Debug, Subcommand)]
pub enum ResourcesCommand {
    /// The kinds the server offers (to this token), with their collections; `--json` adds
    /// each kind's schema.
    Kinds {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
    },
    /// Create a resource.
    Create {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (`setpoint resources kinds` lists them).
        #[arg(long)]
        kind: String,
        /// Short name (a DNS label).
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Request id (default: a new UUID; pass the same one to retry safely).
        #[arg(long)]
        request_id: Option<String>,
        /// Mark the change as bulk (a mass update, an import): its work runs after users'
        /// changes and drift checks.
        #[arg(long)]
        bulk: bool,
        /// Follow progress until the resource is READY or FAILED.
        #[arg(long)]
        wait: bool,
    },
    /// Show a resource.
    Get {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (not needed with a full name).
        #[arg(long)]
        kind: Option<String>,
        /// Short name or `tenants/{t}/{collection}/{name}`.
        name: String,
    },
    /// List resources of a kind.
    List {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// The kind.
        #[arg(long)]
        kind: String,
        /// Only this status (creating, ready, updating, deleting, failed).
        #[arg(long)]
        status: Option<String>,
        /// Resources per page (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
    /// Change a resource's spec: `--set` changes one field each (only those), `--spec-file`
    /// replaces the whole spec.
    Update {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (not needed with a full name).
        #[arg(long)]
        kind: Option<String>,
        /// Short name or full resource name.
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Request id (default: a new UUID).
        #[arg(long)]
        request_id: Option<String>,
        /// Mark the change as bulk (a mass update, an import): its work runs after users'
        /// changes and drift checks.
        #[arg(long)]
        bulk: bool,
        /// Follow progress until READY or FAILED.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a resource (a chain in flight is superseded).
    Delete {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (not needed with a full name).
        #[arg(long)]
        kind: Option<String>,
        /// Short name or full resource name.
        name: String,
        /// Request id (default: a new UUID).
        #[arg(long)]
        request_id: Option<String>,
        /// Mark the change as bulk (a mass update, an import): its work runs after users'
        /// changes and drift checks.
        #[arg(long)]
        bulk: bool,
        /// Follow progress until it is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Follow a resource's changes until it is deleted (Ctrl-C to stop).
    Watch {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (not needed with a full name).
        #[arg(long)]
        kind: Option<String>,
        /// Short name or full resource name.
        name: String,
        /// Stop when the resource is READY, FAILED or DELETED.
        #[arg(long)]
        until_done: bool,
    },
    /// Print a resource's connection details (its secret outputs; the tenant's own only).
    ConnectionDetails {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Its kind (not needed with a full name).
        #[arg(long)]
        kind: Option<String>,
        /// Short name or full resource name.
        name: String,
    },
}

/// Where a spec comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct SpecArgs {
    /// A JSON file holding the spec (`-` reads standard input).
    #[arg(long)]
    pub spec_file: Option<PathBuf>,
    /// `path=value`: one field of the spec (`ttl=300`, `comment=hello`, `a.b=true`); the value
    /// is read as JSON when it is JSON (numbers, true, [..], {..}), else as a string. Repeat
    /// for more fields; use --spec-file for lists of objects.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
}

impl SpecArgs {
    /// The spec the flags describe (the file, then each `--set` over it) and the dotted
    /// paths that `--set` named.
    fn build(&self) -> Result<(Option<Value>, Vec<String>), ClientError> {
        let base = match &self.spec_file {
            None => None,
            Some(p) => {
                let text = if p.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(p).map_err(|e| {
                        ClientError::Usage(format!("cannot read {}: {e}", p.display()))
                    })?
                };
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| ClientError::Usage(format!("{} is not JSON: {e}", p.display())))?;
                if !v.is_object() {
                    return Err(ClientError::Usage(format!(
                        "{} must hold a JSON object (the spec)",
                        p.display()
                    )));
                }
                Some(v)
            }
        };
        let mut paths = Vec::new();
        if self.set.is_empty() {
            return Ok((base, paths));
        }
        let mut spec = base.unwrap_or_else(|| Value::Object(Map::new()));
        for item in &self.set {
            let (path, raw) = item.split_once('=').ok_or_else(|| {
                ClientError::Usage(format!("--set {item:?}: write path=value, e.g. ttl=300"))
            })?;
            let keys: Vec<&str> = path.split('.').collect();
            if keys.iter().any(|k| k.is_empty()) {
                return Err(ClientError::Usage(format!(
                    "--set {item:?}: the path must be field names joined by dots"
                )));
            }
            let value = serde_json::from_str::<Value>(raw)
                .unwrap_or_else(|_| Value::String(raw.to_owned()));
            set_path(&mut spec, &keys, value);
            paths.push(path.to_owned());
        }
        Ok((Some(spec), paths))
    }
}

/// Sets the value at `keys` in `spec`, making objects on the way.
fn set_path(spec: &mut Value, keys: &[&str], value: Value) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let mut target = spec;
    for key in parents {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        let Some(map) = target.as_object_mut() else {
            return;
        };
        target = map
            .entry((*key).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(map) = target.as_object_mut() {
        map.insert((*last).to_owned(), value);
    }
}

/// `name` as a full resource name: as given when it is one, else in the collection of
/// `kind` (asked of the server) in the caller's tenant.
async fn full_name(
    client: &Client,
    rs: &mut ResourceServiceClient<Channel>,
    kind: Option<&str>,
    name: &str,
) -> Result<String, ClientError> {
    if name.starts_with("tenants/") {
        return Ok(name.to_owned());
    }
    let kind = kind.ok_or_else(|| {
        ClientError::Usage(format!(
            "say which kind {name:?} is (--kind), or give its full name tenants/-/{{collection}}/{name}"
        ))
    })?;
    let kinds = rs
        .list_kinds(client.req(ListKindsRequest {}))
        .await?
        .into_inner();
    let found = kinds.kinds.iter().find(|k| k.name == kind).ok_or_else(|| {
        let names: Vec<&str> = kinds.kinds.iter().map(|k| k.name.as_str()).collect();
        ClientError::Usage(format!(
            "the server offers no kind {kind:?} to this token (it offers: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ))
    })?;
    Ok(format!("tenants/-/{}/{name}", found.collection))
}

fn status_name(s: i32) -> &'static str {
    ResourceStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .strip_prefix("RESOURCE_STATUS_")
                .unwrap_or("UNKNOWN")
        })
        .unwrap_or("UNKNOWN")
}

fn is_done(r: &Resource) -> bool {
    matches!(
        ResourceStatus::try_from(r.status),
        Ok(ResourceStatus::Ready | ResourceStatus::Failed | ResourceStatus::Deleted)
    ) && !r.has_active_work
}

fn resource_json(r: &Resource) -> Value {
    serde_json::json!({
        "name": r.name,
        "uid": r.uid,
        "kind": r.kind,
        "spec": r.spec.as_ref().map(struct_to_json),
        "status": status_name(r.status),
        "generation": r.generation,
        "observed_generation": r.observed_generation,
        "observed": r.observed.as_ref().map(struct_to_json),
        "has_active_work": r.has_active_work,
        "active_work_id": r.active_work_id,
        "last_error": r.last_error,
        "create_time": r.create_time.as_ref().map(|t| t.to_string()),
        "update_time": r.update_time.as_ref().map(|t| t.to_string()),
    })
}

/// A resource as a person reads it: name, status, kind, spec, outputs, conditions, error.
fn resource_text(r: &Resource) -> String {
    use std::fmt::Write;
    let mut out = format!("{}  {}\n", r.name, status_name(r.status));
    let _ = writeln!(
        out,
        "  kind {}  uid {}  generation {} (observed {}){}",
        r.kind,
        r.uid,
        r.generation,
        r.observed_generation,
        if r.active_work_id != 0 {
            format!("  work {}", r.active_work_id)
        } else {
            String::new()
        }
    );
    if let Some(spec) = &r.spec {
        let _ = writeln!(out, "  spec {}", struct_to_json(spec));
    }
    let observed = r.observed.as_ref().map(struct_to_json).unwrap_or_default();
    if let Some(map) = observed.as_object() {
        for (k, v) in map.iter().filter(|(k, _)| *k != "conditions") {
            let _ = writeln!(out, "  {k} {v}");
        }
    }
    let text = |v: &Value, key: &str| match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    for c in observed
        .get("conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let _ = writeln!(
            out,
            "  {}={}  {}: {}",
            text(c, "type"),
            text(c, "status"),
            text(c, "reason"),
            text(c, "message")
        );
    }
    if !r.last_error.is_empty() {
        let _ = writeln!(out, "  last error: {}", r.last_error);
    }
    out
}

/// Opens the watch of resource `name`.
async fn watch(
    client: &Client,
    rs: &mut ResourceServiceClient<Channel>,
    name: &str,
) -> Result<Streaming<Resource>, ClientError> {
    let req = client.req(WatchResourceRequest {
        name: name.to_owned(),
    });
    Ok(rs.watch_resource(req).await?.into_inner())
}

async fn finish_change(
    client: &Client,
    rs: &mut ResourceServiceClient<Channel>,
    answer: Resource,
    wait: bool,
    json: bool,
) -> Result<(), ClientError> {
    let name = answer.name.clone();
    progress::finish_change(answer, wait, json, watch(client, rs, &name)).await
}

impl Watched for Resource {
    fn name(&self) -> &str {
        &self.name
    }
    fn status_text(&self) -> &'static str {
        status_name(self.status)
    }
    fn generations(&self) -> (i64, i64) {
        (self.observed_generation, self.generation)
    }
    fn active_work(&self) -> Option<i64> {
        self.has_active_work.then_some(self.active_work_id)
    }
    fn last_error(&self) -> &str {
        &self.last_error
    }
    fn is_done(&self) -> bool {
        is_done(self)
    }
    fn is_failed(&self) -> bool {
        self.status == ResourceStatus::Failed as i32
    }
    fn json(&self) -> Value {
        resource_json(self)
    }
    fn text(&self) -> String {
        resource_text(self)
    }
}

/// Runs `setpoint resources …`.
///
/// # Errors
/// Connection failures, refused calls (printed with their field violations), bad flags, a
/// FAILED resource after `--wait`.
pub async fn run(cmd: ResourcesCommand) -> Result<(), ClientError> {
    match cmd {
        ResourcesCommand::Kinds { conn } => {
            let c = Client::connect(&conn).await?;
            let kinds = c
                .resources()
                .list_kinds(c.req(ListKindsRequest {}))
                .await?
                .into_inner();
            if conn.json {
                let v: Vec<Value> = kinds
                    .kinds
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "name": k.name, "collection": k.collection,
                            "description": k.description,
                            "schema": k.schema.as_ref().map(struct_to_json),
                            "schema_version": k.schema_version,
                            "immutable_fields": k.immutable_fields,
                            "has_connection_details": k.has_connection_details,
                            "observed": k.observed,
                        })
                    })
                    .collect();
                println!("{}", Value::Array(v));
            } else {
                println!("{:<20} {:<16} DESCRIPTION", "KIND", "COLLECTION");
                for k in &kinds.kinds {
                    println!("{:<20} {:<16} {}", k.name, k.collection, k.description);
                }
            }
            Ok(())
        }
        ResourcesCommand::Create {
            conn,
            kind,
            name,
            spec,
            request_id,
            bulk,
            wait,
        } => {
            let (spec, _) = spec.build()?;
            let spec = spec.ok_or_else(|| {
                ClientError::Usage(
                    "give the spec: --spec-file f.json and/or --set path=value (see the kind's \
                     schema with `setpoint resources kinds --json`)"
                        .into(),
                )
            })?;
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let req = c.req(CreateResourceRequest {
                parent: String::new(),
                kind,
                resource_id: name,
                resource: Some(Resource {
                    spec: Some(json_to_struct(&spec)),
                    ..Resource::default()
                }),
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = rs.create_resource(req).await?.into_inner();
            finish_change(&c, &mut rs, answer, wait, conn.json).await
        }
        ResourcesCommand::Get { conn, kind, name } => {
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let name = full_name(&c, &mut rs, kind.as_deref(), &name).await?;
            let r = rs
                .get_resource(c.req(GetResourceRequest { name }))
                .await?
                .into_inner();
            progress::print(&r, conn.json);
            Ok(())
        }
        ResourcesCommand::List {
            conn,
            kind,
            status,
            page_size,
        } => {
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let status_filter = match status {
                None => 0,
                Some(s) => ResourceStatus::from_str_name(&format!(
                    "RESOURCE_STATUS_{}",
                    s.to_ascii_uppercase()
                ))
                .ok_or_else(|| ClientError::Usage(format!("unknown status {s:?}")))?
                    as i32,
            };
            let mut page_token = String::new();
            let mut all = Vec::new();
            loop {
                let req = c.req(ListResourcesRequest {
                    parent: String::new(),
                    kind: kind.clone(),
                    page_size,
                    page_token: page_token.clone(),
                    status_filter,
                });
                let page = rs.list_resources(req).await?.into_inner();
                all.extend(page.resources);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if conn.json {
                let v: Vec<Value> = all.iter().map(resource_json).collect();
                println!("{}", Value::Array(v));
            } else {
                println!("{:<48} {:<10} GENERATION", "NAME", "STATUS");
                for r in &all {
                    println!(
                        "{:<48} {:<10} {}/{}",
                        r.name,
                        status_name(r.status),
                        r.observed_generation,
                        r.generation
                    );
                }
            }
            Ok(())
        }
        ResourcesCommand::Update {
            conn,
            kind,
            name,
            spec,
            request_id,
            bulk,
            wait,
        } => {
            let whole = spec.spec_file.is_some();
            let (spec, set_paths) = spec.build()?;
            let spec = spec.ok_or_else(|| {
                ClientError::Usage(
                    "nothing to change: pass --set path=value or --spec-file f.json".into(),
                )
            })?;
            let paths = if whole {
                vec!["spec".to_owned()]
            } else {
                set_paths.iter().map(|p| format!("spec.{p}")).collect()
            };
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let name = full_name(&c, &mut rs, kind.as_deref(), &name).await?;
            let req = c.req(UpdateResourceRequest {
                resource: Some(Resource {
                    name,
                    spec: Some(json_to_struct(&spec)),
                    ..Resource::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = rs.update_resource(req).await?.into_inner();
            finish_change(&c, &mut rs, answer, wait, conn.json).await
        }
        ResourcesCommand::Delete {
            conn,
            kind,
            name,
            request_id,
            bulk,
            wait,
        } => {
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let name = full_name(&c, &mut rs, kind.as_deref(), &name).await?;
            let req = c.req(DeleteResourceRequest {
                name,
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = rs.delete_resource(req).await?.into_inner();
            finish_change(&c, &mut rs, answer, wait, conn.json).await
        }
        ResourcesCommand::Watch {
            conn,
            kind,
            name,
            until_done,
        } => {
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let name = full_name(&c, &mut rs, kind.as_deref(), &name).await?;
            let stream = watch(&c, &mut rs, &name).await?;
            progress::follow(stream, until_done, conn.json).await?;
            Ok(())
        }
        ResourcesCommand::ConnectionDetails { conn, kind, name } => {
            let c = Client::connect(&conn).await?;
            let mut rs = c.resources();
            let name = full_name(&c, &mut rs, kind.as_deref(), &name).await?;
            let d = rs
                .get_connection_details(c.req(GetConnectionDetailsRequest { name }))
                .await?
                .into_inner();
            let v = d.details.as_ref().map(struct_to_json).unwrap_or_default();
            println!(
                "{}",
                if conn.json {
                    v.to_string()
                } else {
                    serde_json::to_string_pretty(&v).map_err(json_error)?
                }
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_flags_build_a_spec_and_name_their_paths() {
        let args = SpecArgs {
            spec_file: None,
            set: vec![
                "name=example.com".into(),
                "ttl=300".into(),
                "labels.team=dns".into(),
                "records=[]".into(),
            ],
        };
        let (spec, paths) = args.build().unwrap();
        assert_eq!(
            spec.unwrap(),
            json!({"name": "example.com", "ttl": 300, "labels": {"team": "dns"}, "records": []})
        );
        assert_eq!(paths, ["name", "ttl", "labels.team", "records"]);
        let bad = SpecArgs {
            spec_file: None,
            set: vec!["novalue".into()],
        };
        assert!(bad.build().is_err());
    }

    #[test]
    fn a_resource_reads_as_status_kind_spec_outputs_and_conditions() {
        let r = Resource {
            name: "tenants/acme/zones/shop".into(),
            kind: "dns.zone".into(),
            status: ResourceStatus::Ready as i32,
            spec: Some(json_to_struct(&json!({"name": "shop.example"}))),
            observed: Some(json_to_struct(&json!({
                "zone": {"id": "Z1"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Synced", "message": "ok"}]
            }))),
            ..Resource::default()
        };
        let text = resource_text(&r);
        assert!(
            text.starts_with("tenants/acme/zones/shop  READY\n"),
            "{text}"
        );
        assert!(text.contains("  kind dns.zone"), "{text}");
        assert!(text.contains("  zone {\"id\":\"Z1\"}\n"), "{text}");
        assert!(text.contains("  Ready=True  Synced: ok\n"), "{text}");
    }
}
