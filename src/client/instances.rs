//! `setpoint instances …`: KVX instances through `InstanceService`.

use clap::Subcommand;
use tonic::codec::Streaming;

use crate::api::convert;
use crate::api::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, GetConnectionDetailsRequest, GetInstanceRequest,
    Instance, InstanceSpec, InstanceStatus, ListInstancesRequest, RotateInstanceCredentialsRequest,
    UpdateInstanceRequest, WatchInstanceRequest,
};

use super::progress::{self, Watched};
use super::{Client, ClientArgs, ClientError, json_error, new_request_id};

/// `setpoint instances …`.
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Create an instance.
    Create {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name (a DNS label).
        name: String,
        /// Plan: kvx.small, kvx.medium or kvx.large.
        #[arg(long)]
        plan: String,
        /// Region, e.g. eu-west-1.
        #[arg(long)]
        region: String,
        /// Storage size in GiB.
        #[arg(long)]
        size_gb: i32,
        /// The owner's e-mail address.
        #[arg(long)]
        owner_email: String,
        /// Request id (default: a new UUID; pass the same one to retry safely).
        #[arg(long)]
        request_id: Option<String>,
        /// Mark the change as bulk (a mass update, an import): its work runs after users'
        /// changes and drift checks.
        #[arg(long)]
        bulk: bool,
        /// Follow progress until the instance is READY or FAILED.
        #[arg(long)]
        wait: bool,
    },
    /// Show an instance.
    Get {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name or `tenants/{t}/instances/{name}`.
        name: String,
    },
    /// List instances.
    List {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Only this status (creating, ready, updating, deleting, failed).
        #[arg(long)]
        status: Option<String>,
        /// Instances per page (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
    /// Change an instance's plan, size or owner.
    Update {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name or full resource name.
        name: String,
        /// New plan.
        #[arg(long)]
        plan: Option<String>,
        /// New size in GiB.
        #[arg(long)]
        size_gb: Option<i32>,
        /// New owner e-mail.
        #[arg(long)]
        owner_email: Option<String>,
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
    /// Delete an instance.
    Delete {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
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
    /// Print an instance's credentials (its tenant's tokens only; never shown by get or list).
    Credentials {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name or full resource name.
        name: String,
    },
    /// Replace an instance's credentials (the old ones stop working).
    RotateCredentials {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name or full resource name.
        name: String,
        /// Request id (default: a new UUID).
        #[arg(long)]
        request_id: Option<String>,
        /// Follow progress until READY or FAILED.
        #[arg(long)]
        wait: bool,
    },
    /// Follow an instance's state changes until it is deleted (Ctrl-C to stop).
    Watch {
        /// Server.
        #[command(flatten)]
        conn: ClientArgs,
        /// Short name or full resource name.
        name: String,
        /// Stop when the instance is READY, FAILED or DELETED.
        #[arg(long)]
        until_done: bool,
    },
}

/// `tenants/-/instances/{name}` for a short name (the server reads `-` as the caller's tenant).
pub fn full_name(name: &str) -> String {
    if name.starts_with("tenants/") {
        name.to_owned()
    } else {
        format!("tenants/-/instances/{name}")
    }
}

fn status_name(s: i32) -> &'static str {
    InstanceStatus::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn is_done(i: &Instance) -> bool {
    matches!(
        InstanceStatus::try_from(i.status),
        Ok(InstanceStatus::Ready | InstanceStatus::Failed | InstanceStatus::Deleted)
    ) && !i.has_active_work
}

fn instance_json(i: &Instance) -> serde_json::Value {
    let spec = i.spec.clone().unwrap_or_default();
    serde_json::json!({
        "name": i.name,
        "uid": i.uid,
        "spec": convert::spec_to_json(&spec),
        "status": status_name(i.status),
        "generation": i.generation,
        "observed_generation": i.observed_generation,
        "observed": i.observed.as_ref().map(convert::struct_to_json),
        "has_active_work": i.has_active_work,
        "active_work_id": i.active_work_id,
        "last_error": i.last_error,
        "create_time": i.create_time.as_ref().map(|t| t.to_string()),
        "update_time": i.update_time.as_ref().map(|t| t.to_string()),
    })
}

/// An instance as a person reads it: name and status, spec, identity, then what the workers
/// observed (machine, endpoint, conditions) as far as they got, and the last error.
fn instance_text(i: &Instance) -> String {
    use std::fmt::Write;
    let spec = i.spec.clone().unwrap_or_default();
    let mut out = format!("{}  {}\n", i.name, status_name(i.status));
    let _ = writeln!(
        out,
        "  plan {}  region {}  size {} GiB  owner {}",
        spec.plan, spec.region, spec.size_gb, spec.owner_email
    );
    let _ = writeln!(
        out,
        "  uid {}  generation {} (observed {}){}",
        i.uid,
        i.generation,
        i.observed_generation,
        if i.active_work_id != 0 {
            format!("  work {}", i.active_work_id)
        } else {
            String::new()
        }
    );
    let observed = i
        .observed
        .as_ref()
        .map(convert::struct_to_json)
        .unwrap_or_default();
    let text = |v: &serde_json::Value, key: &str| match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    };
    if let Some(m) = observed.get("machine").filter(|m| m.is_object()) {
        let _ = writeln!(
            out,
            "  machine {} ({}, {})  private ip {}",
            text(m, "instance_id"),
            text(m, "instance_type"),
            text(m, "state"),
            text(m, "private_ip")
        );
    }
    if let Some(e) = observed.get("endpoint").and_then(|e| e.as_str()) {
        let _ = writeln!(out, "  endpoint {e}");
    }
    for c in observed
        .get("conditions")
        .and_then(|c| c.as_array())
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
    if !i.last_error.is_empty() {
        let _ = writeln!(out, "  last error: {}", i.last_error);
    }
    out
}

/// Opens the watch of instance `name`.
async fn watch(client: &mut Client, name: &str) -> Result<Streaming<Instance>, ClientError> {
    let req = client.req(WatchInstanceRequest {
        name: name.to_owned(),
    });
    Ok(client.inner.watch_instance(req).await?.into_inner())
}

async fn finish_change(
    client: &mut Client,
    answer: Instance,
    wait: bool,
    json: bool,
) -> Result<(), ClientError> {
    let name = answer.name.clone();
    progress::finish_change(answer, wait, json, watch(client, &name)).await
}

impl Watched for Instance {
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
        self.status == InstanceStatus::Failed as i32
    }
    fn json(&self) -> serde_json::Value {
        instance_json(self)
    }
    fn text(&self) -> String {
        instance_text(self)
    }
}

