//! Orphaned machines: machines tagged as managed by setpoint that belong to no live resource,
//! or that carry a live resource's tag but are not the machine its record names.
//!
//! A chain never leaves a machine behind on purpose, but some do stay: a create an operator
//! cancelled after its launch, a resource whose tombstone was pruned while a machine of it
//! somehow lived on, a database restored from before some launches, or a second launch of one
//! unit (a stale attempt past its lease launching while the live one did, where the provider
//! does not honour client tokens, as moto does not). Before a launch, the machine steps adopt or
//! terminate the machines tagged with *their* resource, and the EC2 adapter terminates extra
//! machines carrying the token it launches with; this sweep finds the rest. Every `[orphans] interval` one engine at a time (a session advisory lock, as
//! retention takes) lists the managed machines of every region it serves (tag
//! `setpoint:managed=true`), looks their resource ids up in `instances` (every kind, tombstones
//! included) and the machines their records name, and records each orphan in
//! `orphan_machines`, where `setpoint work orphans` and the gauge
//! `setpoint_orphan_machines{region}` read them. Kinds of orphan:
//!
//! | reason             | the machine's resource tag                      | terminated when configured |
//! |--------------------|-------------------------------------------------|----------------------------|
//! | `unknown-resource` | names a resource this database has no row of    | yes, once old enough       |
//! | `extra`            | names a live resource whose record names other machines, and no unit holds it | yes, once old enough |
//! | `deleted-resource` | names a deleted resource (a tombstone)          | never                      |
//! | `untagged`         | missing or not a resource id                    | never                      |
//!
//! A record names a machine by an output holding an `instance_id` (KVX's `machine`) or by
//! `ec2_instance_id` (the `ec2.ensure-instance` kind). A resource that records no machine, or
//! that a unit holds (a chain is running, or parked: it may be launching or replacing its
//! machine), has no extras: its machines are left to its chain and its next update or heal.
//!
//! # The risk of terminating
//! The database decides what is an orphan. A database restored from an older backup does not
//! know the resources created after the backup, so their machines — live, holding data — look
//! like `unknown-resource` orphans, and a resource that replaced its machine after the backup
//! names the old one, so its live machine looks `extra`; so do the machines of another setpoint
//! deployment sharing the cloud account and region. Hence: report only by default
//! (`terminate = false`); when terminating, only machines launched at least `min_age` (1 h)
//! before the sweep (by the database's clock), never an `unknown-resource` machine whose
//! resource has a row in any state, never an `extra` machine its resource's record names or
//! whose resource a unit holds, both re-checked just before each termination; and at most
//! `max_terminations` (10) per region and sweep — a sweep
//! that finds more terminates none of them and marks them `held` (a restored or foreign
//! database is the likely cause). Restore a database only with the sweep's `terminate` off,
//! and never point two deployments at one account and region with it on.

pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use setpoint_adapter::{
    BoxFuture, Compute, Fence, IdempotencyToken, ListMachinesRequest, ManagedMachine,
    TerminateRequest,
};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::plugin::{BackgroundTask, TaskContext};
use crate::store::StoreError;
use crate::store::instances::resources_known;
pub use store::{LiveRecord, OrphanRow, SweepRow};
use store::{
    orphan_lock_try, orphan_now, orphans_live_records, orphans_per_region, orphans_record,
    orphans_record_failure,
};

/// Default of [`OrphanConfig::interval`]: a sweep every 10 minutes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
/// Default of [`OrphanConfig::min_age`]: machines launched at least an hour before the sweep.
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(3600);
/// Default of [`OrphanConfig::max_terminations`].
pub const DEFAULT_MAX_TERMINATIONS: usize = 10;
/// Machines per page of a listing.
const PAGE_SIZE: u32 = 500;
/// The first sweep comes this long after start at most (or after the interval, if shorter).
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(60);

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum OrphanError {
    /// The configuration is out of range.
    #[error("invalid [orphans] configuration: {0}")]
    Config(String),
    /// The database failed; the sweep stopped and the next one starts over.
    #[error("orphan sweep: {0}")]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for OrphanError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// How the sweep runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanConfig {
    /// How often each engine tries a sweep ([`DEFAULT_INTERVAL`]); `None` turns the sweep off
    /// in this engine. Every engine tries; one at a time sweeps.
    pub interval: Option<Duration>,
    /// Terminate `unknown-resource` and `extra` orphans (default false: report only). See the
    /// module docs for the risk.
    pub terminate: bool,
    /// Only machines launched at least this long before the sweep are terminated
    /// ([`DEFAULT_MIN_AGE`]).
    pub min_age: Duration,
    /// Most machines one sweep terminates in a region; when more would be, none is
    /// ([`DEFAULT_MAX_TERMINATIONS`]).
    pub max_terminations: usize,
}

