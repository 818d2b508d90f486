//! The end of a soak: wait until no unit is left to run, then check the world against the
//! database and the workload's record (see the module docs of [`super`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use setpoint_adapter::{Compute, ListMachinesRequest, ManagedMachine};
use sqlx::{PgConnection, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use uuid::Uuid;

use super::ChaosError;
use super::workload::Model;
use super::world::{REGION, TENANT, World};
use crate::kinds::conditions::{ConditionStatus, from_observed};
use crate::store::instances::{self, ResourceSummary};
use crate::store::work;

/// What the final checks found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    /// Instances READY at the generation the workload expects.
    pub ready: usize,
    /// Instances deleted (tombstones).
    pub deleted: usize,
    /// Instances held by a parked unit that is not a notification: (name, unit kind and
    /// reason).
    pub parked: Vec<(String, String)>,
    /// Notifications parked as outcome-unknown (each shows as `Notified=Unknown`).
    pub uncertain_notifications: usize,
    /// Mails in the Maildir.
    pub mails: usize,
    /// Live machines beyond one per live instance, or of deleted instances.
    pub extra_machines: usize,
    /// Managed machines of no instance the database knows.
    pub orphan_machines: usize,
    /// Kubernetes objects of deleted instances or of an older generation.
    pub stale_objects: usize,
    /// Mails sent more than once (the same `Message-ID` again).
    pub duplicate_mails: usize,
    /// Machines the engines' orphan sweep terminated as `extra` (a second machine of a live
    /// instance) during the run.
    pub swept_extra: usize,
    /// Machines the engines' orphan sweep terminated as `unknown-resource`.
    pub swept_unknown: usize,
    /// Everything that is wrong, one sentence each.
    pub violations: Vec<String>,
}

impl Findings {
    /// Duplicates of any kind: extra machines, stale objects, mails sent twice.
    pub fn duplicates(&self) -> usize {
        self.extra_machines + self.orphan_machines + self.stale_objects + self.duplicate_mails
    }
}

/// Drift checks keep coming while drift checks are on and never hold their resource: the
/// units that count as open are all but parked ones and these.
const DRIFT_KIND: &str = "kvx.observe";

/// Waits until no unit is open and no instance has active work (twice in a row, a second
/// apart), supervising the engines meanwhile; returns how long after `since` that was, or
/// `None` when it did not happen within `settle`.
pub async fn wait_converged(
    pool: &PgPool,
    since: Instant,
    settle: Duration,
    world: &mut World,
) -> Result<Option<Duration>, ChaosError> {
    let mut quiet_since: Option<Instant> = None;
    loop {
        world.supervise();
        let open = open_count(pool).await;
        match open {
            Ok(0) => match quiet_since {
                Some(q) if q.elapsed() >= Duration::from_secs(1) => {
                    return Ok(Some(q.duration_since(since)));
                }
                Some(_) => {}
                None => quiet_since = Some(Instant::now()),
            },
            _ => quiet_since = None,
        }
        if since.elapsed() > settle {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until an orphan sweep has run after this call began (by the database's clock), for
/// at most `limit`; false when none did (a binary without the sweep, or a database error).
pub async fn wait_swept(pool: &PgPool, limit: Duration) -> bool {
    let Ok(start) = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT now()")
        .fetch_one(pool)
        .await
    else {
        return false;
    };
    let until = Instant::now() + limit;
    loop {
        let last: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT max(swept_at) FROM orphan_sweeps")
                .fetch_one(pool)
                .await
                .ok()
                .flatten();
        if last.is_some_and(|t| t > start) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Machines the orphan sweep terminated, by reason: (extra, unknown-resource); zeros when the
/// sweep's tables do not exist.
async fn swept_counts(pool: &PgPool) -> (usize, usize) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason, count(*) FROM orphan_machines WHERE action = 'terminated' GROUP BY reason",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let of = |reason: &str| {
        rows.iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| usize::try_from(*n).unwrap_or(0))
    };
    (of("extra"), of("unknown-resource"))
}

/// Open units plus resources with active work; an error while PostgreSQL restarts.
async fn open_count(pool: &PgPool) -> Result<i64, ChaosError> {
    let mut conn = pool.acquire().await?;
    let (units, _) = work::work_open(&mut conn, DRIFT_KIND, 0).await?;
    Ok(units + instances::resources_active_count(&mut conn).await?)
}

/// The open units, one line each (for a report of a soak that did not converge).
pub async fn open_units(pool: &PgPool) -> Result<Vec<String>, ChaosError> {
    let mut conn = pool.acquire().await?;
    let (total, rows) = work::work_open(&mut conn, DRIFT_KIND, 20).await?;
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "unit {} {} {} attempt {}: {}",
                r.id,
                r.kind,
                r.state,
                r.attempt,
                r.last_error.as_deref().unwrap_or_default()
            )
        })
        .collect();
    if total > rows.len() as i64 {
        out.push(format!("and {} more", total - rows.len() as i64));
    }
    Ok(out)
}