/// Runs `setpoint instances …`.
///
/// # Errors
/// Connection failures, refused calls (printed with their field violations), a FAILED
/// instance after `--wait`.
pub async fn run_instances(cmd: InstancesCommand) -> Result<(), ClientError> {
    match cmd {
        InstancesCommand::Create {
            conn,
            name,
            plan,
            region,
            size_gb,
            owner_email,
            request_id,
            bulk,
            wait,
        } => {
            let mut c = Client::connect(&conn).await?;
            let req = c.req(CreateInstanceRequest {
                parent: String::new(),
                instance_id: name,
                instance: Some(Instance {
                    spec: Some(InstanceSpec {
                        plan,
                        region,
                        size_gb,
                        owner_email,
                    }),
                    ..Instance::default()
                }),
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = c.inner.create_instance(req).await?.into_inner();
            finish_change(&mut c, answer, wait, conn.json).await
        }
        InstancesCommand::Get { conn, name } => {
            let mut c = Client::connect(&conn).await?;
            let req = c.req(GetInstanceRequest {
                name: full_name(&name),
            });
            progress::print(&c.inner.get_instance(req).await?.into_inner(), conn.json);
            Ok(())
        }
        InstancesCommand::List {
            conn,
            status,
            page_size,
        } => {
            let mut c = Client::connect(&conn).await?;
            let status_filter = match status {
                None => 0,
                Some(s) => InstanceStatus::from_str_name(&s.to_ascii_uppercase())
                    .ok_or_else(|| ClientError::Usage(format!("unknown status {s:?}")))?
                    as i32,
            };
            let mut page_token = String::new();
            let mut all = Vec::new();
            loop {
                let req = c.req(ListInstancesRequest {
                    parent: String::new(),
                    page_size,
                    page_token: page_token.clone(),
                    status_filter,
                });
                let page = c.inner.list_instances(req).await?.into_inner();
                all.extend(page.instances);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if conn.json {
                let v: Vec<_> = all.iter().map(instance_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<40} {:<10} {:<11} {:<15} {:>8}",
                    "NAME", "STATUS", "PLAN", "REGION", "SIZE_GB"
                );
                for i in &all {
                    let s = i.spec.clone().unwrap_or_default();
                    println!(
                        "{:<40} {:<10} {:<11} {:<15} {:>8}",
                        i.name,
                        status_name(i.status),
                        s.plan,
                        s.region,
                        s.size_gb
                    );
                }
            }
            Ok(())
        }
        InstancesCommand::Update {
            conn,
            name,
            plan,
            size_gb,
            owner_email,
            request_id,
            bulk,
            wait,
        } => {
            let mut c = Client::connect(&conn).await?;
            let mut paths = Vec::new();
            if plan.is_some() {
                paths.push("spec.plan".to_owned());
            }
            if size_gb.is_some() {
                paths.push("spec.size_gb".to_owned());
            }
            if owner_email.is_some() {
                paths.push("spec.owner_email".to_owned());
            }
            if paths.is_empty() {
                return Err(ClientError::Usage(
                    "nothing to change: pass --plan, --size-gb or --owner-email".into(),
                ));
            }
            let req = c.req(UpdateInstanceRequest {
                instance: Some(Instance {
                    name: full_name(&name),
                    spec: Some(InstanceSpec {
                        plan: plan.unwrap_or_default(),
                        region: String::new(),
                        size_gb: size_gb.unwrap_or_default(),
                        owner_email: owner_email.unwrap_or_default(),
                    }),
                    ..Instance::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = c.inner.update_instance(req).await?.into_inner();
            finish_change(&mut c, answer, wait, conn.json).await
        }
        InstancesCommand::Delete {
            conn,
            name,
            request_id,
            bulk,
            wait,
        } => {
            let mut c = Client::connect(&conn).await?;
            let req = c.req(DeleteInstanceRequest {
                name: full_name(&name),
                request_id: new_request_id(request_id),
                bulk,
            });
            let answer = c.inner.delete_instance(req).await?.into_inner();
            finish_change(&mut c, answer, wait, conn.json).await
        }
        InstancesCommand::Credentials { conn, name } => {
            let c = Client::connect(&conn).await?;
            let req = c.req(GetConnectionDetailsRequest {
                name: full_name(&name),
            });
            let details = c
                .resources()
                .get_connection_details(req)
                .await?
                .into_inner();
            let v = details
                .details
                .as_ref()
                .map(convert::struct_to_json)
                .unwrap_or_default();
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
        InstancesCommand::RotateCredentials {
            conn,
            name,
            request_id,
            wait,
        } => {
            let mut c = Client::connect(&conn).await?;
            let req = c.req(RotateInstanceCredentialsRequest {
                name: full_name(&name),
                request_id: new_request_id(request_id),
            });
            let answer = c.inner.rotate_instance_credentials(req).await?.into_inner();
            finish_change(&mut c, answer, wait, conn.json).await
        }
        InstancesCommand::Watch {
            conn,
            name,
            until_done,
        } => {
            let mut c = Client::connect(&conn).await?;
            let stream = watch(&mut c, &full_name(&name)).await?;
            progress::follow(stream, until_done, conn.json).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_shows_its_machine_endpoint_and_conditions_as_far_as_they_are_known() {
        let observed = serde_json::json!({
            "machine": { "instance_id": "i-0abc", "instance_type": "t3.small",
                         "state": "running", "private_ip": "10.0.0.7" },
            "endpoint": "kvx-1.setpoint-acme.svc:7379",
            "conditions": [
                { "type": "MachineAvailable", "status": "True", "reason": "MachineRunning",
                  "message": "machine i-0abc runs at 10.0.0.7" },
                { "type": "Ready", "status": "False", "reason": "Parked",
                  "message": "run setpoint work retry 7" }
            ]
        });
        let i = Instance {
            name: "tenants/acme/instances/db-1".into(),
            status: InstanceStatus::Failed as i32,
            observed: Some(convert::json_to_struct(&observed)),
            last_error: "quota exceeded".into(),
            ..Instance::default()
        };
        let text = instance_text(&i);
        assert!(
            text.starts_with("tenants/acme/instances/db-1  FAILED\n"),
            "{text}"
        );
        for line in [
            "  machine i-0abc (t3.small, running)  private ip 10.0.0.7\n",
            "  endpoint kvx-1.setpoint-acme.svc:7379\n",
            "  MachineAvailable=True  MachineRunning: machine i-0abc runs at 10.0.0.7\n",
            "  Ready=False  Parked: run setpoint work retry 7\n",
            "  last error: quota exceeded\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }

        // Before any worker ran: no machine, no endpoint, no conditions, and no error.
        let new = Instance {
            name: "tenants/acme/instances/db-2".into(),
            ..Instance::default()
        };
        assert_eq!(instance_text(&new).lines().count(), 3);
    }
}