impl Default for OrphanConfig {
    fn default() -> Self {
        Self {
            interval: Some(DEFAULT_INTERVAL),
            terminate: false,
            min_age: DEFAULT_MIN_AGE,
            max_terminations: DEFAULT_MAX_TERMINATIONS,
        }
    }
}

impl OrphanConfig {
    /// Checks every value's range.
    ///
    /// # Errors
    /// [`OrphanError::Config`] naming the key.
    pub fn validate(&self) -> Result<(), OrphanError> {
        if self.interval.is_some_and(|i| i < Duration::from_secs(1)) {
            return Err(OrphanError::Config(
                "orphans.interval must be at least 1s, or \"off\"".into(),
            ));
        }
        if self.terminate && self.max_terminations == 0 {
            return Err(OrphanError::Config(
                "orphans.max_terminations must be at least 1 when orphans.terminate is true".into(),
            ));
        }
        Ok(())
    }

    /// The configuration of an `[orphans]` table (JSON), defaults for what it leaves out.
    ///
    /// # Errors
    /// Unknown keys and bad values, by name.
    pub fn from_table(table: Option<&serde_json::Value>) -> Result<Self, OrphanError> {
        let file: OrphansFile = match table {
            Some(t) => serde_json::from_value(t.clone())
                .map_err(|e| OrphanError::Config(format!("[orphans]: {e}")))?,
            None => OrphansFile::default(),
        };
        let mut c = Self::default();
        if let Some(i) = file.interval {
            c.interval = i;
        }
        if let Some(t) = file.terminate {
            c.terminate = t;
        }
        if let Some(a) = file.min_age {
            c.min_age = a;
        }
        if let Some(m) = file.max_terminations {
            c.max_terminations = m;
        }
        c.validate()?;
        Ok(c)
    }
}

/// The `[orphans]` table of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrphansFile {
    #[serde(default, deserialize_with = "crate::config::de_duration_or_off")]
    interval: Option<Option<Duration>>,
    terminate: Option<bool>,
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    min_age: Option<Duration>,
    max_terminations: Option<usize>,
}

/// Why a managed machine is an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Its resource tag names a resource this database has no row of.
    UnknownResource,
    /// Its resource tag names a live resource that no unit holds and whose record names other
    /// machines: a second launch for the resource (two attempts of one unit that both
    /// launched, where the provider does not honour client tokens).
    Extra,
    /// Its resource tag names a deleted resource (a tombstone).
    DeletedResource,
    /// Its resource tag is missing or not a resource id.
    Untagged,
}

impl Reason {
    /// As stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownResource => "unknown-resource",
            Reason::Extra => "extra",
            Reason::DeletedResource => "deleted-resource",
            Reason::Untagged => "untagged",
        }
    }

    /// Whether a sweep configured to terminate may terminate a machine orphaned so (once old
    /// enough, within the limit).
    pub fn terminable(self) -> bool {
        matches!(self, Reason::UnknownResource | Reason::Extra)
    }
}

/// Classifies `machines` against the resources the database knows (`id → deleted`) and the
/// records of the live ones among them (`live`): the orphans, with why. A machine of a live
/// resource is one only when it is an [`Reason::Extra`]: the resource's record is settled
/// ([`LiveRecord::settled`]), names at least one machine, and not this one.
pub fn classify<'a>(
    machines: &'a [ManagedMachine],
    known: &HashMap<uuid::Uuid, bool>,
    live: &HashMap<uuid::Uuid, LiveRecord>,
) -> Vec<(&'a ManagedMachine, Reason)> {
    machines
        .iter()
        .filter_map(|m| match m.resource_id {
            None => Some((m, Reason::Untagged)),
            Some(id) => match known.get(&id) {
                None => Some((m, Reason::UnknownResource)),
                Some(true) => Some((m, Reason::DeletedResource)),
                Some(false) => live
                    .get(&id)
                    .is_some_and(|r| r.is_extra(&m.instance_id))
                    .then_some((m, Reason::Extra)),
            },
        })
        .collect()
}