/// One instance as the database holds it.
type DbInstance = ResourceSummary;

/// Checks machines, Kubernetes objects, mails, statuses and generations.
pub async fn check(world: &World, model: &Model) -> Result<Findings, ChaosError> {
    let mut f = Findings::default();
    let pool = world.pool();
    let mut conn = pool.acquire().await?;
    let rows = instances::resources_of_tenant_kind(&mut conn, TENANT, "kvx.instance").await?;
    let by_name: BTreeMap<String, DbInstance> =
        rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    let parked = parked_units(&mut conn).await?;
    drop(conn);

    // Statuses and generations against what the workload had accepted.
    for (name, inst) in &model.instances {
        let Some(row) = by_name.get(name) else {
            if inst.uid.is_some() {
                f.violations
                    .push(format!("{name} was created (answered) but has no row"));
            }
            continue;
        };
        if inst.deleted {
            if row.deleted {
                f.deleted += 1;
            } else {
                f.violations.push(format!(
                    "{name} was deleted (answered) but is {} without a tombstone",
                    row.status
                ));
            }
            continue;
        }
        if row.deleted {
            f.violations
                .push(format!("{name} is deleted although no delete was accepted"));
            continue;
        }
        if row.generation != inst.generation {
            f.violations.push(format!(
                "{name} is at generation {}, but {} updates were accepted (expected {})",
                row.generation,
                inst.generation - 1,
                inst.generation
            ));
        }
        match row.status.as_str() {
            "READY" => f.ready += 1,
            other => match parked
                .get(&row.id)
                .and_then(|units| units.iter().find(|(kind, _)| !kind.ends_with(".notify")))
            {
                Some((kind, reason)) => f.parked.push((name.clone(), format!("{kind}: {reason}"))),
                None => f.violations.push(format!(
                    "{name} is {other}, and no unit of it is parked on a step"
                )),
            },
        }
    }
    for name in by_name.keys() {
        if !model.instances.contains_key(name) {
            f.violations.push(format!(
                "instance {name} exists but was never created by the workload"
            ));
        }
    }
    // Uncertain notifications: a parked notify unit, the instance READY (or DELETED) with
    // `Notified=Unknown`.
    let by_id: HashMap<Uuid, &DbInstance> = by_name.values().map(|r| (r.id, r)).collect();
    for (resource, units) in &parked {
        for (kind, _) in units.iter().filter(|(k, _)| k.ends_with(".notify")) {
            f.uncertain_notifications += 1;
            let Some(row) = by_id.get(resource) else {
                continue;
            };
            if row.status == "FAILED" {
                f.violations.push(format!(
                    "{} is FAILED because of its notification ({kind}): a notification must \
                     not hold its resource",
                    row.name
                ));
            }
            let notified = from_observed(&row.observed)
                .into_iter()
                .find(|c| c.kind == "Notified");
            if !row.deleted && notified.as_ref().map(|c| c.status) != Some(ConditionStatus::Unknown)
            {
                f.violations.push(format!(
                    "{} has a parked {kind} unit but its Notified condition is {:?}",
                    row.name,
                    notified.map(|c| c.status)
                ));
            }
        }
    }

    (f.swept_extra, f.swept_unknown) = swept_counts(pool).await;
    check_machines(world, &by_name, &mut f).await?;
    check_objects(world, &by_name, &mut f).await?;
    check_mails(&world.maildir, &by_name, model, &mut f);
    Ok(f)
}