/// What a sweep did in one region.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    /// The region.
    pub region: String,
    /// Managed machines listed.
    pub machines: usize,
    /// The orphans found, as recorded.
    pub orphans: Vec<OrphanRow>,
    /// How many of them this sweep terminated.
    pub terminated: usize,
    /// Why the region could not be swept.
    pub error: Option<String>,
}

/// What one sweep did.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// False when another engine held the lock: this sweep did nothing.
    pub ran: bool,
    /// Per region, in name order.
    pub regions: Vec<RegionReport>,
}

/// The orphan sweep of one engine.
#[derive(Clone)]
pub struct OrphanSweep {
    pool: PgPool,
    computes: BTreeMap<String, Arc<dyn Compute>>,
    config: OrphanConfig,
}

impl std::fmt::Debug for OrphanSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrphanSweep")
            .field("regions", &self.computes.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OrphanSweep {
    /// A sweep of the machines of `computes` (by region) against the database of `pool`.
    ///
    /// # Errors
    /// [`OrphanError::Config`] when `config` is out of range.
    pub fn new(
        pool: PgPool,
        computes: BTreeMap<String, Arc<dyn Compute>>,
        config: OrphanConfig,
    ) -> Result<Self, OrphanError> {
        config.validate()?;
        Ok(Self {
            pool,
            computes,
            config,
        })
    }

    /// Sweeps every interval until `shutdown`; returns at once when the interval is off.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(interval) = self.config.interval else {
            tracing::info!("orphan sweep off ([orphans] interval = \"off\")");
            return;
        };
        if self.config.terminate && self.config.min_age < DEFAULT_MIN_AGE {
            tracing::warn!(min_age = ?self.config.min_age,
                "orphan sweep terminates machines younger than an hour: a launch still being \
                 recorded, or a database restored a little while ago, can lose live machines");
        }
        tracing::info!(interval = ?interval, terminate = self.config.terminate,
            min_age = ?self.config.min_age, regions = ?self.computes.keys().collect::<Vec<_>>(),
            "orphan sweep started");
        let mut wait = interval.min(FIRST_SWEEP_AFTER);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            match self.sweep(&shutdown).await {
                Ok(_) => crate::metrics::orphan_sweep("done"),
                Err(e) => {
                    crate::metrics::orphan_sweep("failed");
                    tracing::warn!(error = %e, "orphan sweep failed; the next one starts over");
                }
            }
            self.refresh_gauge().await;
        }
    }

    /// Runs one sweep now: takes the lock (or returns at once with [`SweepReport::ran`] false
    /// when another engine holds it), sweeps every region, records what it found.
    ///
    /// # Errors
    /// Database errors. A region whose machines cannot be listed is recorded as failed and the
    /// others are swept.
    pub async fn run_once(&self) -> Result<SweepReport, OrphanError> {
        let report = self.sweep(&CancellationToken::new()).await?;
        self.refresh_gauge().await;
        Ok(report)
    }

    async fn sweep(&self, stop: &CancellationToken) -> Result<SweepReport, OrphanError> {
        // A connection of its own, closed at the end: the lock belongs to its session, so it
        // goes with the connection whatever happens (a crash, an error, a broken connection).
        let mut conn = crate::store::connect_dedicated(&self.pool).await?;
        let result = self.locked_sweep(&mut conn, stop).await;
        let _ = conn.close().await;
        let report = result?;
        if !report.ran {
            crate::metrics::orphan_sweep("skipped");
            tracing::debug!("orphan sweep skipped: another engine is sweeping");
        }
        Ok(report)
    }

    async fn locked_sweep(
        &self,
        conn: &mut PgConnection,
        stop: &CancellationToken,
    ) -> Result<SweepReport, OrphanError> {
        if !orphan_lock_try(conn).await? {
            return Ok(SweepReport {
                ran: false,
                regions: Vec::new(),
            });
        }
        let mut regions = Vec::new();
        for (region, compute) in &self.computes {
            if stop.is_cancelled() {
                break;
            }
            let report = self
                .sweep_region(conn, region, compute.as_ref(), stop)
                .await?;
            regions.push(report);
        }
        Ok(SweepReport { ran: true, regions })
    }

    /// Sweeps one region: lists its managed machines, classifies them, terminates what may be
    /// terminated, records the result.
    async fn sweep_region(
        &self,
        conn: &mut PgConnection,
        region: &str,
        compute: &dyn Compute,
        stop: &CancellationToken,
    ) -> Result<RegionReport, OrphanError> {
        let machines = match list_all(compute, stop).await {
            Ok(m) => m,
            Err(e) => {
                let now = orphan_now(conn).await?;
                tracing::warn!(region, error = %e,
                    "orphan sweep: cannot list the region's managed machines; its last findings stay");
                orphans_record_failure(conn, region, now, &e.to_string()).await?;
                return Ok(RegionReport {
                    region: region.to_owned(),
                    machines: 0,
                    orphans: Vec::new(),
                    terminated: 0,
                    error: Some(e.to_string()),
                });
            }
        };
        // Read after the listing: a resource created since is found, so a machine is never
        // taken for an orphan because its resource was written after the check.
        let ids: Vec<uuid::Uuid> = machines.iter().filter_map(|m| m.resource_id).collect();
        let known: HashMap<uuid::Uuid, bool> =
            resources_known(conn, &ids).await?.into_iter().collect();
        let live_ids: Vec<uuid::Uuid> = known
            .iter()
            .filter(|(_, deleted)| !**deleted)
            .map(|(id, _)| *id)
            .collect();
        let live: HashMap<uuid::Uuid, LiveRecord> = orphans_live_records(conn, &live_ids)
            .await?
            .into_iter()
            .collect();
        let now = orphan_now(conn).await?;
        let found = classify(&machines, &known, &live);
        let min_age = chrono::TimeDelta::from_std(self.config.min_age)
            .map_err(|_| OrphanError::Config("orphans.min_age is too long".into()))?;
        let old_enough = |m: &ManagedMachine| launched_at(m).is_some_and(|t| t <= now - min_age);
        let terminable: Vec<&str> = found
            .iter()
            .filter(|(m, r)| self.config.terminate && r.terminable() && old_enough(m))
            .map(|(m, _)| m.instance_id.as_str())
            .collect();
        let held = terminable.len() > self.config.max_terminations;
        if held {
            tracing::error!(
                region,
                machines = terminable.len(),
                limit = self.config.max_terminations,
                "orphan sweep: more machines would be terminated than [orphans] max_terminations \
                 allows; terminating none. A database restored from a backup, or another \
                 deployment in this account and region, makes live machines look orphaned: \
                 check `setpoint work orphans`, then raise the limit if they really are"
            );
        }
        let token = IdempotencyToken::generate();
        let mut orphans = Vec::with_capacity(found.len());
        let mut terminated = 0;
        for (m, reason) in &found {
            let (action, note) = if !self.config.terminate || !reason.terminable() {
                ("reported", None)
            } else if !old_enough(m) {
                (
                    "waiting",
                    Some(match launched_at(m) {
                        Some(t) => format!("terminable from {}", (t + min_age).to_rfc3339()),
                        None => "the provider reports no launch time; never terminated".into(),
                    }),
                )
            } else if held {
                (
                    "held",
                    Some(format!(
                        "{} machines would be terminated, more than max_terminations ({})",
                        terminable.len(),
                        self.config.max_terminations
                    )),
                )
            } else if stop.is_cancelled() {
                ("reported", Some("the engine was shutting down".into()))
            } else {
                match self
                    .terminate(conn, region, compute, m, *reason, &token)
                    .await?
                {
                    Ok(()) => {
                        terminated += 1;
                        ("terminated", None)
                    }
                    Err(why) => ("failed", Some(why)),
                }
            };
            orphans.push(OrphanRow {
                region: region.to_owned(),
                instance_id: m.instance_id.clone(),
                state: m.state.to_string(),
                resource_id: m.resource_id,
                tenant: m.tenant.clone(),
                launch_token: m.launch_token.as_ref().map(|t| t.to_string()),
                launched_at: launched_at(m),
                reason: reason.as_str().to_owned(),
                action: action.to_owned(),
                note,
                first_seen_at: now,
                last_seen_at: now,
            });
        }
        let sweep = SweepRow {
            region: region.to_owned(),
            swept_at: now,
            machines: i32::try_from(machines.len()).unwrap_or(i32::MAX),
            orphans: i32::try_from(orphans.len()).unwrap_or(i32::MAX),
            terminated: terminated as i32,
            error: None,
        };
        orphans_record(conn, &sweep, &orphans).await?;
        if !orphans.is_empty() {
            tracing::warn!(
                region,
                machines = machines.len(),
                orphans = orphans.len(),
                terminated,
                "orphan sweep: managed machines that belong to no live resource, or extra machines \
                 of one (see `setpoint work orphans`)"
            );
        } else {
            tracing::info!(
                region,
                machines = machines.len(),
                "orphan sweep: no orphaned machines"
            );
        }
        crate::metrics::orphans_terminated(region, terminated as u64);
        Ok(RegionReport {
            region: region.to_owned(),
            machines: machines.len(),
            orphans,
            terminated,
            error: None,
        })
    }

    /// Terminates orphan `m` after checking once more what made it one: for an
    /// `unknown-resource` machine that its resource has no row, for an `extra` one that its
    /// resource is still live, settled, and names other machines. The outer error is the
    /// database's; the inner one the provider's refusal (or the re-check's finding), as text.
    async fn terminate(
        &self,
        conn: &mut PgConnection,
        region: &str,
        compute: &dyn Compute,
        m: &ManagedMachine,
        reason: Reason,
        token: &IdempotencyToken,
    ) -> Result<Result<(), String>, OrphanError> {
        match (reason, m.resource_id) {
            (Reason::UnknownResource, Some(id)) => {
                if !resources_known(conn, &[id]).await?.is_empty() {
                    return Ok(Err("its resource exists now; not terminated".into()));
                }
            }
            (Reason::Extra, Some(id)) => {
                let still = orphans_live_records(conn, &[id])
                    .await?
                    .into_iter()
                    .any(|(_, r)| r.is_extra(&m.instance_id));
                if !still {
                    return Ok(Err(
                        "its resource's record names it now, or a unit holds the resource; \
                         not terminated"
                            .into(),
                    ));
                }
            }
            (Reason::UnknownResource | Reason::Extra, None) => {
                return Ok(Err("no resource tag; not terminated".into()));
            }
            (Reason::DeletedResource | Reason::Untagged, _) => {
                return Ok(Err("never terminated for this reason".into()));
            }
        }
        match reason {
            Reason::Extra => tracing::warn!(region, machine = %m.instance_id,
                resource = ?m.resource_id, launch_token = ?m.launch_token.as_ref().map(|t| t.as_str()),
                token = %token,
                "orphan sweep: terminating an extra machine of a live resource (its record names another)"),
            _ => tracing::warn!(region, machine = %m.instance_id, resource = ?m.resource_id,
                token = %token,
                "orphan sweep: terminating a managed machine that belongs to no resource"),
        }
        let request = TerminateRequest {
            instance_id: Some(m.instance_id.clone()),
            resource_id: None,
            launch_token: None,
        };
        // The sweep is no unit of work and has no lease to lose: its fence never runs out.
        let fence = Fence::unbounded();
        match crate::metrics::adapter_call(
            "compute",
            "terminate_instance",
            compute.terminate_instance(token, &request, &fence),
        )
        .await
        {
            Ok(_) => Ok(Ok(())),
            Err(e) => {
                tracing::warn!(region, machine = %m.instance_id, error = %e,
                    "orphan sweep: terminating failed; the next sweep tries again");
                Ok(Err(e.message))
            }
        }
    }

    /// Sets `setpoint_orphan_machines{region}` from the recorded findings: every engine does,
    /// after every round it tried, so each reports the last sweep's findings whichever engine
    /// swept.
    async fn refresh_gauge(&self) {
        let Ok(mut conn) = self.pool.acquire().await else {
            return;
        };
        let Ok(counts) = orphans_per_region(&mut conn).await else {
            return;
        };
        for region in self.computes.keys() {
            let n = counts
                .iter()
                .find(|(r, _)| r == region)
                .map_or(0, |(_, n)| *n);
            crate::metrics::orphan_machines(region, n);
        }
    }
}

/// When `m` was launched, as the provider says.
fn launched_at(m: &ManagedMachine) -> Option<DateTime<Utc>> {
    m.launch_time.map(DateTime::<Utc>::from)
}

/// Every live managed machine of `compute`, page by page.
async fn list_all(
    compute: &dyn Compute,
    stop: &CancellationToken,
) -> Result<Vec<ManagedMachine>, setpoint_adapter::AdapterError> {
    let mut request = ListMachinesRequest {
        resource_id: None,
        page_token: None,
        page_size: Some(PAGE_SIZE),
    };
    let mut all = Vec::new();
    loop {
        let page = crate::metrics::adapter_call(
            "compute",
            "list_managed_machines",
            compute.list_managed_machines(&request),
        )
        .await?;
        all.extend(page.machines);
        match page.next_page_token {
            Some(t) if !stop.is_cancelled() => request.page_token = Some(t),
            _ => return Ok(all),
        }
    }
}

/// The sweep as the EC2 plugin registers it: built with the engine's pool when the engine
/// starts.
pub struct OrphanTask {
    computes: BTreeMap<String, Arc<dyn Compute>>,
    config: OrphanConfig,
}

impl OrphanTask {
    /// A sweep of `computes` (by region), as `config` says.
    pub fn new(computes: BTreeMap<String, Arc<dyn Compute>>, config: OrphanConfig) -> Self {
        Self { computes, config }
    }
}