/// Parked units by resource: (kind, reason).
async fn parked_units(
    conn: &mut PgConnection,
) -> Result<HashMap<Uuid, Vec<(String, String)>>, ChaosError> {
    let mut out: HashMap<Uuid, Vec<(String, String)>> = HashMap::new();
    for (resource, kind, reason) in work::work_parked_of_resources(conn).await? {
        out.entry(resource).or_default().push((kind, reason));
    }
    Ok(out)
}

/// Exactly one live machine per live instance (the recorded one, running), none for deleted
/// ones, none of an instance the database does not know.
async fn check_machines(
    world: &World,
    rows: &BTreeMap<String, DbInstance>,
    f: &mut Findings,
) -> Result<(), ChaosError> {
    let machines = list_machines(world.moto_url()).await?;
    let mut by_resource: HashMap<Option<Uuid>, Vec<&ManagedMachine>> = HashMap::new();
    for m in &machines {
        by_resource.entry(m.resource_id).or_default().push(m);
    }
    let known: HashMap<Uuid, &DbInstance> = rows.values().map(|r| (r.id, r)).collect();
    for (resource, ms) in &by_resource {
        if resource.is_none_or(|r| !known.contains_key(&r)) {
            f.orphan_machines += ms.len();
            f.violations.push(format!(
                "{} managed machine(s) of no known instance: {:?}",
                ms.len(),
                ms.iter().map(|m| &m.instance_id).collect::<Vec<_>>()
            ));
        }
    }
    for row in rows.values() {
        let mine = by_resource.get(&Some(row.id)).cloned().unwrap_or_default();
        if row.deleted {
            if !mine.is_empty() {
                f.extra_machines += mine.len();
                f.violations.push(format!(
                    "deleted {} still has live machine(s) {:?}",
                    row.name,
                    mine.iter()
                        .map(|m| (&m.instance_id, m.state))
                        .collect::<Vec<_>>()
                ));
            }
            continue;
        }
        if mine.len() > 1 {
            f.extra_machines += mine.len() - 1;
            f.violations.push(format!(
                "{} has {} live machines: {:?}",
                row.name,
                mine.len(),
                mine.iter()
                    .map(|m| (&m.instance_id, m.state))
                    .collect::<Vec<_>>()
            ));
        }
        if row.status != "READY" {
            continue;
        }
        let recorded = row
            .observed
            .get("machine")
            .and_then(|m| m.get("instance_id"))
            .and_then(Value::as_str);
        match mine.as_slice() {
            [] => f
                .violations
                .push(format!("READY {} has no live machine", row.name)),
            [m] => {
                if recorded != Some(m.instance_id.as_str()) {
                    f.violations.push(format!(
                        "READY {}'s machine is {}, but its record names {recorded:?}",
                        row.name, m.instance_id
                    ));
                }
                if m.state != setpoint_adapter::InstanceState::Running {
                    f.violations.push(format!(
                        "READY {}'s machine {} is {}",
                        row.name, m.instance_id, m.state
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every live managed machine moto holds in the soak's region.
async fn list_machines(endpoint: &str) -> Result<Vec<ManagedMachine>, ChaosError> {
    let mut config = setpoint_ec2::Ec2Config::new(REGION);
    config.endpoint_url = Some(endpoint.to_owned());
    let credentials =
        aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "chaos");
    let client = config
        .client_with_credentials(credentials)
        .await
        .map_err(|e| ChaosError::Setup(format!("an EC2 client for the checks: {e}")))?;
    let compute = setpoint_ec2::Ec2Compute::from_client(client, config);
    let mut request = ListMachinesRequest {
        resource_id: None,
        page_token: None,
        page_size: Some(500),
    };
    let mut all = Vec::new();
    loop {
        let page = compute
            .list_managed_machines(&request)
            .await
            .map_err(|e| ChaosError::Setup(format!("listing moto's machines: {e}")))?;
        all.extend(page.machines);
        match page.next_page_token {
            Some(t) => request.page_token = Some(t),
            None => return Ok(all),
        }
    }
}

/// No object of a deleted instance; none older than its instance's generation; a READY
/// instance has its Deployment.
async fn check_objects(
    world: &World,
    rows: &BTreeMap<String, DbInstance>,
    f: &mut Findings,
) -> Result<(), ChaosError> {
    let by_id: HashMap<String, &DbInstance> =
        rows.values().map(|r| (r.id.to_string(), r)).collect();
    let mut deployments: HashMap<String, usize> = HashMap::new();
    for (path, kind) in [
        ("/api/v1/secrets", "Secret"),
        ("/api/v1/services", "Service"),
        ("/apis/apps/v1/deployments", "Deployment"),
    ] {
        let list = http_get_json(&world.k8s_url(), path).await?;
        for item in list["items"].as_array().into_iter().flatten() {
            let meta = &item["metadata"];
            let Some(uid) = meta["labels"][setpoint_kubernetes::names::LABEL_INSTANCE].as_str()
            else {
                continue;
            };
            let name = meta["name"].as_str().unwrap_or("?");
            let Some(row) = by_id.get(uid) else {
                f.stale_objects += 1;
                f.violations.push(format!(
                    "{kind} {name} belongs to no known instance ({uid})"
                ));
                continue;
            };
            if row.deleted {
                f.stale_objects += 1;
                f.violations.push(format!(
                    "{kind} {name} of deleted {} is still there",
                    row.name
                ));
                continue;
            }
            let generation = meta["annotations"][setpoint_kubernetes::names::ANNOTATION_GENERATION]
                .as_str()
                .and_then(|g| g.parse::<i64>().ok());
            if row.status == "READY" && generation.is_some_and(|g| g < row.generation) {
                f.stale_objects += 1;
                f.violations.push(format!(
                    "{kind} {name} of {} is of generation {generation:?}, the instance of {}",
                    row.name, row.generation
                ));
            }
            if kind == "Deployment" {
                *deployments.entry(uid.to_owned()).or_default() += 1;
            }
        }
    }
    for row in rows.values().filter(|r| !r.deleted && r.status == "READY") {
        if deployments.get(&row.id.to_string()).copied().unwrap_or(0) != 1 {
            f.violations.push(format!(
                "READY {} has {} Deployment(s)",
                row.name,
                deployments.get(&row.id.to_string()).copied().unwrap_or(0)
            ));
        }
    }
    Ok(())
}

/// No mail twice: counts each `Message-ID`; and no more "is ready" mails for an instance than
/// it had generations.
fn check_mails(
    maildir: &Path,
    rows: &BTreeMap<String, DbInstance>,
    model: &Model,
    f: &mut Findings,
) {
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut ready: HashMap<String, usize> = HashMap::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            f.mails += 1;
            let header = |name: &str| {
                text.lines()
                    .take_while(|l| !l.is_empty())
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default()
            };
            *ids.entry(header("Message-ID")).or_default() += 1;
            if header("Subject").ends_with("is ready")
                && let Some(id) = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Id:").map(|v| v.trim().to_owned()))
            {
                *ready.entry(id).or_default() += 1;
            }
        }
    }
    for (id, n) in &ids {
        if *n > 1 {
            f.duplicate_mails += n - 1;
            f.violations
                .push(format!("mail {id} was delivered {n} times"));
        }
    }
    for row in rows.values() {
        let generations = model.instances.get(&row.name).map_or(1, |i| i.generation);
        let got = ready.get(&row.id.to_string()).copied().unwrap_or(0);
        if got as i64 > generations {
            f.violations.push(format!(
                "{} got {got} \"is ready\" mails for {generations} generation(s)",
                row.name
            ));
        }
    }
}

/// GET `path` from the HTTP/1.1 server at `base` (`http://host:port`), as JSON.
async fn http_get_json(base: &str, path: &str) -> Result<Value, ChaosError> {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let fail = |e: String| ChaosError::Setup(format!("GET {base}{path}: {e}"));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no header end".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(fail(head.lines().next().unwrap_or_default().to_owned()));
    }
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).map_err(|e| fail(e.to_string()))
}

/// The body of a chunked HTTP/1.1 message.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