impl BackgroundTask for OrphanTask {
    fn name(&self) -> &str {
        "orphan machines sweep"
    }

    fn run(self: Arc<Self>, cx: TaskContext) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            match OrphanSweep::new(cx.pool, self.computes.clone(), self.config.clone()) {
                Ok(sweep) => sweep.run(cx.shutdown).await,
                Err(e) => tracing::error!(error = %e, "orphan sweep not started"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use setpoint_adapter::InstanceState;
    use uuid::Uuid;

    use super::*;

    fn machine(id: &str, resource: Option<Uuid>) -> ManagedMachine {
        ManagedMachine {
            instance_id: id.into(),
            state: InstanceState::Running,
            resource_id: resource,
            launch_token: None,
            tenant: None,
            launch_time: Some(SystemTime::now()),
        }
    }

    #[test]
    fn machines_of_live_resources_are_never_orphans() {
        let (live, gone, unknown) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let machines = vec![
            machine("i-live", Some(live)),
            machine("i-gone", Some(gone)),
            machine("i-unknown", Some(unknown)),
            machine("i-untagged", None),
        ];
        let known = HashMap::from([(live, false), (gone, true)]);
        let found: Vec<(&str, Reason)> = classify(&machines, &known, &HashMap::new())
            .into_iter()
            .map(|(m, r)| (m.instance_id.as_str(), r))
            .collect();
        assert_eq!(
            found,
            vec![
                ("i-gone", Reason::DeletedResource),
                ("i-unknown", Reason::UnknownResource),
                ("i-untagged", Reason::Untagged),
            ]
        );
    }

    #[test]
    fn a_live_resource_has_extras_only_once_settled_and_recording_another_machine() {
        let (settled, busy, bare, ec2) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let machines = vec![
            machine("i-recorded", Some(settled)),
            machine("i-extra", Some(settled)),
            machine("i-launching", Some(busy)),
            machine("i-unrecorded", Some(bare)),
            machine("i-ec2-extra", Some(ec2)),
        ];
        let known = HashMap::from([(settled, false), (busy, false), (bare, false), (ec2, false)]);
        let record = |machines: &[&str], settled| LiveRecord {
            machines: machines.iter().map(|m| (*m).to_owned()).collect(),
            settled,
        };
        let live = HashMap::from([
            (settled, record(&["i-recorded"], true)),
            // A unit holds it: the machine it launches is not recorded yet.
            (busy, record(&["i-old"], false)),
            // Records no machine: left to its chain, its next update or heal.
            (bare, record(&[], true)),
            (ec2, record(&["i-ec2"], true)),
        ]);
        let found: Vec<(&str, Reason)> = classify(&machines, &known, &live)
            .into_iter()
            .map(|(m, r)| (m.instance_id.as_str(), r))
            .collect();
        assert_eq!(
            found,
            vec![("i-extra", Reason::Extra), ("i-ec2-extra", Reason::Extra)]
        );
        assert!(Reason::Extra.terminable() && Reason::UnknownResource.terminable());
        assert!(!Reason::DeletedResource.terminable() && !Reason::Untagged.terminable());
        assert_eq!(Reason::Extra.as_str(), "extra");
    }

    #[test]
    fn the_table_reads_with_defaults_and_refuses_unknown_keys() {
        let c = OrphanConfig::from_table(None).expect("defaults");
        assert_eq!(c, OrphanConfig::default());
        assert!(!c.terminate, "report only by default");
        let t = serde_json::json!({"interval": "off", "terminate": true, "min_age": "2h",
                                   "max_terminations": 3});
        let c = OrphanConfig::from_table(Some(&t)).expect("valid");
        assert_eq!(c.interval, None);
        assert!(c.terminate);
        assert_eq!(c.min_age, Duration::from_secs(7200));
        assert_eq!(c.max_terminations, 3);
        let bad = serde_json::json!({"terminte": true});
        let e = OrphanConfig::from_table(Some(&bad)).expect_err("unknown key");
        assert!(e.to_string().contains("terminte"), "{e}");
        let zero = serde_json::json!({"terminate": true, "max_terminations": 0});
        assert!(OrphanConfig::from_table(Some(&zero)).is_err());
    }
}
